"""``nn.Conv1d`` / ``nn.Conv2d``: convolutions as sequence Linear layers on their input
patches (Rochette et al. 2019, "Efficient Per-Example Gradient Computations in
Convolutional Neural Networks"), per group.

Patches are a strided view (no im2col copy); per-example gradients are materialised in
chunks no larger than the layer's input or output gradient, or the Gram form is used.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradnoise.rules._common import batch_chunks, bias_norms, joined, product_moments, scaled_
from gradnoise.rules.registry import Grads, Norms, Rule, register

__all__ = ["conv_moments", "conv_prefers_moments"]


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
    views = S.as_strided((S.shape[0], *size), (S.stride(0), *strides))
    # one add per kernel offset: each view's last dimension runs along S's rows (a reduction
    # over the leading strided dimensions is several times slower)
    offsets = itertools.product(*map(range, size[: len(geo.out)]))
    ga = views[(slice(None), *next(offsets))].clone()
    for k in offsets:
        ga.add_(views[(slice(None), *k)])
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
        for ac, dc in batch_chunks(a, d, 2 * module.weight.numel()):
            g2 = _conv1d_single_channel_grads(module, ac, dc).flatten(1).square()
            rows.append(g2.sum(1))
            if total is not None:
                total += g2.sum(0).view_as(total)
    else:
        geo = _geometry(module, a.shape, d.shape)
        G, Og, T = geo.G, geo.Og, geo.T
        gram = "" if elementwise else geo.gram
        for ac, dc in batch_chunks(a, d, geo.per_example if gram else geo.per_example_products):
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
    out: Norms = {"weight": scaled_(joined(rows), total, s2)}
    if module.bias is not None and gram:
        out["bias"] = scaled_(joined(bias_rows), None, s2)
    elif module.bias is not None:
        out["bias"] = bias_norms(d.flatten(2).sum(2), elementwise, s2)
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

    def products():
        for ac, dc in batch_chunks(a, d, G * (I * T + I * Og)):
            b = ac.shape[0]
            g = torch.bmm(dc.reshape(b * G, Og, T), _patch_columns(module, ac, geo).transpose(1, 2))
            yield g.view(b, G, Og, I)

    s2 = scale * scale
    sq, total, mean = product_moments(products(), elementwise, s2)
    weight_shape = module.weight.shape
    out: Norms = {"weight": (sq, None if total is None else total.view(weight_shape))}
    means: Grads = {"weight": mean.view(weight_shape)}
    if module.bias is not None:
        gb = d.flatten(2).sum(2)  # [B, O]
        means["bias"] = gb.sum(0)
        out["bias"] = bias_norms(gb, elementwise, s2)
    return out, means


def conv_prefers_moments(module: nn.Module, a_shape: torch.Size, out_shape: torch.Size) -> bool:
    """Whether the norms of this call would come from per-example products (not a Gram form,
    nor the one-channel grouped convolution): :func:`conv_moments` then forms the same
    products and also gives the mean, so the backward pass can skip the weight gradient."""
    return not _single_channel(module) and _geometry(module, a_shape, out_shape).gram == ""


def _conv_grads(module: nn.Module, a: Tensor, d: Tensor) -> Grads:
    out = {"weight": _conv_grads_grouped(module, a, d)}
    if module.bias is not None:
        out["bias"] = d.flatten(2).sum(2)
    return out


register(Rule(_conv_accepts, _conv_norms, _conv_grads, moments=conv_moments, moments_pay=conv_prefers_moments),
         nn.Conv1d, nn.Conv2d)  # fmt: skip
