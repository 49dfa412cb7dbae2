"""The noise statistics of one training step from the monitor's step hooks (per-example
squared norms recorded in the user's backward pass) and the parameters' ``.grad``."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from gradnoise._coupling import mixed_error
from gradnoise._moments import (
    HostSums,
    Moments,
    centred_m2,
    centred_sums,
    scaled_rows,
    squared_norms,
)
from gradnoise.distributed import Group, local
from gradnoise.engine.step_hooks import StepHooks
from gradnoise.summary import LayerStats, summarise, summarise_scalars

__all__ = ["CancellationError", "HooksCannotMeasure", "StepStats", "global_step_stats", "preconditioned_step_stats",
           "step_stats"]  # fmt: skip


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
    loss: float | None = None  # the global batch's mean loss (global_step_stats, when given one)
    extra: tuple[float, ...] = ()  # global_step_stats: its ``extra`` values summed over ranks


def _check(hooks: StepHooks, accumulation_steps: int, distributed: bool = False) -> None:
    """What the hooks' norms need of the step: no failed hook, every layer on the batch and
    called once per micro-batch, micro-batches of equal size (rules applied here).
    ``distributed``: under DDP/FSDP, where ``mode='separate'`` would see one rank's batch
    only, the errors say what measures such a model instead."""
    separate = ("need mode='separate', which under DDP/FSDP would measure only this rank's batch: measure this model "
                "with gn.gradient_stats in one process, or (DDP) with Monitor(mode='two-batch')"
                if distributed else "need mode='separate'")  # fmt: skip
    if hooks.mixed:
        raise mixed_error()
    if hooks.failed:
        raise RuntimeError(f"a layer hook failed during backward: {hooks.failed}")
    hooks.flush()
    if hooks.off_batch:
        raise HooksCannotMeasure(
            f"layers {sorted(hooks.off_batch)[:3]} run on a tensor that does not depend on the batch (such as a "
            f"position embedding on arange(T)): their per-example gradients {separate}"
        )
    if hooks.outside:
        raise HooksCannotMeasure(
            f"parameters {sorted(hooks.outside)[:3]} are also used outside their layers' calls (such as an output "
            "embedding tied by hand, h @ wte.weight.T): the hooks see only part of their gradient; their per-example "
            f"gradients {separate}"
        )
    if hooks.unsupported:
        raise HooksCannotMeasure(
            f"RNN calls of {sorted(hooks.unsupported)[:3]} that the hooks cannot run again as torch ran them (dropout "
            "between layers in training, an input or output modified in place): their "
            f"per-example gradients {separate}"
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
        raise HooksCannotMeasure(f"modules called more than once per forward {several[:3]}: their per-example gradients {separate}")


# Under autocast, a layer that ran in 16 bits gets a .grad that is the 16-bit rounding of a
# sum whose terms the hooks' norms share (hooks.in_float32 rounds their inputs as autocast
# did): element j carries a relative error ρ_j, uniform on ±u (round to nearest) and
# independent across elements, so B|ĝ|² − B|ḡ|² = B Σ_j ḡ_j²(2ρ_j + ρ_j²) has standard
# deviation B(2u/√3)‖ḡ‖₄² and a bias under Bu²|ḡ|². A layer's centred sum (the statistics
# are reported per layer) is kept where that error, at ROUNDING_SIGMAS deviations, is under
# ROUNDED_TOLERANCE of it: far below the statistics' own sampling error at any batch size.
ROUNDING_SIGMAS = 6.0
ROUNDED_TOLERANCE = 1e-2


def flatness(tensors: list[Tensor]) -> list[float]:
    """``‖t‖₄² / ‖t‖₂²`` of each tensor: ``1/√n`` for ``n`` equal elements, 1 for one spike."""
    if not tensors:
        return []
    fourth = torch.stack(torch._foreach_norm(tensors, 4, dtype=torch.float64)).square_()
    second = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square_()
    return fourth.div_(second.clamp_min_(torch.finfo(torch.float64).tiny)).tolist()


def _cancelled(hooks: StepHooks, params: dict[str, Tensor], host: list[HostSums], count: int,
               flat: list[float] | None = None) -> list[str]:  # fmt: skip
    """The parameters whose centred sum the step's rounding cannot resolve: the worst case
    ``ε·Σ_i |g_i|²`` of their dtype (:meth:`HostSums.cancelled`), and for the layers that ran
    in 16 bits (``flat``: :func:`flatness` of every ``.grad``) the rounding of ``.grad``."""
    lost = [n for n, h in zip(params, host, strict=True) if h.cancelled(torch.finfo(params[n].dtype).eps)]
    layers: dict[str, list[float]] = {}  # layer → [centred sum, error variance, error bias]
    for n, h, r in zip(params, host, flat or [0.0] * len(host), strict=True):
        acc = layers.setdefault(n.rpartition(".")[0], [0.0, 0.0, 0.0])
        acc[0] += h.trace_m2
        if n in hooks.low_precision:
            u, s = torch.finfo(hooks.low_precision[n]).eps / 2, count * h.mean_sq
            acc[1] += (2 * u / math.sqrt(3) * r * s) ** 2
            acc[2] += u * u * s
    for n in params:
        m2, var, bias = layers[n.rpartition(".")[0]]
        if ROUNDING_SIGMAS * math.sqrt(var) + bias > ROUNDED_TOLERANCE * m2 and n not in lost:
            lost.append(n)
    return lost


def _rows(hooks: StepHooks, params: dict[str, Tensor], B: int):
    """Per parameter: its name, ``.grad`` (detached) and the hooks' ``|g_i|²`` of its B examples."""
    for name, p in params.items():
        if p.grad is None or name not in hooks.sq:
            raise RuntimeError(f"no gradient recorded for {name!r}: call step() after backward() and before zero_grad()")
        parts = hooks.sq[name]
        s = parts[0] if len(parts) == 1 else torch.cat(parts)
        if s.shape[0] != B:
            raise HooksCannotMeasure(
                f"the hooks saw {s.shape[0]} examples of {name!r} but the batch has {B}: pass the whole "
                "batch of this optimizer step (or the layer does not run on the batch: use mode='separate')"
            )
        yield name, (p.grad if not p.grad.requires_grad else p.grad.detach()), s


def step_stats(hooks: StepHooks, params: dict[str, Tensor], numels: dict[str, int], B: int, factor: float,
               accumulation_steps: int) -> StepStats:  # fmt: skip
    """``tr Σ``, ``|G|²``, ``B_simple`` (and the GSNR with ``hooks.elementwise``) of a batch of
    ``B`` from the hooks and ``.grad``; ``factor`` (loss scale × accumulation steps) turns
    ``.grad`` into the mean gradient.

    Raises:
        RuntimeError: a hook failed, a module ran more often than once per micro-batch, a
            parameter has no gradient, or the hooks saw another number of examples than ``B``.
        ValueError: the model's forward pass mixes examples (:mod:`gradnoise._coupling`).
    """
    _check(hooks, accumulation_steps)
    mean, m2, rows = {}, ({} if hooks.elementwise else None), []
    for name, g, s in _rows(hooks, params, B):
        mean[name] = g
        rows.append(s)
        if m2 is not None:
            mean[name] = g = g if factor == 1 else g / factor
            m2[name] = centred_m2(hooks.sum_sq[name], g, B)
    # All parameters' scalars in a few stacked operations: Σ_i|g_i|² − B|ḡ|² per parameter
    # (.grad is the user's gradient: divided by the loss scale and accumulation steps on
    # the host scalars, unless the variance needs the mean itself).
    sq_rows, _, host = centred_sums(rows, list(mean.values()), B, mean_scale=1.0 if m2 is not None else 1.0 / factor)
    flat = flatness(list(mean.values())) if hooks.low_precision else None
    lost = _cancelled(hooks, params, host, B, flat)
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
    # the rounding of ḡ_j weighs P_j ḡ_j² in |ḡ|²_P: the flatness of P ⊙ ḡ² (of √P ⊙ ḡ)
    flat = None
    if hooks.low_precision:
        flat = flatness(torch._foreach_sqrt(torch._foreach_mul(weighted_grads, grads)))
    lost = _cancelled(hooks, params, host, B, flat)
    if lost:
        raise CancellationError(f"the preconditioned centred sums of {lost[:3]} cancel in {params[lost[0]].dtype}")
    total, per_layer = summarise_scalars(numels, host, B, "hooks")
    return StepStats(total.trace_cov, total.grad_norm_sq, total.b_simple, None, per_layer)


def global_step_stats(hooks: StepHooks, params: dict[str, Tensor], numels: dict[str, int], B: int, factor: float,
                      accumulation_steps: int, group: Group, loss: float | None = None,
                      extra: tuple[float, ...] = ()) -> StepStats:  # fmt: skip
    """:func:`step_stats` of the global batch under DDP or FSDP2: each rank's examples' sums
    ``Σ_i |g_i|²`` per parameter (from its own backward pass) and ``|ḡ|²`` (under FSDP, of
    its shard of the reduce-scattered gradient) in one all-reduce of ``3P + 4`` numbers
    (:meth:`~gradnoise.distributed.Group.all_reduce`, which every rank joins, also one whose
    measurement failed), and ``P`` more, the ``‖ḡ‖₄⁴`` that :func:`_cancelled` needs after
    a 16-bit backward pass. Each rank's loss is the mean over its ``B`` examples and the ranks'
    gradients are averaged, so ``ḡ`` is the global mean when every rank has the same ``B``
    (checked). No per-element variance (the GSNR is ``None``). ``loss``: this rank's mean
    loss, averaged into the global batch's (every rank gets the same record). ``extra``:
    more numbers to sum over ranks in the same all-reduce (the two-batch estimate's), in
    ``StepStats.extra``.

    Raises:
        as :func:`step_stats` on any rank; :class:`~gradnoise.distributed.RankFailed` on the
        others.
    """
    P, E = len(params), len(extra)
    F = P  # ‖ḡ‖₄⁴ (zeros without autocast): the same length on every rank, also one that fails
    values = torch.zeros(2 * P + F + 4 + E, dtype=torch.float64)
    failure = None
    try:
        _check(hooks, accumulation_steps, distributed=True)
        sums, shards = [], []
        for _, g, s in _rows(hooks, params, B):
            sums.append(s.sum(dtype=torch.float64))
            shards.append(local(g))
        mean_sq = squared_norms(shards).div_(factor**2)  # one foreach pass, squared in float64
        fourth = torch.stack(torch._foreach_norm(shards, 4, dtype=torch.float64)).pow_(4) if hooks.low_precision else torch.zeros_like(mean_sq)
        counts = [*extra, B, B * B, 0.0 if loss is None else loss * B, 0.0 if loss is None else 1.0]
        values = torch.cat([torch.stack(sums).cpu(), mean_sq.cpu(), fourth.cpu().div_(factor**4),
                            torch.tensor(counts, dtype=torch.float64)])  # fmt: skip
    except Exception as exc:  # noqa: BLE001  (joins the all-reduce, then re-raised)
        failure = exc
    values = group.all_reduce(values, failed=failure is not None)
    if failure is not None:
        raise failure
    total_b, sum_b2, loss_sum, with_loss = values[-4:].tolist()
    summed_extra = tuple(values[2 * P + F : 2 * P + F + E].tolist())
    if abs(sum_b2 * group.size - total_b**2) > 0.5:
        raise ValueError(
            "the ranks' batches differ in size: the averaged gradient is then not the mean over the global batch, "
            "which the per-example statistics need; give every rank the same batch size"
        )
    n = int(round(total_b))
    copies = 1 if group.sharded else group.size  # unsharded, every rank holds all of ḡ
    mean_sq = values[P : 2 * P] / copies
    host = [HostSums(max(sq - n * m, 0.0), m, sq) for sq, m in zip(values[:P].tolist(), mean_sq.tolist(), strict=True)]
    flat = (values[2 * P : 2 * P + F] / copies).sqrt_().div_(mean_sq.clamp_min(1e-300)).tolist()
    lost = _cancelled(hooks, params, host, n, flat)
    if lost:
        raise CancellationError(f"the centred sums of {lost[:3]} cancel in {params[lost[0]].dtype}")
    total, per_layer = summarise_scalars(numels, host, n, "hooks")
    mean_loss = loss_sum / total_b if with_loss == group.size else None
    return StepStats(total.trace_cov, total.grad_norm_sq, total.b_simple, None, per_layer, mean_loss, summed_extra)
