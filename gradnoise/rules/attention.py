"""``nn.MultiheadAttention``: its four projections as Linear layers on sequences, with the
gradients of ``q, k, v`` recomputed locally from the attention's own forward."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradnoise.rules.linear import dense_grads, dense_norms
from gradnoise.rules.registry import Grads, Norms, Rule, register

_MHA_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)


def _mha_accepts(module: nn.Module) -> bool:
    return (
        module._qkv_same_embed_dim and module.in_proj_weight is not None and module.bias_k is None
        and not module.add_zero_attn and (module.dropout == 0.0 or not module.training)
    )  # fmt: skip


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = may not attend) or a float one as an additive float mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def _mha_parts(module: nn.MultiheadAttention, call: tuple, d: Tensor):
    """The four projections inside ``nn.MultiheadAttention`` as (input, output gradient) pairs.

    ``MultiheadAttention`` computes ``q, k, v = x_q W_qᵀ, x_k W_kᵀ, x_v W_vᵀ`` (rows of
    ``in_proj_weight``), ``c = attention(q, k, v)`` and ``y = c W_oᵀ`` (``out_proj``), so each
    weight is a Linear layer on a sequence; the gradients ``∂L/∂q, ∂L/∂k, ∂L/∂v`` are recomputed
    locally: one attention forward and backward from ``∂L/∂c = ∂L/∂y W_o`` (no weight
    gradients), and ``c`` comes from the same forward.
    """
    args, kwargs = call
    bound = _MHA_SIGNATURE.bind(module, *args, **kwargs)
    bound.apply_defaults()
    A = bound.arguments
    xs = [A["query"], A["key"], A["value"]]
    if not module.batch_first:
        xs, d = [x.transpose(0, 1) for x in xs], d.transpose(0, 1)
    E, H = module.embed_dim, module.num_heads
    W, b = module.in_proj_weight.detach(), module.in_proj_bias
    b = None if b is None else b.detach()
    with torch.no_grad():
        q, k, v = (F.linear(x, W[i * E : (i + 1) * E], None if b is None else b[i * E : (i + 1) * E]) for i, x in enumerate(xs))
        d_ctx = d @ module.out_proj.weight.detach()
    B, L, S = q.shape[0], q.shape[1], k.shape[1]
    mask = None
    if A["attn_mask"] is not None:
        mask = _additive(A["attn_mask"], q.dtype)
        mask = mask.view(B, H, L, S) if mask.dim() == 3 else mask
    if A["key_padding_mask"] is not None:
        kp = _additive(A["key_padding_mask"], q.dtype).view(B, 1, 1, S)
        mask = kp if mask is None else mask + kp
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    with torch.enable_grad():
        heads = [t.view(B, -1, H, E // H).transpose(1, 2) for t in (q, k, v)]
        ctx = F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(1, 2).reshape(B, L, E)
        dq, dk, dv = torch.autograd.grad(ctx, (q, k, v), d_ctx)
    return list(zip(xs, (dq, dk, dv), strict=True)), (ctx.detach(), d)


def _mha_norms(module: nn.MultiheadAttention, call: tuple, d: Tensor, elementwise: bool, scale: float = 1.0) -> Norms:
    projections, (ctx, d_out) = _mha_parts(module, call, d)
    bias = module.in_proj_bias is not None
    parts = [dense_norms(x, g, bias, elementwise, scale) for x, g in projections]
    out: Norms = {}
    for name in ("weight", "bias") if bias else ("weight",):  # rows of q, k, v: norms add up
        sq = sum(p[name][0] for p in parts)
        out[f"in_proj_{name}"] = (sq, torch.cat([p[name][1] for p in parts]) if elementwise else None)
    for name, v in dense_norms(ctx, d_out, module.out_proj.bias is not None, elementwise, scale).items():
        out[f"out_proj.{name}"] = v
    return out


def _mha_grads(module: nn.MultiheadAttention, call: tuple, d: Tensor) -> Grads:
    projections, (ctx, d_out) = _mha_parts(module, call, d)
    bias = module.in_proj_bias is not None
    parts = [dense_grads(x, g, bias) for x, g in projections]
    out = {f"in_proj_{n}": torch.cat([p[n] for p in parts], dim=1) for n in parts[0]}
    out.update({f"out_proj.{n}": v for n, v in dense_grads(ctx, d_out, module.out_proj.bias is not None).items()})
    return out


register(Rule(_mha_accepts, _mha_norms, _mha_grads, whole_call=True, owns_children=True), nn.MultiheadAttention)
