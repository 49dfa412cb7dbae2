"""Hutchinson's estimator of ``tr H`` (Hutchinson 1990, "A stochastic estimator of the trace
of the influence matrix for Laplacian smoothing splines"): ``E[zᵀHz] = tr H`` for
Rademacher probes ``z``; the standard error is that of the mean of ``zᵀHz``."""

from __future__ import annotations

import math

import torch

from gradnoise.hessian import HessianOperator
from gradnoise.trace._probes import rademacher

__all__ = ["hutchinson"]


def hutchinson(op: HessianOperator, num_hvps: int, generator: torch.Generator) -> tuple[float, float]:
    """``(estimate, standard error)`` of ``tr H`` from ``num_hvps`` Rademacher probes.

    Raises:
        ValueError: fewer than 2 probes (no standard error).
    """
    if num_hvps < 2:
        raise ValueError(f"Hutchinson needs at least 2 probes for a standard error, got {num_hvps}")
    Z = rademacher(op, num_hvps, generator)
    q = (Z * op.matmat(Z)).sum(0).double()
    return float(q.mean()), float(q.std() / math.sqrt(num_hvps))
