"""Hessian-vector products of the mean loss over a stated set of examples, and the
curvature estimators built on them: eigenvalues (power iteration, Lanczos) and the trace
(Hutchinson, Hutch++).

The Hessian is that of ``L(θ) = Σ_b (n_b / N) loss_fn(model(x_b), y_b)``: the mean loss over
all ``N`` examples of the given batches (each batch weighted by its size). The model is
evaluated in its current mode through ``functional_call`` on detached parameters, so its
parameters, buffers, ``.grad`` and mode are never changed. A stochastic forward pass
(dropout in train mode) has no single Hessian and is refused, as is BatchNorm in train mode.

Vectors are flat (``[P]``, parameters in ``named_parameters`` order, trainable only).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from gradnoise._chain_hvp import Chain, ChainBatch, Unsupported, plan_chain
from gradnoise._functional import (
    LossFn,
    as_tuple,
    batch_size_of,
    check_device,
    check_loss_fn,
    check_loss_value,
    check_no_train_batchnorm,
    frozen_state,
    mean_gradient,
    preserved_state,
    sdpa_math,
    trainable_params,
)

__all__ = [
    "HessianEigen",
    "HessianOperator",
    "TraceEstimate",
    "as_batches",
    "hessian_eigenvalues",
    "hessian_operator",
    "hessian_trace",
]

HVPMethod = Literal["auto", "closed-form", "double-backward", "forward-over-reverse"]
_HVP_METHODS = ("auto", "closed-form", "double-backward", "forward-over-reverse")


twice_differentiable = sdpa_math  # the fused attention kernels have no second derivative


def as_batches(batches) -> list[tuple[tuple[Tensor, ...], tuple[Tensor, ...]]]:
    """Normalise ``(inputs, targets)`` or an iterable of such pairs to a list of tuples.

    Raises:
        ValueError: if there is no batch.
    """
    if isinstance(batches, tuple) and len(batches) == 2 and isinstance(batches[0], (Tensor, tuple)) and isinstance(batches[1], Tensor):
        batches = [batches]
    out = []
    for b in batches if isinstance(batches, Iterable) else []:
        x, y = b
        batch_size_of(x, y)
        out.append((as_tuple(x), as_tuple(y)))
    if not out:
        raise ValueError("no batches: pass (inputs, targets) or an iterable of such pairs")
    return out


def _check_deterministic(model: nn.Module) -> None:
    for name, m in model.named_modules():
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", 0.0)
        if m.training and isinstance(p, float) and p > 0 and isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention, nn.RNNBase)):
            raise ValueError(
                f"module {name!r} applies dropout in train mode, so the loss is random and has "
                "no single Hessian: call model.eval() for curvature measurements"
            )


@dataclass
class HessianOperator:
    """The Hessian of the mean loss over fixed batches, as a linear operator on flat vectors.

    Attributes:
        names: parameter names, in the order of the flat vector.
        shapes: their shapes.
        num_examples: ``N``, the examples the loss is averaged over.
        method: how products are computed (resolved, never ``"auto"``):
            ``"closed-form"`` (Pearlmutter's R-operator written out for ``nn.Sequential``
            chains of Linear layers and elementwise activations under cross-entropy or
            squared error: :mod:`gradnoise._chain_hvp`; no autograd graph),
            ``"double-backward"`` (reuses each batch's first-order graph) or
            ``"forward-over-reverse"`` (``torch.func.jvp`` of ``grad``; no graph kept).
        num_hvps: Hessian-vector products computed so far.
    """

    model: nn.Module
    loss_fn: LossFn
    batches: list
    params: dict[str, Tensor]
    state: dict[str, Tensor]
    method: HVPMethod = "double-backward"
    num_hvps: int = 0
    _graphs: list | None = field(default=None, repr=False)
    _chain: Chain | None = field(default=None, repr=False)
    _chain_batches: list | None = field(default=None, repr=False)
    _requested: str = field(default="", repr=False)  # the method asked of hessian_operator

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def num_examples(self) -> int:
        return sum(x[0].shape[0] for x, _ in self.batches)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def flatten(self, tensors: dict[str, Tensor] | list[Tensor]) -> Tensor:
        vals = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in vals])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, p in self.params.items():
            out[n] = v[i : i + p.numel()].view_as(p)
            i += p.numel()
        return out

    def _loss(self, p: dict[str, Tensor], x, y) -> Tensor:
        out = functional_call(self.model, {**p, **self.state}, x)
        return self.loss_fn(out, y[0] if len(y) == 1 else y)

    def loss(self, params: dict[str, Tensor] | None = None) -> float:
        """Mean loss over the batches, at ``params`` (default: the model's)."""
        p = self.params if params is None else params
        total = 0.0
        with torch.no_grad(), preserved_state(self.model):
            for x, y in self.batches:
                total += float(self._loss(p, x, y)) * x[0].shape[0]
        return total / self.num_examples

    def gradient(self) -> Tensor:
        """Flat gradient of the mean loss."""
        return self.flatten(mean_gradient(self.model, self.loss_fn, self.batches))

    def matmat(self, V: Tensor, *, chunk: int = 64) -> Tensor:
        """``H V`` for ``V`` of shape ``[P, k]``: blocks of vectors in one batched backward
        (``is_grads_batched``) with double backward, column by column otherwise."""
        V = V.to(dtype=self.dtype, device=self.device)
        if self.method != "double-backward":
            return torch.stack([self.matvec(c) for c in V.T], dim=1)
        self._build_graphs()
        cols = []
        for start in range(0, V.shape[1], chunk):
            block = V[:, start : start + chunk].T.contiguous()  # [c, P]
            out = torch.zeros_like(block)
            for leaves, gs, w in self._graphs:
                vs = [t.reshape(block.shape[0], *p.shape) for t, p in zip(self._split(block), leaves.values(), strict=True)]
                hv = torch.autograd.grad(gs, list(leaves.values()), grad_outputs=vs, retain_graph=True, allow_unused=True, is_grads_batched=True)
                out += w * torch.cat([(torch.zeros_like(v) if h is None else h).reshape(block.shape[0], -1) for v, h in zip(vs, hv, strict=True)], dim=1)
            cols.append(out.T)
            self.num_hvps += block.shape[0]
        return torch.cat(cols, dim=1)

    def _split(self, block: Tensor) -> list[Tensor]:
        return list(block.split([p.numel() for p in self.params.values()], dim=1))

    def matvec(self, v: Tensor, *, out: Tensor | None = None) -> Tensor:
        """``H v`` for a flat vector ``v`` (or ``V`` of shape ``[P, k]``, see :meth:`matmat`),
        written into ``out`` if given (a flat buffer of the operator's dtype; Lanczos passes
        the next row of its basis: no fresh vector per product)."""
        if v.dim() == 2:
            return self.matmat(v)
        v = v.to(dtype=self.dtype, device=self.device)
        self.num_hvps += 1
        if self.method == "closed-form" and self._build_chain():
            return self._hvp_chain(v, out)
        if self.method == "forward-over-reverse":
            hv = self._hvp_fwd(v)
            return hv if out is None else out.copy_(hv)
        return self._hvp_double(v, out)

    def _build_chain(self) -> bool:
        """The closed-form path's per-batch quantities; ``False`` (and double backward from
        now on) if a batch is outside it and the method was chosen by ``"auto"``."""
        if self._chain_batches is None:
            try:
                if self._chain is None:  # an operator built directly, not by hessian_operator
                    self._chain = plan_chain(self.model, self.params, self.loss_fn)
                self._chain_batches = [
                    (ChainBatch(self._chain, *_single(x, y)), x[0].shape[0] / self.num_examples) for x, y in self.batches
                ]
            except Unsupported as e:
                if self._requested != "auto":
                    raise ValueError(f"method='closed-form' cannot handle these batches or this model: {e}; use method='auto'") from None
                self.method = "double-backward"
                return False
        return True

    def _hvp_chain(self, v: Tensor, out: Tensor | None) -> Tensor:
        out = torch.empty_like(v) if out is None else out
        vs, views = self.unflatten(v), self.unflatten(out)
        for i, (batch, w) in enumerate(self._chain_batches):
            batch.hvp_into(vs, views, w, first=i == 0)  # the first batch writes every block
        return out

    def _hvp_double(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        self._build_graphs()
        vs = list(self.unflatten(v).values())
        for i, (leaves, gs, w) in enumerate(self._graphs):
            hv = torch.autograd.grad(gs, list(leaves.values()), grad_outputs=vs, retain_graph=True, allow_unused=True)
            parts = [(torch.zeros_like(p) if h is None else h).reshape(-1) for p, h in zip(leaves.values(), hv, strict=True)]
            if i == 0:
                out = torch.cat(parts, out=out) if out is not None else torch.cat(parts)
                if w != 1:
                    out.mul_(w)
            else:
                out.add_(torch.cat(parts), alpha=w)
        return out

    def _build_graphs(self) -> None:
        if self._graphs is None:
            self._graphs = []
            with preserved_state(self.model), torch.enable_grad(), twice_differentiable():
                leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
                for x, y in self.batches:
                    loss = self._loss(leaves, x, y)
                    check_loss_value(loss)
                    gs = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
                    self._graphs.append((leaves, gs, x[0].shape[0] / self.num_examples))

    def _hvp_fwd(self, v: Tensor) -> Tensor:
        out = torch.zeros_like(v)
        tangent = self.unflatten(v)
        with preserved_state(self.model), twice_differentiable():
            for x, y in self.batches:
                w = x[0].shape[0] / self.num_examples
                _, hv = jvp(grad(lambda p: self._loss(p, x, y)), (self.params,), (tangent,))
                out += w * self.flatten(hv)
        return out

    def release(self) -> None:
        """Free the cached first-order graphs (or the closed-form path's batch quantities)."""
        self._graphs = None
        self._chain_batches = None

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 numpy (for ``eigsh``)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().to("cpu", torch.float64).numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, dtype=np.float64)


def _single(x: tuple[Tensor, ...], y: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    if len(x) != 1 or len(y) != 1:
        raise Unsupported("one input tensor and one target tensor per batch only")
    return x[0], y[0]


def hessian_operator(
    model: nn.Module, loss_fn: LossFn, batches, *, method: HVPMethod = "auto"
) -> HessianOperator:
    """The Hessian of the mean loss over ``batches`` as a :class:`HessianOperator`.

    Args:
        model: evaluated in its current mode (BatchNorm and dropout must be in eval mode).
        loss_fn: mean-reduced loss.
        batches: ``(inputs, targets)`` or an iterable of such pairs; the loss is the mean
            over all their examples (batches weighted by their sizes).
        method: ``"auto"`` (default): ``"closed-form"`` where the model and loss allow it,
            else ``"double-backward"`` (on CPU measured faster and lighter than
            ``"forward-over-reverse"``). The closed form is exact like the others and
            measured 1.2–1.7× cheaper per product on the MNIST-1D MLP (benchmarks/README.md).

    Raises:
        ValueError: BatchNorm or dropout in train mode, no batches, unknown method,
            ``"closed-form"`` for a model or loss outside it (the message says why).
    """
    if method not in _HVP_METHODS:
        raise ValueError(f"unknown HVP method {method!r}; choose one of {', '.join(map(repr, _HVP_METHODS))}")
    params = trainable_params(model)
    check_loss_fn(loss_fn)
    check_no_train_batchnorm(model)
    _check_deterministic(model)
    bs = as_batches(batches)
    for x, y in bs:
        check_device(params, x, y)
    chain = None
    if method in ("auto", "closed-form"):
        try:
            chain = plan_chain(model, params, loss_fn)
        except Unsupported as e:
            if method == "closed-form":
                raise ValueError(f"method='closed-form' cannot handle this model: {e}; use method='auto'") from None
    resolved = "closed-form" if chain is not None else "double-backward" if method == "auto" else method
    return HessianOperator(
        model, loss_fn, bs, params, frozen_state(model), resolved, _chain=chain, _requested=method
    )


# ---------------------------------------------------------------- eigenvalues

Which = Literal["LA", "LM", "SA"]


@dataclass(frozen=True)
class HessianEigen:
    """Eigenpairs of the Hessian of the mean loss over the stated examples.

    Attributes:
        eigenvalues: ``k`` values, sorted as ``which`` asks (largest algebraic "LA",
            largest magnitude "LM", smallest algebraic "SA") — first is the extreme one.
        eigenvectors: ``[P, k]`` unit vectors (flat, parameter order of ``names``).
        num_hvps: Hessian-vector products used (including the residual checks).
        residuals: ``‖Hv − λv‖ / |λ|`` of each pair, computed with an extra HVP each.
        converged: every residual ``≤ tol``.
        which, method, num_examples, names.
    """

    eigenvalues: tuple[float, ...]
    eigenvectors: Tensor = field(repr=False)
    num_hvps: int
    residuals: tuple[float, ...]
    converged: bool
    which: str
    method: str
    num_examples: int
    names: tuple[str, ...] = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "eigenvalues": list(self.eigenvalues), "num_hvps": self.num_hvps,
            "residuals": list(self.residuals), "converged": self.converged, "which": self.which,
            "method": self.method, "num_examples": self.num_examples,
        }  # fmt: skip


def _residuals(op: HessianOperator, vals, vecs) -> tuple[float, ...]:
    hv = op.matmat(vecs)
    out = []
    for j, lam in enumerate(vals):
        r = float(torch.linalg.vector_norm(hv[:, j] - lam * vecs[:, j]))
        out.append(r / max(abs(lam), torch.finfo(vecs.dtype).tiny))
    return tuple(out)


def _power(op: HessianOperator, v0: Tensor, *, shift: float, tol: float, max_iter: int, basis: Tensor | None):
    """Power iteration on ``H + shift·I`` (deflated against ``basis``); stops when the
    residual ``‖Hv − λv‖ ≤ tol·|λ|`` (λ the Rayleigh quotient of H), not on a relative change."""
    v = v0 / torch.linalg.vector_norm(v0)
    lam = 0.0
    for _ in range(max_iter):
        if basis is not None:
            v = v - basis @ (basis.T @ v)
            v = v / torch.linalg.vector_norm(v)
        hv = op.matvec(v)
        lam = float(v @ hv)
        resid = float(torch.linalg.vector_norm(hv - lam * v))
        if resid <= tol * max(abs(lam), torch.finfo(v.dtype).tiny):
            return lam, v, True
        w = hv + shift * v
        norm = torch.linalg.vector_norm(w)
        if norm == 0:
            return lam, v, True
        v = w / norm
    return lam, v, False


def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches,
    *,
    k: int = 1,
    which: Which = "LA",
    method: Literal["lanczos", "arpack", "power"] = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 1000,
    v0: Tensor | None = None,
    seed: int = 0,
    hvp: HVPMethod = "auto",
) -> HessianEigen:
    """Top-``k`` Hessian eigenvalues of the mean loss over ``batches``.

    Args:
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic (the sharpness ``λ_max``), ``"LM"`` largest
            magnitude (what plain power iteration converges to), ``"SA"`` smallest algebraic.
            On an indefinite Hessian "LA" and "LM" differ; every method honours ``which``.
        method: ``"lanczos"`` (Lanczos with full reorthogonalisation, checked after every
            product: :func:`_lanczos_checked`; the reported residuals are its exact Ritz
            residuals, no extra products; at most 32 basis vectors, then explicit
            restarts), ``"arpack"`` (``scipy.sparse.linalg.eigsh`` on a ``LinearOperator``,
            implicitly restarted, in float64; residuals computed afterwards, ``k`` more
            products) or ``"power"`` (power iteration with shifts for "LA"/"SA" and
            deflation for ``k>1``).
        tol: relative residual ``‖Hv − λv‖/|λ|`` to reach (the eigenvalue's error is at
            most ``tol·|λ|``, and typically far less).
        max_iter: at most this many products (``"lanczos"``, ``"power"``) or ARPACK
            restarts (``"arpack"``).
        v0: start vector (flat, ``[P]``), e.g. the previous eigenvector during training
            (Lanczos then stops after a few products); else random from ``seed``.
        hvp: how Hessian-vector products are computed, as ``method`` of
            :func:`hessian_operator` (default ``"auto"``).

    Returns:
        :class:`HessianEigen`.

    Raises:
        ValueError: bad ``k``, ``which`` or ``method``; and as :func:`hessian_operator`.
    """
    if which not in ("LA", "LM", "SA"):
        raise ValueError(f"unknown which={which!r}; choose 'LA', 'LM' or 'SA'")
    if method not in ("lanczos", "arpack", "power"):
        raise ValueError(f"unknown method {method!r}; choose 'lanczos', 'arpack' or 'power'")
    op = hessian_operator(model, loss_fn, batches, method=hvp)
    if not 1 <= k < op.dim:
        raise ValueError(f"k must be in [1, {op.dim - 1}] for {op.dim} parameters, got {k}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = (v0.detach().reshape(-1).to(op.dtype) if v0 is not None else torch.randn(op.dim, generator=g, dtype=op.dtype)).to(op.device)
    if method == "lanczos":
        vals, vecs, residuals = _lanczos_checked(op, k, which, tol, min(max_iter, op.dim), start)
    else:
        if method == "arpack":
            vals, vecs = _arpack(op, k, which, tol, max_iter, start)
        else:
            vals, vecs = _power_k(op, k, which, tol, max_iter, start)
        residuals = _residuals(op, vals, vecs)
    op.release()
    return HessianEigen(
        eigenvalues=tuple(vals), eigenvectors=vecs, num_hvps=op.num_hvps, residuals=residuals,
        converged=all(r <= tol for r in residuals), which=which, method=method,
        num_examples=op.num_examples, names=tuple(op.names),
    )  # fmt: skip


def _order(vals: np.ndarray, which: str) -> np.ndarray:
    key = {"LA": -vals, "SA": vals, "LM": -np.abs(vals)}[which]
    return np.argsort(key, kind="stable")


def _arpack(op, k, which, tol, max_iter, start):
    from scipy.sparse.linalg import eigsh

    # ARPACK stops when each Ritz pair's residual bound is ≤ tol·|θ|, the criterion reported.
    # A short basis (ncv = 2k+1, at least 8) is checked after fewer products than the default
    # 20; measured on the MNIST-1D MLP: 13 instead of 21 HVPs to the same accuracy.
    vals, vecs = eigsh(
        op.to_scipy(), k=k, which=which, tol=tol, maxiter=max_iter,
        ncv=min(op.dim, max(2 * k + 1, 8)), v0=start.detach().to("cpu", torch.float64).numpy(),
    )  # fmt: skip
    idx = _order(vals, which)
    return [float(vals[i]) for i in idx], torch.as_tensor(vecs[:, idx], dtype=op.dtype, device=op.device)


MAX_BASIS = 32  # Lanczos vectors held at once by the checked Lanczos: memory ≤ 32·P numbers


def _lanczos_checked(op, k, which, tol, max_iter, start, max_basis: int = MAX_BASIS):
    """Lanczos from ``start`` with full reorthogonalisation, checked after every product.

    After ``j`` products the Ritz pairs ``(θ, Q s)`` of the tridiagonal ``T_j`` have residual
    ``‖H Q s − θ Q s‖ = β_j |s_j|`` (Saad 2011, *Numerical Methods for Large Eigenvalue
    Problems*, Prop. 6.8), so convergence is known without extra products (reported no
    smaller than the rounding level ``8 ε max|θ|`` of the operator's dtype). From a good start
    (the previous eigenvector during training) this stops after a few products, where ARPACK
    would build a basis of at least ``ncv`` vectors first. The basis holds at most
    ``max_basis`` vectors (at least ``2k + 2``): when it is full, Lanczos restarts from the
    sum of the current Ritz vectors (explicit restart), so memory stays bounded on large
    models; it stops when a restart no longer reduces the residual. Returns values,
    vectors and the residuals relative to ``|θ|``.
    """
    max_basis = max(max_basis, 2 * k + 2)
    products, best, stalls = 0, math.inf, 0
    while True:
        vals, vecs, res, n, final = _lanczos_run(op, k, which, tol, min(max_basis, max_iter - products), start)
        products += n
        # Two restarts in a row without a smaller residual: the operator's precision is
        # reached (e.g. tol below float32 rounding), so stop, not converged.
        stalls = stalls + 1 if max(res) >= best else 0
        best = min(best, max(res))
        if final or products >= max_iter or stalls >= 2:
            return vals, vecs, res
        start = vecs.sum(1)


def _lanczos_run(op, k, which, tol, steps, start):
    """One Lanczos run of at most ``steps`` products; ``final`` when converged or the Krylov
    space is invariant (nothing left to gain from a restart).

    Reorthogonalisation against the whole basis (classical Gram–Schmidt, repeated when a
    pass cancelled more than ``1 − 1/√2`` of the norm: "twice is enough", Giraud et al.
    2005) starts at the first step where some Ritz pair of ``T_j`` has converged to
    ``β_j |s_j| ≤ √ε max|θ|`` and is done at every step from then on. Before that the
    three-term recurrence keeps the basis semi-orthogonal: the component of a new Lanczos
    vector along a Ritz vector grows like ``ε ‖H‖ / (β_j |s_j|)`` (Paige 1976), and
    semi-orthogonality (``√ε``) is enough for Ritz values accurate to rounding (Simon 1984,
    *Math. Comp.* 42). A stop at ``tol ≫ √ε`` (the monitor's 1e-2 in float32) then never
    reads the basis, which is most of the cost besides the products on small models.
    """
    eps = torch.finfo(start.dtype).eps
    rows = torch.empty(min(steps, 16), op.dim, dtype=start.dtype, device=start.device)
    torch.div(start, torch.linalg.vector_norm(start), out=rows[0])
    alphas: list[float] = []
    betas: list[float] = []
    full = False  # reorthogonalising against the whole basis
    while True:
        j = len(alphas)
        if j + 1 == rows.shape[0] < steps:  # grow the basis storage
            grown = torch.empty(min(2 * rows.shape[0], steps), op.dim, dtype=rows.dtype, device=rows.device)
            grown[: rows.shape[0]] = rows
            rows = grown
        # the product goes straight into the next row, normalised there below
        w = op.matvec(rows[j], out=rows[j + 1] if j + 1 < rows.shape[0] else None)
        Q = rows[: j + 1]  # orthonormal rows
        alpha = float(torch.mv(rows[j : j + 1], w))  # torch.dot: 125 µs, this: 37 µs (289k, CPU)
        alphas.append(alpha)
        w.add_(rows[j], alpha=-alpha)
        if j:
            w.add_(rows[j - 1], alpha=-betas[-1])
        beta = _reorthogonalise(w, Q) if full else float(torch.linalg.vector_norm(w))
        T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
        theta, S = np.linalg.eigh(T)
        scale = abs(theta).max()
        if not full and (beta * np.abs(S[-1]) <= math.sqrt(eps) * scale).any():
            # A Ritz pair has converged: from here on the basis needs reorthogonalising,
            # this step's vector included (against the whole basis, twice).
            full = True
            beta = _reorthogonalise(w, Q, twice=True)
        idx = _order(theta, which)[: min(k, j + 1)]
        # Exact in exact arithmetic; floored at the rounding level of the products.
        floor = 8 * eps * scale
        res = [max(beta * abs(S[-1, i]), floor) / max(abs(theta[i]), np.finfo(np.float64).tiny) for i in idx]
        done = j + 1 >= k and all(r <= tol for r in res)
        invariant = beta <= eps * max(scale, 1.0)
        if done or (invariant and j + 1 >= k) or j + 1 >= steps:
            break
        if invariant:  # the Krylov space closed with fewer than k vectors: continue from a
            # seeded random direction orthogonal to it (T becomes block diagonal, β = 0)
            g = torch.Generator(device="cpu").manual_seed(j)
            w = torch.randn(op.dim, generator=g, dtype=w.dtype).to(w.device)
            beta = _reorthogonalise(w, Q, twice=True)
            w, beta = w / beta, 0.0
        betas.append(beta)
        torch.div(w, beta if beta else 1.0, out=rows[j + 1])
    vecs = Q.T @ torch.as_tensor(S[:, idx], dtype=Q.dtype, device=Q.device)
    return [float(theta[i]) for i in idx], vecs, res, j + 1, done or (invariant and j + 1 >= k)


def _reorthogonalise(w: Tensor, Q: Tensor, *, twice: bool = False) -> float:
    """One classical Gram–Schmidt pass of ``w`` against the rows of ``Q`` (in place),
    repeated when it cancelled more than ``1 − 1/√2`` of the norm ("twice is enough",
    Giraud et al. 2005) or when ``twice``; returns ``‖w‖``."""
    before = float(torch.linalg.vector_norm(w))
    w.addmv_(Q.T, torch.mv(Q, w), alpha=-1)
    norm = float(torch.linalg.vector_norm(w))
    if twice or norm < 0.7071 * before:
        w.addmv_(Q.T, torch.mv(Q, w), alpha=-1)
        norm = float(torch.linalg.vector_norm(w))
    return norm


def _power_k(op, k, which, tol, max_iter, start):
    vals, vecs = [], []
    basis = None
    for j in range(k):
        v0 = start if j == 0 else torch.roll(start, j)
        # Largest magnitude first; shift to reach the algebraic ends (Rayleigh-quotient shift).
        lam, v, ok = _power(op, v0, shift=0.0, tol=tol, max_iter=max_iter, basis=basis)
        # On H + |λ_LM| I (LA) or H − λ_LM I (SA) the dominant eigenvalue is the algebraic
        # end asked for; restart from v0 (the LM eigenvector has eigenvalue 0 there).
        if (which == "LA" and lam < 0) or (which == "SA" and lam > 0):
            lam, v, ok = _power(op, v0, shift=-lam, tol=tol, max_iter=max_iter, basis=basis)
        vals.append(lam)
        vecs.append(v)
        basis = torch.stack(vecs, dim=1)
    return vals, basis


# ---------------------------------------------------------------- trace


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic estimate of ``tr H``, its standard error and cost."""

    trace: float
    stderr: float
    num_hvps: int
    method: str
    num_examples: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches,
    *,
    method: Literal["hutchinson", "hutch++"] = "hutchinson",
    num_hvps: int = 99,
    seed: int = 0,
) -> TraceEstimate:
    """``tr H`` by Hutchinson (Rademacher probes, 1990) or Hutch++ (Meyer et al. 2021).

    Hutch++ spends a third of the budget on a sketch ``Q = qr(H S)`` whose trace is exact,
    a third on ``HQ``, and a third on Hutchinson for the deflated rest
    ``(I − QQᵀ)H(I − QQᵀ)``: lower variance when the spectrum decays. The standard error
    is that of the Hutchinson part (the sketch part is exact given ``Q``).

    Raises:
        ValueError: fewer than 2 probes (3 for Hutch++), unknown method.
    """
    op = hessian_operator(model, loss_fn, batches)
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rademacher(m):
        return (torch.randint(0, 2, (op.dim, m), generator=g) * 2 - 1).to(op.dtype).to(op.device)

    if method == "hutchinson":
        if num_hvps < 2:
            raise ValueError(f"Hutchinson needs at least 2 probes for a standard error, got {num_hvps}")
        Z = rademacher(num_hvps)
        q = (Z * op.matmat(Z)).sum(0).double()
        est, se = float(q.mean()), float(q.std() / np.sqrt(num_hvps))
    elif method == "hutch++":
        m = num_hvps // 3
        if m < 2:
            raise ValueError(f"Hutch++ needs at least 6 matrix-vector products, got {num_hvps}")
        Q, _ = torch.linalg.qr(op.matmat(rademacher(m)))
        sketch = float((Q * op.matmat(Q)).sum())
        G = rademacher(num_hvps - 2 * m)
        G = G - Q @ (Q.T @ G)
        q = (G * op.matmat(G)).sum(0).double()
        est, se = sketch + float(q.mean()), float(q.std() / np.sqrt(q.numel()))
    else:
        raise ValueError(f"unknown method {method!r}; choose 'hutchinson' or 'hutch++'")
    op.release()
    return TraceEstimate(est, se, op.num_hvps, method, op.num_examples)
