"""Extreme eigenvalues of the Hessian operator: Lanczos with semi-orthogonality checked
after every product, ARPACK (``scipy.sparse.linalg.eigsh``) and power iteration, behind
one function, :func:`hessian_eigenvalues`, with one meaning of ``which`` for all of them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from gradnoise._compat import renamed_keywords
from gradnoise._data import Data
from gradnoise._functional import LossFn
from gradnoise.hessian import HessianOperator, HVPMethod, hessian_operator

__all__ = ["EIGENSOLVERS", "HessianEigen", "hessian_eigenvalues"]

# The smallest relative residual the products of a dtype can certify, in units of its
# machine epsilon: a residual computed in float32 below ~6e-5 is rounding, not convergence.
RESOLVABLE = 512


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


def _power(op: HessianOperator, v0: Tensor, *, shift: float, tol: float, limit: int, basis: Tensor | None):
    """Power iteration on ``H + shift·I`` (deflated against ``basis``); stops when the
    residual ``‖Hv − λv‖ ≤ tol·|λ|`` (λ the Rayleigh quotient of H), not on a relative change,
    or when the operator has computed ``limit`` products."""
    v = v0 / torch.linalg.vector_norm(v0)
    lam = 0.0
    while op.num_hvps < limit:
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


@renamed_keywords(batches="data", max_iter="max_hvps")
def hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    k: int = 1,
    which: Which = "LA",
    method: Literal["lanczos", "arpack", "power"] = "lanczos",
    tol: float = 1e-3,
    max_hvps: int = 1000,
    v0: Tensor | None = None,
    seed: int = 0,
    hvp: HVPMethod = "auto",
) -> HessianEigen:
    """Top-``k`` Hessian eigenvalues of the mean loss over ``data``.

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
            most ``tol·|λ|``, and typically far less). Below ``512 ε`` of the
            operator's dtype (``6.1e-5`` in float32) the residuals cannot certify it: a
            ``RuntimeWarning`` says so and ``converged`` is ``False``.
        max_hvps: the solver's budget of Hessian-vector products (``"arpack"`` counts in
            restarts of ``ncv − k`` products, so it may overshoot by one restart; the
            residual checks of ``"arpack"`` and ``"power"`` add ``k``). The old name
            ``max_iter`` is deprecated.
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
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol is a relative residual in (0, 1), got {tol!r}")
    solver = EIGENSOLVERS.get(method)
    if solver is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, EIGENSOLVERS))}")
    op = hessian_operator(model, loss_fn, data, method=hvp)
    if not 1 <= k < op.dim:
        raise ValueError(f"k must be in [1, {op.dim - 1}] for {op.dim} parameters, got {k}")
    g = torch.Generator(device="cpu").manual_seed(seed)
    start = (v0.detach().reshape(-1).to(op.dtype) if v0 is not None else torch.randn(op.dim, generator=g, dtype=op.dtype)).to(op.device)
    if not isinstance(max_hvps, int) or max_hvps < 1:
        raise ValueError(f"max_hvps must be a positive int, got {max_hvps!r}")
    resolvable = RESOLVABLE * torch.finfo(op.dtype).eps
    if tol < resolvable:
        warnings.warn(
            f"tol={tol:g} is below what {op.dtype} products resolve (about {resolvable:.1e} relative): "
            "the residuals cannot certify it, so the result says converged=False; use a float64 "
            "model and data for a tighter bound",
            RuntimeWarning,
            stacklevel=3,
        )
    vals, vecs, residuals = solver(op, k, which, tol, max_hvps, start)
    op.release()
    return HessianEigen(
        eigenvalues=tuple(vals), eigenvectors=vecs, num_hvps=op.num_hvps, residuals=residuals,
        converged=tol >= resolvable and all(r <= tol for r in residuals), which=which, method=method,
        num_examples=op.num_examples, names=tuple(op.names),
    )  # fmt: skip


def _order(vals: np.ndarray, which: str) -> np.ndarray:
    key = {"LA": -vals, "SA": vals, "LM": -np.abs(vals)}[which]
    return np.argsort(key, kind="stable")


def _arpack(op, k, which, tol, max_hvps, start):
    from scipy.sparse.linalg import eigsh

    # ARPACK stops when each Ritz pair's residual bound is ≤ tol·|θ|, the criterion reported.
    # A short basis (ncv = 2k+1, at least 8) is checked after fewer products than the
    # default of 20 vectors, so a converged pair stops the run sooner.
    ncv = min(op.dim, max(2 * k + 1, 8))
    restarts = max(1, math.ceil(max_hvps / max(ncv - k, 1)))  # each restart: ncv − k products
    vals, vecs = eigsh(
        op.to_scipy(), k=k, which=which, tol=tol, maxiter=restarts, ncv=ncv,
        v0=start.detach().to("cpu", torch.float64).numpy(),
    )  # fmt: skip
    idx = _order(vals, which)
    return [float(vals[i]) for i in idx], torch.as_tensor(vecs[:, idx], dtype=op.dtype, device=op.device)


MAX_BASIS = 32  # Lanczos vectors held at once by the checked Lanczos: memory ≤ 32·P numbers


def _lanczos_checked(op, k, which, tol, max_hvps, start, max_basis: int = MAX_BASIS):
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
        vals, vecs, res, n, final = _lanczos_run(op, k, which, tol, min(max_basis, max_hvps - products), start)
        products += n
        # Two restarts in a row without a smaller residual: the operator's precision is
        # reached (e.g. tol below float32 rounding), so stop, not converged.
        stalls = stalls + 1 if max(res) >= best else 0
        best = min(best, max(res))
        if final or products >= max_hvps or stalls >= 2:
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


def _power_k(op, k, which, tol, max_hvps, start):
    limit = op.num_hvps + max_hvps
    vals, vecs = [], []
    basis = None
    for j in range(k):
        v0 = start if j == 0 else torch.roll(start, j)
        # Largest magnitude first; shift to reach the algebraic ends (Rayleigh-quotient shift).
        lam, v, ok = _power(op, v0, shift=0.0, tol=tol, limit=limit, basis=basis)
        # On H + |λ_LM| I (LA) or H − λ_LM I (SA) the dominant eigenvalue is the algebraic
        # end asked for; restart from v0 (the LM eigenvector has eigenvalue 0 there).
        if (which == "LA" and lam < 0) or (which == "SA" and lam > 0):
            lam, v, ok = _power(op, v0, shift=-lam, tol=tol, limit=limit, basis=basis)
        vals.append(lam)
        vecs.append(v)
        basis = torch.stack(vecs, dim=1)
    return vals, basis


def _solve_lanczos(op: HessianOperator, k: int, which: str, tol: float, max_hvps: int, start: Tensor):
    vals, vecs, res = _lanczos_checked(op, k, which, tol, min(max_hvps, op.dim), start)
    return vals, vecs, tuple(float(r) for r in res)


def _solve_arpack(op: HessianOperator, k: int, which: str, tol: float, max_hvps: int, start: Tensor):
    vals, vecs = _arpack(op, k, which, tol, max_hvps, start)
    return vals, vecs, _residuals(op, vals, vecs)


def _solve_power(op: HessianOperator, k: int, which: str, tol: float, max_hvps: int, start: Tensor):
    vals, vecs = _power_k(op, k, which, tol, max_hvps, start)
    return vals, vecs, _residuals(op, vals, vecs)


# Eigensolvers by name: ``fn(op, k, which, tol, max_hvps, start) -> (values, vectors,
# relative residuals)``, values ordered as ``which`` asks.
EIGENSOLVERS: dict[str, Callable[..., tuple[list[float], Tensor, tuple[float, ...]]]] = {
    "lanczos": _solve_lanczos,
    "arpack": _solve_arpack,
    "power": _solve_power,
}
