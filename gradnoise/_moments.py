"""Sufficient statistics of per-example gradients (a leaf of the package).

The engines (:mod:`gradnoise.per_sample`, :mod:`gradnoise.engine`) produce
:class:`Moments`; :mod:`gradnoise.stats` finalises them into unbiased estimates. With ``B``
examples, mean ``ḡ`` and ``S = Σ_i |g_i|²``, the centred sum of squares is
``M2 = Σ_i |g_i − ḡ|² = S − B|ḡ|²``; two disjoint sets merge exactly (Chan, Golub & LeVeque
1979, "Updating Formulae and a Pairwise Algorithm for Computing Sample Variances").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "CANCELLATION",
    "HostSums",
    "Moments",
    "centred_m2",
    "centred_m2_",
    "centred_sums",
    "moments_from_grads",
    "scaled_rows",
    "squared_norms",
]


@dataclass
class Moments:
    """Sufficient statistics of per-example gradients over ``count`` examples.

    Tensors are in the parameters' dtype for one batch (centred on the vmap path; on the
    fast path ``Σg² − Bḡ²`` from sums that the per-layer rules produce in that dtype);
    scalar reductions accumulate in float64, and :meth:`merge` promotes to float64 so that
    streaming over many batches is exact.

    Attributes:
        count: number of examples.
        mean: per-parameter mean gradient ``ḡ`` (a dict, or a
            :class:`~gradnoise._factored.FactoredGrads` when the fast engine kept some Linear
            weights' means as factors).
        trace_m2: per-parameter ``Σ_i |g_i − ḡ|²`` (a 0-d tensor).
        m2: per-parameter elementwise ``Σ_i (g_i − ḡ)²``, or ``None`` if not computed.
        sq_norms: per-parameter ``|g_i|²`` of each example (``[count]``).
        loss_sum: ``Σ_i loss_i``.
        methods: which engine computed each parameter ("fast", "vmap-module", "vmap").
        scalars: per parameter ``(Σ_i |g_i − ḡ|², |ḡ|²)`` as Python floats, of every
            parameter, when the engine has already transferred them (one transfer for all
            parameters); else ``None``.
        sq_total: ``|g_i|²`` of each example summed over parameters (``[count]`` float64),
            when the engine has it; else ``None`` (summed from ``sq_norms`` when needed).
        promoted: some tensors were promoted to float64 by :meth:`merge` (results are cast
            back to the parameters' dtypes).
    """

    count: int
    mean: Mapping[str, Tensor]
    trace_m2: Mapping[str, Tensor]
    m2: Mapping[str, Tensor] | None
    sq_norms: Mapping[str, Tensor]
    loss_sum: float
    methods: dict[str, str]
    scalars: dict[str, tuple[float, float]] | None = None
    sq_total: Tensor | None = None
    promoted: bool = False

    def merge(self, other: Moments) -> Moments:
        """Exact union of two disjoint sets of examples (Chan, Golub & LeVeque 1979)."""
        if self.mean.keys() != other.mean.keys():
            raise ValueError("cannot merge statistics of different parameter sets")
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        mean, trace_m2, m2 = {}, {}, {} if (self.m2 is not None and other.m2 is not None) else None
        for k in self.mean:
            delta = other.mean[k].double() - self.mean[k].double()
            mean[k] = self.mean[k].double() + delta * (n_b / n)
            trace_m2[k] = (
                self.trace_m2[k].double() + other.trace_m2[k].double() + delta.square().sum() * (n_a * n_b / n)
            )
            if m2 is not None:
                m2[k] = self.m2[k].double() + other.m2[k].double() + delta.square() * (n_a * n_b / n)
        sq = {k: torch.cat([self.sq_norms[k].double(), other.sq_norms[k].double()]) for k in self.sq_norms}
        methods = {
            k: v if v == other.methods.get(k) else f"{v}+{other.methods.get(k)}"
            for k, v in self.methods.items()
        }
        return Moments(n, mean, trace_m2, m2, sq, self.loss_sum + other.loss_sum, methods, promoted=True)


# A centred sum S − B|ḡ|² whose rounding error (≈ ε·S in the gradients' dtype) exceeds this
# fraction of it cannot be trusted (its error bound is then well under 1 %).
CANCELLATION = 1e-4


class HostSums(NamedTuple):
    """One parameter's scalars on the host (float64): ``Σ_i |g_i − ḡ|²``, ``|ḡ|²`` and
    ``Σ_i |g_i|²``."""

    trace_m2: float
    mean_sq: float
    sum_sq: float

    def cancelled(self, eps: float) -> bool:
        """Whether ``trace_m2 = S − B|ḡ|²`` lost more than :data:`CANCELLATION` of itself to
        the rounding of a dtype with machine epsilon ``eps`` (the mean gradient dominating
        the spread, e.g. near-identical examples in float32)."""
        return self.sum_sq > 0 and eps * self.sum_sq > CANCELLATION * self.trace_m2


def squared_norms(tensors: list[Tensor]) -> Tensor:
    """``|t|²`` of each tensor, stacked (``[P]``, float64)."""
    return torch.stack(torch._foreach_norm(tensors)).double().square_()


def centred_sums(
    sq_norms: list[Tensor], means: list[Tensor], count: int, *, scale: float = 1.0, mean_sq: list[Tensor] = (),
    mean_scale: float = 1.0, total: bool = False,
) -> tuple[Tensor, Tensor | None, list[HostSums]]:
    """Centred sums of squares of ``P`` parameters from their per-example squared norms.

    Args:
        sq_norms: per parameter ``|g_i|²`` of each example (``[B]`` each), to be multiplied
            by ``scale``.
        means: the mean gradients ``ḡ`` of the first ``len(means)`` parameters, each to be
            multiplied by ``mean_scale``.
        count: ``B``.
        mean_sq: ``|ḡ|²`` (0-d) of the remaining parameters, whose means are not at hand
            (the Gram path of the fast engine).
        total: also return the per-example total over parameters.

    Returns:
        The stacked ``[P, B]`` ``|g_i|²`` *unscaled*, in their dtype (:func:`scaled_rows`
        makes them float64 and scaled), the scaled float64 per-example total over
        parameters (``[B]``) or ``None``, and per parameter its :class:`HostSums`, with ``Σ_i |g_i − ḡ|² = Σ_i |g_i|² − B |ḡ|²``
        (clamped at 0 against rounding).

    Sums accumulate in float64 and norms are squared on the host in float64; the scales are
    applied to host values, so that all parameters cost a handful of operations and one
    transfer (each operation costs several microseconds right after a backward pass).
    """
    rows = torch.stack(sq_norms)
    small = torch.stack([*torch._foreach_norm(means), *mean_sq]) if means else torch.stack(list(mean_sq))
    # Two transfers rather than a concatenation: right after a backward pass the first call
    # of each kind of operation is the costliest (cold caches), so fewer kinds pay.
    sums, values = rows.sum(1, dtype=torch.float64).tolist(), small.tolist()
    P, k = len(sq_norms), len(means)
    host = []
    for j in range(P):
        s, v = sums[j] * scale, values[j]
        msq = v * v * mean_scale**2 if j < k else v
        host.append(HostSums(max(s - count * msq, 0.0), msq, s))
    per_example = None
    if total:
        per_example = rows.sum(0, dtype=torch.float64)
        if scale != 1.0:
            per_example.mul_(scale)
    return rows, per_example, host


def scaled_rows(rows: Tensor, scale: float = 1.0) -> Tensor:
    """The float64 ``scale · rows`` of :func:`centred_sums`' stacked squared norms."""
    out = rows.double()
    return out.mul_(scale) if scale != 1.0 else out


def centred_m2(sum_sq: Tensor, mean: Tensor, count: int) -> Tensor:
    """Elementwise ``Σ_i (g_i − ḡ)² = Σ_i g_i² − B ḡ²`` (clamped at 0 against rounding)."""
    return torch.addcmul(sum_sq, mean, mean, value=-count).clamp_min_(0)


def centred_m2_(sums_sq: list[Tensor], means: list[Tensor], count: int) -> list[Tensor]:
    """:func:`centred_m2` in place on several buffers the caller owns, in two ``_foreach``
    operations for all of them (per-tensor calls cost several µs each after a backward)."""
    if sums_sq:
        torch._foreach_addcmul_(sums_sq, means, means, value=-count)
        torch._foreach_clamp_min_(sums_sq, 0)
    return sums_sq


def moments_from_grads(grads: dict[str, Tensor], losses: Tensor, method: str, elementwise: bool) -> Moments:
    """Moments from materialised per-example gradients ``{name: [B, ...]}`` (centred sums)."""
    count = losses.shape[0]
    mean, trace_m2, m2, sq = {}, {}, {} if elementwise else None, {}
    for k, g in grads.items():
        g = g.detach()
        flat = g.reshape(count, -1)
        mu = flat.mean(0)
        # Centred sum of squares (torch.var_mean over dim 0 is much slower on CPU).
        c2 = (flat - mu).square_().sum(0).view_as(g[0])
        mu = mu.view_as(g[0])
        mean[k], trace_m2[k] = mu, c2.sum(dtype=torch.float64)
        if m2 is not None:
            m2[k] = c2
        sq[k] = torch.linalg.vector_norm(g.flatten(1), dim=1).double().square_()
    methods = dict.fromkeys(grads, method)
    return Moments(count, mean, trace_m2, m2, sq, float(losses.detach().double().sum()), methods)
