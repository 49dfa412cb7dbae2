"""Stochastic estimators of the Hessian trace ``tr H``, one module per method (registered in
:data:`TRACE_ESTIMATORS`), behind :func:`hessian_trace`.

To add an estimator: a module with ``fn(op, num_hvps, generator) -> (estimate, stderr)``
and one entry in :data:`TRACE_ESTIMATORS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from gradnoise._compat import renamed_keywords
from gradnoise._data import Data
from gradnoise._functional import LossFn
from gradnoise.hessian import HessianOperator, HVPMethod, hessian_operator
from gradnoise.trace.hutchinson import hutchinson
from gradnoise.trace.hutchpp import hutchpp

__all__ = ["TRACE_ESTIMATORS", "TraceEstimate", "hessian_trace"]

TraceMethod = Literal["hutchinson", "hutch++"]
TRACE_ESTIMATORS: dict[str, Callable[[HessianOperator, int, torch.Generator], tuple[float, float]]] = {
    "hutchinson": hutchinson,
    "hutch++": hutchpp,
}


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


@renamed_keywords(batches="data")
def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    method: TraceMethod = "hutchinson",
    num_hvps: int = 99,
    seed: int = 0,
    hvp: HVPMethod = "auto",
) -> TraceEstimate:
    """``tr H`` of the mean loss over ``data`` by Hutchinson (Rademacher probes) or
    Hutch++ (:mod:`gradnoise.trace.hutchpp`).

    Args:
        method: ``"hutchinson"`` or ``"hutch++"``.
        num_hvps: Hessian-vector products to spend.
        seed: seed of the probes.
        hvp: how Hessian-vector products are computed, as ``method`` of
            :func:`~gradnoise.hessian_operator`.

    Raises:
        ValueError: fewer than 2 probes (6 products for Hutch++), unknown method; and as
            :func:`~gradnoise.hessian_operator`.
    """
    estimator = TRACE_ESTIMATORS.get(method)
    if estimator is None:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(map(repr, TRACE_ESTIMATORS))}")
    op = hessian_operator(model, loss_fn, data, method=hvp)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    try:
        estimate, stderr = estimator(op, num_hvps, generator)
    finally:
        op.release()
    return TraceEstimate(estimate, stderr, op.num_hvps, method, op.num_examples)
