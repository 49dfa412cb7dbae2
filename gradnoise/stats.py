"""Gradient statistics of one batch, and exact streaming over many batches.

Notation (McCandlish et al. 2018, arXiv:1812.06162, App. A): per-example gradients ``g_i``,
true gradient ``G = E[g_i]``, per-example covariance ``Σ``. From ``B`` examples with mean
``ḡ`` and centred sum of squares ``M2 = Σ_i |g_i − ḡ|²``:

.. math::

    s^2 = \\frac{M_2}{B-1}, \\qquad
    \\widehat{\\operatorname{tr}\\Sigma} = s^2 \\cdot \\frac{N-1}{N}, \\qquad
    \\widehat{|G|^2} = |\\bar g|^2 - s^2\\left(\\frac1B - \\frac1N\\right),
    \\qquad B_\\text{simple} = \\operatorname{tr}\\Sigma / |G|^2 .

``N`` is the data-set size when the batch was drawn without replacement from ``N`` examples
(``dataset_size``); for an infinite stream ``(N−1)/N = 1`` and ``1/N = 0``. ``Σ`` is the
population covariance ``(1/N) Σ_n (g_n − G)(g_n − G)ᵀ`` so that
``E|ḡ_B − G|² = tr(Σ)/B · (N − B)/(N − 1)``; both estimates are unbiased.

GSNR (Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through GSNR of
Parameters", Eq. 1) per element is ``G_j² / σ_j²``, estimated with the unbiased signal
``ḡ_j² − s_j²(1/B − 1/N)`` (the plug-in ``ḡ_j²`` is biased upward by ``σ_j²/B``, which would
make GSNR fall as ``1/B``); a layer's GSNR is its mean over the
elements that are not noise-free (``σ̂_j² > 10⁻⁶ E[g_j²]``, i.e. above float32 rounding) and
whose centred sum of squares exceeds ``10⁻¹²`` of the largest in its tensor (elements whose
gradient is zero up to rounding, such as attention key biases, would otherwise give
meaningless ratios).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from gradnoise._factored import dtype_of, numel_of
from gradnoise._functional import Batch, LossFn, as_tuple, batch_size_of, is_known_mean_loss
from gradnoise._lazy import LazyMap

__all__ = [
    "GradientStats",
    "LayerStats",
    "Moments",
    "StatsAccumulator",
    "gradient_stats",
]

Method = Literal["auto", "fast", "vmap"]
ROOT = "(model)"
NOISE_FREE = 1e-6  # relative variance below which an element counts as noise-free (GSNR)
NEGLIGIBLE = 1e-12  # E[g²] relative to the tensor's largest below which an element is ignored


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

    Any of the mappings may be a :class:`~gradnoise._lazy.LazyMap` (built when first read).
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


def squared_norms(tensors: list[Tensor]) -> Tensor:
    """``|t|²`` of each tensor, stacked (``[P]``, float64)."""
    return torch.stack(torch._foreach_norm(tensors)).double().square_()


def centred_sums(
    sq_norms: list[Tensor], means: list[Tensor], count: int, *, scale: float = 1.0, mean_sq: list[Tensor] = (),
    mean_scale: float = 1.0, total: bool = False,
) -> tuple[Tensor, Tensor | None, list[tuple[float, float, float]]]:
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
        parameters (``[B]``) or ``None``, and per parameter the host values
        ``(Σ_i |g_i − ḡ|², |ḡ|², Σ_i |g_i|²)`` with ``Σ_i |g_i − ḡ|² = Σ_i |g_i|² − B |ḡ|²``
        (clamped at 0 against rounding).

    Sums accumulate in float64 and norms are squared on the host in float64; the scales are
    applied to host values, so that all parameters cost a handful of operations and one
    transfer (each operation costs several microseconds right after a backward pass).
    """
    rows = torch.stack(sq_norms)
    small = torch.stack([*torch._foreach_norm(means), *mean_sq]) if means else torch.stack(list(mean_sq))
    # Two transfers rather than a concatenation: right after a backward pass the first call
    # of each kind of operation costs most (measured: 30-40 µs for a cold kernel, 10 warm).
    sums, values = rows.sum(1, dtype=torch.float64).tolist(), small.tolist()
    P, k = len(sq_norms), len(means)
    host = []
    for j in range(P):
        s, v = sums[j] * scale, values[j]
        msq = v * v * mean_scale**2 if j < k else v
        host.append((max(s - count * msq, 0.0), msq, s))
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
        # Centred sum of squares (measured 15× faster than torch.var_mean over dim 0 here).
        c2 = (flat - mu).square_().sum(0).view_as(g[0])
        mu = mu.view_as(g[0])
        mean[k], trace_m2[k] = mu, c2.sum(dtype=torch.float64)
        if m2 is not None:
            m2[k] = c2
        sq[k] = torch.linalg.vector_norm(g.flatten(1), dim=1).double().square_()
    methods = dict.fromkeys(grads, method)
    return Moments(count, mean, trace_m2, m2, sq, float(losses.detach().double().sum()), methods)


@dataclass(frozen=True)
class LayerStats:
    """Noise statistics of one parameter or one module's parameters (plain numbers)."""

    num_params: int
    trace_cov: float
    grad_norm_sq: float
    b_simple: float
    gsnr: float | None
    method: str


@dataclass(frozen=True)
class GradientStats:
    """Gradient statistics of a batch (or of the union of many batches).

    Attributes:
        batch_size: number of examples ``B`` the statistics are computed from.
        dataset_size: ``N`` for the finite-population correction, or ``None`` (stream).
        loss: mean loss over the ``B`` examples.
        mean: mean gradient ``ḡ`` per parameter (the usual minibatch gradient), a read-only
            mapping. Without ``variance``, the fast engine skips the weight gradient of a
            Linear layer where its Gram form is cheaper (``B(in + out) ≤ in · out``) and keeps
            ``ḡ_W = Dᵀ A`` as its two factors, which hold fewer numbers; reading
            ``mean[name]`` multiplies them out once.
        variance: unbiased per-element variance of per-example gradients per parameter
            (finite-population convention as ``trace_cov``), or ``None`` if not computed.
        trace_cov: unbiased ``tr Σ``.
        grad_norm_sq: unbiased ``|G|²``.
        gsnr: mean per-element gradient signal-to-noise ratio, or ``None`` (a property,
            computed when first read).
        b_simple: ``trace_cov / grad_norm_sq`` of this batch (a single-batch ratio: for a
            noise scale, average numerator and denominator over batches, see
            :func:`gradnoise.noise_scale`). ``inf`` when the ``|G|²`` estimate is ``≤ 0``.
        per_param: the same statistics per parameter name (a read-only mapping, computed
            when first read).
        per_layer: the same statistics per module (parameters grouped by owner; likewise).
        sq_norms: ``|g_i|²`` of each example over all parameters, ``[B]`` float64.
    """

    batch_size: int
    dataset_size: int | None
    loss: float
    mean: Mapping[str, Tensor] = field(repr=False)
    variance: dict[str, Tensor] | None = field(repr=False)
    trace_cov: float
    grad_norm_sq: float
    b_simple: float
    per_param: Mapping[str, LayerStats] = field(repr=False)
    per_layer: Mapping[str, LayerStats] = field(repr=False)
    sq_norms: Tensor = field(repr=False)
    # the GSNR, or a function that computes it from ``mean`` and ``variance`` (see ``gsnr``)
    _gsnr: float | None | Callable[[], float] = field(default=None, repr=False, compare=False)

    @property
    def gsnr(self) -> float | None:
        """Mean per-element gradient signal-to-noise ratio, or ``None`` without ``variance``.

        Computed when first read (then kept), from ``mean`` and ``variance`` as they are
        then: a pass over every parameter, which on the MNIST-1D MLP at ``B = 128`` took
        about half as long as a training step; callers that do not read it do not pay it.
        """
        value = self._gsnr
        if callable(value):
            value = value()
            object.__setattr__(self, "_gsnr", value)  # cached (a frozen dataclass)
        return value

    def __getstate__(self) -> dict:  # pickles and copies with the GSNR computed
        state = dict(self.__dict__)
        state["_gsnr"] = self.gsnr
        return state

    def to_dict(self) -> dict:
        """Plain numbers only (JSON-serialisable): scalars, per-parameter and per-layer stats."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("mean", "variance", "per_param", "per_layer", "sq_norms", "_gsnr")
        }
        out["gsnr"] = self.gsnr
        out["per_param"] = {k: dataclasses.asdict(v) for k, v in self.per_param.items()}
        out["per_layer"] = {k: dataclasses.asdict(v) for k, v in self.per_layer.items()}
        return out

    def __repr__(self) -> str:
        n = "∞" if self.dataset_size is None else self.dataset_size
        gsnr = "n/a" if self.gsnr is None else f"{self.gsnr:.4g}"
        lines = [
            f"GradientStats(B={self.batch_size}, N={n}, loss={self.loss:.4g}, "
            f"trace_cov={self.trace_cov:.4g}, grad_norm_sq={self.grad_norm_sq:.4g}, "
            f"b_simple={self.b_simple:.4g}, gsnr={gsnr})",
            f"  {'layer':<28}{'params':>9}{'tr Σ':>12}{'|G|²':>12}{'B_simple':>11}  method",
        ]
        for name, s in self.per_layer.items():
            lines.append(
                f"  {name:<28}{s.num_params:>9}{s.trace_cov:>12.4g}{s.grad_norm_sq:>12.4g}"
                f"{s.b_simple:>11.4g}  {s.method}"
            )
        return "\n".join(lines)


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


class _Sums(NamedTuple):
    """Per-parameter scalars from which any group's statistics follow by addition (a tuple:
    built for every parameter at every monitored step)."""

    numel: int
    trace_m2: float
    mean_sq: float
    gsnr_sum: float
    gsnr_count: int
    method: str


def _param_sums(m: Moments, dataset_size: int | None, *, gsnr: bool = True) -> dict[str, _Sums]:
    """Per-parameter scalars, converted to Python numbers in one transfer (or none, when the
    engine has done it: ``Moments.scalars``); the GSNR sums only with ``gsnr`` (else 0)."""
    names = list(m.mean)
    if m.scalars is not None:  # of every parameter (see Moments.scalars)
        scalars = [[m.scalars[k][0] for k in names], [m.scalars[k][1] for k in names]]
    else:
        mean_sq = squared_norms([m.mean[k] for k in names])
        trace_m2 = torch.stack([m.trace_m2[k].double() for k in names])
        scalars = torch.stack([trace_m2, mean_sq.to(trace_m2.device)]).tolist()
    out = {
        k: _Sums(numel_of(m.mean, k), scalars[0][j], scalars[1][j], 0.0, 0, m.methods[k])
        for j, k in enumerate(names)
    }  # fmt: skip
    if gsnr and m.m2 is not None:  # now, from the centred sums themselves
        out = _LazyGsnr(m.mean, m.m2, m.count, dataset_size, 1.0).fill(out)
    return out


GSNR_CHUNK = 1 << 16  # elements per pass of the GSNR sums (two reused buffers of this size)


def _gsnr_scratch(tensors) -> Tensor | None:
    """Two reused rows for :func:`_gsnr_sums`, shared by all of a step's parameters."""
    tensors = list(tensors)
    if not tensors:
        return None
    size = min(GSNR_CHUNK, max(t.numel() for t in tensors))
    return torch.empty(2, size, dtype=tensors[0].dtype, device=tensors[0].device)


def _gsnr_sums(
    mean: Tensor, m2: Tensor, n: int, dataset_size: int | None, scratch: Tensor | None = None,
    m2_scale: float = 1.0,
) -> tuple[float, int]:
    """``Σ_j GSNR_j`` over the kept elements of one tensor, and their number.

    With ``q_j = ḡ_j² / M2_j``: ``GSNR_j = ((n−1) q_j − (1/n − 1/N)) / pop``. Kept: not
    noise-free (``M2_j > 10⁻⁶ (M2_j + n ḡ_j²)``, i.e. ``q_j < (1 − 10⁻⁶)/(10⁻⁶ n)``) and not
    rounding noise (``M2_j > 10⁻¹² max M2``; every ``M2_j = 0``, hence every ``0/0``, is
    dropped here). ``m2`` may be ``m2_scale · M2`` (a variance: ``m2_scale = pop/(n−1)``).

    In passes of at most :data:`GSNR_CHUNK` elements through the two rows of ``scratch``:
    on CPU a fresh temporary the size of a weight costs more in first-touch page faults than
    the arithmetic on it (measured on a 512×512 weight: 1.0 ms with four fresh temporaries,
    0.25 ms where the allocator reused memory).
    """
    pop = 1.0 if dataset_size is None else (dataset_size - 1) / dataset_size
    inv_n = 0.0 if dataset_size is None else 1.0 / dataset_size
    limit = (1 - NOISE_FREE) / (NOISE_FREE * n) / m2_scale  # on ḡ²/m2 = q / m2_scale
    tiny = torch.finfo(m2.dtype).tiny
    thr = NEGLIGIBLE * float(m2.max())
    mean, m2 = mean.reshape(-1), m2.reshape(-1)
    size = min(GSNR_CHUNK, m2.numel())
    if scratch is None or scratch.shape[1] < size or scratch.dtype != m2.dtype or scratch.device != m2.device:
        scratch = _gsnr_scratch([m2])
    # float64 accumulators: the per-pass float32 sums are exact counts (≤ 2²⁴ per pass) and
    # stay exact across passes
    count, q_sum = torch.zeros(2, dtype=torch.float64, device=m2.device).unbind()
    for start in range(0, m2.numel(), size):
        mu, v = mean[start : start + size], m2[start : start + size]  # noqa: E203
        q, w = scratch[0, : v.numel()], scratch[1, : v.numel()]
        torch.mul(mu, mu, out=q).div_(torch.clamp_min(v, tiny, out=w)).clamp_(max=limit)
        # Rounding noise joins the noise-free at the limit; masks are float (faster than
        # bool on CPU).
        q.add_(torch.le(v, thr, out=w), alpha=limit).clamp_(max=limit)
        keep = torch.lt(q, limit, out=w)
        count.add_(keep.sum())
        q_sum.add_(q.mul_(keep).sum())  # pairwise float32 within a pass
    count, q_sum = int(count), float(q_sum) * m2_scale
    return ((n - 1) * q_sum - count * (1.0 / n - inv_n)) / pop, count


class _LazyGsnr:
    """The GSNR sums of a result's own ``mean`` and ``variance`` (``variance = m2_scale ·
    M2``), computed once, when the GSNR of the whole model, a parameter or a layer is first
    read; where it must be computed now (moments cast to another dtype, :func:`summarise`),
    the same table is filled at once (:func:`_param_sums`)."""

    def __init__(self, mean: Mapping[str, Tensor], variance: Mapping[str, Tensor], count: int,
                 dataset_size: int | None, m2_scale: float) -> None:  # fmt: skip
        self._args: tuple | None = (mean, variance, count, dataset_size, m2_scale)
        self._sums: dict[str, tuple[float, int]] | None = None

    def sums(self) -> dict[str, tuple[float, int]]:
        if self._sums is None:
            mean, variance, count, dataset_size, m2_scale = self._args
            scratch = _gsnr_scratch(variance.values())
            self._sums = {
                k: _gsnr_sums(mean[k], variance[k], count, dataset_size, scratch, m2_scale) for k in variance
            }  # fmt: skip
            self._args = None  # drop the references to the tensors
        return self._sums

    def fill(self, sums: dict[str, _Sums]) -> dict[str, _Sums]:
        """``sums`` with their GSNR fields filled in."""
        table = self.sums()
        return {k: s._replace(gsnr_sum=table[k][0], gsnr_count=table[k][1]) for k, s in sums.items()}

    def total(self) -> float:
        sums = self.sums().values()
        num = sum(c for _, c in sums)
        return sum(v for v, _ in sums) / num if num else math.nan


def _group(sums: list[_Sums], n: int, dataset_size: int | None, has_gsnr: bool) -> LayerStats:
    numel, tm2, msq, gsnr_sum, gsnr_count, methods = 0, 0.0, 0.0, 0.0, 0, set()
    for s in sums:
        numel, tm2, msq = numel + s.numel, tm2 + s.trace_m2, msq + s.mean_sq
        gsnr_sum, gsnr_count = gsnr_sum + s.gsnr_sum, gsnr_count + s.gsnr_count
        methods.add(s.method)
    s2 = tm2 / (n - 1)
    pop = 1.0 if dataset_size is None else (dataset_size - 1) / dataset_size
    inv_n = 0.0 if dataset_size is None else 1.0 / dataset_size
    trace_cov = s2 * pop
    grad_norm_sq = msq - s2 * (1.0 / n - inv_n)
    gsnr = None
    if has_gsnr:
        gsnr = gsnr_sum / gsnr_count if gsnr_count else math.nan
    return LayerStats(
        num_params=numel,
        trace_cov=trace_cov,
        grad_norm_sq=grad_norm_sq,
        b_simple=_ratio(trace_cov, grad_norm_sq),
        gsnr=gsnr,
        method="+".join(sorted(methods)),
    )


def summarise(
    m: Moments, dataset_size: int | None = None, *, per_param: bool = True
) -> tuple[LayerStats, dict[str, LayerStats] | None, dict[str, LayerStats]]:
    """The scalar statistics of :class:`Moments`: over all parameters, per parameter (unless
    ``per_param=False``) and per module — without the tensors of :class:`GradientStats`."""
    return _summary(_param_sums(m, dataset_size), m.count, dataset_size, m.m2 is not None, per_param)


def summarise_scalars(
    numels: dict[str, int], host: list[tuple[float, ...]], count: int, method: str
) -> tuple[LayerStats, dict[str, LayerStats]]:
    """:func:`summarise` (no GSNR, infinite stream) from the host scalars of
    :func:`centred_sums` (per parameter, in the order of ``numels``), without per-parameter
    tensors. Returns the total and the per-module statistics."""
    sums = {k: _Sums(n, h[0], h[1], 0.0, 0, method) for (k, n), h in zip(numels.items(), host, strict=True)}
    total, _, per_layer = _summary(sums, count, None, False, per_param=False)
    return total, per_layer


def _summary(sums: dict[str, _Sums], count: int, dataset_size: int | None, has_gsnr: bool, per_param: bool):
    total = _group(list(sums.values()), count, dataset_size, has_gsnr)
    params = _per_param(sums, count, dataset_size, has_gsnr) if per_param else None
    return total, params, _per_layer(sums, count, dataset_size, has_gsnr)


def _per_param(sums: dict[str, _Sums], count: int, dataset_size: int | None, has_gsnr: bool) -> dict[str, LayerStats]:
    return {k: _group([v], count, dataset_size, has_gsnr) for k, v in sums.items()}


def _per_layer(sums: dict[str, _Sums], count: int, dataset_size: int | None, has_gsnr: bool) -> dict[str, LayerStats]:
    owners: dict[str, list[_Sums]] = {}
    for k, v in sums.items():
        owners.setdefault(k.rpartition(".")[0] or ROOT, []).append(v)
    return {mod: _group(vs, count, dataset_size, has_gsnr) for mod, vs in owners.items()}


def stats_from_moments(
    m: Moments, *, dataset_size: int | None = None, dtypes: dict[str, torch.dtype] | None = None,
    consume: bool = False,
) -> GradientStats:
    """Finalise :class:`Moments` into :class:`GradientStats` (unbiased, see module docstring).

    ``consume``: ``m`` is not used again, so the variance is scaled in place in ``m.m2``.
    """
    if m.count < 2:
        raise ValueError(f"batch of {m.count} example: a variance needs at least 2")
    check_dataset_size(m.count, dataset_size)
    dtypes = {k: t for k, t in (dtypes or {}).items() if k in m.mean and t != dtype_of(m.mean, k)}
    has_gsnr = m.m2 is not None
    # The GSNR is computed when first read, from the result's own mean and variance, unless
    # they are cast to another dtype (then now, from the moments' precision).
    lazy = has_gsnr and not dtypes
    sums = _param_sums(m, dataset_size, gsnr=not lazy)
    pop = 1.0 if dataset_size is None else (dataset_size - 1) / dataset_size
    cast = lambda k, t: t.to(dtypes[k]) if k in dtypes else t  # noqa: E731
    scale = pop / (m.count - 1)
    if m.m2 is None:
        variance = None
    elif consume:
        torch._foreach_mul_(list(m.m2.values()), scale)
        variance = {k: cast(k, v) for k, v in m.m2.items()}
    else:
        variance = {k: cast(k, v * scale) for k, v in m.m2.items()}
    total = _group(list(sums.values()), m.count, dataset_size, has_gsnr and not lazy)
    gsnr: float | None | Callable[[], float] = total.gsnr
    filled = lambda: sums  # noqa: E731  (the per-parameter sums, with their GSNR)
    if lazy:
        table = _LazyGsnr(m.mean, variance, m.count, dataset_size, scale)
        filled, gsnr = (lambda: table.fill(sums)), table.total
    per_param = LazyMap(lambda: _per_param(filled(), m.count, dataset_size, has_gsnr))
    per_layer = LazyMap(lambda: _per_layer(filled(), m.count, dataset_size, has_gsnr))
    return GradientStats(
        batch_size=m.count,
        dataset_size=dataset_size,
        loss=m.loss_sum / m.count,
        mean={k: cast(k, v) for k, v in m.mean.items()} if dtypes else m.mean,
        variance=variance,
        trace_cov=total.trace_cov,
        grad_norm_sq=total.grad_norm_sq,
        b_simple=total.b_simple,
        per_param=per_param,
        per_layer=per_layer,
        sq_norms=m.sq_total if m.sq_total is not None else torch.stack(list(m.sq_norms.values())).sum(0),
        _gsnr=gsnr,
    )


def check_dataset_size(batch_size: int, dataset_size: int | None) -> None:
    if dataset_size is None:
        return
    if not isinstance(dataset_size, int) or dataset_size < 2:
        raise ValueError(f"dataset_size must be an int ≥ 2 or None, got {dataset_size!r}")
    if batch_size > dataset_size:
        raise ValueError(
            f"{batch_size} examples but dataset_size={dataset_size}: with the finite-population "
            "correction the examples must be drawn without replacement from the data set; "
            "pass the right dataset_size, or None for an infinite stream"
        )


def _backends() -> dict[str, Callable[..., Moments]]:
    from gradnoise.fast_norms import fast_moments
    from gradnoise.per_sample import vmap_moments

    return {"vmap": vmap_moments, "fast": fast_moments}


def compute_moments(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Batch,
    targets: Batch,
    *,
    method: Method = "auto",
    variance: bool = True,
    chunk_size: int | None = None,
    factored_mean: bool = False,
) -> Moments:
    """Moments of per-example gradients of one batch with the engine ``method`` picks
    (``factored_mean``: see :func:`gradnoise.fast_norms.fast_moments`).

    ``"auto"`` picks ``"fast"`` (one forward and one backward with hooks, see
    :mod:`gradnoise.fast_norms`) when the loss is known to be the mean of per-example
    losses (or is verified to be on this batch), else ``"vmap"``.
    """
    backends = _backends()
    if method != "auto" and method not in backends:
        raise ValueError(f"unknown method {method!r}; choose one of 'auto', {', '.join(map(repr, backends))}")
    kwargs = {"variance": variance, "chunk_size": chunk_size}
    fast_kwargs = {**kwargs, "factored_mean": factored_mean}
    if method != "auto":
        return backends[method](model, loss_fn, inputs, targets, **(fast_kwargs if method == "fast" else kwargs))
    from gradnoise.fast_norms import NotMeanLossError, fast_applies

    known = is_known_mean_loss(loss_fn, targets)  # then fast_moments need not check it again
    if known or fast_applies(model, loss_fn, inputs, targets):
        try:
            return backends["fast"](model, loss_fn, inputs, targets, **fast_kwargs, known_mean=known)
        except NotMeanLossError:
            pass  # the loss is not a plain mean of per-example losses on this batch
    return backends["vmap"](model, loss_fn, inputs, targets, **kwargs)


def gradient_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Batch,
    targets: Batch,
    *,
    method: Method = "auto",
    dataset_size: int | None = None,
    variance: bool = True,
    chunk_size: int | None = None,
) -> GradientStats:
    """Mean, variance, ``tr Σ``, ``|G|²``, GSNR and ``B_simple`` of one batch's gradients.

    Args:
        model: the model, evaluated in its current mode; never modified.
        loss_fn: mean-reduced ``loss_fn(outputs, targets)``.
        inputs: Tensor or tuple of Tensors with a leading batch dimension ``B ≥ 2``.
        targets: Tensor (or tuple) with the same leading dimension.
        method: ``"fast"`` (hooks, one backward; :mod:`gradnoise.fast_norms`), ``"vmap"``
            (materialised per-example gradients, :func:`gradnoise.per_sample_grads`), or
            ``"auto"`` (``"fast"`` unless the loss is not a plain mean of per-example losses,
            e.g. class-weighted cross-entropy or ``ignore_index`` targets).
        dataset_size: ``N`` if the batch was drawn without replacement from ``N`` examples
            (finite-population correction); ``None`` for an infinite stream.
        variance: also compute the per-element variance and GSNR (one extra matrix product
            per layer on the fast path).
        chunk_size: for ``"vmap"``, examples per chunk; bounds memory to ``chunk × P``.

    Returns:
        :class:`GradientStats`.

    Raises:
        ValueError: batch of fewer than 2 examples, mismatched batch, non-scalar or
            non-mean loss, BatchNorm in train mode, no trainable parameters, unknown method.
        FloatingPointError: NaN or inf in the loss or gradients.

    Example:
        >>> import torch, gradnoise as gn
        >>> model = torch.nn.Linear(4, 1)
        >>> s = gn.gradient_stats(model, torch.nn.MSELoss(), torch.randn(32, 4), torch.randn(32, 1))
        >>> s.batch_size, s.trace_cov > 0
        (32, True)
    """
    batch_size_of(inputs, targets, min_size=2)
    check_dataset_size(as_tuple(inputs)[0].shape[0], dataset_size)
    m = compute_moments(
        model, loss_fn, inputs, targets, method=method, variance=variance, chunk_size=chunk_size,
        factored_mean=True,
    )  # fmt: skip
    # Results in the parameters' dtypes; only merged (chunked) moments are promoted to float64.
    dtypes = {n: p.dtype for n, p in model.named_parameters()} if m.promoted else None
    return stats_from_moments(m, dataset_size=dataset_size, dtypes=dtypes, consume=True)


class StatsAccumulator:
    """Streams many batches into exact data-set-level statistics (float64, Chan's merge).

    The result equals :func:`gradient_stats` on the concatenation of all batches (up to
    float64 rounding), without holding more than one batch of gradients.

    Example:
        >>> import torch, gradnoise as gn
        >>> model, loss = torch.nn.Linear(4, 1), torch.nn.MSELoss()
        >>> acc = gn.StatsAccumulator(model, loss)
        >>> for _ in range(3):
        ...     acc.update(torch.randn(16, 4), torch.randn(16, 1))
        >>> acc.compute().batch_size
        48
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        method: Method = "auto",
        dataset_size: int | None = None,
        variance: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.method, self.dataset_size = method, dataset_size
        self.variance, self.chunk_size = variance, chunk_size
        self._moments: Moments | None = None

    @property
    def count(self) -> int:
        return 0 if self._moments is None else self._moments.count

    def update(self, inputs: Batch, targets: Batch) -> None:
        """Add one batch (any size ≥ 1)."""
        m = compute_moments(
            self.model,
            self.loss_fn,
            inputs,
            targets,
            method=self.method,
            variance=self.variance,
            chunk_size=self.chunk_size,
        )
        self._moments = m if self._moments is None else self._moments.merge(m)

    def compute(self) -> GradientStats:
        """Statistics of all examples seen so far.

        Raises:
            ValueError: fewer than 2 examples seen.
        """
        if self._moments is None:
            raise ValueError("no batch seen: call update(inputs, targets) first")
        dtypes = {n: p.dtype for n, p in self.model.named_parameters()}
        return stats_from_moments(self._moments, dataset_size=self.dataset_size, dtypes=dtypes)

    def reset(self) -> None:
        self._moments = None
