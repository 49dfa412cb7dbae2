"""Normalisation layers with per-example statistics (LayerNorm, GroupNorm, RMSNorm): their
affine parameters' per-example gradients are small (``[B, C]``) and are materialised.
BatchNorm couples examples and has no rule (the engines refuse it in train mode)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradnoise.rules._common import norms_from_grads
from gradnoise.rules.registry import Grads, Rule, always, register


def _affine(module: nn.Module, xhat: Tensor, d: Tensor, reduce_dims: tuple[int, ...]) -> Grads:
    out = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = (d * xhat).sum(reduce_dims) if reduce_dims else d * xhat
    if getattr(module, "bias", None) is not None:
        out["bias"] = d.sum(reduce_dims) if reduce_dims else d
    return out


def _layer_norm_grads(module: nn.LayerNorm, a: Tensor, d: Tensor) -> Grads:
    dims = tuple(range(-len(module.normalized_shape), 0))
    var, mean = torch.var_mean(a, dim=dims, keepdim=True, correction=0)
    xhat = (a - mean) * torch.rsqrt(var + module.eps)
    return _affine(module, xhat, d, tuple(range(1, a.dim() - len(dims))))


def _rms_norm_grads(module: nn.Module, a: Tensor, d: Tensor) -> Grads:
    dims = tuple(range(-len(module.normalized_shape), 0))
    eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
    xhat = a * torch.rsqrt(a.square().mean(dims, keepdim=True) + eps)
    return _affine(module, xhat, d, tuple(range(1, a.dim() - len(dims))))


def _group_norm_grads(module: nn.GroupNorm, a: Tensor, d: Tensor) -> Grads:
    B, C = a.shape[:2]
    x = a.reshape(B, module.num_groups, -1)
    var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
    xhat = ((x - mean) * torch.rsqrt(var + module.eps)).reshape(B, C, -1)
    return _affine(module, xhat, d.reshape(B, C, -1), (2,))


register(Rule(always, norms_from_grads(_layer_norm_grads), _layer_norm_grads), nn.LayerNorm)
register(Rule(always, norms_from_grads(_group_norm_grads), _group_norm_grads), nn.GroupNorm)
if hasattr(nn, "RMSNorm"):
    register(Rule(always, norms_from_grads(_rms_norm_grads), _rms_norm_grads), nn.RMSNorm)
