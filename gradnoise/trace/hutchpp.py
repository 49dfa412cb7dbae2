"""Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace
Estimation", Alg. 1): a third of the products sketch ``Q = qr(H S)``, whose part of the
trace is exact, a third compute ``HQ``, and a third run Hutchinson on the deflated rest
``(I − QQᵀ)H(I − QQᵀ)``: lower variance when the spectrum decays. The standard error is
that of the Hutchinson part (the sketch part is exact given ``Q``)."""

from __future__ import annotations

import math

import torch

from gradnoise.hessian import HessianOperator
from gradnoise.trace._probes import rademacher

__all__ = ["hutchpp"]


def hutchpp(op: HessianOperator, num_hvps: int, generator: torch.Generator) -> tuple[float, float]:
    """``(estimate, standard error)`` of ``tr H`` from ``num_hvps`` products.

    Raises:
        ValueError: fewer than 6 products (two per part).
    """
    m = num_hvps // 3
    if m < 2:
        raise ValueError(f"Hutch++ needs at least 6 matrix-vector products, got {num_hvps}")
    Q, _ = torch.linalg.qr(op.matmat(rademacher(op, m, generator)))
    sketch = float((Q * op.matmat(Q)).sum())
    G = rademacher(op, num_hvps - 2 * m, generator)
    G = G - Q @ (Q.T @ G)
    q = (G * op.matmat(G)).sum(0).double()
    return sketch + float(q.mean()), float(q.std() / math.sqrt(q.numel()))
