"""Normalisation layers with per-example statistics (LayerNorm, GroupNorm, RMSNorm), and
BatchNorm in eval mode: their affine parameters' per-example gradients are small
(``[B, C]``) and are materialised.

BatchNorm in train mode couples a batch's examples (its statistics are the batch's), so
per-example gradients are not defined and the engines refuse it before any rule runs. In
eval mode it is a per-channel affine map with fixed running statistics,
``y = γ (x − μ) / √(σ² + ε) + β``; its rule takes those statistics, which are only those
of the forward pass where the module uses them: in eval mode with running statistics
tracked (:func:`_batch_norm_accepts`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gradnoise.rules._common import MIN_CHUNK_ELEMENTS, norms_from_grads
from gradnoise.rules.registry import Grads, Rule, always, register


def _affine(module: nn.Module, xhat: Tensor, d: Tensor, reduce_dims: tuple[int, ...]) -> Grads:
    out = {}
    if getattr(module, "weight", None) is not None:
        out["weight"] = (d * xhat).sum(reduce_dims) if reduce_dims else d * xhat
    if getattr(module, "bias", None) is not None:
        out["bias"] = d.sum(reduce_dims) if reduce_dims else d
    return out


def _layer_norm_grads(module: nn.LayerNorm, a: Tensor, d: Tensor) -> Grads:
    # x̂ by torch's own kernel, as the layer computed it (several times faster than var_mean)
    xhat = F.layer_norm(a, module.normalized_shape, None, None, module.eps)
    return _affine(module, xhat, d, tuple(range(1, a.dim() - len(module.normalized_shape))))


def _rms_norm_grads(module: nn.Module, a: Tensor, d: Tensor) -> Grads:
    dims = tuple(range(-len(module.normalized_shape), 0))
    eps = module.eps if module.eps is not None else torch.finfo(a.dtype).eps
    xhat = a * torch.rsqrt(a.square().mean(dims, keepdim=True) + eps)
    return _affine(module, xhat, d, tuple(range(1, a.dim() - len(dims))))


def _group_norm_grads(module: nn.GroupNorm, a: Tensor, d: Tensor) -> Grads:
    B, C = a.shape[:2]
    xhat = F.group_norm(a, module.num_groups, None, None, module.eps).reshape(B, C, -1)
    return _affine(module, xhat, d.reshape(B, C, -1), (2,))


def _batch_norm_grads(module: nn.modules.batchnorm._BatchNorm, a: Tensor, d: Tensor) -> Grads:
    """``γ``'s per-example gradient ``Σ_s δ_s (x_s − μ) / √(σ² + ε)`` per channel, with the
    centred input formed a few examples at a time in one reused buffer: a temporary the size
    of the layer's input would cost more than the products (fresh pages on every call), and
    centring before the products keeps ``|μ| ≫ σ`` from cancelling digits."""
    B, C = a.shape[:2]
    x, dd = a.reshape(B, C, -1), d.reshape(B, C, -1)
    out = {}
    if module.weight is not None:
        mean = module.running_mean.to(a.dtype).view(1, C, 1)
        step = max(1, MIN_CHUNK_ELEMENTS // x[0].numel())
        buf, dot = a.new_empty(min(step, B), *x.shape[1:]), a.new_empty(B, C)
        for lo in range(0, B, step):
            xc = torch.sub(x[lo : lo + step], mean, out=buf[: min(step, B - lo)]).mul_(dd[lo : lo + step])
            torch.sum(xc, 2, out=dot[lo : lo + step])
        out["weight"] = dot.mul_(torch.rsqrt(module.running_var.to(a.dtype) + module.eps))
    if module.bias is not None:
        out["bias"] = dd.sum(2)
    return out


def _batch_norm_accepts(module: nn.Module) -> bool:
    """Running statistics exist (``track_running_stats``): in eval mode they are what the
    forward pass normalises with. (In train mode the engines refuse the layer first.)"""
    return module.running_mean is not None and module.running_var is not None


register(Rule(always, norms_from_grads(_layer_norm_grads), _layer_norm_grads), nn.LayerNorm)
for _bn in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register(Rule(_batch_norm_accepts, norms_from_grads(_batch_norm_grads), _batch_norm_grads), _bn)
register(Rule(always, norms_from_grads(_group_norm_grads), _group_norm_grads), nn.GroupNorm)
if hasattr(nn, "RMSNorm"):
    register(Rule(always, norms_from_grads(_rms_norm_grads), _rms_norm_grads), nn.RMSNorm)
