"""Helpers shared by the layer rules: chunking over examples within a memory budget, and
per-example squared norms."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from gradnoise.rules.registry import Grads, Norms, Rule

MIN_CHUNK_ELEMENTS = 2**17  # smallest budget for a chunk of per-example temporaries


def grads_norms(grads: Grads, elementwise: bool, scale: float = 1.0) -> Norms:
    """Materialised per-example gradients ``[B, *shape]`` by name → ``|g_i|²`` (and
    ``Σ_i g_i²``) of ``scale · g_i``."""
    out = {}
    for name, g in grads.items():
        g2 = g.square().mul_(scale * scale)
        out[name] = (g2.flatten(1).sum(1), g2.sum(0) if elementwise else None)
    return out


def norms_from_grads(grads_fn: Callable[[nn.Module, Tensor, Tensor], Grads]):
    """Norms of a rule whose per-example gradients are small enough to materialise."""

    def norms(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> Norms:
        return grads_norms(grads_fn(module, a, d), elementwise, scale)

    return norms


def budget(a: Tensor, d: Tensor) -> int:
    """Temporaries are bounded by the larger of the layer's input and output gradient (both
    held by the step anyway, so a fraction of its peak)."""
    return max(a.numel(), d.numel(), MIN_CHUNK_ELEMENTS)


def chunk_size(inputs: list[Tensor], d: Tensor, per_example: int) -> int:
    """Examples per chunk whose temporaries hold at most the :func:`budget` of the largest of
    ``inputs`` with ``d`` (several inputs sharing one output gradient)."""
    return max(1, max(budget(a, d) for a in inputs) // max(1, per_example))


def batch_chunks(a: Tensor, d: Tensor, per_example: int):
    """``(a, d)`` in chunks of examples whose temporaries hold at most :func:`budget`
    elements (the tensors themselves when one chunk holds the batch)."""
    B = a.shape[0]
    step = chunk_size([a], d, per_example)
    if step >= B:
        yield a, d
        return
    for start in range(0, B, step):
        yield a[start : start + step], d[start : start + step]


def joined(rows: list[Tensor]) -> Tensor:
    """The per-chunk rows of :func:`batch_chunks` as one tensor (no copy for one chunk)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def scaled_(sq: Tensor, total: Tensor | None, s2: float) -> tuple[Tensor, Tensor | None]:
    """``|g_i|²`` and ``Σ_i g_i²`` of ``d`` turned into those of ``scale · d`` (``s2 =
    scale²``), in place."""
    if s2 != 1:
        sq.mul_(s2)
        if total is not None:
            total.mul_(s2)
    return sq, total


def product_moments(products: Iterable[Tensor], elementwise: bool, s2: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """From per-example gradients of ``d`` materialised in chunks (``[b, ...]`` each, the
    moments paths): ``|g_i|²`` and (with ``elementwise``) ``Σ_i g_i²``, both of ``scale · d``
    (``s2 = scale²``), and the mean gradient ``Σ_i g_i`` of ``d``. Squares the chunks in place."""
    rows: list[Tensor] = []
    mean = total = None
    for g in products:
        part = g.sum(0)
        mean = part if mean is None else mean.add_(part)
        if elementwise:
            g2 = g.square_()
            rows.append(g2.flatten(1).sum(1))
            part = g2.sum(0)
            total = part if total is None else total.add_(part)
        else:
            rows.append(sq_norms(g))
    sq, total = scaled_(joined(rows), total, s2)
    return sq, total, mean


def sq_norms(g: Tensor) -> Tensor:
    """``|g_i|²`` of ``[B, ...]`` rows in one pass (no squared temporary)."""
    return torch.linalg.vector_norm(g if g.dim() == 2 else g.flatten(1), dim=1).square_()


def bias_norms(gb: Tensor, elementwise: bool, s2: float) -> tuple[Tensor, Tensor | None]:
    """``|g_i|²`` (and ``Σ_i g_i²``) of per-example bias gradients ``gb [B, O]`` of ``d``,
    for ``δ = scale · d`` (``s2 = scale²``); squares ``gb`` in place."""
    gb2 = gb.square_()
    if s2 != 1:
        gb2.mul_(s2)
    return gb2.sum(1), gb2.sum(0) if elementwise else None


def weighted_norms(rule: Rule, module: nn.Module, a, d: Tensor, weights: Grads, elementwise: bool,
                   scale: float = 1.0) -> Norms:  # fmt: skip
    """Norms in the diagonal metric ``weights`` (``P`` by local name): ``|g_i|²_P = Σ P ⊙ g_i²``
    and, if asked, ``Σ_i P ⊙ g_i²``, for ``δ = scale · d``. The rule's own ``weighted`` where
    it covers the call; else per-example gradients weighted in chunks of examples."""
    if rule.weighted is not None:
        out = rule.weighted(module, a, d, weights, elementwise, scale)
        if out is not None:
            return out
    per_example = sum(w.numel() for w in weights.values())
    chunks = [(a, d)] if rule.whole_call else batch_chunks(a, d, per_example)
    rows: dict[str, list[Tensor]] = {}
    totals: dict[str, Tensor] = {}
    for ac, dc in chunks:
        for local, g in rule.grads(module, ac, dc).items():
            g2 = g.square()
            rows.setdefault(local, []).append((g2 * weights[local]).flatten(1).sum(1))
            if elementwise:
                totals[local] = totals[local] + g2.sum(0) if local in totals else g2.sum(0)
    s2 = scale * scale
    return {
        local: (joined(r).mul_(s2), totals[local].mul_(weights[local]).mul_(s2) if elementwise else None)
        for local, r in rows.items()
    }  # fmt: skip
