"""The gradient noise scale over many batches, the two-batch estimator, an EMA for streams,
intervals, and the Hessian-aware ``B_noise`` next to it (:mod:`gradnoise.b_noise`).

McCandlish et al. 2018 (arXiv:1812.06162), App. A: ``B_simple = tr Σ / |G|²``,
``B_noise = tr(HΣ) / GᵀHG`` and ``ε_opt(B) = ε_max / (1 + B_noise / B)`` with
``ε_max = |G|² / GᵀHG``. The ratio of two unbiased estimates is biased, so numerator and
denominator are averaged separately over batches, then divided (never the mean of
per-batch ratios).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from gradnoise._compat import deprecated, renamed_keywords
from gradnoise._data import Data, as_data, unpacked
from gradnoise._functional import (
    Batch,
    LossFn,
    as_tuple,
    batch_size_of,
    check_device,
    check_loss_fn,
    check_no_train_batchnorm,
    mean_gradient,
    trainable_params,
)
from gradnoise.b_noise import b_noise
from gradnoise.hessian import HVPMethod
from gradnoise.preconditioner import Preconditioner, preconditioner_weights
from gradnoise.stats import Method, gradient_stats

__all__ = [
    "LayerNoise",
    "NoiseScale",
    "NoiseScaleEMA",
    "noise_scale",
    "ratio_interval",
    "two_batch",
    "two_batch_stats",
]

Estimator = Literal["per-example", "two-batch"]


@dataclass(frozen=True)
class LayerNoise:
    trace_cov: float
    grad_norm_sq: float
    b_simple: float


@dataclass(frozen=True)
class NoiseScale:
    """The gradient noise scale over many batches (ratio of averages).

    Attributes:
        b_simple: ``mean(tr Σ̂) / mean(|G|²̂)`` over batches.
        b_simple_interval: confidence interval (bootstrap or jackknife over batches).
        trace_cov, grad_norm_sq: the averaged unbiased estimates.
        b_noise: ``tr(HΣ)/GᵀHG`` when requested, else ``None``.
        b_noise_interval: its interval (bootstrap over the subsampled examples), or ``None``.
        eps_max: ``|G|²/GᵀHG``, the optimal SGD step size at infinite batch, or ``None``.
        per_layer: per-module averaged estimates and ``B_simple``.
        num_batches, examples: how much data went in.
        estimator: ``"per-example"`` or ``"two-batch"``.
        metric: ``"euclidean"``, or ``"preconditioned"``: ``B_simple^P = tr(PΣ)/GᵀPG`` and
            ``B_noise^P = tr(PHPΣ)/GᵀPHPG`` (:mod:`gradnoise.preconditioner`); ``eps_max``
            is then ``GᵀPG/GᵀPHPG``, the step size that multiplies ``Pĝ``.
        interval_method, confidence: how the intervals were computed (``"bootstrap"`` or
            ``"jackknife"``) and their level.
    """

    b_simple: float
    b_simple_interval: tuple[float, float]
    trace_cov: float
    grad_norm_sq: float
    b_noise: float | None = None
    b_noise_interval: tuple[float, float] | None = None
    eps_max: float | None = None
    per_layer: dict[str, LayerNoise] = field(default_factory=dict, repr=False)
    num_batches: int = 0
    examples: int = 0
    estimator: str = "per-example"
    metric: str = "euclidean"
    interval_method: str = "bootstrap"
    confidence: float = 0.95
    trace_cov_batches: tuple[float, ...] = field(default=(), repr=False)
    grad_norm_sq_batches: tuple[float, ...] = field(default=(), repr=False)

    @property
    def interval(self) -> str:
        """Deprecated: ``f"{interval_method} {confidence:.0%}"``."""
        deprecated("NoiseScale.interval", "NoiseScale.interval_method and NoiseScale.confidence")
        return f"{self.interval_method} {self.confidence:.0%}"

    def eps_opt(self, batch_size: float) -> float:
        """``ε_opt(B) = ε_max / (1 + B_noise / B)`` (requires ``b_noise``)."""
        if self.b_noise is None or self.eps_max is None:
            raise ValueError("eps_opt needs B_noise: call noise_scale(..., hessian=True)")
        return self.eps_max / (1 + self.b_noise / batch_size)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["per_layer"] = {k: dataclasses.asdict(v) for k, v in self.per_layer.items()}
        return d

    def __repr__(self) -> str:
        lo, hi = self.b_simple_interval
        s = (
            f"NoiseScale(b_simple={self.b_simple:.4g} [{lo:.4g}, {hi:.4g}] ({self.interval_method} "
            f"{self.confidence:.0%}), "
            f"trace_cov={self.trace_cov:.4g}, grad_norm_sq={self.grad_norm_sq:.4g}"
        )
        if self.b_noise is not None:
            s += f", b_noise={self.b_noise:.4g}"
            if self.b_noise_interval is not None:
                s += f" [{self.b_noise_interval[0]:.4g}, {self.b_noise_interval[1]:.4g}]"
        return s + f", {self.num_batches} batches, {self.examples} examples, {self.estimator})"


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def ratio_interval(
    num: np.ndarray,
    den: np.ndarray,
    *,
    method: Literal["bootstrap", "jackknife"] = "bootstrap",
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval for ``mean(num) / mean(den)`` over paired per-batch values.

    ``"bootstrap"``: BCa bootstrap over batches (``scipy.stats.bootstrap``, paired);
    ``"jackknife"``: delete-one jackknife standard error with a Student-t quantile. A
    denominator whose resampled mean is ``≤ 0`` gives an infinite upper end.

    Raises:
        ValueError: fewer than 2 batches, or an unknown method.
    """
    from scipy import stats

    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    n = len(num)
    if n < 2:
        raise ValueError(f"an interval needs at least 2 batches, got {n}")
    alpha = 1 - confidence
    if method == "jackknife":
        total_n, total_d = num.sum(), den.sum()
        loo = np.array([_ratio((total_n - num[i]) / (n - 1), (total_d - den[i]) / (n - 1)) for i in range(n)])
        if not np.all(np.isfinite(loo)):
            return (float(np.nanmin(loo)), math.inf)
        se = math.sqrt((n - 1) / n * np.sum((loo - loo.mean()) ** 2))
        r = _ratio(num.mean(), den.mean())
        t = float(stats.t.ppf(1 - alpha / 2, n - 1))
        return (float(r - t * se), float(r + t * se))
    if method != "bootstrap":
        raise ValueError(f"unknown interval method {method!r}; choose 'bootstrap' or 'jackknife'")

    def statistic(a, b, axis=-1):
        mb = np.mean(b, axis=axis)
        return np.where(mb > 0, np.mean(a, axis=axis) / np.where(mb > 0, mb, 1.0), np.inf)

    # Resamples whose |G|² mean is ≤ 0 give an infinite ratio on purpose; scipy's standard
    # error of them is NaN, which it would warn about to the user.
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = stats.bootstrap(
            (num, den), statistic, paired=True, vectorized=True, confidence_level=confidence,
            n_resamples=n_resamples, method="percentile", random_state=np.random.default_rng(seed),
        )  # fmt: skip
    lo, hi = res.confidence_interval
    return (float(lo), float(hi) if np.isfinite(hi) else math.inf)


# ---------------------------------------------------------------- two-batch estimator


def two_batch(small_norm_sq: float, large_norm_sq: float, small: int, large: int) -> tuple[float, float]:
    """Unbiased ``(|G|², tr Σ)`` from squared norms of mean gradients over ``small < large``
    examples (McCandlish et al. 2018, App. A.1)::

        |G|² = (B_big |g_big|² − B_small |g_small|²) / (B_big − B_small)
        tr Σ = (|g_small|² − |g_big|²) / (1/B_small − 1/B_big)

    Raises:
        ValueError: unless ``0 < small < large``.
    """
    if not 0 < small < large:
        raise ValueError(f"two batch sizes must satisfy 0 < small < large, got {small} and {large}")
    g2 = (large * large_norm_sq - small * small_norm_sq) / (large - small)
    tr = (small_norm_sq - large_norm_sq) / (1 / small - 1 / large)
    return g2, tr


def two_batch_stats(
    model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch, *, micro_batches: int,
    preconditioner: Preconditioner | None = None,
) -> tuple[float, float]:
    """``(|G|², tr Σ)`` from one batch split into equal micro-batches (gradient accumulation).

    The micro-batch gradients are what an accumulating training loop computes anyway; their
    mean is the full-batch gradient, and the mean of their squared norms is ``|g_b|²``.
    Only batch gradients are needed (no per-example engine). With a ``preconditioner``, the
    squared norms are ``|g|²_P = Σ P ⊙ g²``, which gives ``(GᵀPG, tr(PΣ))``.

    Raises:
        ValueError: if the batch does not split into ``micro_batches ≥ 2`` equal parts.
    """
    B = batch_size_of(inputs, targets, min_size=2)
    params = trainable_params(model)  # a model with trainable parameters, or a clear error
    check_loss_fn(loss_fn)
    check_no_train_batchnorm(model)
    check_device(params, inputs, targets)
    if micro_batches < 2 or B % micro_batches:
        raise ValueError(f"a batch of {B} does not split into {micro_batches} equal micro-batches (need ≥ 2 that divide it)")
    b = B // micro_batches
    xs, ys = as_tuple(inputs), as_tuple(targets)
    weights = None
    if preconditioner is not None:
        weights = preconditioner_weights(trainable_params(model, detach=False), preconditioner)
    grads = []
    for k in range(micro_batches):
        sl = slice(k * b, (k + 1) * b)
        g = mean_gradient(model, loss_fn, [(tuple(t[sl] for t in xs), tuple(t[sl] for t in ys))])
        flat = torch.cat([v.reshape(-1) for v in g.values()]).double()
        if weights is not None:
            flat = flat * torch.cat([weights[k].reshape(-1) for k in g]).double().sqrt()
        grads.append(flat)
    small = float(torch.stack([g.dot(g) for g in grads]).mean())
    big_g = torch.stack(grads).mean(0)
    return two_batch(small, float(big_g.dot(big_g)), b, B)


# ---------------------------------------------------------------- EMA for streams


class NoiseScaleEMA:
    """Exponential moving averages of ``tr Σ`` and ``|G|²`` (bias-corrected), then divided.

    For a stream of per-step estimates (McCandlish et al. 2018 smooth numerator and
    denominator separately)::

        ema = NoiseScaleEMA(beta=0.99)
        ema.update(stats.trace_cov, stats.grad_norm_sq)
        ema.b_simple

    The averages span about ``1/(1−β)`` updates. When ``tr Σ`` and ``|G|²`` change by orders
    of magnitude within that window (late in training, or with sparse updates), the old,
    larger values dominate both and the ratio lags: match ``β`` to the update schedule.
    """

    def __init__(self, beta: float = 0.99) -> None:
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self._tr = self._g2 = 0.0
        self._steps = 0

    def update(self, trace_cov: float, grad_norm_sq: float) -> float:
        """Add one estimate; returns the current ``B_simple``."""
        b = self.beta
        self._tr = b * self._tr + (1 - b) * trace_cov
        self._g2 = b * self._g2 + (1 - b) * grad_norm_sq
        self._steps += 1
        return self.b_simple

    @property
    def trace_cov(self) -> float:
        return self._tr / (1 - self.beta**self._steps) if self._steps else math.nan

    @property
    def grad_norm_sq(self) -> float:
        return self._g2 / (1 - self.beta**self._steps) if self._steps else math.nan

    @property
    def b_simple(self) -> float:
        return _ratio(self.trace_cov, self.grad_norm_sq) if self._steps else math.nan


# ---------------------------------------------------------------- noise scale over batches


@renamed_keywords(batches="data")
def noise_scale(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    estimator: Estimator = "per-example",
    micro_batches: int = 2,
    dataset_size: int | None = None,
    interval: Literal["bootstrap", "jackknife"] = "bootstrap",
    confidence: float = 0.95,
    hessian: bool = False,
    hessian_examples: int = 64,
    hvp: HVPMethod = "auto",
    method: Method = "auto",
    seed: int = 0,
    preconditioner: Preconditioner | None = None,
) -> NoiseScale:
    """``B_simple`` (and optionally ``B_noise``) over many batches, with an interval.

    Args:
        model, loss_fn: as in :func:`gradnoise.gradient_stats`.
        data: at least 2 batches from the same distribution: a list of ``(inputs,
            targets)`` pairs or a DataLoader. Batches of unequal size are weighted by their
            size (the variance of each batch's estimates falls as ``1/B``).
        estimator: ``"per-example"`` (unbiased tr Σ and |G|² from per-example gradients of
            each batch) or ``"two-batch"`` (each batch split into ``micro_batches`` equal
            parts; only batch gradients are used).
        dataset_size: ``N`` for batches drawn without replacement from ``N`` examples.
        interval: ``"bootstrap"`` (percentile, paired over batches) or ``"jackknife"``.
        hessian: also estimate ``B_noise = tr(HΣ)/GᵀHG`` (see :func:`b_noise`).
        hessian_examples: examples (from the first batches) whose gradient deviations
            estimate ``tr(HΣ)``; one Hessian-vector product each.
        hvp: how those products are computed (``method`` of :func:`~gradnoise.hessian_operator`).
        preconditioner: a diagonal ``P`` (a dict, or an ``Adam``/``AdamW`` optimizer; see
            :func:`~gradnoise.gradient_stats`): the noise scales of the update ``−εPĝ``,
            ``B_simple^P`` and ``B_noise^P`` (``metric="preconditioned"``).

    Returns:
        :class:`NoiseScale`.

    Raises:
        ValueError: fewer than 2 batches, a batch of 1, an unknown estimator.
    """
    if estimator not in ("per-example", "two-batch"):
        raise ValueError(f"unknown estimator {estimator!r}; choose 'per-example' or 'two-batch'")
    batches = as_data(data)
    if len(batches) < 2:
        raise ValueError(
            f"{len(batches)} batch given: a noise scale with an interval needs at least 2 "
            "batches (the estimate is a ratio of averages over batches); pass a list of "
            "(inputs, targets) pairs or a DataLoader"
        )
    trs, g2s, layers, examples = [], [], [], 0
    for x, y in map(unpacked, batches):
        n = batch_size_of(x, y, min_size=2)
        examples += n
        if estimator == "per-example":
            s = gradient_stats(model, loss_fn, x, y, method=method, dataset_size=dataset_size, variance=False,
                               preconditioner=preconditioner)  # fmt: skip
            trs.append(s.trace_cov)
            g2s.append(s.grad_norm_sq)
            layers.append(s.per_layer)
        else:
            g2, tr = two_batch_stats(model, loss_fn, x, y, micro_batches=micro_batches, preconditioner=preconditioner)
            trs.append(tr)
            g2s.append(g2)
    # Each batch's estimates are unbiased with a variance that falls as 1/B: batches of
    # unequal size are weighted by their size (equal sizes: the plain mean).
    w = np.array([x[0].shape[0] for x, _ in batches], dtype=float)
    w /= w.mean()
    tr, g2 = float(np.mean(w * trs)), float(np.mean(w * g2s))
    per_layer = {}
    if layers:
        for name in layers[0]:
            lt = float(np.mean(w * [ls[name].trace_cov for ls in layers]))
            lg = float(np.mean(w * [ls[name].grad_norm_sq for ls in layers]))
            per_layer[name] = LayerNoise(lt, lg, _ratio(lt, lg))
    result = NoiseScale(
        b_simple=_ratio(tr, g2),
        b_simple_interval=ratio_interval(w * trs, w * g2s, method=interval, confidence=confidence, seed=seed),
        trace_cov=tr,
        grad_norm_sq=g2,
        per_layer=per_layer,
        num_batches=len(batches),
        examples=examples,
        estimator=estimator,
        metric="euclidean" if preconditioner is None else "preconditioned",
        interval_method=interval,
        confidence=confidence,
        trace_cov_batches=tuple(trs),
        grad_norm_sq_batches=tuple(g2s),
    )
    if hessian:
        bn = b_noise(model, loss_fn, batches, examples=hessian_examples, confidence=confidence, seed=seed, hvp=hvp,
                     preconditioner=preconditioner)  # fmt: skip
        result = dataclasses.replace(result, b_noise=bn.b_noise, b_noise_interval=bn.interval, eps_max=bn.eps_max)
    return result


# ---------------------------------------------------------------- the 1/B law


