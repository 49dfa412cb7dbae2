"""A PyTorch Lightning callback that runs :class:`gradnoise.Monitor` inside ``Trainer``.

Optional extra: ``pip install 'gradnoise[lightning]'``.

    from gradnoise.lightning import GradNoiseCallback
    trainer = Trainer(callbacks=[GradNoiseCallback(loss_fn=nn.CrossEntropyLoss(), run_dir="runs/x")])

The callback keeps the batches of the current optimizer step (all micro-batches under
``accumulate_grad_batches``; Lightning divides each micro-batch loss by their number, which
is the monitor's default ``loss_scale``), and calls ``monitor.step`` in
``on_before_optimizer_step``: after the backward pass, before the update.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError("gradnoise.lightning needs Lightning: pip install 'gradnoise[lightning]'") from exc

from gradnoise.monitor import Monitor

__all__ = ["GradNoiseCallback"]


def _default_split(batch: Any):
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValueError("GradNoiseCallback expects (inputs, targets) batches; pass batch_to_xy=callable for other layouts")


class GradNoiseCallback(Callback):
    """Gradient noise (and sharpness) of a Lightning run, through :class:`gradnoise.Monitor`.

    Args:
        loss_fn: the mean-reduced loss of ``training_step`` (used by the separate mode and
            by ``λ_max``; the hooks mode only needs it to be mean-reduced).
        batch_to_xy: ``batch → (inputs, targets)`` for batches that are not pairs.
        **monitor_kwargs: as :class:`gradnoise.Monitor` (``run_dir``, ``every``,
            ``sharpness_every``, ``sharpness_data``, ``variance``, ...).
    """

    def __init__(self, loss_fn: Callable, *, batch_to_xy: Callable | None = None, **monitor_kwargs) -> None:
        super().__init__()
        self.loss_fn, self.split = loss_fn, batch_to_xy or _default_split
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self._pending: list = []

    @property
    def history(self) -> list[dict]:
        return [] if self.monitor is None else self.monitor.history.records

    def on_fit_start(self, trainer, pl_module) -> None:
        k = getattr(trainer, "accumulate_grad_batches", 1) or 1
        self.monitor = Monitor(pl_module, self.loss_fn, accumulation_steps=k, **self.monitor_kwargs)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._pending.append(self.split(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is None or not self._pending:
            return
        xs = torch.cat([x for x, _ in self._pending])
        ys = torch.cat([y for _, y in self._pending])
        self._pending = []
        loss = trainer.callback_metrics.get("train_loss")
        self.monitor.step(xs, ys, optimizer=optimizer, loss=loss)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
