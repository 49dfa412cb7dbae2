"""Random probe vectors for the trace estimators."""

from __future__ import annotations

import torch
from torch import Tensor

from gradnoise.hessian import HessianOperator


def rademacher(op: HessianOperator, m: int, generator: torch.Generator) -> Tensor:
    """``[P, m]`` Rademacher vectors (entries ±1) in the operator's dtype and device, drawn
    on the CPU from ``generator`` (the same probes on every device)."""
    return (torch.randint(0, 2, (op.dim, m), generator=generator) * 2 - 1).to(op.dtype).to(op.device)
