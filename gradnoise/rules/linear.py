"""``nn.Linear``: per-example norms on 2-D inputs and on sequences (Goodfellow 2015,
"Efficient Per-Example Gradient Computations"; Li et al. 2022 for the sequence "ghost norm").

For a Linear layer on 2-D input ``g_i = δ_i a_iᵀ``, so ``|g_i|² = |a_i|²|δ_i|²`` and
``Σ_i g_i² = (δ²)ᵀ(a²)``. On sequences ``[B, T, ·]``, ``g_i = Σ_t δ_{it} a_{it}ᵀ`` and
``|g_i|² = ⟨A_i A_iᵀ, D_i D_iᵀ⟩_F`` (Gram form, cost ``T²(I+O)``) or the per-example product
(cost ``T·I·O``), whichever is cheaper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gradnoise.rules._common import (
    batch_chunks,
    bias_norms,
    chunk_size,
    joined,
    product_moments,
    sq_norms,
)
from gradnoise.rules.registry import Grads, Norms, Rule, always, register

__all__ = ["dense_grads", "dense_linear_moments", "dense_mean", "dense_moments", "dense_norms", "linear_gram_norms", "prefers_gram", "shared_output_norms"]


def _grouped_grads(a: Tensor, d: Tensor) -> Tensor:
    """``a [B, G, T, I]``, ``d [B, G, T, O]`` → per-example ``[B, G, O, I]``."""
    return torch.einsum("bgto,bgti->bgoi", d, a)


def _grouped_norms(a: Tensor, d: Tensor, elementwise: bool) -> tuple[Tensor, Tensor | None]:
    """Per-example squared norms (and ``Σ_i g_i²``, shape ``[G, O, I]``) of ``Σ_t d_t a_tᵀ``.

    Without ``Σ_i g_i²``, the Gram form ``⟨A Aᵀ, D Dᵀ⟩`` is used when it needs fewer
    multiplications (``T²(I+O) < T·I·O``); otherwise the per-example products are
    materialised in chunks (:func:`batch_chunks`).
    """
    _, G, T, I = a.shape
    O = d.shape[-1]
    rows: list[Tensor] = []
    if not elementwise and T * (I + O) < I * O:
        for ac, dc in batch_chunks(a, d, G * T * (T + I + O)):
            ga = ac @ ac.transpose(-1, -2)
            gd = dc @ dc.transpose(-1, -2)
            rows.append((ga * gd).flatten(1).sum(1))
        return joined(rows), None
    total = torch.zeros(G, O, I, dtype=a.dtype, device=a.device) if elementwise else None
    for ac, dc in batch_chunks(a, d, G * O * I):
        g = _grouped_grads(ac, dc)
        if total is None:
            rows.append(sq_norms(g))
            continue
        g2 = g.square_()  # a reduction over dim 0 of the squares: vector_norm(g, dim=0) is ~20× slower
        rows.append(g2.flatten(1).sum(1))
        total += g2.sum(0)
    return joined(rows), total


def _linear_norms(module: nn.Linear, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> Norms:
    return dense_norms(a, d, module.bias is not None, elementwise, scale)


def dense_norms(a: Tensor, d: Tensor, bias: bool, elementwise: bool, scale: float = 1.0) -> Norms:
    """Norms of ``y = a Wᵀ (+ b)`` on ``[B, in]`` or ``[B, *, in]`` inputs."""
    out: Norms = {}
    s2 = scale * scale
    if a.dim() == 2:
        if not elementwise:  # |g_i|² = |a_i|²|δ_i|², no squared temporaries
            d_sq = sq_norms(d) if s2 == 1 else sq_norms(d).mul_(s2)
            out["weight"] = (sq_norms(a).mul_(d_sq), None)
            if bias:
                out["bias"] = (d_sq, None)
            return out
        # Σ_i g_i² = (δ²)ᵀ(a²), with δ² scaled once: every sum below is then of scale · d
        # (eight operations per layer; right after a backward pass each costs ~10 µs).
        d2 = torch.mul(d, d)
        if s2 != 1:
            d2.mul_(s2)
        a2 = torch.mul(a, a)
        d_sq = d2.sum(1)
        out["weight"] = (a2.sum(1).mul_(d_sq), d2.t() @ a2)
        if bias:
            out["bias"] = (d_sq, d2.sum(0))
        return out
    B = a.shape[0]
    a3, d3 = a.reshape(B, 1, -1, a.shape[-1]), d.reshape(B, 1, -1, d.shape[-1])
    sq, total = _grouped_norms(a3, d3, elementwise)
    out["weight"] = (sq.mul_(s2), None if total is None else total[0].mul_(s2))
    if bias:
        out["bias"] = bias_norms(d3.sum(2)[:, 0], elementwise, s2)
    return out


def shared_output_norms(inputs: list[Tensor], d: Tensor, bias: bool, scale: float = 1.0) -> list[Norms]:
    """:func:`dense_norms` (without ``Σ_i g_i²``) of several Linear maps on ``[B, T, ·]``
    inputs whose outputs share one gradient ``d [B, T, O]`` (an LSTM's input and recurrent
    weights both act on its gates): ``D Dᵀ`` formed once for all those whose Gram form is
    the cheaper, and the bias norms (``|Σ_t δ_t|²``, equal for all) once."""
    B, T, O = d.shape
    s2 = scale * scale
    gram = [T * (a.shape[-1] + O) < a.shape[-1] * O for a in inputs]
    out = [{} if g else dense_norms(a, d, False, False, scale) for a, g in zip(inputs, gram, strict=True)]
    on_gram = [a for a, g in zip(inputs, gram, strict=True) if g]
    if on_gram:
        per_example = T * (T + O + sum(a.shape[-1] for a in on_gram))
        step = chunk_size(on_gram, d, per_example)
        rows: list[list[Tensor]] = [[] for _ in on_gram]
        for lo in range(0, B, step):
            gd = torch.bmm(d[lo : lo + step], d[lo : lo + step].transpose(1, 2))
            for r, a in zip(rows, on_gram, strict=True):
                ga = torch.bmm(a[lo : lo + step], a[lo : lo + step].transpose(1, 2))
                r.append(ga.mul_(gd).flatten(1).sum(1))
        found = iter(rows)
        for norms, g in zip(out, gram, strict=True):
            if g:
                norms["weight"] = (joined(next(found)).mul_(s2), None)
    if bias:
        sq = bias_norms(d.sum(1), False, s2)[0]
        for j, norms in enumerate(out):  # a tensor each: callers may scale them in place
            norms["bias"] = (sq if j == 0 else sq.clone(), None)
    return out


def dense_moments(a: Tensor, d: Tensor, bias: bool, elementwise: bool, scale: float = 1.0) -> tuple[Norms, Grads]:
    """Norms of ``y = a Wᵀ (+ b)`` on ``[B, T, in]`` inputs, as :func:`dense_norms`, and the
    **mean gradient**, from the per-example products ``g_i = Σ_t d_it a_itᵀ`` (one batched
    product per chunk of examples): ``ḡ = Σ_i g_i`` for ``d`` the gradient of the mean loss.
    It costs the multiplications of the weight gradient, which the backward pass then skips
    (the "book-keeping" of Bu et al. 2023). Norms are of ``scale · d``; the mean is of ``d``."""
    chunks = batch_chunks(a, d, d.shape[-1] * a.shape[-1])
    products = (torch.bmm(dc.flatten(1, -2).transpose(1, 2), ac.flatten(1, -2)) for ac, dc in chunks)
    sq, total, mean = product_moments(products, elementwise, scale * scale)
    out: Norms = {"weight": (sq, total)}
    means: Grads = {"weight": mean}
    if bias:
        gb = d.flatten(1, -2).sum(1)
        means["bias"] = gb.sum(0)
        out["bias"] = bias_norms(gb, elementwise, scale * scale)
    return out, means


def products_pay(T: int, in_features: int, out_features: int) -> bool:
    """Whether a Linear layer on sequences of ``T`` should take its norms and mean gradient
    from the per-example products (:func:`dense_moments`) rather than the Gram form plus the
    weight gradient: from about half the Gram form's break-even ``T(I + O) = I·O`` on, one
    batched product of the weight gradient's size is faster than two Gram products and the
    weight gradient together (the Gram products grow as ``T²``)."""
    return 2 * T * (in_features + out_features) >= in_features * out_features


def linear_moments(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> tuple[Norms, Grads]:
    """Norms as :func:`dense_norms`, and the **mean gradient** ``ḡ = Σ_i g_i`` of ``d`` (the
    gradient of the mean loss), so that the backward pass can skip the weight gradient: on
    sequences whose products pay (:func:`products_pay`, or with ``Σ_i g_i²``, which needs
    them), from the per-example products; otherwise the norms as the rule's and ``ḡ`` as
    the weight gradient itself, one product — never more work than the rule and the
    backward pass's weight gradient."""
    return dense_linear_moments(a, d, module.bias is not None, elementwise, scale)


def dense_linear_moments(a: Tensor, d: Tensor, bias: bool, elementwise: bool, scale: float = 1.0) -> tuple[Norms, Grads]:
    """:func:`linear_moments` of ``y = a Wᵀ (+ b)`` without a module (attention projections)."""
    I, O = a.shape[-1], d.shape[-1]
    T = a[0].numel() // I
    if a.dim() > 2 and (elementwise or products_pay(T, I, O)):
        return dense_moments(a, d, bias, elementwise, scale)
    return dense_norms(a, d, bias, elementwise, scale), dense_mean(a, d, bias)


def dense_mean(a: Tensor, d: Tensor, bias: bool) -> Grads:
    """The gradient of ``y = a Wᵀ (+ b)`` for the output gradient ``d`` (summed over the
    batch and any sequence), as the backward pass forms it: one product."""
    flat_d = d.reshape(-1, d.shape[-1])
    means: Grads = {"weight": flat_d.T @ a.reshape(-1, a.shape[-1])}
    if bias:
        means["bias"] = flat_d.sum(0)
    return means


def _linear_weighted(module: nn.Linear, a: Tensor, d: Tensor, weights: Grads, elementwise: bool,
                     scale: float = 1.0) -> Norms | None:  # fmt: skip
    """2-D inputs in the metric ``P``: ``|g_i|²_P = Σ_jk P_jk δ_ij² a_ik² = ⟨δ_i², P a_i²⟩``,
    one product the size of the weight gradient; ``Σ_i P ⊙ g_i² = P ⊙ (δ²)ᵀ(a²)``.
    Sequences: ``None`` (weighted per-example products, in chunks)."""
    if a.dim() != 2:
        return None
    d2 = torch.mul(d, d)
    if scale != 1:
        d2.mul_(scale * scale)
    a2 = torch.mul(a, a)
    out: Norms = {"weight": ((d2 * (a2 @ weights["weight"].t())).sum(1), (d2.t() @ a2).mul_(weights["weight"]) if elementwise else None)}
    if module.bias is not None:
        out["bias"] = (d2 @ weights["bias"], d2.sum(0).mul_(weights["bias"]) if elementwise else None)
    return out


def prefers_gram(batch: int, in_features: int, out_features: int) -> bool:
    """Whether the Gram form of a Linear layer's mean gradient (:func:`linear_gram_norms`)
    needs no more multiplications than the weight gradient itself: ``B²(I + O) ≤ B·I·O``.
    Then its factors ``D [B, O]``, ``A [B, I]`` also hold no more numbers than ``ḡ [O, I]``."""
    return batch * (in_features + out_features) <= in_features * out_features


def linear_gram_norms(a: Tensor, d: Tensor, bias: bool) -> tuple[Norms, Tensor]:
    """Per-example squared norms of a Linear layer on 2-D inputs, and ``|ḡ_W|²``, from the
    two ``B × B`` Gram matrices instead of the weight gradient.

    For ``d`` the gradient of the mean loss with respect to the outputs, ``ḡ_W = dᵀa`` and

    .. math:: |\\bar g_W|^2 = \\sum_{ij} (a_i \\cdot a_j)(d_i \\cdot d_j) = \\langle A A^\\top, D D^\\top\\rangle_F,

    while the diagonals give ``|a_i|²|d_i|²`` (to be scaled by ``B²`` to ``|g_i|²``, as in
    the no-variance path of the rule). Returns the norms ``{"weight": ([B], None), "bias":
    ([B], None)}`` and ``|ḡ_W|²`` (0-d, in ``a``'s dtype).
    """
    ga, gd = a @ a.t(), d @ d.t()
    out: Norms = {"weight": (ga.diagonal() * gd.diagonal(), None)}
    if bias:
        out["bias"] = (gd.diagonal().clone(), None)
    return out, ga.flatten().dot(gd.flatten())


def _linear_grads(module: nn.Linear, a: Tensor, d: Tensor) -> Grads:
    return dense_grads(a, d, module.bias is not None)


def dense_grads(a: Tensor, d: Tensor, bias: bool) -> Grads:
    B = a.shape[0]
    a3, d3 = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
    out = {"weight": torch.einsum("bto,bti->boi", d3, a3)}
    if bias:
        out["bias"] = d3.sum(1)
    return out


register(Rule(always, _linear_norms, _linear_grads, weighted=_linear_weighted, moments=linear_moments, moments_pay=True),
         nn.Linear)  # fmt: skip
