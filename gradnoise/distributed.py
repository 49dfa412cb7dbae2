"""``torch.distributed`` for the training monitor: the process group of a distributed run,
FSDP2's sharded gradients, and the one small all-reduce per measured step that every rank
joins — also a rank whose own measurement failed, so that no rank waits for one that will
never come — bounded by a timeout."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Group", "RankFailed", "group_of", "local"]


class RankFailed(RuntimeError):
    """Another rank could not measure this step (its own exception is in its log)."""


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 ``DTensor``, else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


@dataclass(frozen=True)
class Group:
    """The default process group of a distributed run, as the monitor sees it.

    Attributes:
        dist: the ``torch.distributed`` module.
        size, rank: world size and this rank.
        sharded: the parameters are FSDP2 ``DTensor`` shards (their ``.grad`` too).
        timeout: seconds a collective waits for the other ranks before raising.
    """

    dist: Any
    size: int
    rank: int
    sharded: bool
    timeout: float

    def all_reduce(self, values: Tensor, *, failed: bool = False) -> Tensor:
        """The sum of ``values`` (float64, on the CPU) over ranks.

        Raises:
            RankFailed: another rank reported a failed measurement (``failed=True`` on it).
            TimeoutError: a rank did not join within ``timeout`` seconds (it crashed, or it
                skipped the measured step).
        """
        buf = torch.cat([values.detach().double().cpu(), torch.tensor([1.0 if failed else 0.0], dtype=torch.float64)])
        backend = self.dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = buf.to(device)
        work = self.dist.all_reduce(buf, async_op=True)
        try:
            done = work.wait(timeout=datetime.timedelta(seconds=self.timeout))
        except RuntimeError as exc:
            raise TimeoutError(
                f"rank {self.rank}: the other ranks did not join the monitor's all-reduce within {self.timeout:g} s "
                f"(a rank crashed, or did not call Monitor.step() on this step): {exc}"
            ) from exc
        if done is False:
            raise TimeoutError(f"rank {self.rank}: the other ranks did not join the monitor's all-reduce within {self.timeout:g} s")
        buf = buf.cpu()
        if buf[-1] > 0 and not failed:
            raise RankFailed(f"{int(buf[-1])} other rank(s) failed to measure this step (see their logs); the step is not recorded")
        return buf[:-1]


def group_of(params: dict[str, Tensor], timeout: float) -> Group | None:
    """The :class:`Group` when ``torch.distributed`` is initialised with more than one rank."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    sharded = any(hasattr(p, "to_local") for p in params.values())
    return Group(dist, dist.get_world_size(), dist.get_rank(), sharded, timeout)
