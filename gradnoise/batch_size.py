"""Choosing a batch size: ``B_noise``, the critical-batch fit, a training sweep, per-example
memory, and a suggestion with its reasoning.

McCandlish et al. 2018 (arXiv:1812.06162): training at batch ``B`` to a fixed target takes
``S(B) = S_min + E_min / B`` steps, equivalently ``(S/S_min − 1)(E/E_min − 1) = 1`` with
``E = B·S`` examples; the critical batch size ``B_crit = E_min / S_min`` balances the two,
and the gradient noise scale ``B_noise = tr(HΣ)/GᵀHG`` predicts it (within an order of
magnitude in their experiments).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from gradnoise._functional import LossFn, as_tuple
from gradnoise.hessian import as_batches, hessian_operator
from gradnoise.per_sample import per_sample_grads

__all__ = [
    "BNoise",
    "BatchSizeSuggestion",
    "CriticalBatchFit",
    "SweepResult",
    "b_noise",
    "critical_batch_sweep",
    "fit_critical_batch",
    "per_example_memory",
    "suggest_batch_size",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- B_noise


@dataclass(frozen=True)
class BNoise:
    """``B_noise = tr(HΣ)/GᵀHG`` and the quantities it is made of.

    Attributes:
        b_noise: the estimate; interval: bootstrap over the examples of ``tr(HΣ)``.
        trace_h_sigma: ``tr(HΣ)``; gthg: ``GᵀHG`` (bias-corrected); grad_norm_sq: ``|G|²``.
        eps_max: ``|G|²/GᵀHG``, the optimal step size with an exact gradient.
        examples: examples whose gradient deviations estimate ``tr(HΣ)``; num_hvps.
    """

    b_noise: float
    interval: tuple[float, float]
    trace_h_sigma: float
    gthg: float
    grad_norm_sq: float
    eps_max: float
    examples: int
    num_hvps: int

    def eps_opt(self, batch_size: float) -> float:
        """``ε_opt(B) = ε_max / (1 + B_noise/B)`` (McCandlish et al. 2018, Eq. 2.6)."""
        return self.eps_max / (1 + self.b_noise / batch_size)


def b_noise(
    model: nn.Module,
    loss_fn: LossFn,
    batches,
    *,
    examples: int = 64,
    dataset_size: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> BNoise:
    """Estimate ``B_noise = tr(HΣ)/GᵀHG`` with Hessian-vector products.

    ``H`` and ``G`` are the Hessian and gradient of the mean loss over all examples in
    ``batches`` (the stated set). ``tr(HΣ) = E[(g_i − G)ᵀ H (g_i − G)]`` is estimated from
    the per-example gradient deviations of the first ``examples`` examples (one HVP each,
    ``1/(m−1)`` normalisation); ``GᵀHG`` from one HVP, corrected for the noise in ``Ĝ``:
    ``E[ĜᵀHĜ] = GᵀHG + tr(HΣ)(1/n − 1/N)`` over ``n`` examples (``1/N = 0`` for a stream).

    Raises:
        ValueError: fewer than 2 examples for ``tr(HΣ)``, and as :func:`hessian_operator`.
    """
    from scipy import stats

    bs = as_batches(batches)
    op = hessian_operator(model, loss_fn, bs)
    n = op.num_examples
    xs = tuple(torch.cat([x[i] for x, _ in bs]) for i in range(len(bs[0][0])))
    ys = tuple(torch.cat([y[i] for _, y in bs]) for i in range(len(bs[0][1])))
    m = min(examples, n)
    if m < 2:
        raise ValueError(f"tr(HΣ) needs at least 2 examples, got {m}")
    g = per_sample_grads(model, loss_fn, tuple(t[:m] for t in xs), ys[0][:m] if len(ys) == 1 else tuple(t[:m] for t in ys))
    flat = torch.cat([v.reshape(m, -1) for v in g.values()], dim=1)
    dev = flat - flat.mean(0)
    q = np.concatenate([
        (blk * op.matmat(blk.T).T).sum(1).double().cpu().numpy() for blk in dev.split(256)
    ]) * m / (m - 1)  # (g_i − ḡ)ᵀH(g_i − ḡ); mean(q) is unbiased for tr(HΣ)
    tr_hs = float(q.mean())
    G = op.gradient()
    inv_n = 1.0 / n - (0.0 if dataset_size is None else 1.0 / dataset_size)
    # trace of Σ from the same deviations, for the |G|² correction
    tr_s = float(dev.square().sum()) / (m - 1)
    gthg = float(G @ op.matvec(G)) - tr_hs * inv_n
    g2 = float(G @ G) - tr_s * inv_n
    res = stats.bootstrap((q,), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    ratio = (lambda x: x / gthg) if gthg > 0 else (lambda x: math.inf)
    return BNoise(
        b_noise=ratio(tr_hs),
        interval=(ratio(float(lo)), ratio(float(hi))),
        trace_h_sigma=tr_hs,
        gthg=gthg,
        grad_norm_sq=g2,
        eps_max=g2 / gthg if gthg > 0 else math.inf,
        examples=m,
        num_hvps=op.num_hvps,
    )


# ---------------------------------------------------------------- critical batch fit


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

    def predict(self, batch_size):
        return self.s_min + self.e_min / np.asarray(batch_size, dtype=float)

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
    if np.any(b <= 0) or np.any(s <= 0) or not np.all(np.isfinite(s)):
        raise ValueError("batch sizes and steps must be positive and finite (a run that never reached the target has no step count: leave it out)")
    # Start from the linear fit of S against 1/B, then fit in log space (relative errors).
    A = np.stack([np.ones_like(b), 1 / b], axis=1)
    p0 = np.linalg.lstsq(A, s, rcond=None)[0]
    p0 = np.clip(p0, [s.min() * 1e-3, 1e-6], None)

    def model(bb, log_s, log_e):
        return np.log(np.exp(log_s) + np.exp(log_e) / bb)

    popt, pcov = optimize.curve_fit(model, b, np.log(s), p0=np.log(p0), maxfev=20000)
    resid = np.log(s) - model(b, *popt)
    dof = max(len(b) - 2, 1)
    t = stats.t.ppf(1 - (1 - confidence) / 2, dof)
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


# ---------------------------------------------------------------- training sweep


@dataclass(frozen=True)
class SweepRun:
    batch_size: int
    lr: float
    steps: int | None  # None: target not reached within max_steps
    examples: int | None
    seconds: float
    final_loss: float


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
    if sys.stderr.isatty():
        done = int(30 * i / n)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {text[:50]:<50}")
        sys.stderr.flush()
        if i == n:
            sys.stderr.write("\n")
    else:
        log.info("%d/%d %s", i, n, text)


def critical_batch_sweep(
    make_model: Callable[[], nn.Module],
    loss_fn: LossFn,
    data: tuple[Tensor, Tensor],
    batch_sizes: Sequence[int],
    *,
    target_loss: float | None = None,
    target_accuracy: float | None = None,
    eval_data: tuple[Tensor, Tensor] | None = None,
    lrs: Sequence[float] | Callable[[int], Sequence[float]] = (0.01, 0.03, 0.1, 0.3),
    momentum: float = 0.0,
    max_steps: int = 5000,
    eval_every: int = 10,
    seed: int = 0,
    progress: bool = True,
) -> SweepResult:
    """Train from the same initialisation at each batch size until a target is reached.

    The learning rate is tuned per batch size over ``lrs`` (a grid, or a callable ``B →
    grid`` for a named rule such as linear scaling); the run with the fewest steps counts.
    Batches are sampled with replacement; the target is checked every ``eval_every`` steps
    on ``eval_data`` (default: the training data) — loss ``≤ target_loss`` or accuracy
    ``≥ target_accuracy``.

    Raises:
        ValueError: neither or both targets, an empty grid.
    """
    if (target_loss is None) == (target_accuracy is None):
        raise ValueError("give exactly one of target_loss and target_accuracy")
    x, y = data
    ex, ey = eval_data if eval_data is not None else data
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
            torch.manual_seed(seed)
            model = make_model()
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
            g = torch.Generator().manual_seed(seed + 1)
            start, steps, loss_val = time.perf_counter(), None, math.nan
            for step in range(1, max_steps + 1):
                idx = torch.randint(0, x.shape[0], (B,), generator=g)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x[idx]), y[idx])
                if not torch.isfinite(loss):
                    break
                loss.backward()
                opt.step()
                if step % eval_every == 0:
                    with torch.no_grad():
                        out = model(ex)
                        loss_val = float(loss_fn(out, ey))
                        hit = loss_val <= target_loss if target_loss is not None else float((out.argmax(1) == ey).float().mean()) >= target_accuracy
                    if hit:
                        steps = step
                        break
            run = SweepRun(B, lr, steps, None if steps is None else steps * B, time.perf_counter() - start, loss_val)
            runs.append(run)
            these.append(run)
            done += 1
            if progress:
                _progress(done, total, f"B={B} lr={lr:g}: {steps if steps else '—'} steps")
        reached = [r for r in these if r.steps is not None]
        best.append(min(reached, key=lambda r: r.steps) if reached else these[0])
    target = f"loss ≤ {target_loss}" if target_loss is not None else f"accuracy ≥ {target_accuracy}"
    return SweepResult(target, tuple(best), tuple(runs))


# ---------------------------------------------------------------- memory and suggestion


def _saved_bytes(model, loss_fn, x, y) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of one forward: the
    activation memory of a training step."""
    from gradnoise._functional import preserved_state

    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        key = (t.data_ptr(), t.numel())  # a view counts its own size, not its base's
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with preserved_state(model), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model(x), y)
    return total


def _peak_cuda_step(model, loss_fn, x, y, device) -> int:
    import copy

    m = copy.deepcopy(model)

    def step():
        m.zero_grad(set_to_none=True)
        loss_fn(m(x), y).backward()

    step()  # warm-up
    m.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def per_example_memory(model, loss_fn, inputs, targets, *, sizes=(64, 256)) -> tuple[float, float]:
    """``(fixed_bytes, bytes_per_example)`` of a training step, from two batch sizes.

    On CUDA: the caching allocator's peak of a forward + backward (measured). On CPU: the
    activation memory saved for the backward pass (``saved_tensors_hooks``), doubled for the
    gradients that flow through the backward pass at its peak — an estimate, since CPU
    allocators give no reliable peak.
    """
    xs = as_tuple(inputs)
    device = xs[0].device
    points = []
    for b in sizes:
        b = min(b, xs[0].shape[0])
        x = xs[0][:b] if len(xs) == 1 else tuple(t[:b] for t in xs)
        if device.type == "cuda":
            points.append((b, _peak_cuda_step(model, loss_fn, x, targets[:b], device)))
        else:
            points.append((b, 2 * _saved_bytes(model, loss_fn, x, targets[:b])))
    (b0, p0), (b1, p1) = points
    if b0 == b1:
        raise ValueError(f"need two different batch sizes to separate per-example memory, got {b0}")
    per = max((p1 - p0) / (b1 - b0), 1.0)
    return max(p0 - per * b0, 0.0), per


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            m = re.search(r"MemAvailable:\s+(\d+)", fh.read())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def oom_probe(model, loss_fn, make_batch: Callable[[int], tuple], *, start: int = 32, limit: int = 2**20) -> int:
    """Largest batch (power of two) whose training step runs on CUDA without running out of
    memory: doubling, then stopping at the first ``OutOfMemoryError``. CUDA only."""
    import copy

    m = copy.deepcopy(model)
    b, ok = start, 0
    while b <= limit:
        try:
            x, y = make_batch(b)
            m.zero_grad(set_to_none=True)
            loss_fn(m(x), y).backward()
            ok = b
            b *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            m.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    return ok


@dataclass(frozen=True)
class BatchSizeSuggestion:
    """A batch size and learning rates, with the measurements and the reasoning."""

    suggested: int
    b_simple: float
    b_simple_interval: tuple[float, float]
    b_noise: float | None
    b_noise_interval: tuple[float, float] | None
    max_batch_memory: int | None
    bytes_per_example: float | None
    lr_linear: float | None
    lr_eps_opt: float | None
    reasoning: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(x, 1)))))


def suggest_batch_size(
    model: nn.Module,
    loss_fn: LossFn,
    batches,
    *,
    memory_budget: int | None = None,
    base_lr: float | None = None,
    base_batch: int | None = None,
    hessian: bool = True,
    hessian_examples: int = 32,
    seed: int = 0,
) -> BatchSizeSuggestion:
    """Suggest a batch size from the gradient noise scale and the memory it would need.

    The noise scale (``B_noise`` if ``hessian`` else ``B_simple``) estimates the critical
    batch size (McCandlish et al. 2018): below it, doubling the batch nearly halves the
    steps; above it, extra examples buy little. The suggestion is the largest power of two
    not above that estimate that also fits in memory. Learning rates: the linear scaling
    rule from ``(base_lr, base_batch)``, and ``ε_opt(B) = ε_max/(1 + B_noise/B)``.
    """
    from gradnoise.noise_scale import noise_scale

    bs = list(batches) if not (isinstance(batches, tuple) and len(batches) == 2) else [batches]
    ns = noise_scale(model, loss_fn, bs, hessian=hessian, hessian_examples=hessian_examples, seed=seed)
    target = ns.b_noise if (hessian and ns.b_noise is not None and math.isfinite(ns.b_noise)) else ns.b_simple
    x0, y0 = bs[0]
    device = as_tuple(x0)[0].device
    mem = per_example_memory(model, loss_fn, x0, y0, sizes=(max(1, len(y0) // 4), len(y0)))
    budget = memory_budget if memory_budget is not None else _available_bytes(device)
    max_b = None
    if mem is not None and budget is not None:
        fixed, per = mem
        max_b = max(1, int((budget * (0.8 if memory_budget is None else 1.0) - fixed) // per))
    if device.type == "cuda" and memory_budget is None:  # measure, not estimate: probe until OOM
        xs0 = as_tuple(x0)

        def make_batch(b):
            idx = torch.arange(b, device=device) % xs0[0].shape[0]
            return (xs0[0][idx] if len(xs0) == 1 else tuple(t[idx] for t in xs0)), y0[idx]

        probed = oom_probe(model, loss_fn, make_batch, start=max(1, len(y0)))
        max_b = probed if probed else max_b
    suggested = _pow2_floor(target) if math.isfinite(target) else (max_b or 1)
    if max_b is not None:
        suggested = min(suggested, _pow2_floor(max_b))
    lr_lin = base_lr * suggested / base_batch if base_lr is not None and base_batch else None
    lr_eps = ns.eps_opt(suggested) if ns.b_noise is not None and ns.eps_max is not None and math.isfinite(ns.eps_max) else None
    name = "B_noise" if target is ns.b_noise else "B_simple"
    lo, hi = ns.b_noise_interval if name == "B_noise" and ns.b_noise_interval else ns.b_simple_interval
    lines = [
        f"{name} = {target:.4g} (95% interval {lo:.4g} – {hi:.4g}) estimates the critical batch size:",
        "  below it the number of steps falls almost as 1/B; above it extra examples per step buy little.",
    ]
    if max_b is not None:
        where = "CUDA allocator peak" if device.type == "cuda" else "activations saved for backward ×2, estimated"
        lines.append(f"  memory: ~{mem[1] / 1024:.1f} KiB per example ({where}), so at most B ≈ {max_b:,} fits in {budget / 2**30:.1f} GiB.")
    lines.append(f"  suggested B = {suggested} (largest power of two ≤ the estimate{' and the memory limit' if max_b else ''}).")
    if lr_eps is not None:
        lines.append(f"  ε_opt({suggested}) = {lr_eps:.4g} (plain-SGD step size on the local quadratic model; a ceiling, not a tuned rate).")
    if lr_lin is not None:
        lines.append(f"  linear scaling from lr {base_lr:g} at B={base_batch}: lr = {lr_lin:.4g}.")
    return BatchSizeSuggestion(
        suggested=suggested,
        b_simple=ns.b_simple,
        b_simple_interval=ns.b_simple_interval,
        b_noise=ns.b_noise,
        b_noise_interval=ns.b_noise_interval,
        max_batch_memory=max_b,
        bytes_per_example=None if mem is None else mem[1],
        lr_linear=lr_lin,
        lr_eps_opt=lr_eps,
        reasoning="\n".join(lines),
    )
