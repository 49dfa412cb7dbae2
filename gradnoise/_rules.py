"""Per-layer rules: per-example gradient quantities from a layer's input ``a`` and output
gradient ``δ`` (Goodfellow 2015, "Efficient Per-Example Gradient Computations";
Rochette et al. 2019 for convolutions; Li et al. 2022 for the sequence "ghost norm").

``δ_i`` is the gradient of example ``i``'s own loss with respect to the layer output, i.e.
``B · ∂L/∂out_i`` for a mean-reduced batch loss ``L``. Each rule gives, per parameter, either

* ``norms``: per-example squared norms ``|g_i|²`` (``[B]``) and, if asked, ``Σ_i g_i²``
  (elementwise, the parameter's shape) without materialising ``B × P`` numbers; or
* ``grads``: the materialised per-example gradients ``[B, *shape]`` (used when a parameter
  receives contributions from several calls, e.g. tied weights).

For a Linear layer on 2-D input ``g_i = δ_i a_iᵀ``, so ``|g_i|² = |a_i|²|δ_i|²`` and
``Σ_i g_i² = (δ²)ᵀ(a²)``. On sequences ``[B, T, ·]``, ``g_i = Σ_t δ_{it} a_{it}ᵀ`` and
``|g_i|² = ⟨A_i A_iᵀ, D_i D_iᵀ⟩_F`` (Gram form, cost ``T²(I+O)``) or the per-example product
(cost ``T·I·O``), whichever is cheaper. Convolutions are sequence Linear layers on unfolded
inputs, per group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MAX_CHUNK_ELEMENTS = 2**24  # elements of a materialised chunk of per-example gradients

Norms = dict[str, tuple[Tensor, Tensor | None]]  # name -> (sq_norms [B], sum_sq or None)
Grads = dict[str, Tensor]  # name -> [B, *shape]


@dataclass(frozen=True)
class Rule:
    """How to get per-example quantities for one module type."""

    accepts: Callable[[nn.Module], bool]
    norms: Callable[[nn.Module, Tensor, Tensor, bool], Norms]
    grads: Callable[[nn.Module, Tensor, Tensor], Grads]


def _small(grads_fn: Callable[[nn.Module, Tensor, Tensor], Grads]):
    """Norms of a rule whose per-example gradients are small enough to materialise."""

    def norms(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool) -> Norms:
        out = {}
        for name, g in grads_fn(module, a, d).items():
            sq = g.square()
            out[name] = (sq.flatten(1).sum(1), sq.sum(0) if elementwise else None)
        return out

    return norms


# ---------------------------------------------------------------- sequence / grouped linear


def _chunks(batch: int, per_example: int):
    step = max(1, MAX_CHUNK_ELEMENTS // max(1, per_example))
    for start in range(0, batch, step):
        yield slice(start, start + step)


def _grouped_grads(a: Tensor, d: Tensor) -> Tensor:
    """``a [B, G, T, I]``, ``d [B, G, T, O]`` → per-example ``[B, G, O, I]``."""
    return torch.einsum("bgto,bgti->bgoi", d, a)


def _grouped_norms(a: Tensor, d: Tensor, elementwise: bool) -> tuple[Tensor, Tensor | None]:
    """Per-example squared norms (and ``Σ_i g_i²``, shape ``[G, O, I]``) of ``Σ_t d_t a_tᵀ``."""
    B, G, T, I = a.shape
    O = d.shape[-1]
    if not elementwise and T * (I + O) < I * O:  # Gram form is cheaper
        sq = torch.zeros(B, dtype=a.dtype, device=a.device)
        for s in _chunks(B, G * T * T):
            ga = a[s] @ a[s].transpose(-1, -2)
            gd = d[s] @ d[s].transpose(-1, -2)
            sq[s] = (ga * gd).sum((1, 2, 3))
        return sq, None
    sq = torch.empty(B, dtype=a.dtype, device=a.device)
    total = torch.zeros(G, O, I, dtype=a.dtype, device=a.device) if elementwise else None
    for s in _chunks(B, G * O * I):
        g2 = _grouped_grads(a[s], d[s]).square()
        sq[s] = g2.sum((1, 2, 3))
        if total is not None:
            total += g2.sum(0)
    return sq, total


# ---------------------------------------------------------------- Linear


def _linear_norms(module: nn.Linear, a: Tensor, d: Tensor, elementwise: bool) -> Norms:
    out: Norms = {}
    if a.dim() == 2:
        a2, d2 = a.square(), d.square()
        out["weight"] = (a2.sum(1) * d2.sum(1), d2.t() @ a2 if elementwise else None)
        if module.bias is not None:
            out["bias"] = (d2.sum(1), d2.sum(0) if elementwise else None)
        return out
    B = a.shape[0]
    a3, d3 = a.reshape(B, 1, -1, a.shape[-1]), d.reshape(B, 1, -1, d.shape[-1])
    sq, total = _grouped_norms(a3, d3, elementwise)
    out["weight"] = (sq, None if total is None else total[0])
    if module.bias is not None:
        gb = d3.sum(2)[:, 0]
        out["bias"] = (gb.square().sum(1), gb.square().sum(0) if elementwise else None)
    return out


def _linear_grads(module: nn.Linear, a: Tensor, d: Tensor) -> Grads:
    B = a.shape[0]
    a3, d3 = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
    out = {"weight": torch.einsum("bto,bti->boi", d3, a3)}
    if module.bias is not None:
        out["bias"] = d3.sum(1)
    return out


# ---------------------------------------------------------------- Conv1d / Conv2d


def _conv_accepts(module: nn.Module) -> bool:
    return module.padding_mode == "zeros"


def _conv_unfold(module: nn.Module, a: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Unfold a Conv1d/Conv2d input to ``[B, G, L, C_in/G·k]`` and ``δ`` to ``[B, G, L, C_out/G]``."""
    one_d = isinstance(module, nn.Conv1d)
    x = a.unsqueeze(2) if one_d else a
    k = (1, *module.kernel_size) if one_d else module.kernel_size
    dil = (1, *module.dilation) if one_d else module.dilation
    stride = (1, *module.stride) if one_d else module.stride
    if isinstance(module.padding, str):
        pad = (0, 0)
        if module.padding == "same":
            total = [dl * (kk - 1) for dl, kk in zip(dil, k, strict=True)]
            x = F.pad(x, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
    else:
        pad = (0, *module.padding) if one_d else module.padding
    cols = F.unfold(x, k, dilation=dil, padding=pad, stride=stride)  # [B, C·k, L]
    B, G = a.shape[0], module.groups
    cols = cols.reshape(B, G, -1, cols.shape[-1]).transpose(-1, -2)
    dd = d.reshape(B, G, d.shape[1] // G, -1).transpose(-1, -2)
    return cols, dd


def _conv_norms(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool) -> Norms:
    cols, dd = _conv_unfold(module, a, d)
    sq, total = _grouped_norms(cols, dd, elementwise)
    out: Norms = {"weight": (sq, None if total is None else total.reshape(module.weight.shape))}
    if module.bias is not None:
        gb = d.flatten(2).sum(2)
        out["bias"] = (gb.square().sum(1), gb.square().sum(0) if elementwise else None)
    return out


def _conv_grads(module: nn.Module, a: Tensor, d: Tensor) -> Grads:
    cols, dd = _conv_unfold(module, a, d)
    g = _grouped_grads(cols, dd)
    out = {"weight": g.reshape(a.shape[0], *module.weight.shape)}
    if module.bias is not None:
        out["bias"] = d.flatten(2).sum(2)
    return out


# ---------------------------------------------------------------- Embedding


def _embedding_rows(module: nn.Embedding, ids: Tensor, d: Tensor):
    """Non-zero rows of the per-example gradients: (example, row) pairs and their values."""
    B, V = ids.shape[0], module.num_embeddings
    ids2, d2 = ids.reshape(B, -1), d.reshape(B, -1, d.shape[-1])
    if module.padding_idx is not None:
        d2 = d2 * (ids2 != module.padding_idx).unsqueeze(-1)
    example = torch.arange(B, device=ids.device).unsqueeze(1).expand_as(ids2)
    keys = (example * V + ids2).reshape(-1)
    uniq, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(uniq.shape[0], d2.shape[-1], dtype=d.dtype, device=d.device)
    rows.index_add_(0, inverse, d2.reshape(-1, d2.shape[-1]))
    return uniq // V, uniq % V, rows


def _embedding_norms(module: nn.Embedding, ids: Tensor, d: Tensor, elementwise: bool) -> Norms:
    example, row, vals = _embedding_rows(module, ids, d)
    v2 = vals.square()
    sq = torch.zeros(ids.shape[0], dtype=d.dtype, device=d.device).index_add_(0, example, v2.sum(1))
    total = None
    if elementwise:
        total = torch.zeros_like(module.weight, dtype=d.dtype).index_add_(0, row, v2)
    return {"weight": (sq, total)}


def _embedding_grads(module: nn.Embedding, ids: Tensor, d: Tensor) -> Grads:
    example, row, vals = _embedding_rows(module, ids, d)
    g = torch.zeros(ids.shape[0], *module.weight.shape, dtype=d.dtype, device=d.device)
    g[example, row] = vals
    return {"weight": g}


def _embedding_accepts(module: nn.Module) -> bool:
    return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse


# ---------------------------------------------------------------- normalisation layers


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


def _always(module: nn.Module) -> bool:
    return True


RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: Rule(_always, _linear_norms, _linear_grads),
    nn.Conv1d: Rule(_conv_accepts, _conv_norms, _conv_grads),
    nn.Conv2d: Rule(_conv_accepts, _conv_norms, _conv_grads),
    nn.Embedding: Rule(_embedding_accepts, _embedding_norms, _embedding_grads),
    nn.LayerNorm: Rule(_always, _small(_layer_norm_grads), _layer_norm_grads),
    nn.GroupNorm: Rule(_always, _small(_group_norm_grads), _group_norm_grads),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = Rule(_always, _small(_rms_norm_grads), _rms_norm_grads)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this exact module type, if it has one and accepts this configuration."""
    rule = RULES.get(type(module))
    return rule if rule is not None and rule.accepts(module) else None
