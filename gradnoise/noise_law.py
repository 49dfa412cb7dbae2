"""The 1/B noise law: ``E|ĝ_B − G|² = tr(Σ)/B · (N − B)/(N − 1)`` for batches of ``B``
drawn without replacement from ``N`` examples (McCandlish et al. 2018, App. A), measured
against the full-data gradient over a grid of batch sizes and fitted as a power law.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from gradnoise._compat import deprecated
from gradnoise._data import Data, as_data, concat
from gradnoise._functional import (
    LossFn,
    batch_size_of,
    check_device,
    check_loss_fn,
    check_no_train_batchnorm,
    mean_gradient,
    trainable_params,
)
from gradnoise.plots import plot_noise_law
from gradnoise.stats import StatsAccumulator

__all__ = ["NoiseLaw", "noise_law"]


@dataclass(frozen=True)
class NoiseLaw:
    """Measured ``E|ĝ_B − G|²`` against the full-data gradient, and its power-law fit.

    Attributes:
        batch_sizes: the grid.
        errors: mean of ``|ĝ_B − G|²`` over ``repeats`` batches drawn without replacement.
        errors_se: standard errors of those means.
        theory: ``tr Σ / B · (N − B)/(N − 1)`` with the exact ``tr Σ`` of the data set.
        exponent: fitted slope of ``log E·(N−1)/(N−B)`` against ``log B`` (expect −1), by
            least squares weighted with each point's relative standard error.
        exponent_interval: its confidence interval (Student t on the weighted regression).
        raw_exponent: the slope without the finite-population factor (bends near ``N``).
        trace_cov_fit: ``exp(intercept)``, the fitted ``tr Σ``; trace_cov: the exact one.
        dataset_size: ``N``.
    """

    batch_sizes: tuple[int, ...]
    errors: tuple[float, ...]
    errors_se: tuple[float, ...]
    theory: tuple[float, ...]
    exponent: float
    exponent_interval: tuple[float, float]
    raw_exponent: float
    trace_cov_fit: float
    trace_cov: float
    dataset_size: int
    repeats: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def plot(self, ax=None):
        """Seaborn figure of the measurements, the fit and the theory (see :mod:`gradnoise.plots`)."""
        return plot_noise_law(self, ax=ax)


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float, float]:
    """Weighted least-squares line: slope, intercept and the slope's standard error (residual
    variance estimated from the fit, as in ordinary regression)."""
    X = np.stack([np.ones_like(x), x], axis=1)
    XtW = X.T * w
    cov = np.linalg.inv(XtW @ X)
    beta = cov @ (XtW @ y)
    r = y - X @ beta
    dof = max(len(x) - 2, 1)
    s2 = float(np.sum(w * r**2) / dof)
    return float(beta[1]), float(beta[0]), math.sqrt(max(s2 * cov[1, 1], 0.0))


def noise_law(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    batch_sizes: Iterable[int],
    *old: Iterable[int],
    repeats: int = 32,
    finite_population: bool = True,
    confidence: float = 0.95,
    chunk_size: int = 1024,
    seed: int = 0,
) -> NoiseLaw:
    """Measure the 1/B law of gradient noise on a data set of ``N`` examples.

    For each ``B``, ``repeats`` batches are drawn without replacement; each batch gradient
    ``ĝ_B`` is compared with the full-data gradient ``G``. In expectation
    ``E|ĝ_B − G|² = tr Σ / B · (N − B)/(N − 1)`` (McCandlish et al. 2018, App. A), with ``Σ``
    the population covariance of per-example gradients, computed exactly here.

    Args:
        data: the whole data set (``N`` examples): ``(inputs, targets)``, a list of such
            pairs or a DataLoader (concatenated). The old spelling ``noise_law(model,
            loss_fn, inputs, targets, batch_sizes)`` is deprecated.
        batch_sizes: at least 2 distinct sizes in ``[1, N]``.
        finite_population: fit with the ``(N − B)/(N − 1)`` factor divided out (default);
            without it every ``B`` must be below ``N``.

    Raises:
        ValueError: fewer than 2 distinct batch sizes, a size outside ``[1, N]``, or ``B = N``
            without the finite-population correction.
    """
    from scipy import stats as sstats


    if isinstance(data, Tensor) and isinstance(batch_sizes, Tensor) and len(old) == 1:
        deprecated("noise_law(model, loss_fn, inputs, targets, batch_sizes)", "noise_law(model, loss_fn, (inputs, targets), batch_sizes)")
        data, batch_sizes = (data, batch_sizes), old[0]
    elif old:
        raise TypeError("noise_law() takes (model, loss_fn, data, batch_sizes); data is (inputs, targets)")
    xs, ys = concat(as_data(data))
    N = batch_size_of(xs, ys, min_size=2)
    params = trainable_params(model)  # a model with trainable parameters, or a clear error
    check_loss_fn(loss_fn)
    check_no_train_batchnorm(model)
    check_device(params, xs, ys)
    sizes = tuple(sorted({int(b) for b in batch_sizes}))
    if len(sizes) < 2:
        raise ValueError(f"a power law needs at least 2 distinct batch sizes, got {sizes}")
    if sizes[0] < 1 or sizes[-1] > N:
        raise ValueError(f"batch sizes must lie in [1, N={N}], got {sizes}")
    if not finite_population and sizes[-1] >= N:
        raise ValueError(
            f"batch size {sizes[-1]} ≥ N={N} without the finite-population correction: at B = N "
            "the batch is the data set and the error is 0; pass finite_population=True"
        )
    chunks = [(tuple(t[s : s + chunk_size] for t in xs), tuple(t[s : s + chunk_size] for t in ys)) for s in range(0, N, chunk_size)]
    flat = lambda g: torch.cat([v.reshape(-1) for v in g.values()]).double()  # noqa: E731
    G = flat(mean_gradient(model, loss_fn, chunks))
    acc = StatsAccumulator(model, loss_fn, dataset_size=N, variance=False)
    for cx, cy in chunks:
        acc.update(cx, cy)
    trace_cov = acc.compute().trace_cov
    gen = torch.Generator().manual_seed(seed)
    errors, ses = [], []
    for B in sizes:
        errs = []
        for _ in range(repeats if B < N else 1):
            idx = torch.randperm(N, generator=gen)[:B].to(xs[0].device)
            g = flat(mean_gradient(model, loss_fn, [(tuple(t[idx] for t in xs), tuple(t[idx] for t in ys))]))
            errs.append(float((g - G).square().sum()))
        errors.append(float(np.mean(errs)))
        ses.append(float(np.std(errs, ddof=1) / math.sqrt(len(errs))) if len(errs) > 1 else 0.0)
    theory = tuple(trace_cov / B * (N - B) / (N - 1) for B in sizes)
    keep = [i for i, B in enumerate(sizes) if B < N]
    if len(keep) < 2:
        raise ValueError("need at least 2 batch sizes below N to fit the exponent")
    logb = np.log([sizes[i] for i in keep])
    corrected = [errors[i] * (N - 1) / (N - sizes[i]) for i in keep] if finite_population else [errors[i] for i in keep]
    # Weighted least squares in log space: σ(log E) ≈ SE/E (delta method), so points whose
    # mean is noisy (heavy-tailed gradients at small B) count less.
    rel = np.array([ses[i] / errors[i] if errors[i] > 0 else 0.0 for i in keep])
    w = 1 / np.maximum(rel, 1e-12) ** 2 if np.all(rel > 0) else np.ones(len(keep))
    slope, intercept, slope_se = _wls(logb, np.log(corrected), w)
    raw_slope = _wls(logb, np.log([errors[i] for i in keep]), w)[0]
    dof = len(keep) - 2
    t = float(sstats.t.ppf(1 - (1 - confidence) / 2, dof)) if dof > 0 else math.inf
    return NoiseLaw(
        batch_sizes=sizes,
        errors=tuple(errors),
        errors_se=tuple(ses),
        theory=theory,
        exponent=float(slope),
        exponent_interval=(slope - t * slope_se, slope + t * slope_se),
        raw_exponent=float(raw_slope),
        trace_cov_fit=float(math.exp(intercept)),
        trace_cov=float(trace_cov),
        dataset_size=N,
        repeats=repeats,
    )
