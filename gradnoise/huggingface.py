"""A Hugging Face ``transformers.TrainerCallback`` that runs :class:`gradnoise.Monitor`
inside ``Trainer``.

Optional extra: ``pip install 'gradnoise[huggingface]'``.

    from gradnoise.huggingface import GradNoiseTrainerCallback
    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[GradNoiseTrainerCallback(loss_fn, run_dir="runs/x")])

The callback sees the batches of each optimizer step through a forward pre-hook on the
model (``input_ids`` and ``labels`` of every micro-batch; ``batch_to_xy`` for other
layouts) and calls ``monitor.step`` in ``on_pre_optimizer_step``: after the backward passes,
before the update. ``Trainer`` clips the gradient before that (``max_grad_norm``); the
callback reads the gradient's norm before clipping (a hook after each accumulation) and
passes the clip coefficient as ``grad_scale``, so the statistics are of the unclipped
gradient. ``Trainer`` divides each micro-batch loss by the accumulation steps (the
monitor's default ``loss_scale``) for models whose loss it normalises by example count.
A model whose ``forward`` takes ``num_items_in_batch`` (or ``**kwargs``, as Hugging Face
models do) has its loss divided by ``Trainer``'s own count of label tokens instead, which
need not be the mean that ``loss_fn`` computes (for a causal LM built from a config it
counts the first position too, which no prediction targets): the monitor's hooks, which
read the scale of the user's loss from ``loss_scale``, would then be off by a constant
factor, so the callback measures such models in a separate pass (``mode="separate"``)
unless given a ``mode``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch

try:
    from transformers import TrainerCallback
except ImportError as exc:
    raise ImportError("gradnoise.huggingface needs transformers: pip install 'gradnoise[huggingface]'") from exc

from gradnoise._functional import is_measuring
from gradnoise.monitor import Monitor

__all__ = ["GradNoiseTrainerCallback"]


def _default_xy(args: tuple, kwargs: dict):
    x = kwargs.get("input_ids", args[0] if args else None)
    y = kwargs.get("labels")
    if x is None or y is None:
        raise ValueError("GradNoiseTrainerCallback expects input_ids and labels; pass batch_to_xy=callable for other layouts")
    return x, y


def _takes_loss_kwargs(model: torch.nn.Module) -> bool:
    """Whether ``Trainer`` would pass ``num_items_in_batch`` to the model's ``forward``."""
    params = inspect.signature(model.forward).parameters.values()
    return any(p.name == "num_items_in_batch" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class GradNoiseTrainerCallback(TrainerCallback):
    """Gradient noise (and sharpness) of a ``transformers.Trainer`` run, through
    :class:`gradnoise.Monitor`.

    Args:
        loss_fn: ``loss_fn(outputs, labels)``, mean-reduced, as the model's own loss (it
            reads ``outputs.logits``); used by the monitor's separate pass and ``λ_max``.
        batch_to_xy: ``(args, kwargs) → (inputs, targets)`` of a model call, for batches
            without ``input_ids``/``labels``.
        **monitor_kwargs: as :class:`gradnoise.Monitor` (``run_dir``, ``every``, ...).
    """

    def __init__(self, loss_fn: Callable, *, batch_to_xy: Callable | None = None, **monitor_kwargs: Any) -> None:
        self.loss_fn, self.split, self.monitor_kwargs = loss_fn, batch_to_xy or _default_xy, monitor_kwargs
        self.monitor: Monitor | None = None
        self._handles: list = []
        self._batches: list = []
        self._pre_clip: dict[int, float] = {}

    @property
    def history(self) -> list[dict]:
        return [] if self.monitor is None else self.monitor.history.records

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        monitor_kwargs = dict(self.monitor_kwargs)
        if "mode" not in monitor_kwargs and _takes_loss_kwargs(model):  # see the module docstring
            monitor_kwargs["mode"] = "separate"
        self.monitor = Monitor(model, self.loss_fn, accumulation_steps=args.gradient_accumulation_steps, **monitor_kwargs)
        self._handles.append(model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        if args.max_grad_norm and args.max_grad_norm > 0:
            for p in model.parameters():
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _on_forward(self, module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled() and not is_measuring():  # the Trainer's own calls
            self._batches.append(self.split(args, kwargs))

    def _on_grad(self, p: torch.Tensor) -> None:  # the accumulated gradient before clipping
        flat = p.grad.detach().reshape(-1)
        self._pre_clip[id(p)] = float(flat.double().dot(flat.double()))

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs) -> None:
        if self.monitor is None or not self._batches:
            return
        xs = torch.cat([x for x, _ in self._batches])
        ys = torch.cat([y for _, y in self._batches])
        self._batches = []
        scale = 1.0
        if self._pre_clip:  # clipping multiplied every gradient by one coefficient
            post = sum(float(p.grad.detach().double().pow(2).sum()) for p in model.parameters() if p.grad is not None)
            pre = sum(self._pre_clip.values())
            scale = math.sqrt(post / pre) if pre > 0 and post > 0 else 1.0
            self._pre_clip = {}
        self.monitor.step(xs, ys, optimizer=optimizer, grad_scale=scale)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.monitor is not None:
            self.monitor.close()
