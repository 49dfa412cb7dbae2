"""``nn.Embedding``: per-example gradients are sparse rows, summed per (example, row)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradnoise.rules.registry import Grads, Norms, Rule, register


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


def _embedding_norms(
    module: nn.Embedding, ids: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0
) -> Norms:
    example, row, vals = _embedding_rows(module, ids, d)
    v2 = vals.square().mul_(scale * scale)
    sq = torch.zeros(ids.shape[0], dtype=d.dtype, device=d.device).index_add_(0, example, v2.sum(1))
    total = None
    if elementwise:
        total = torch.zeros_like(module.weight, dtype=d.dtype).index_add_(0, row, v2)
    return {"weight": (sq, total)}


def _embedding_weighted(module: nn.Embedding, ids: Tensor, d: Tensor, weights: Grads, elementwise: bool,
                        scale: float = 1.0) -> Norms:  # fmt: skip
    """In the metric ``P``: each non-zero row weighted by its row of ``P`` (no ``B × V × d``)."""
    example, row, vals = _embedding_rows(module, ids, d)
    v2 = vals.square().mul_(scale * scale)
    P = weights["weight"]
    sq = torch.zeros(ids.shape[0], dtype=d.dtype, device=d.device).index_add_(0, example, (v2 * P[row]).sum(1))
    total = None
    if elementwise:
        total = torch.zeros_like(module.weight, dtype=d.dtype).index_add_(0, row, v2).mul_(P)
    return {"weight": (sq, total)}


def _embedding_grads(module: nn.Embedding, ids: Tensor, d: Tensor) -> Grads:
    example, row, vals = _embedding_rows(module, ids, d)
    g = torch.zeros(ids.shape[0], *module.weight.shape, dtype=d.dtype, device=d.device)
    g[example, row] = vals
    return {"weight": g}


def _embedding_accepts(module: nn.Module) -> bool:
    return module.max_norm is None and not module.scale_grad_by_freq and not module.sparse


register(Rule(_embedding_accepts, _embedding_norms, _embedding_grads, weighted=_embedding_weighted), nn.Embedding)
