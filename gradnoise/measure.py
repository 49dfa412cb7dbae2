"""The main job: train a task briefly, then measure gradient noise at several batch sizes.

``gradnoise measure`` is a thin shell over :func:`measure`. A user model plugs in through an
entry point ``package.module:factory`` returning ``(model, loss_fn, (x_train, y_train))``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gradnoise.batch_size import suggest_batch_size
from gradnoise.eigen import hessian_eigenvalues
from gradnoise.sharpness import epsilon_sharpness
from gradnoise.stats import gradient_stats
from gradnoise.tasks import get_task
from gradnoise.trace import hessian_trace

__all__ = [
    "MeasureConfig",
    "MeasureResult",
    "SharpnessConfig",
    "load_entry_point",
    "load_problem",
    "measure",
    "measure_sharpness",
    "train_sgd",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MeasureConfig:
    """What ``gradnoise measure`` runs. Every field has a command-line flag of the same name."""

    task: str = "mnist1d-mlp"
    model: str | None = None  # "package.module:factory" overrides task
    train_steps: int = 300
    train_batch: int = 64
    lr: float = 0.05
    batch_sizes: tuple[int, ...] = (16, 64, 256, 1024)
    batches: int = 8
    method: str = "auto"
    seed: int = 0
    device: str = "cpu"
    suggest: bool = True  # B_noise (Hessian-vector products) and a batch-size suggestion


@dataclass(frozen=True)
class MeasureRow:
    batch_size: int
    num_batches: int
    loss: float
    trace_cov: float
    grad_norm_sq: float
    noise: float  # E|ĝ_B − G|² = tr Σ / B · (N − B)/(N − 1)
    b_simple: float
    gsnr: float | None
    seconds_per_batch: float


@dataclass(frozen=True)
class MeasureResult:
    """Rows per batch size, pooled over ``batches`` disjoint batches each (exact merge)."""

    config: MeasureConfig
    description: str
    num_params: int
    dataset_size: int
    train_loss: float
    rows: tuple[MeasureRow, ...]
    per_layer: dict[str, dict] = field(default_factory=dict)  # at the largest batch size
    suggestion: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        head = (
            f"{'B':>6} {'batches':>7} {'loss':>8} {'tr Σ':>10} {'|G|²':>10} "
            f"{'E|ĝ−G|²':>10} {'B_simple':>9} {'GSNR':>8} {'ms/batch':>9}"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            gsnr = "n/a" if r.gsnr is None else f"{r.gsnr:.3g}"
            lines.append(
                f"{r.batch_size:>6} {r.num_batches:>7} {r.loss:>8.4f} {r.trace_cov:>10.4g} "
                f"{r.grad_norm_sq:>10.4g} {r.noise:>10.4g} {r.b_simple:>9.4g} {gsnr:>8} "
                f"{1e3 * r.seconds_per_batch:>9.1f}"
            )
        return "\n".join(lines)


def load_entry_point(spec: str):
    """Import ``package.module:factory`` and call it.

    The factory returns ``(model, loss_fn, (x_train, y_train))``.

    Raises:
        ValueError: malformed spec, missing attribute, or a factory returning something else.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--model must look like 'package.module:factory', got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:  # as `python -m` does: a module in the working directory imports
        sys.path.insert(0, cwd)
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot load {spec!r}: {exc} (looked in {cwd} and on sys.path)") from exc
    out = factory()
    if not (isinstance(out, tuple) and len(out) == 3 and isinstance(out[0], nn.Module)):
        raise ValueError(f"{spec} must return (model, loss_fn, (x_train, y_train)), got {type(out).__name__}")
    return out


def load_problem(task_name: str, model_spec: str | None, seed: int, device: str):
    """``(model, loss_fn, x_train, y_train, description)`` of a built-in task or an entry point."""
    torch.manual_seed(seed)
    if model_spec:
        model, loss_fn, (x, y) = load_entry_point(model_spec)
        description = model_spec
    else:
        task = get_task(task_name)
        model, loss_fn = task.make_model(), task.make_loss()
        x, y, _, _ = task.make_data()
        description = task.description
    dev = torch.device(device)
    return model.to(dev), loss_fn, x.to(dev), y.to(dev), description


def train_sgd(
    model: nn.Module, loss_fn, x: Tensor, y: Tensor, *, steps: int, batch: int, lr: float, seed: int
) -> float:
    """Plain SGD on random batches; returns the mean loss of the last 20 steps."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g).to(x.device)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tail = losses[-20:]
    return sum(tail) / max(1, len(tail))


def measure(config: MeasureConfig) -> MeasureResult:
    """Train briefly, then pool gradient statistics over disjoint batches at each batch size.

    Batches are drawn without replacement from the training set, so the finite-population
    correction uses the training-set size.

    Raises:
        ValueError: a batch size larger than the training set, or non-positive settings.
    """
    if config.train_steps < 0 or config.batches < 1 or not config.batch_sizes:
        raise ValueError("train_steps must be ≥ 0, batches ≥ 1 and batch_sizes non-empty")
    model, loss_fn, x, y, description = load_problem(config.task, config.model, config.seed, config.device)
    device = x.device
    n = x.shape[0]
    for b in config.batch_sizes:
        if not 2 <= b <= n:
            raise ValueError(f"batch size {b} must be between 2 and the training-set size {n}")
    log.info("training %s for %d steps", description, config.train_steps)
    train_loss = train_sgd(
        model, loss_fn, x, y, steps=config.train_steps, batch=config.train_batch, lr=config.lr, seed=config.seed
    )
    g = torch.Generator().manual_seed(config.seed + 1)
    rows, per_batch = [], []
    for b in config.batch_sizes:
        perm = torch.randperm(n, generator=g).to(device)
        k = max(1, min(config.batches, n // b))
        start = time.perf_counter()
        per_batch = [
            gradient_stats(model, loss_fn, x[idx], y[idx], method=config.method, dataset_size=n)
            for idx in perm[: k * b].split(b)
        ]
        seconds = (time.perf_counter() - start) / k
        # Noise scale: numerator and denominator averaged over batches, then divided.
        tr = sum(s.trace_cov for s in per_batch) / k
        g2 = sum(s.grad_norm_sq for s in per_batch) / k
        gsnrs = [s.gsnr for s in per_batch if s.gsnr is not None]
        rows.append(
            MeasureRow(
                batch_size=b,
                num_batches=k,
                loss=sum(s.loss for s in per_batch) / k,
                trace_cov=tr,
                grad_norm_sq=g2,
                noise=tr / b * (n - b) / (n - 1),
                b_simple=tr / g2 if g2 > 0 else float("inf"),
                gsnr=sum(gsnrs) / len(gsnrs) if gsnrs else None,
                seconds_per_batch=seconds,
            )
        )
    per_layer = {}
    for name in per_batch[0].per_layer:
        tr = sum(s.per_layer[name].trace_cov for s in per_batch) / len(per_batch)
        g2 = sum(s.per_layer[name].grad_norm_sq for s in per_batch) / len(per_batch)
        per_layer[name] = {
            "num_params": per_batch[0].per_layer[name].num_params,
            "trace_cov": tr,
            "grad_norm_sq": g2,
            "b_simple": tr / g2 if g2 > 0 else float("inf"),
            "method": per_batch[0].per_layer[name].method,
        }
    suggestion = None
    if config.suggest:
        b = min(256, n // 8)
        perm = torch.randperm(n, generator=g).to(device)
        batches = [(x[i], y[i]) for i in perm[: 8 * b].split(b)]
        suggestion = suggest_batch_size(
            model, loss_fn, batches, base_lr=config.lr, base_batch=config.train_batch,
            hessian_examples=32, dataset_size=n, seed=config.seed,
        ).to_dict()  # fmt: skip
    return MeasureResult(
        config=config,
        description=description,
        num_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        dataset_size=n,
        train_loss=train_loss,
        rows=tuple(rows),
        per_layer=per_layer,
        suggestion=suggestion,
    )


def parse_sizes(text: str) -> Sequence[int]:
    try:
        return tuple(int(t) for t in text.split(","))
    except ValueError as exc:
        raise ValueError(f"batch sizes must be comma-separated integers, got {text!r}") from exc


@dataclass(frozen=True)
class SharpnessConfig:
    """What ``gradnoise sharpness`` runs. Every field has a command-line flag of the same name."""

    task: str = "mnist1d-mlp"
    model: str | None = None
    train_steps: int = 300
    train_batch: int = 64
    lr: float = 0.05
    examples: int = 1000  # the stated set: the first N training examples
    k: int = 3
    epsilon: float = 1e-3
    trace_hvps: int = 60
    seed: int = 0
    device: str = "cpu"


def measure_sharpness(config: SharpnessConfig) -> dict:
    """Train briefly, then the Hessian's top-k eigenvalues (Lanczos), its trace (Hutch++) and
    the ε-sharpness (Keskar et al. 2017), over the first ``examples`` training examples, in
    eval mode (curvature of a deterministic loss)."""
    model, loss_fn, x, y, description = load_problem(config.task, config.model, config.seed, config.device)
    train_loss = train_sgd(model, loss_fn, x, y, steps=config.train_steps, batch=config.train_batch, lr=config.lr, seed=config.seed)
    model.eval()
    n = min(config.examples, x.shape[0])
    data = (x[:n], y[:n])
    start = time.perf_counter()
    eig = hessian_eigenvalues(model, loss_fn, data, k=config.k, tol=1e-4, seed=config.seed)
    t_eig = time.perf_counter() - start
    trace = hessian_trace(model, loss_fn, data, method="hutch++", num_hvps=config.trace_hvps, seed=config.seed)
    sharp = epsilon_sharpness(model, loss_fn, data, epsilon=config.epsilon, seed=config.seed)
    return {
        "config": dataclasses.asdict(config),
        "description": description,
        "num_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "examples": n,
        "train_loss": train_loss,
        "eigenvalues": eig.to_dict(),
        "eigen_seconds": t_eig,
        "two_over_lr": 2 / config.lr,
        "trace": trace.to_dict(),
        "epsilon_sharpness": sharp.to_dict(),
    }
