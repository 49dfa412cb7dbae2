"""The critical batch size from training runs (McCandlish et al. 2018, arXiv:1812.06162,
§2.3): training at batch ``B`` to a fixed target takes ``S(B) = S_min + E_min / B`` steps,
equivalently ``(S/S_min − 1)(E/E_min − 1) = 1`` with ``E = B·S`` examples; the critical
batch size ``B_crit = E_min / S_min`` balances the two. :func:`fit_critical_batch` fits the
law to measured steps; :func:`critical_batch_sweep` measures them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from gradnoise._data import Data, Pair, as_data, concat
from gradnoise._functional import LossFn

__all__ = ["CriticalBatchFit", "SweepResult", "SweepRun", "critical_batch_sweep", "fit_critical_batch"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CriticalBatchFit:
    """``S(B) = S_min + E_min / B`` fitted to steps-to-target.

    Attributes:
        s_min, e_min, b_crit (``E_min/S_min``) and their intervals (delta method on the
        least-squares covariance in log space); r2: coefficient of determination of
        ``log S``; rms_rel_residual: root-mean-square relative residual.
    """

    s_min: float
    e_min: float
    b_crit: float
    s_min_interval: tuple[float, float]
    e_min_interval: tuple[float, float]
    b_crit_interval: tuple[float, float]
    r2: float
    rms_rel_residual: float
    batch_sizes: tuple[float, ...] = field(repr=False)
    steps: tuple[float, ...] = field(repr=False)

    def predict(self, batch_size: float) -> float:
        """Steps to the target at ``batch_size``: ``S_min + E_min / B``."""
        return float(self.s_min + self.e_min / float(batch_size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fit_critical_batch(
    batch_sizes: Sequence[float], steps: Sequence[float], *, confidence: float = 0.95
) -> CriticalBatchFit:
    """Fit ``S = S_min + E_min/B`` (least squares on ``log S``, scipy ``curve_fit``).

    Raises:
        ValueError: fewer than 3 distinct batch sizes, mismatched lengths, non-positive
            batch sizes or steps.
    """
    from scipy import optimize, stats

    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    if b.shape != s.shape or b.ndim != 1:
        raise ValueError(f"batch_sizes and steps must be 1-D of the same length, got {b.shape} and {s.shape}")
    if len(np.unique(b)) < 3:
        raise ValueError(
            f"fitting S_min and E_min needs at least 3 distinct batch sizes, got {sorted(set(b.tolist()))}"
        )
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if np.any(b <= 0) or np.any(s <= 0) or not np.all(np.isfinite(s)) or not np.all(np.isfinite(b)):
        raise ValueError("batch sizes and steps must be positive and finite (a run that never reached the target has no step count: leave it out)")
    # Start from the linear fit of S against 1/B, then fit in log space (relative errors).
    A = np.stack([np.ones_like(b), 1 / b], axis=1)
    p0 = np.linalg.lstsq(A, s, rcond=None)[0]
    p0 = np.clip(p0, [s.min() * 1e-3, 1e-6], None)

    def model(bb, log_s, log_e):
        return np.log(np.exp(log_s) + np.exp(log_e) / bb)

    order = np.argsort(b)
    if s[order][0] <= s[order][-1]:
        raise ValueError(
            f"the steps do not fall with the batch size ({s[order][0]:g} steps at B = {b[order][0]:g}, "
            f"{s[order][-1]:g} at B = {b[order][-1]:g}): the data do not support S = S_min + E_min/B, "
            "so no critical batch size can be fitted"
        )
    with warnings.catch_warnings():  # a covariance that cannot be estimated is reported below
        warnings.simplefilter("ignore", optimize.OptimizeWarning)
        popt, pcov = optimize.curve_fit(model, b, np.log(s), p0=np.log(p0), maxfev=20000)
    if not np.all(np.isfinite(pcov)):
        raise ValueError(
            "the fit of S = S_min + E_min/B is not determined by these steps (its covariance is "
            "not finite): measure more batch sizes on both sides of the bend"
        )
    resid = np.log(s) - model(b, *popt)
    dof = max(len(b) - 2, 1)
    t = float(stats.t.ppf(1 - (1 - confidence) / 2, dof))
    var_ls, var_le, cov = pcov[0, 0], pcov[1, 1], pcov[0, 1]
    se_ls, se_le = math.sqrt(max(var_ls, 0)), math.sqrt(max(var_le, 0))
    se_lb = math.sqrt(max(var_ls + var_le - 2 * cov, 0))
    s_min, e_min = math.exp(popt[0]), math.exp(popt[1])
    ss_tot = float(np.sum((np.log(s) - np.log(s).mean()) ** 2))
    return CriticalBatchFit(
        s_min=s_min,
        e_min=e_min,
        b_crit=e_min / s_min,
        s_min_interval=(s_min * math.exp(-t * se_ls), s_min * math.exp(t * se_ls)),
        e_min_interval=(e_min * math.exp(-t * se_le), e_min * math.exp(t * se_le)),
        b_crit_interval=(e_min / s_min * math.exp(-t * se_lb), e_min / s_min * math.exp(t * se_lb)),
        r2=1 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0,
        rms_rel_residual=float(np.sqrt(np.mean(np.expm1(resid) ** 2))),
        batch_sizes=tuple(b.tolist()),
        steps=tuple(s.tolist()),
    )


@dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep: steps to the target (``None``: not reached), and whether
    it was stopped early because it could no longer beat the best learning rate at its
    batch size."""

    batch_size: int
    lr: float
    steps: int | None
    examples: int | None
    seconds: float
    final_loss: float
    stopped: bool = False


@dataclass(frozen=True)
class SweepResult:
    """Per batch size, the best run (fewest steps to target) over the learning-rate grid."""

    target: str
    best: tuple[SweepRun, ...]
    runs: tuple[SweepRun, ...] = field(repr=False)

    def fit(self) -> CriticalBatchFit:
        ok = [r for r in self.best if r.steps is not None]
        return fit_critical_batch([r.batch_size for r in ok], [r.steps for r in ok])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _progress(i: int, n: int, text: str) -> None:
    """A progress bar on a terminal, one line per run elsewhere (both on stderr)."""
    if sys.stderr.isatty():
        done = int(30 * i / n)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {text[:50]:<50}")
        if i == n:
            sys.stderr.write("\n")
    else:
        sys.stderr.write(f"critical_batch_sweep [{i}/{n}] {text}\n")
    sys.stderr.flush()


def critical_batch_sweep(
    make_model: Callable[[], nn.Module],
    loss_fn: LossFn,
    data: Data,
    batch_sizes: Sequence[int],
    *,
    target_loss: float | None = None,
    target_accuracy: float | None = None,
    eval_data: Data | None = None,
    lrs: Sequence[float] | Callable[[int], Sequence[float]] = (0.01, 0.03, 0.1, 0.3),
    momentum: float = 0.0,
    max_steps: int = 5000,
    eval_every: int = 10,
    seed: int = 0,
    progress: bool = True,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
) -> SweepResult:
    """Train from the same initialisation at each batch size until a target is reached.

    The learning rate is tuned per batch size over ``lrs`` (a grid, or a callable ``B →
    grid`` for a named rule such as linear scaling); the run with the fewest steps counts,
    and a run is stopped once it has taken as many steps as the best one at its batch size
    (``SweepRun.stopped``). Progress goes to stderr, one line per run when not on a terminal
    (``progress=False``: none).
    Batches are sampled with replacement; the target is checked every ``eval_every`` steps
    on ``eval_data`` (default: the training data) — loss ``≤ target_loss`` or accuracy
    ``≥ target_accuracy``. ``optimizer``: ``optimizer(params, lr=lr)`` builds each run's
    optimizer (e.g. ``torch.optim.AdamW``); default SGD with ``momentum``.

    Raises:
        ValueError: neither or both targets, an empty grid.
    """
    if (target_loss is None) == (target_accuracy is None):
        raise ValueError("give exactly one of target_loss and target_accuracy")
    (x,), (y,) = _single_tensors(concat(as_data(data)), "data")
    (ex,), (ey,) = _single_tensors(concat(as_data(eval_data, name="eval_data")), "eval_data") if eval_data is not None else ((x,), (y,))
    if optimizer is None:
        optimizer = functools.partial(torch.optim.SGD, momentum=momentum)
    elif momentum:
        raise ValueError("momentum= is for the default SGD; pass it inside optimizer= instead")
    sweep = _Sweep(make_model, loss_fn, x, y, ex, ey, optimizer, max_steps, eval_every, seed, target_loss, target_accuracy)
    runs, best = [], []
    grid_of = lrs if callable(lrs) else (lambda b: lrs)
    total = sum(len(list(grid_of(b))) for b in batch_sizes)
    done = 0
    for B in batch_sizes:
        grid = list(grid_of(B))
        if not grid:
            raise ValueError(f"empty learning-rate grid for B={B}")
        these = []
        for lr in grid:
            # a run that has taken as many steps as the best one so far cannot beat it
            limit = min([max_steps] + [r.steps for r in these if r.steps is not None])
            run = _train_to_target(sweep, B, lr, limit)
            runs.append(run)
            these.append(run)
            done += 1
            if progress:
                _progress(done, total, f"B={B} lr={lr:g}: {run.steps or ('stopped' if run.stopped else '—')} steps")
        reached = [r for r in these if r.steps is not None]
        best.append(min(reached, key=lambda r: r.steps) if reached else these[0])
    target = f"loss ≤ {target_loss}" if target_loss is not None else f"accuracy ≥ {target_accuracy}"
    return SweepResult(target, tuple(best), tuple(runs))


def _single_tensors(pair: Pair, name: str) -> Pair:
    """The sweep trains on one input tensor and one target tensor."""
    if len(pair[0]) != 1 or len(pair[1]) != 1:
        raise ValueError(f"{name}: critical_batch_sweep takes one input tensor and one target tensor")
    return pair


@dataclass(frozen=True)
class _Sweep:
    """What every run of a sweep shares: the model, data, optimiser settings and target."""

    make_model: Callable[[], nn.Module]
    loss_fn: LossFn
    x: Tensor
    y: Tensor
    ex: Tensor  # evaluation inputs and targets
    ey: Tensor
    optimizer: Callable[..., torch.optim.Optimizer]
    max_steps: int
    eval_every: int
    seed: int
    target_loss: float | None
    target_accuracy: float | None


def _train_to_target(s: _Sweep, B: int, lr: float, limit: int) -> SweepRun:
    """Training from the seeded initialisation until the target is reached (checked every
    ``eval_every`` steps), the loss is not finite, or ``limit`` steps (``stopped`` when the
    limit is below ``max_steps``: another learning rate already did better)."""
    loss_fn, x, y, ex, ey, target_loss, max_steps = s.loss_fn, s.x, s.y, s.ex, s.ey, s.target_loss, s.max_steps
    torch.manual_seed(s.seed)
    model = s.make_model()
    opt = s.optimizer(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(s.seed + 1)
    start, loss_val = time.perf_counter(), math.nan
    for step in range(1, limit + 1):
        idx = torch.randint(0, x.shape[0], (B,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        if not torch.isfinite(loss):
            break
        loss.backward()
        opt.step()
        if step % s.eval_every == 0:
            with torch.no_grad():
                out = model(ex)
                loss_val = float(loss_fn(out, ey))
                hit = loss_val <= target_loss if target_loss is not None else float((out.argmax(1) == ey).float().mean()) >= s.target_accuracy
            if hit and (step < limit or limit == max_steps):  # a tie with the best is no better
                return SweepRun(B, lr, step, step * B, time.perf_counter() - start, loss_val)
    return SweepRun(B, lr, None, None, time.perf_counter() - start, loss_val, stopped=limit < max_steps)
