"""The noise statistics of one training step from the monitor's step hooks (per-example
squared norms recorded in the user's backward pass) and the parameters' ``.grad``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gradnoise._moments import Moments, centred_m2, centred_sums, scaled_rows
from gradnoise.engine.step_hooks import StepHooks
from gradnoise.summary import LayerStats, summarise, summarise_scalars

__all__ = ["CancellationError", "HooksCannotMeasure", "StepStats", "preconditioned_step_stats", "step_stats"]


class HooksCannotMeasure(RuntimeError):
    """The hooks cannot give this step's per-example statistics: a module ran more than once
    per forward, or a layer ran on something other than the batch (``wpe(arange(T))``)."""


class CancellationError(FloatingPointError):
    """A parameter's centred sum ``Σ_i |g_i|² − B|ḡ|²`` cancelled below what its dtype
    resolves (:meth:`~gradnoise._moments.HostSums.cancelled`)."""


@dataclass(frozen=True)
class StepStats:
    """What a record needs of a step's statistics (hooks mode skips the per-parameter ones)."""

    trace_cov: float
    grad_norm_sq: float
    b_simple: float
    gsnr: float | None
    per_layer: dict[str, LayerStats]


def step_stats(hooks: StepHooks, params: dict[str, Tensor], numels: dict[str, int], B: int, factor: float,
               accumulation_steps: int) -> StepStats:  # fmt: skip
    """``tr Σ``, ``|G|²``, ``B_simple`` (and the GSNR with ``hooks.elementwise``) of a batch of
    ``B`` from the hooks and ``.grad``; ``factor`` (loss scale × accumulation steps) turns
    ``.grad`` into the mean gradient.

    Raises:
        RuntimeError: a hook failed, a module ran more often than once per micro-batch, a
            parameter has no gradient, or the hooks saw another number of examples than ``B``.
    """
    if hooks.failed:
        raise RuntimeError(f"a layer hook failed during backward: {hooks.failed}")
    hooks.flush()
    if hooks.off_batch:
        raise HooksCannotMeasure(
            f"layers {sorted(hooks.off_batch)[:3]} run on a tensor that does not depend on the batch (such as a "
            "position embedding on arange(T)): their per-example gradients need mode='separate'"
        )
    sizes = [t.shape[0] for t in next(iter(hooks.sq.values()), [])]
    if len(set(sizes)) > 1:  # .grad/factor is then not the mean over the examples
        raise ValueError(
            f"micro-batches of unequal sizes {sizes}: the accumulated gradient is not the mean over "
            "the examples, which the per-example statistics need; use equal micro-batches or "
            "mode='separate'"
        )
    several = [m for m, c in hooks.calls.items() if c > accumulation_steps]
    if several:
        raise HooksCannotMeasure(f"modules called more than once per forward {several[:3]}: use Monitor(mode='separate')")
    mean, m2, rows = {}, ({} if hooks.elementwise else None), []
    for name, p in params.items():
        if p.grad is None or name not in hooks.sq:
            raise RuntimeError(f"no gradient recorded for {name!r}: call step() after backward() and before zero_grad()")
        g = p.grad if not p.grad.requires_grad else p.grad.detach()
        parts = hooks.sq[name]
        s = parts[0] if len(parts) == 1 else torch.cat(parts)
        if s.shape[0] != B:
            raise HooksCannotMeasure(
                f"the hooks saw {s.shape[0]} examples of {name!r} but the batch has {B}: pass the whole "
                "batch of this optimizer step (or the layer does not run on the batch: use mode='separate')"
            )
        mean[name] = g
        rows.append(s)
        if m2 is not None:
            mean[name] = g = g if factor == 1 else g / factor
            m2[name] = centred_m2(hooks.sum_sq[name], g, B)
    # All parameters' scalars in a few stacked operations: Σ_i|g_i|² − B|ḡ|² per parameter
    # (.grad is the user's gradient: divided by the loss scale and accumulation steps on
    # the host scalars, unless the variance needs the mean itself).
    sq_rows, _, host = centred_sums(rows, list(mean.values()), B, mean_scale=1.0 if m2 is not None else 1.0 / factor)
    lost = [n for n, h in zip(params, host, strict=True) if h.cancelled(torch.finfo(params[n].dtype).eps)]
    if lost:
        raise CancellationError(f"the centred sums of {lost[:3]} cancel in {params[lost[0]].dtype}")
    if m2 is None:  # the scalars only: one transfer, no per-parameter tensors
        total, per_layer = summarise_scalars(numels, host, B, "hooks")
        return StepStats(total.trace_cov, total.grad_norm_sq, total.b_simple, None, per_layer)
    names = list(mean)
    tm2 = torch.tensor([h.trace_m2 for h in host], dtype=torch.float64, device=sq_rows.device)
    m = Moments(
        B, mean, dict(zip(names, tm2.unbind(), strict=True)), m2,
        dict(zip(names, scaled_rows(sq_rows).unbind(), strict=True)),
        0.0, dict.fromkeys(mean, "hooks"), {n: (h.trace_m2, h.mean_sq) for n, h in zip(names, host, strict=True)},
    )  # fmt: skip
    total, _, per_layer = summarise(m, per_param=False)
    return StepStats(total.trace_cov, total.grad_norm_sq, total.b_simple, total.gsnr, per_layer)


def preconditioned_step_stats(hooks: StepHooks, params: dict[str, Tensor], numels: dict[str, int], B: int,
                              factor: float) -> StepStats | None:  # fmt: skip
    """``tr(PΣ)``, ``GᵀPG`` and ``B_simple^P`` of the step (:mod:`gradnoise.preconditioner`)
    from the hooks' ``|g_i|²_P`` and ``√P ⊙ .grad``; ``None`` without a metric this step
    (an optimizer before its first step). Call after :func:`step_stats` (which flushes).

    Raises:
        CancellationError: as :func:`step_stats`.
    """
    weights = hooks.step_weights()
    if weights is None:
        return None
    if hooks.elementwise:  # Σ_i |g_i|²_P = ⟨P, Σ_i g_i²⟩ (only sums over examples are needed)
        weighted = torch._foreach_mul([hooks.sum_sq[n] for n in params], [weights[n] for n in params])
        rows = [w.sum(dtype=torch.float64).reshape(1) for w in weighted]
    else:
        rows = [torch.cat(hooks.sq_p[n]) if len(hooks.sq_p[n]) > 1 else hooks.sq_p[n][0] for n in params]
    grads = [p.grad.detach() for p in params.values()]
    weighted_grads = torch._foreach_mul(grads, [weights[n] for n in params])
    # |ḡ|²_P = ⟨P ⊙ ḡ, ḡ⟩, with .grad = factor · ḡ
    mean_sq = [torch.dot(w.reshape(-1), g.reshape(-1)).div_(factor * factor) for w, g in zip(weighted_grads, grads, strict=True)]
    _, _, host = centred_sums(rows, [], B, mean_sq=mean_sq)
    lost = [n for n, h in zip(params, host, strict=True) if h.cancelled(torch.finfo(params[n].dtype).eps)]
    if lost:
        raise CancellationError(f"the preconditioned centred sums of {lost[:3]} cancel in {params[lost[0]].dtype}")
    total, per_layer = summarise_scalars(numels, host, B, "hooks")
    return StepStats(total.trace_cov, total.grad_norm_sq, total.b_simple, None, per_layer)
