"""Per-layer rules: per-example gradient quantities from a layer's input ``a`` and output
gradient ``δ`` (Goodfellow 2015, "Efficient Per-Example Gradient Computations";
Rochette et al. 2019 for convolutions; Li et al. 2022 for the sequence "ghost norm").

``δ_i`` is the gradient of example ``i``'s own loss with respect to the layer output, i.e.
``B · ∂L/∂out_i`` for a mean-reduced batch loss ``L``. Each rule gives, per parameter, either

* ``norms(module, a, d, elementwise, scale)``: per-example squared norms ``|g_i|²``
  (``[B]``) and, if asked, ``Σ_i g_i²`` (elementwise, the parameter's shape) without
  materialising ``B × P`` numbers, for ``δ = scale · d`` (the scale is applied where it
  costs least, never as an extra pass over the output gradient); or
* ``grads``: the materialised per-example gradients ``[B, *shape]`` (used when a parameter
  receives contributions from several calls, e.g. tied weights).

For a Linear layer on 2-D input ``g_i = δ_i a_iᵀ``, so ``|g_i|² = |a_i|²|δ_i|²`` and
``Σ_i g_i² = (δ²)ᵀ(a²)``. On sequences ``[B, T, ·]``, ``g_i = Σ_t δ_{it} a_{it}ᵀ`` and
``|g_i|² = ⟨A_i A_iᵀ, D_i D_iᵀ⟩_F`` (Gram form, cost ``T²(I+O)``) or the per-example product
(cost ``T·I·O``), whichever is cheaper. Convolutions are sequence Linear layers on their
input patches (a strided view, no im2col copy), per group; their per-example gradients are
materialised in chunks no larger than the layer's input or output gradient (or the Gram
form is used).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_CHUNK_ELEMENTS = 2**17  # smallest budget for a chunk of per-example temporaries

Norms = dict[str, tuple[Tensor, Tensor | None]]  # name -> (sq_norms [B], sum_sq or None)
Grads = dict[str, Tensor]  # name -> [B, *shape]


@dataclass(frozen=True)
class Rule:
    """How to get per-example quantities for one module type.

    ``whole_call``: the rule gets the call's ``(args, kwargs)`` instead of its first input
    (attention needs query, key, value and masks). ``owns_children``: the parameters of the
    module's children belong to this rule (under dotted local names), for modules that use
    a child's parameters without calling it (``MultiheadAttention.out_proj``). ``moments``
    (optional): the norms of ``norms`` and the module's mean gradient ``Σ_i g_i`` (of ``d``,
    unscaled) at about the cost of the parameters' own gradients, which the backward pass
    then skips.
    """

    accepts: Callable[[nn.Module], bool]
    norms: Callable[[nn.Module, Tensor, Tensor, bool, float], Norms]
    grads: Callable[[nn.Module, Tensor, Tensor], Grads]
    whole_call: bool = False
    owns_children: bool = False
    moments: Callable[[nn.Module, Tensor, Tensor, bool, float], tuple[Norms, Grads]] | None = None


def _small(grads_fn: Callable[[nn.Module, Tensor, Tensor], Grads]):
    """Norms of a rule whose per-example gradients are small enough to materialise."""

    def norms(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> Norms:
        out = {}
        for name, g in grads_fn(module, a, d).items():
            g2 = g.square().mul_(scale * scale)
            out[name] = (g2.flatten(1).sum(1), g2.sum(0) if elementwise else None)
        return out

    return norms


# ---------------------------------------------------------------- sequence / grouped linear


def _budget(a: Tensor, d: Tensor) -> int:
    """Temporaries are bounded by the larger of the layer's input and output gradient (both
    held by the step anyway, so a fraction of its peak)."""
    return max(a.numel(), d.numel(), MIN_CHUNK_ELEMENTS)


def _batch_chunks(a: Tensor, d: Tensor, per_example: int):
    """``(a, d)`` in chunks of examples whose temporaries hold at most :func:`_budget`
    elements (the tensors themselves when one chunk holds the batch)."""
    B = a.shape[0]
    step = max(1, _budget(a, d) // max(1, per_example))
    if step >= B:
        yield a, d
        return
    for start in range(0, B, step):
        yield a[start : start + step], d[start : start + step]


def _joined(rows: list[Tensor]) -> Tensor:
    """The per-chunk rows of :func:`_batch_chunks` as one tensor (no copy for one chunk)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _scaled_(sq: Tensor, total: Tensor | None, s2: float) -> tuple[Tensor, Tensor | None]:
    """``|g_i|²`` and ``Σ_i g_i²`` of ``d`` turned into those of ``scale · d`` (``s2 =
    scale²``), in place."""
    if s2 != 1:
        sq.mul_(s2)
        if total is not None:
            total.mul_(s2)
    return sq, total


def _sq_norms(g: Tensor) -> Tensor:
    """``|g_i|²`` of ``[B, ...]`` rows in one pass (no squared temporary)."""
    return torch.linalg.vector_norm(g if g.dim() == 2 else g.flatten(1), dim=1).square_()


def _bias_norms(gb: Tensor, elementwise: bool, s2: float) -> tuple[Tensor, Tensor | None]:
    """``|g_i|²`` (and ``Σ_i g_i²``) of per-example bias gradients ``gb [B, O]`` of ``d``,
    for ``δ = scale · d`` (``s2 = scale²``); squares ``gb`` in place."""
    gb2 = gb.square_()
    if s2 != 1:
        gb2.mul_(s2)
    return gb2.sum(1), gb2.sum(0) if elementwise else None


def _grouped_grads(a: Tensor, d: Tensor) -> Tensor:
    """``a [B, G, T, I]``, ``d [B, G, T, O]`` → per-example ``[B, G, O, I]``."""
    return torch.einsum("bgto,bgti->bgoi", d, a)


def _grouped_norms(a: Tensor, d: Tensor, elementwise: bool) -> tuple[Tensor, Tensor | None]:
    """Per-example squared norms (and ``Σ_i g_i²``, shape ``[G, O, I]``) of ``Σ_t d_t a_tᵀ``.

    Without ``Σ_i g_i²``, the Gram form ``⟨A Aᵀ, D Dᵀ⟩`` is used when it needs fewer
    multiplications (``T²(I+O) < T·I·O``); otherwise the per-example products are
    materialised in chunks (:func:`_batch_chunks`).
    """
    _, G, T, I = a.shape
    O = d.shape[-1]
    rows: list[Tensor] = []
    if not elementwise and T * (I + O) < I * O:
        for ac, dc in _batch_chunks(a, d, G * T * (T + I + O)):
            ga = ac @ ac.transpose(-1, -2)
            gd = dc @ dc.transpose(-1, -2)
            rows.append((ga * gd).flatten(1).sum(1))
        return _joined(rows), None
    total = torch.zeros(G, O, I, dtype=a.dtype, device=a.device) if elementwise else None
    for ac, dc in _batch_chunks(a, d, G * O * I):
        g = _grouped_grads(ac, dc)
        rows.append(_sq_norms(g))
        if total is not None:
            total += torch.linalg.vector_norm(g, dim=0).square()
    return _joined(rows), total


# ---------------------------------------------------------------- Linear


def _linear_norms(module: nn.Linear, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> Norms:
    return _dense_norms(a, d, module.bias is not None, elementwise, scale)


def _dense_norms(a: Tensor, d: Tensor, bias: bool, elementwise: bool, scale: float = 1.0) -> Norms:
    """Norms of ``y = a Wᵀ (+ b)`` on ``[B, in]`` or ``[B, *, in]`` inputs."""
    out: Norms = {}
    s2 = scale * scale
    if a.dim() == 2:
        if not elementwise:  # |g_i|² = |a_i|²|δ_i|², no squared temporaries
            d_sq = _sq_norms(d) if s2 == 1 else _sq_norms(d).mul_(s2)
            out["weight"] = (_sq_norms(a).mul_(d_sq), None)
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
        out["bias"] = _bias_norms(d3.sum(2)[:, 0], elementwise, s2)
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
    return _dense_grads(a, d, module.bias is not None)


def _dense_grads(a: Tensor, d: Tensor, bias: bool) -> Grads:
    B = a.shape[0]
    a3, d3 = a.reshape(B, -1, a.shape[-1]), d.reshape(B, -1, d.shape[-1])
    out = {"weight": torch.einsum("bto,bti->boi", d3, a3)}
    if bias:
        out["bias"] = d3.sum(1)
    return out


# ---------------------------------------------------------------- Conv1d / Conv2d


def _conv_accepts(module: nn.Module) -> bool:
    return module.padding_mode == "zeros"


class _ConvGeometry(NamedTuple):
    """A convolution call's shapes and the rules' choices for them, computed once per
    configuration and input shape (:func:`_geometry`), so that the rules' time goes to tensor
    operations (each Python step costs about a microsecond next to operations of ten)."""

    pad: tuple[int, ...]  # F.pad's argument (last dimension first); () without padding
    out: tuple[int, ...]  # the output's spatial shape
    G: int  # groups
    Og: int  # output channels per group
    T: int  # output positions
    I: int  # weight elements per output channel: C_in/G · Πk
    gram: str  # norms without Σ_i g_i²: "input" (input Gram), "patch" (patch Gram) or "" (products)
    per_example: int  # temporaries per example of that choice
    per_example_products: int  # temporaries per example of the per-example products
    gram_view: tuple[tuple[int, ...], tuple[int, ...]]  # the input Gram's offsets view (see _input_gram)


def _geometry(module: nn.Module, a_shape: torch.Size, d_shape: torch.Size) -> _ConvGeometry:
    """The geometry of ``module`` on input ``a_shape`` with output (gradient) ``d_shape``."""
    return _geometry_of(module.kernel_size, module.stride, module.padding, module.dilation, module.groups,
                        tuple(a_shape[1:]), tuple(d_shape[1:]))  # fmt: skip


@functools.lru_cache(maxsize=256)
def _geometry_of(kernel, stride, padding, dilation, groups, in_shape, out_shape) -> _ConvGeometry:
    if padding == "same":
        pads = [(dl * (k - 1) // 2, dl * (k - 1) - dl * (k - 1) // 2) for dl, k in zip(dilation, kernel, strict=True)]
    elif padding == "valid":
        pads = [(0, 0)] * len(kernel)
    else:
        pads = [(p, p) for p in padding]
    padded = [n + left + right for n, (left, right) in zip(in_shape[1:], pads, strict=True)]
    G, Og, out = groups, out_shape[0] // groups, out_shape[1:]
    T, I, N = math.prod(out), in_shape[0] // groups * math.prod(kernel), math.prod(padded)
    # Gram form when it needs fewer products than the per-example gradients (T(I + O) < IO);
    # its patch Gram from the input's own Gram (N² products per input channel, no copy) when
    # that is cheaper than T² per patch element plus the patch copy (counted twice: copies
    # are slow next to products).
    gram = ""
    if T * (I + Og) < I * Og:
        gram = "input" if N * N * (in_shape[0] // G) <= 2 * (T * T * I + 2 * T * I) else "patch"
    products = G * (T * I + Og * I)
    per_example = {"input": G * (N * N + 2 * T * T), "patch": G * T * (I + 2 * T), "": products}[gram]
    # S[p, q] at p = q = s·t + dil·κ per spatial dimension j, in the flat index of a padded
    # position (stride P_j = Π_{j' > j} padded_j' in p, N·P_j in the row-major S [N, N]).
    P = [math.prod(padded[j + 1 :]) for j in range(len(padded))]
    size = (*kernel, *out, *out)
    strides = (
        *(dl * p * (N + 1) for dl, p in zip(dilation, P, strict=True)),
        *(s * p * N for s, p in zip(stride, P, strict=True)),
        *(s * p for s, p in zip(stride, P, strict=True)),
    )
    pad = tuple(p for lr in reversed(pads) for p in lr) if any(p for lr in pads for p in lr) else ()
    return _ConvGeometry(pad, tuple(out), G, Og, T, I, gram, per_example, products, (size, strides))


def _conv_patches(module: nn.Module, a: Tensor, geo: _ConvGeometry) -> Tensor:
    """Input patches as a strided view ``[B, G, C_in/G, *L, *k]`` (no im2col copy)."""
    nd = a.dim() - 2
    k, dil, stride = module.kernel_size, module.dilation, module.stride
    if geo.pad:
        a = F.pad(a, geo.pad)
    for dim in range(nd):
        span = dil[dim] * (k[dim] - 1) + 1
        a = a.unfold(2 + dim, span, stride[dim])
    if any(d > 1 for d in dil):
        a = a[(Ellipsis, *(slice(None, None, d) for d in dil))]
    B, C, G = a.shape[0], a.shape[1], geo.G
    return a.reshape(B, G, C // G, *a.shape[2:]) if G > 1 else a.unsqueeze(1)


_SPATIAL = "hw"
_KERNEL = "ij"


def _single_channel(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv1d) and module.in_channels == 1 and module.groups == 1


def _conv1d_single_channel_grads(module: nn.Conv1d, a: Tensor, d: Tensor) -> Tensor:
    """Per-example gradients of a one-input-channel Conv1d as one grouped convolution.

    Rochette et al. 2019: ``g_i[o, 0, j] = Σ_l δ_i[o, l] a_i[l·s + j·dil]`` is a cross-
    correlation of the input with the output gradient (dilated by the stride); with the batch
    as groups it is one ``conv1d`` call instead of ``B`` tiny matrix products.
    """
    pad = _geometry(module, a.shape, d.shape).pad
    a = F.pad(a, pad) if pad else a
    B, O, L = d.shape
    out = F.conv1d(a.transpose(0, 1), d.reshape(B * O, 1, L), dilation=module.stride[0], groups=B)
    k, dil = module.kernel_size[0], module.dilation[0]
    return out[..., : dil * (k - 1) + 1 : dil].reshape(B, O, 1, k)


def _conv_grads_grouped(module: nn.Module, a: Tensor, d: Tensor) -> Tensor:
    """Per-example weight gradients ``[B, C_out, C_in/G, *k]`` by one einsum over patches."""
    if _single_channel(module):
        return _conv1d_single_channel_grads(module, a, d)
    nd = a.dim() - 2
    geo = _geometry(module, a.shape, d.shape)
    patches = _conv_patches(module, a, geo)
    dd = d.reshape(a.shape[0], geo.G, geo.Og, *d.shape[2:])
    sp, kk = _SPATIAL[:nd], _KERNEL[:nd]
    g = torch.einsum(f"bgo{sp},bgc{sp}{kk}->bgoc{kk}", dd, patches)
    return g.reshape(a.shape[0], *module.weight.shape)


def _patch_columns(module: nn.Module, a: Tensor, geo: _ConvGeometry) -> Tensor:
    """Contiguous transposed patch matrices ``[B·G, I, T]`` (``I = C_in/G·Πk`` in the
    order of the weight's trailing dimensions, ``T`` output positions); the rules use them
    and their transposes ``P_i [T, I]`` (one layout: with few kernel elements, as a first
    layer's ``I = 5``, contiguous ``[T, I]`` rows made the batched product 9× slower)."""
    nd = a.dim() - 2
    patches = _conv_patches(module, a, geo)  # [B, G, C', *L, *k] view
    perm = (0, 1, 2, *range(3 + nd, 3 + 2 * nd), *range(3, 3 + nd))
    # contiguous: a strided view (overlapping windows) would send the batched product to a
    # slow per-example path
    return patches.permute(perm).reshape(a.shape[0] * geo.G, geo.I, geo.T).contiguous()


def _input_gram(a: Tensor, geo: _ConvGeometry) -> Tensor:
    """The patch Gram ``P_i P_iᵀ`` (``[B·G, T, T]``) without patch matrices.

    Two patches at output positions ``t, t'`` overlap the input at positions
    ``s·t + dil·κ`` and ``s·t' + dil·κ`` for each kernel offset ``κ``, so
    ``(P Pᵀ)_{tt'} = Σ_κ S[s·t + dil·κ, s·t' + dil·κ]`` with ``S = Xᵀ X`` the channel Gram of
    the (zero-padded) input over its positions: one batched product on the input as it is,
    then one strided view of ``S`` (offsets, positions) summed over the offsets.
    """
    if geo.pad:
        a = F.pad(a, geo.pad)
    b, C = a.shape[0], a.shape[1]
    x = a.reshape(b * geo.G, C // geo.G, -1)
    S = torch.bmm(x.transpose(1, 2), x)  # [b·G, N, N]
    size, strides = geo.gram_view
    ga = S.as_strided((S.shape[0], *size), (S.stride(0), *strides)).sum(tuple(range(1, 1 + len(geo.out))))
    return ga.view(-1, geo.T, geo.T)


def _conv_norms(module: nn.Module, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0) -> Norms:
    """Per-example squared norms (and ``Σ_i g_i²``) of a convolution's weight and bias.

    One input channel: the per-example gradients by one grouped convolution (cheapest).
    Otherwise per chunk of examples, with output gradients ``D_i [T, O]`` and input patches
    ``P_i [T, I]``: ``|g_i|² = ⟨P_i P_iᵀ, D_i D_iᵀ⟩`` (Gram form; ``P_i P_iᵀ`` from the
    input's own Gram when that is cheaper than building patch matrices, see
    :func:`_input_gram`) or ``|D_i P_i|²`` on contiguous patch columns, whichever needs
    fewer products (:func:`_geometry_of`); with ``Σ_i g_i²`` the products are always
    materialised.
    """
    rows: list[Tensor] = []  # |g_i|² per chunk
    bias_rows: list[Tensor] = []  # |g_b,i|² per chunk, from the Gram path
    total = torch.zeros_like(module.weight, dtype=a.dtype) if elementwise else None
    gram = ""
    if _single_channel(module):
        for ac, dc in _batch_chunks(a, d, 2 * module.weight.numel()):
            g2 = _conv1d_single_channel_grads(module, ac, dc).flatten(1).square()
            rows.append(g2.sum(1))
            if total is not None:
                total += g2.sum(0).view_as(total)
    else:
        geo = _geometry(module, a.shape, d.shape)
        G, Og, T = geo.G, geo.Og, geo.T
        gram = "" if elementwise else geo.gram
        for ac, dc in _batch_chunks(a, d, geo.per_example if gram else geo.per_example_products):
            b = ac.shape[0]
            dm = dc.reshape(b * G, Og, T)
            if gram:
                if gram == "input":
                    ga = _input_gram(ac, geo)
                else:
                    cols = _patch_columns(module, ac, geo)
                    ga = torch.bmm(cols.transpose(1, 2), cols)
                gd = torch.bmm(dm.transpose(1, 2), dm)  # [b·G, T, T]
                if module.bias is not None:  # |Σ_t δ_t|² = Σ_tt' (DᵀD)_tt', summed over groups
                    bias_rows.append(gd.view(b, -1).sum(1))
                rows.append(ga.mul_(gd).view(b, -1).sum(1))
            else:
                g2 = torch.bmm(dm, _patch_columns(module, ac, geo).transpose(1, 2)).square_()  # [b·G, O/G, I]
                rows.append(g2.view(b, -1).sum(1))
                if total is not None:
                    total += g2.view(b, -1).sum(0).view_as(total)
    s2 = scale * scale
    out: Norms = {"weight": _scaled_(_joined(rows), total, s2)}
    if module.bias is not None and gram:
        out["bias"] = _scaled_(_joined(bias_rows), None, s2)
    elif module.bias is not None:
        out["bias"] = _bias_norms(d.flatten(2).sum(2), elementwise, s2)
    return out


def conv_moments(
    module: nn.Module, a: Tensor, d: Tensor, elementwise: bool, scale: float = 1.0
) -> tuple[Norms, Grads]:
    """Per-example squared norms (and ``Σ_i g_i²``) of a convolution's weight and bias, and
    their **mean gradient**, from per-example gradients materialised in chunks.

    With output gradients ``D_i [O, T]`` and transposed input patches ``P_iᵀ [I, T]``,
    ``g_i = D_i P_i`` is one batched product per chunk (no larger than the layer's input
    or output gradient); ``ḡ = Σ_i g_i`` for ``d`` the gradient of the mean loss. It costs
    the multiplications of the weight gradient itself, so the backward pass can skip that
    (on CPU, convolution weight gradients of small layers are slow next to a batched
    product). Norms are of ``scale · d`` as in the other rules; the mean is of ``d``.
    """
    geo = _geometry(module, a.shape, d.shape)
    G, Og, T, I = geo.G, geo.Og, geo.T, geo.I
    rows: list[Tensor] = []
    mean = total = None
    for ac, dc in _batch_chunks(a, d, G * (I * T + I * Og)):
        b = ac.shape[0]
        g = torch.bmm(dc.reshape(b * G, Og, T), _patch_columns(module, ac, geo).transpose(1, 2))
        g = g.view(b, G, Og, I)
        part = g.sum(0)
        mean = part if mean is None else mean.add_(part)
        if elementwise:
            g2 = g.square_()
            rows.append(g2.view(b, -1).sum(1))
            part = g2.sum(0)
            total = part if total is None else total.add_(part)
        else:
            rows.append(_sq_norms(g))
    s2 = scale * scale
    sq, total = _scaled_(_joined(rows), total, s2)
    weight_shape = module.weight.shape
    out: Norms = {"weight": (sq, None if total is None else total.view(weight_shape))}
    means: Grads = {"weight": mean.view(weight_shape)}
    if module.bias is not None:
        gb = d.flatten(2).sum(2)  # [B, O]
        means["bias"] = gb.sum(0)
        out["bias"] = _bias_norms(gb, elementwise, s2)
    return out, means


def _conv_grads(module: nn.Module, a: Tensor, d: Tensor) -> Grads:
    out = {"weight": _conv_grads_grouped(module, a, d)}
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


# ---------------------------------------------------------------- multi-head attention

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
    parts = [_dense_norms(x, g, bias, elementwise, scale) for x, g in projections]
    out: Norms = {}
    for name in ("weight", "bias") if bias else ("weight",):  # rows of q, k, v: norms add up
        sq = sum(p[name][0] for p in parts)
        out[f"in_proj_{name}"] = (sq, torch.cat([p[name][1] for p in parts]) if elementwise else None)
    for name, v in _dense_norms(ctx, d_out, module.out_proj.bias is not None, elementwise, scale).items():
        out[f"out_proj.{name}"] = v
    return out


def _mha_grads(module: nn.MultiheadAttention, call: tuple, d: Tensor) -> Grads:
    projections, (ctx, d_out) = _mha_parts(module, call, d)
    bias = module.in_proj_bias is not None
    parts = [_dense_grads(x, g, bias) for x, g in projections]
    out = {f"in_proj_{n}": torch.cat([p[n] for p in parts], dim=1) for n in parts[0]}
    out.update({f"out_proj.{n}": v for n, v in _dense_grads(ctx, d_out, module.out_proj.bias is not None).items()})
    return out


def _always(module: nn.Module) -> bool:
    return True


RULES: dict[type[nn.Module], Rule] = {
    nn.Linear: Rule(_always, _linear_norms, _linear_grads),
    nn.Conv1d: Rule(_conv_accepts, _conv_norms, _conv_grads, moments=conv_moments),
    nn.Conv2d: Rule(_conv_accepts, _conv_norms, _conv_grads, moments=conv_moments),
    nn.Embedding: Rule(_embedding_accepts, _embedding_norms, _embedding_grads),
    nn.LayerNorm: Rule(_always, _small(_layer_norm_grads), _layer_norm_grads),
    nn.GroupNorm: Rule(_always, _small(_group_norm_grads), _group_norm_grads),
    nn.MultiheadAttention: Rule(_mha_accepts, _mha_norms, _mha_grads, whole_call=True, owns_children=True),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = Rule(_always, _small(_rms_norm_grads), _rms_norm_grads)


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this exact module type, if it has one and accepts this configuration."""
    rule = RULES.get(type(module))
    return rule if rule is not None and rule.accepts(module) else None
