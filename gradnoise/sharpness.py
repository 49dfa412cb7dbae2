"""ε-sharpness (Keskar et al. 2017) and loss landscapes (lines between solutions, random
filter-normalised slices; Li et al. 2018).

Every function evaluates the mean loss over the stated examples at parameter vectors other
than the model's own, through ``functional_call``: the model itself is never changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from gradnoise._compat import renamed_keywords
from gradnoise._data import Data
from gradnoise._functional import LossFn
from gradnoise.hessian import hessian_operator

__all__ = [
    "EpsilonSharpness",
    "Landscape",
    "epsilon_sharpness",
    "filter_normalized_direction",
    "loss_along_line",
    "random_slice",
]


def _flat_loss_and_grad(op, x: Tensor):
    """Loss and gradient of the mean loss at flat parameters ``x`` (float64 numpy out)."""
    from torch.func import functional_call

    leaves = {n: t.detach().requires_grad_(True) for n, t in op.unflatten(x.to(op.dtype)).items()}
    total, grads = 0.0, torch.zeros(op.dim, dtype=op.dtype, device=op.device)
    with torch.enable_grad():
        for xs, ys in op.batches:
            w = xs[0].shape[0] / op.num_examples
            out = functional_call(op.model, {**leaves, **op.state}, xs)
            loss = op.loss_fn(out, ys[0] if len(ys) == 1 else ys)
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            total += w * float(loss.detach())
            grads += w * op.flatten([torch.zeros_like(p) if g is None else g for p, g in zip(leaves.values(), gs, strict=True)])
    return total, grads


@dataclass(frozen=True)
class EpsilonSharpness:
    """Keskar et al. 2017, Metric 2.1: ``φ = (max_{y∈C_ε} L(x + Ay) − L(x)) / (1 + L(x)) · 100``.

    Attributes:
        sharpness: ``φ`` (percent); loss: ``L(x)``; max_loss: the maximised loss;
        epsilon; dim: ``p`` (the number of columns of ``A``; ``P`` for the full space);
        iterations, evaluations: of L-BFGS-B; num_examples.
    """

    sharpness: float
    loss: float
    max_loss: float
    epsilon: float
    dim: int
    iterations: int
    evaluations: int
    num_examples: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@renamed_keywords(batches="data")
def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    epsilon: float = 1e-3,
    subspace_dim: int | None = None,
    max_iter: int = 10,
    seed: int = 0,
) -> EpsilonSharpness:
    """Keskar et al. 2017 ε-sharpness, maximised with scipy's L-BFGS-B.

    The box is ``C_ε = {y : |y_i| ≤ ε(|(A⁺x)_i| + 1)}``. With ``subspace_dim=None`` the
    search is in the full space (``A = I``); otherwise ``A`` is a random ``P × p`` Gaussian
    matrix (seeded) and ``A⁺`` its pseudo-inverse. Keskar et al. use ``max_iter=10``.
    L-BFGS-B starts at ``y = 0`` and is deterministic given the seed.

    Raises:
        ValueError: non-positive ``epsilon`` or ``subspace_dim``.
    """
    from scipy.optimize import minimize

    if epsilon <= 0:
        raise ValueError(f"epsilon must be positive, got {epsilon}")
    op = hessian_operator(model, loss_fn, data)
    x = op.flatten(op.params).detach()
    if subspace_dim is None:
        A = None
        ax = x
    else:
        if subspace_dim < 1:
            raise ValueError(f"subspace_dim must be ≥ 1, got {subspace_dim}")
        g = torch.Generator(device="cpu").manual_seed(seed)
        A = torch.randn(op.dim, subspace_dim, generator=g, dtype=torch.float64).to(op.device)
        ax = torch.linalg.lstsq(A, x.double().unsqueeze(1)).solution.squeeze(1)  # A⁺x
    radius = (epsilon * (ax.abs().double() + 1)).cpu().numpy()
    loss0 = op.loss()

    def neg(y: np.ndarray):
        yt = torch.as_tensor(y, dtype=torch.float64, device=op.device)
        step = yt if A is None else A @ yt
        val, grad = _flat_loss_and_grad(op, x + step.to(op.dtype))
        gy = grad.double() if A is None else A.T @ grad.double()
        return -val, -gy.cpu().numpy()

    res = minimize(
        neg, np.zeros_like(radius), jac=True, method="L-BFGS-B",
        bounds=list(zip(-radius, radius, strict=True)), options={"maxiter": max_iter},
    )  # fmt: skip
    max_loss = max(-float(res.fun), loss0)
    return EpsilonSharpness(
        sharpness=(max_loss - loss0) / (1 + loss0) * 100,
        loss=loss0,
        max_loss=max_loss,
        epsilon=epsilon,
        dim=op.dim if A is None else subspace_dim,
        iterations=int(res.nit),
        evaluations=int(res.nfev),
        num_examples=op.num_examples,
    )


# ---------------------------------------------------------------- landscapes


@dataclass(frozen=True)
class Landscape:
    """Losses (and optionally a metric) on a 1-D or 2-D grid of parameter vectors.

    Attributes:
        alphas: the first coordinate; betas: the second (2-D slices), else ``None``.
        losses: ``[len(alphas)]`` or ``[len(alphas), len(betas)]``; metric: same shape or None.
        kind: "line" (θ(α) = (1−α)θ_a + αθ_b) or "slice" (θ + αd₁ + βd₂).
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    losses: np.ndarray
    metric: np.ndarray | None
    kind: str
    num_examples: int
    extras: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "alphas": self.alphas.tolist(), "betas": None if self.betas is None else self.betas.tolist(),
            "losses": self.losses.tolist(), "metric": None if self.metric is None else self.metric.tolist(),
            "kind": self.kind, "num_examples": self.num_examples, **self.extras,
        }  # fmt: skip


def _evaluate(op, flat: Tensor, metric: Callable | None) -> tuple[float, float | None]:
    from torch.func import functional_call

    p = op.unflatten(flat.to(op.dtype))
    loss, met = 0.0, 0.0
    with torch.no_grad():
        for xs, ys in op.batches:
            w = xs[0].shape[0] / op.num_examples
            out = functional_call(op.model, {**p, **op.state}, xs)
            y = ys[0] if len(ys) == 1 else ys
            loss += w * float(op.loss_fn(out, y))
            if metric is not None:
                met += w * float(metric(out, y))
    return loss, (met if metric is not None else None)


def _flat_params(model: nn.Module, params, names) -> Tensor:
    if isinstance(params, nn.Module):
        params = dict(params.named_parameters())
    if isinstance(params, Tensor):
        return params.detach().reshape(-1)
    return torch.cat([params[n].detach().reshape(-1) for n in names])


@renamed_keywords(batches="data")
def loss_along_line(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    params_a,
    params_b,
    *,
    alphas: Sequence[float] = tuple(np.linspace(-1, 2, 31)),
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Landscape:
    """Loss along ``θ(α) = (1 − α)θ_a + αθ_b`` (Keskar et al. 2017, Fig. 3; Goodfellow 2015).

    ``params_a``/``params_b``: a model of the same architecture, a ``{name: tensor}`` dict or
    a flat vector. ``model`` only supplies the architecture, buffers and mode.
    """
    op = hessian_operator(model, loss_fn, data)
    a, b = _flat_params(model, params_a, op.names), _flat_params(model, params_b, op.names)
    alphas = np.asarray(alphas, dtype=float)
    vals = [_evaluate(op, (1 - al) * a + al * b, metric) for al in alphas]
    return Landscape(
        alphas=alphas, betas=None, losses=np.array([v[0] for v in vals]),
        metric=None if metric is None else np.array([v[1] for v in vals]),
        kind="line", num_examples=op.num_examples,
    )  # fmt: skip


def filter_normalized_direction(model: nn.Module, *, seed: int = 0) -> dict[str, Tensor]:
    """A random Gaussian direction scaled filter by filter to the norms of the weights
    (Li et al. 2018, Sec. 4): for each output unit (row 0 of a weight), ``d ← d·‖θ‖/‖d‖``.
    One-dimensional parameters (biases, norm scales) get zero, as in the paper."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() <= 1:
            out[n] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
        dn = d.flatten(1).norm(dim=1).clamp_min(torch.finfo(p.dtype).tiny)
        pn = p.detach().flatten(1).norm(dim=1)
        out[n] = d * (pn / dn).view(-1, *([1] * (p.dim() - 1)))
    return out


@renamed_keywords(batches="data")
def random_slice(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    dims: int = 1,
    span: float = 1.0,
    steps: int = 21,
    seed: int = 0,
    metric: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> Landscape:
    """Loss on ``θ + αd₁ (+ βd₂)`` for ``α, β ∈ [−span, span]`` along filter-normalised
    random directions (Li et al. 2018)."""
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    op = hessian_operator(model, loss_fn, data)
    theta = op.flatten(op.params)
    d1 = op.flatten(filter_normalized_direction(model, seed=seed))
    alphas = np.linspace(-span, span, steps)
    if dims == 1:
        vals = [_evaluate(op, theta + al * d1, metric) for al in alphas]
        losses = np.array([v[0] for v in vals])
        met = None if metric is None else np.array([v[1] for v in vals])
        return Landscape(alphas, None, losses, met, "slice", op.num_examples)
    d2 = op.flatten(filter_normalized_direction(model, seed=seed + 1))
    grid = [[_evaluate(op, theta + al * d1 + be * d2, metric) for be in alphas] for al in alphas]
    losses = np.array([[v[0] for v in row] for row in grid])
    met = None if metric is None else np.array([[v[1] for v in row] for row in grid])
    return Landscape(alphas, alphas.copy(), losses, met, "slice", op.num_examples)
