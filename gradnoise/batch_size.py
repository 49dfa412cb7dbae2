"""Choosing a batch size: per-example memory, the largest batch that fits, and a suggestion
with its reasoning from the noise scales.

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
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gradnoise._compat import renamed_keywords
from gradnoise._data import Data, as_data, unpacked
from gradnoise._functional import LossFn, as_tuple, preserved_state
from gradnoise.hessian import HVPMethod
from gradnoise.noise_scale import noise_scale

__all__ = ["BatchSizeSuggestion", "oom_probe", "per_example_memory", "suggest_batch_size"]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- B_noise


# ---------------------------------------------------------------- critical batch fit


# ---------------------------------------------------------------- training sweep


# ---------------------------------------------------------------- memory and suggestion


def _saved_bytes(model, loss_fn, x, y) -> int:
    """Bytes of the distinct tensors autograd saves for the backward pass of one forward: the
    activation memory of a training step."""

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


@renamed_keywords(batches="data")
def suggest_batch_size(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    memory_budget: int | None = None,
    base_lr: float | None = None,
    base_batch: int | None = None,
    hessian: bool = True,
    hessian_examples: int = 32,
    hvp: HVPMethod = "auto",
    dataset_size: int | None = None,
    seed: int = 0,
) -> BatchSizeSuggestion:
    """Suggest a batch size from the gradient noise scale and the memory it would need.

    The noise scale (``B_noise`` if ``hessian`` else ``B_simple``) estimates the critical
    batch size (McCandlish et al. 2018): below it, doubling the batch nearly halves the
    steps; above it, extra examples buy little. The suggestion is the largest power of two
    not above that estimate that also fits in memory. Learning rates: the linear scaling
    rule from ``(base_lr, base_batch)``, and ``ε_opt(B) = ε_max/(1 + B_noise/B)``.

    Args:
        data: batches from the training distribution (at least 2): a list of
            ``(inputs, targets)`` pairs or a DataLoader.
        memory_budget: bytes a step may use (default: what the device has free).
        base_lr, base_batch: a learning rate known to work at ``base_batch``, for the
            linear-scaling suggestion.
        hvp: how ``B_noise``'s Hessian-vector products are computed (``method`` of
            :func:`~gradnoise.hessian_operator`).
        dataset_size: ``N``, the training set's size: no batch larger than ``N`` is
            suggested or reported as fitting.

    Raises:
        ValueError: a budget, learning rate, batch or data-set size that is not positive.
    """
    _check_positive(memory_budget=memory_budget, base_lr=base_lr, base_batch=base_batch, dataset_size=dataset_size)

    bs = as_data(data)
    ns = noise_scale(model, loss_fn, bs, hessian=hessian, hessian_examples=hessian_examples, hvp=hvp, seed=seed)
    target = ns.b_noise if (hessian and ns.b_noise is not None and math.isfinite(ns.b_noise)) else ns.b_simple
    x0, y0 = unpacked(bs[0])
    n0 = bs[0][0][0].shape[0]
    device = as_tuple(x0)[0].device
    mem = per_example_memory(model, loss_fn, x0, y0, sizes=(max(1, n0 // 4), n0))
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
    suggested = _pow2_floor(target) if math.isfinite(target) else (max_b or dataset_size or 1)
    if max_b is not None:
        suggested = min(suggested, _pow2_floor(max_b))
    if dataset_size is not None:
        suggested = min(suggested, _pow2_floor(dataset_size))
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
        fits = f"at most B ≈ {max_b:,} fits in {budget / 2**30:.1f} GiB"
        if dataset_size is not None and max_b >= dataset_size:
            fits = f"the whole data set (N = {dataset_size:,}) fits in {budget / 2**30:.1f} GiB"
        lines.append(f"  memory: ~{mem[1] / 1024:.1f} KiB per example ({where}), so {fits}.")
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


def _check_positive(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not value > 0 or not math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number or None, got {value!r}")
