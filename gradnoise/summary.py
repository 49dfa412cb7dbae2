"""Scalar summaries of :class:`~gradnoise._moments.Moments`: ``tr Σ``, ``|G|²``,
``B_simple`` and the GSNR, over all parameters, per parameter and per module.

The formulas are those of :mod:`gradnoise.stats` (McCandlish et al. 2018, App. A; Liu et
al. 2020, Eq. 1 for the GSNR). Every group's statistics follow by addition from
per-parameter scalars (:class:`_Sums`), so that the per-module table costs no tensor work.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from gradnoise._factored import numel_of
from gradnoise._moments import HostSums, Moments, squared_norms

__all__ = [
    "LazyGsnr",
    "LayerStats",
    "group_stats",
    "param_sums",
    "per_layer_stats",
    "per_param_stats",
    "summarise",
    "summarise_scalars",
]

ROOT = "(model)"
NOISE_FREE = 1e-6  # relative variance below which an element counts as noise-free (GSNR)
NEGLIGIBLE = 1e-12  # E[g²] relative to the tensor's largest below which an element is ignored


@dataclass(frozen=True)
class LayerStats:
    """Noise statistics of one parameter or one module's parameters (plain numbers)."""

    num_params: int
    trace_cov: float
    grad_norm_sq: float
    b_simple: float
    gsnr: float | None
    method: str


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


def param_sums(m: Moments, dataset_size: int | None, *, gsnr: bool = True) -> dict[str, _Sums]:
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
        out = LazyGsnr(m.mean, m.m2, m.count, dataset_size, 1.0).fill(out)
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
    the arithmetic on it, so two buffers are reused.
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


class LazyGsnr:
    """The GSNR sums of a result's own ``mean`` and ``variance`` (``variance = m2_scale ·
    M2``), computed once, when the GSNR of the whole model, a parameter or a layer is first
    read; where it must be computed now (moments cast to another dtype, :func:`summarise`),
    the same table is filled at once (:func:`param_sums`)."""

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


def group_stats(sums: list[_Sums], n: int, dataset_size: int | None, has_gsnr: bool) -> LayerStats:
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
    return _summary(param_sums(m, dataset_size), m.count, dataset_size, m.m2 is not None, per_param)


def summarise_scalars(
    numels: dict[str, int], host: list[HostSums], count: int, method: str
) -> tuple[LayerStats, dict[str, LayerStats]]:
    """:func:`summarise` (no GSNR, infinite stream) from the host scalars of
    :func:`centred_sums` (per parameter, in the order of ``numels``), without per-parameter
    tensors. Returns the total and the per-module statistics."""
    sums = {k: _Sums(n, h.trace_m2, h.mean_sq, 0.0, 0, method) for (k, n), h in zip(numels.items(), host, strict=True)}
    total, _, per_layer = _summary(sums, count, None, False, per_param=False)
    return total, per_layer


def _summary(sums: dict[str, _Sums], count: int, dataset_size: int | None, has_gsnr: bool, per_param: bool):
    total = group_stats(list(sums.values()), count, dataset_size, has_gsnr)
    params = per_param_stats(sums, count, dataset_size, has_gsnr) if per_param else None
    return total, params, per_layer_stats(sums, count, dataset_size, has_gsnr)


def per_param_stats(sums: dict[str, _Sums], count: int, dataset_size: int | None, has_gsnr: bool) -> dict[str, LayerStats]:
    return {k: group_stats([v], count, dataset_size, has_gsnr) for k, v in sums.items()}


def per_layer_stats(sums: dict[str, _Sums], count: int, dataset_size: int | None, has_gsnr: bool) -> dict[str, LayerStats]:
    owners: dict[str, list[_Sums]] = {}
    for k, v in sums.items():
        owners.setdefault(k.rpartition(".")[0] or ROOT, []).append(v)
    return {mod: group_stats(vs, count, dataset_size, has_gsnr) for mod, vs in owners.items()}
