"""The two-batch estimate of a training step from its micro-batches' gradients (gradient
accumulation) or its ranks' local gradients (DDP), observed by parameter hooks in the
user's own backward passes (McCandlish et al. 2018, App. A.1)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gradnoise._functional import is_measuring
from gradnoise.distributed import Group
from gradnoise.noise_scale import two_batch

__all__ = ["MicroBatches"]


def _sq(t: Tensor) -> Tensor:
    """``|t|²`` in one pass (no squared or float64 copy)."""
    flat = t.detach().reshape(-1)
    return flat.dot(flat)


class MicroBatches:
    """Squared norms of each backward pass's gradient (before accumulation or all-reduce)
    and the sizes of the model's forward passes, during armed steps.

    Args:
        model: the module whose forward passes are the micro-batches.
        params: the trainable parameters by name.
        armed: whether the current step is measured.
        loss_scale: the factor each micro-batch loss is multiplied by before ``backward()``.
        group: the process group when the gradients are all-reduced over ranks, else ``None``.
    """

    def __init__(self, model: nn.Module, params: dict[str, Tensor], *, armed, loss_scale: float,
                 group: Group | None) -> None:  # fmt: skip
        self.params, self.armed, self.loss_scale, self.group = params, armed, loss_scale, group
        self._handles = [p.register_hook(self._on_grad) for p in params.values()]
        self._handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        self.reset()

    def reset(self) -> None:
        self.sq: list[float] = []  # |g|² of each backward's gradient
        self.sizes: list[int] = []  # the size of each forward's batch
        self._pending_sq, self._pending_count = 0.0, 0  # of the backward in progress

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        first = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)  # model(**batch) too
        if self.armed() and torch.is_grad_enabled() and not is_measuring() and first is not None:
            self.sizes.append(first.shape[0])

    def _on_grad(self, g: Tensor) -> None:
        if self.armed():
            self._pending_sq = self._pending_sq + _sq(g).double()  # summed on the device, read once
            self._pending_count += 1
            if self._pending_count == len(self.params):  # all parameters of this backward seen
                self.sq.append(float(self._pending_sq) / self.loss_scale**2)
                self._pending_sq, self._pending_count = 0.0, 0

    def _micro_sizes(self, B: int, k: int) -> list[int]:
        if len(self.sizes) != k or sum(self.sizes) != B:
            raise ValueError(
                f"{k} micro-batches of sizes {self.sizes} do not make the batch of {B} given to "
                "step(): pass the whole batch of this optimizer step"
            )
        return self.sizes

    def local_small(self) -> float:
        """This rank's mean ``|g_j|²`` over its backward passes (0 when none was seen)."""
        return sum(self.sq) / len(self.sq) if self.sq else 0.0

    def record(self, B: int, factor: float, summed_small: float | None = None) -> dict:
        """The two-batch entries of a record: micro-batch (accumulation) or per-rank (DDP)
        gradients against ``.grad`` (divided by ``factor``); empty if none. Under DDP,
        ``summed_small`` is :meth:`local_small` summed over ranks when the caller has reduced
        it already (with the step's other statistics, in one all-reduce)."""
        if not self.sq:
            return {}
        k = len(self.sq)
        small = sum(self.sq) / k
        big = sum(float(_sq(p.grad)) for p in self.params.values() if p.grad is not None)
        big /= factor**2
        if self.group is not None:  # each rank's micro-batch gradients vs the all-reduced one
            if summed_small is None:
                summed_small = float(self.group.all_reduce(torch.tensor([small], dtype=torch.float64))[0])
            small = summed_small / self.group.size
            b, total = B / k, B * self.group.size  # k equal micro-batches per rank
        else:  # E mean_j|g_j|² = |G|² + tr Σ·h and E|(1/k)Σ_j g_j|² = |G|² + tr Σ·h/k, h = mean_j 1/b_j
            h = sum(1 / b for b in self._micro_sizes(B, k)) / k
            b, total = 1 / h, k / h
        if not 0 < b < total:
            return {}
        g2, tr = two_batch(small, big, b, total)
        return {"two_batch_trace_cov": tr, "two_batch_grad_norm_sq": g2, "two_batch_b_simple": tr / g2 if g2 > 0 else math.inf}
