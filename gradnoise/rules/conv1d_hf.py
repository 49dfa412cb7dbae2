"""Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections): a Linear layer
that stores its weight transposed, ``y = x W + b`` with ``W [in, out]``. Its per-example
quantities are the Linear rule's, with the weight's transposed (norms do not change).

Registered by qualified name, so that gradnoise never imports ``transformers``."""

from __future__ import annotations

from torch import Tensor, nn

from gradnoise.rules.linear import _linear_weighted, dense_grads, dense_linear_moments, dense_norms
from gradnoise.rules.registry import Grads, Norms, Rule, always, register_by_name


def _norms(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> Norms:
    out = dense_norms(a, d, module.bias is not None, elementwise, scale)
    sq, total = out["weight"]
    out["weight"] = (sq, None if total is None else total.t())
    return out


def _grads(module: nn.Module, a: Tensor, d: Tensor) -> Grads:
    out = dense_grads(a, d, module.bias is not None)
    out["weight"] = out["weight"].transpose(1, 2)
    return out


class _AsLinear:
    """What ``_linear_weighted`` reads of a module: whether it has a bias."""

    def __init__(self, module: nn.Module) -> None:
        self.bias = module.bias


def _weighted(module: nn.Module, a: Tensor, d: Tensor, weights: Grads, elementwise: bool,
              scale: float = 1.0) -> Norms | None:  # fmt: skip
    as_linear = {**weights, "weight": weights["weight"].t()}
    out = _linear_weighted(_AsLinear(module), a, d, as_linear, elementwise, scale)
    if out is not None and elementwise:
        sq, total = out["weight"]
        out["weight"] = (sq, total.t())
    return out


def _moments(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> tuple[Norms, Grads]:
    norms, means = dense_linear_moments(a, d, module.bias is not None, elementwise, scale)
    sq, total = norms["weight"]
    norms["weight"] = (sq, None if total is None else total.t())
    means["weight"] = means["weight"].t().contiguous()
    return norms, means


register_by_name(Rule(always, _norms, _grads, weighted=_weighted, moments=_moments, moments_pay=True),
                 "transformers.pytorch_utils.Conv1D")  # fmt: skip
