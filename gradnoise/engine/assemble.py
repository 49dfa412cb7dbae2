"""Finishing the fast engine's pass: per-parameter norms from the rules, materialised
per-example gradients of tied and rule-less parameters, and the whole-model ``vmap``
fallback, merged into one :class:`~gradnoise._moments.Moments`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from gradnoise._factored import FactoredGrads
from gradnoise._functional import LossFn
from gradnoise._moments import Moments, centred_m2_, centred_sums, moments_from_grads, scaled_rows
from gradnoise.engine.hooks import Recorder
from gradnoise.engine.module_vmap import close_to, local_tensors, module_grads, rnn_call
from gradnoise.engine.plan import Plan, Route
from gradnoise.engine.rnn import per_example_rnn_norms, unrollable
from gradnoise.per_sample import vmap_grads_and_losses

__all__ = ["Pass", "assemble", "cancelled", "check_finite"]


@dataclass
class Pass:
    """One forward and backward pass of the fast engine: what it ran on and what it produced.

    ``params`` are the parameters the vmap fallbacks differentiate (detached), ``state`` the
    frozen parameters and buffers; ``mean`` holds the mean gradient of every parameter that
    the backward pass (or a rule's ``moments``) produced.
    """

    model: nn.Module
    loss_fn: LossFn
    xs: tuple[Tensor, ...]
    ys: tuple[Tensor, ...]
    params: dict[str, Tensor]
    state: dict[str, Tensor]
    plan: Plan
    modules: dict[str, nn.Module]
    route: Route
    recorder: Recorder
    mean: dict[str, Tensor]
    loss_sum: float
    variance: bool
    chunk_size: int | None
    sqrt_weights: dict[str, Tensor] | None = None  # √P of a diagonal metric: moments of √P ⊙ g_i

    @property
    def batch(self) -> int:
        return self.recorder.batch


@dataclass
class _Parts:
    """Per-parameter results gathered from the rules and the fallbacks."""

    sq: dict[str, Tensor] = field(default_factory=dict)  # |g_i|² from the rules
    sum_sq: dict[str, Tensor | None] = field(default_factory=dict)  # Σ_i g_i² from the rules
    grads: dict[str, Tensor] = field(default_factory=dict)  # materialised [B, *shape]
    whole_model: list[str] = field(default_factory=list)  # parameters for whole-model vmap
    methods: dict[str, str] = field(default_factory=dict)


def assemble(p: Pass) -> Moments:
    """The :class:`Moments` of a pass: rule parameters from their norms and the batch
    gradient (centred sums by subtraction), the others from materialised per-example
    gradients (centred sums), merged.

    A rule parameter whose centred sum ``S − B|ḡ|²`` cancels below what its dtype resolves
    (:func:`cancelled`: the mean gradient dominates the spread, e.g. near-identical
    examples in float32) is measured again from materialised per-example gradients, whose
    centred sums do not cancel.
    """
    parts = _Parts(methods=dict(p.route.paths))
    _collect_rules(p, parts)
    _collect_units(p, parts)
    if p.sqrt_weights is not None:  # the rules' norms are weighted already (Recorder.weights)
        sw = p.sqrt_weights
        p.mean.update({n: g * sw[n] for n, g in p.mean.items()})
        parts.grads.update({n: g * sw[n] for n, g in parts.grads.items()})
    factors = {n: p.recorder.factors[m] for n, m in p.route.gram.items() if m in p.recorder.factors}
    for n in p.route.gram.keys() - factors.keys():  # output never reached by the backward pass
        p.mean[n] = torch.zeros_like(p.params[n])
    sums = _rule_sums(p, parts, factors) if parts.sq else None
    lost = cancelled(sums, p.params) if sums else []
    if lost:
        for n in lost:
            del parts.sq[n], parts.sum_sq[n]
            factors.pop(n, None)
        parts.whole_model.extend(lost)
        sums = _rule_sums(p, parts, factors) if parts.sq else None
    merged = []
    if parts.grads:
        part = moments_from_grads(parts.grads, torch.zeros(p.batch), "fast", p.variance)
        part.methods = {n: parts.methods[n] for n in parts.grads}
        merged.append(part)
    if parts.whole_model:
        merged.append(_whole_model(p, parts.whole_model))
    return _combine(p, parts, merged, factors, sums)


def cancelled(sums: _RuleSums, params: dict[str, Tensor]) -> list[str]:
    """Parameters whose centred sum lost too much to rounding (:meth:`HostSums.cancelled`)."""
    return [n for n, h in zip(sums.names, sums.host, strict=True) if h.cancelled(torch.finfo(params[n].dtype).eps)]


def _collect_rules(p: Pass, parts: _Parts) -> None:
    """Norms (or per-example gradients) that the recorder's rules produced, per parameter."""
    recorder, owners, B = p.recorder, p.plan.owners, p.batch
    for name, path in p.route.paths.items():
        module, local = owners[name][0]
        if path == "fast" and local in recorder.norms.get(module, ()):  # (an attention projection may not be reached)
            parts.sq[name], parts.sum_sq[name] = recorder.norms[module][local]
        elif path == "fast" and module in recorder.grads:  # the module has tied parameters
            parts.grads[name] = recorder.grads[module][local]
        elif name in p.route.pairs:  # |E_i + L_i|² (and Σ_i g_i²) from the two rules and the cross terms
            _tied_pair(p, parts, name)
        elif path == "fast-tied":
            found = [recorder.grads[m][loc] for m, loc in owners[name] if m in recorder.grads]
            param = p.params[name]
            parts.grads[name] = sum(found) if found else param.new_zeros(B, *param.shape)
        else:  # output never reached by the backward pass: zero gradient
            param = p.params[name]
            parts.sq[name] = param.new_zeros(B)
            parts.sum_sq[name] = torch.zeros_like(param) if p.variance else None


def _tied_pair(p: Pass, parts: _Parts, name: str) -> None:
    """A tied weight's ``|g_i|²`` and ``Σ_i g_i²`` (with ``variance``) from its two layers'
    norms and the cross terms (:mod:`gradnoise.rules.tied`). The rules' norms are of ``B·d``
    with ``variance`` (else scaled later), the cross terms of ``d``: scaled here alike."""
    recorder, param, B = p.recorder, p.params[name], p.batch
    s2 = B * B if p.variance else 1.0
    found = [recorder.norms[m]["weight"] for m in p.route.pairs[name] if m in recorder.norms]
    cross, cross_sum = recorder.cross.get(name, (param.new_zeros(B), None))
    parts.sq[name] = sum((sq for sq, _ in found), param.new_zeros(B)) + cross.mul(2 * s2)
    parts.sum_sq[name] = None
    if p.variance:
        total = sum((s for _, s in found), torch.zeros_like(param))
        parts.sum_sq[name] = total if cross_sum is None else total.add_(cross_sum, alpha=2 * s2)


def _collect_units(p: Pass, parts: _Parts) -> None:
    """Parameters without a rule: ``vmap`` over their smallest called owner, checked against
    the batch gradient; whole-model ``vmap`` where that check fails or the owner is the
    model itself."""
    calls = p.recorder.calls
    for unit, names in p.route.units.items():
        if not unit:
            parts.whole_model.extend(names)
            continue
        module = p.modules[unit]
        if isinstance(module, nn.RNNBase) and any(isinstance(c.args[0], PackedSequence) for c in calls[unit] if c.args):
            # one sequence at a time through torch's kernel (for its own length); else the whole model by vmap
            if not (len(calls[unit]) == 1 and unrollable(module) and p.sqrt_weights is None and _rnn(p, parts, unit, names)):
                parts.whole_model.extend(names)
            continue
        if len(calls[unit]) == 1 and rnn_call(module, calls[unit][0]) and p.sqrt_weights is None and _rnn(p, parts, unit, names):
            continue
        local_leaves = local_tensors(module, p.params, p.state, p.model)
        wanted = [n[len(unit) + 1 :] for n in names]  # noqa: E203
        total: dict[str, Tensor] | None = {}
        for call in calls[unit]:
            g = module_grads(module, local_leaves, wanted, call, p.batch)
            if g is None:
                total = None
                break
            for k, v in g.items():
                total[k] = total[k] + v if k in total else v
        if total is not None and all(close_to(total[w].mean(0), p.mean[n]) for w, n in zip(wanted, names, strict=True)):
            for w, n in zip(wanted, names, strict=True):
                parts.grads[n] = total[w]
                parts.methods[n] = "vmap-module"
        else:
            parts.whole_model.extend(names)


def _rnn(p: Pass, parts: _Parts, unit: str, names: list[str]) -> bool:
    """An RNN's norms from its unrolled gates (:func:`~gradnoise.engine.rnn.per_example_rnn_norms`),
    as a rule's (scaled like the recorder's), checked against the batch gradient."""
    module, call, B = p.modules[unit], p.recorder.calls[unit][0], p.batch
    grads = [None if g is None else g.detach() for g in call.grads]
    path, norms, sums = per_example_rnn_norms(module, call.args, grads, B, p.variance, B if p.variance else 1.0)
    local = {n: n[len(unit) + 1 :] for n in names}  # noqa: E203
    if not all(close_to(sums[local[n]], p.mean[n]) for n in names):
        return False
    for n in names:
        parts.sq[n], parts.sum_sq[n] = norms[local[n]]
        parts.methods[n] = path
    return True


def _whole_model(p: Pass, names: list[str]) -> Moments:
    """Moments of ``names`` by ``vmap`` of the whole model (in chunks of ``chunk_size``)."""
    sub = {n: p.params[n].detach() for n in names}
    rest = {**{n: t.detach() for n, t in p.params.items() if n not in sub}, **p.state}
    B = p.batch
    step = p.chunk_size or B
    out = None
    for s in range(0, B, step):
        g, losses = vmap_grads_and_losses(
            p.model, p.loss_fn, sub, rest, tuple(t[s : s + step] for t in p.xs), tuple(t[s : s + step] for t in p.ys)
        )  # fmt: skip
        if p.sqrt_weights is not None:
            g = {n: v * p.sqrt_weights[n] for n, v in g.items()}
        m = moments_from_grads(g, losses, "vmap", p.variance)
        out = m if out is None else out.merge(m)
    return out


@dataclass
class _RuleSums:
    """The rule parameters' per-example norms stacked (``rows``, unscaled), their scaled
    per-example total, and each one's host scalars (:func:`~gradnoise._moments.centred_sums`)."""

    names: list[str]
    rows: Tensor
    scale: float
    sq_total: Tensor
    host: list


def _rule_sums(p: Pass, parts: _Parts, factors: dict) -> _RuleSums:
    """Centred sums of the rule parameters in a few stacked operations and one transfer."""
    sq, B = parts.sq, p.batch
    dense = [n for n in sq if n not in factors]
    names = dense + [n for n in sq if n in factors]
    scale = 1.0 if p.variance else B * B
    rows, sq_total, host = centred_sums(
        [sq[n] for n in names], [p.mean[n] for n in dense], B, scale=scale,
        mean_sq=[p.recorder.mean_sq[p.route.gram[n]] for n in names[len(dense):]], total=True,
    )  # fmt: skip
    check_finite([h.mean_sq + h.sum_sq for h in host], names)
    return _RuleSums(names, rows, scale, sq_total, host)


def _combine(p: Pass, parts: _Parts, merged: list[Moments], factors: dict, sums: _RuleSums | None) -> Moments:
    """Rule parameters: mean from the batch gradient, centred sums by subtraction (``sums``).
    Then the materialised parts, merged in."""
    B, mean, params = p.batch, p.mean, p.params
    order = list(params)
    scalars: dict[str, tuple[float, float]] = {}
    sq_map: dict[str, Tensor] = {}
    tm2_map: dict[str, Tensor] = {}
    m2_map: dict[str, Tensor] | None = {} if p.variance else None
    sq_total = None
    sq = parts.sq
    if sums is not None:
        names, host = sums.names, sums.host
        sq_total = sums.sq_total
        scalars = {n: (h.trace_m2, h.mean_sq) for n, h in zip(names, host, strict=True)}
        sq_map = _rows_by_name(names, scaled_rows(sums.rows, sums.scale), order)
        tm2_map = _values_by_name(names, [h.trace_m2 for h in host], sums.rows.device, order)
        if m2_map is not None:  # in place on the rules' own buffers
            centred = centred_m2_([parts.sum_sq[n] for n in names], [mean[n] for n in names], B)
            m2_map.update(zip(names, centred, strict=True))
    out_mean = {n: mean[n] for n in sq if n not in factors}
    methods = parts.methods
    if merged:  # some parameters materialised: plain dicts, merged
        for part in merged:
            out_mean.update(part.mean)
            tm2_map.update(part.trace_m2)
            if m2_map is not None:
                m2_map.update(part.m2)
            sq_map.update(part.sq_norms)
            methods.update(part.methods)
            pnames = list(part.mean)
            check_finite(torch.stack([part.trace_m2[n] + part.sq_norms[n].sum() for n in pnames]).tolist(), pnames)
        sq_map, tm2_map = {n: sq_map[n] for n in order}, {n: tm2_map[n] for n in order}
        sq_total = None
    return Moments(
        count=B,
        mean=FactoredGrads(order, out_mean, factors) if factors else {n: out_mean[n] for n in order},
        trace_m2=tm2_map,
        m2=None if m2_map is None else {n: m2_map[n] for n in order},
        sq_norms=sq_map,
        loss_sum=p.loss_sum,
        methods={n: methods[n] for n in order},
        scalars=scalars if len(scalars) == len(order) else None,
        sq_total=sq_total,
        promoted=any(part.promoted for part in merged),
    )


def _rows_by_name(names: list[str], rows: Tensor, order: list[str]) -> dict[str, Tensor]:
    """``{name: rows[j]}`` in the order ``order`` (of the parameters; ``names`` is a subset)."""
    by_name = dict(zip(names, rows.unbind(), strict=True))
    return {n: by_name[n] for n in order if n in by_name}


def _values_by_name(names: list[str], values: list[float], device: torch.device, order: list[str]) -> dict[str, Tensor]:
    """0-d float64 tensors on ``device`` of host ``values``, by name in the order ``order``."""
    return _rows_by_name(names, torch.tensor(values, dtype=torch.float64, device=device), order)


def check_finite(values: list[float], names: list[str]) -> None:
    """Any NaN/inf in a per-example gradient shows in its squared norm, and one in the mean
    gradient in ``|ḡ|²`` (cheaper than ``isfinite`` over every parameter)."""
    for name, v in zip(names, values, strict=True):
        if not math.isfinite(v):
            raise FloatingPointError(
                f"gradient of parameter {name!r} contains NaN or inf: the loss or the model "
                "overflows on this batch"
            )
