"""One LSTM layer's recurrence as a single autograd node, with its backward written out.

Unrolled step by step through autograd, a recurrence records about ten nodes a step, each
with its own saved tensors and dispatch, and costs a multiple of torch's fused kernel in
time and memory. Here the forward runs without a graph and keeps only the activated gates
and the cell states; the backward (back-propagation through time, the gradients as in
Hochreiter & Schmidhuber 1997 with torch's gate order ``i, f, g, o``) does five operations
a step, every product that does not depend on the carried gradient computed for all steps
at once. The gradient of the gate pre-activations ``δ [B, T, 4H]`` it returns for the input
part ``gx`` is what the per-example norms need (an LSTM's recurrent part has the same).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["WeightGrads", "lstm_gate_gradients", "lstm_layer"]


class WeightGrads:
    """Whether the backward pass forms the recurrent weight's and bias's gradients: the
    engine turns it off, before its backward pass, where it takes their mean from the
    per-example products instead (autograd skips its own nodes' unneeded gradients, but
    a custom node's ``needs_input_grad`` is fixed at the forward pass)."""

    __slots__ = ("needed",)

    def __init__(self) -> None:
        self.needed = True


def _activate(acts: Tensor, c0: Tensor) -> Tensor:
    """The gates' pre-activations ``[T, 4H, B]`` activated in place, and the cell states
    ``[T, H, B]`` from them step by step (one operation a step): the forward pass when the
    hidden states are known, so that every pre-activation comes from one batched product."""
    H = acts.shape[1] // 4
    acts[:, : 2 * H].sigmoid_()
    acts[:, 2 * H : 3 * H].tanh_()
    acts[:, 3 * H :].sigmoid_()
    i, f, g, _ = acts.chunk(4, 1)
    cs = i * g
    c = c0
    for t in range(cs.shape[0]):
        c = cs[t].addcmul_(f[t], c)
    return cs


def _bptt(acts: Tensor, cs: Tensor, w_hh: Tensor, c0: Tensor, d_out: Tensor | None,
          d_hn: Tensor | None, d_cn: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Back-propagation through time from the activated gates ``acts [T, 4H, B]`` and the
    cell states ``cs [T, H, B]`` (hidden-major, ``c0 [H, B]``) given the gradients of
    the output ``[B, T, H]`` and the final states ``[B, H]`` (``None``: zero). Returns the
    gradient of the gate pre-activations ``[B, T, 4H]`` and that of ``c0`` (``[H, B]``);
    ``acts`` is overwritten."""
    T, G, B = acts.shape
    H = G // 4
    dtype = acts.dtype
    i, f, g, o = acts.chunk(4, 1)
    tc = cs.tanh()
    # What multiplies the carried gradients, for all steps at once: K takes ∂L/∂h_t to
    # ∂L/∂c_t; M holds the input, forget and cell gates' factors of ∂L/∂c_t, N the output
    # gate's of ∂L/∂h_t. M and N overwrite the gates (not needed after this), f kept.
    K = o * (1 - tc * tc)
    N = tc.mul_(o).mul_(1 - o)
    forget = f.clone()
    m_i, m_g = g * i * (1 - i), i * (1 - g * g)
    i.copy_(m_i)
    g.copy_(m_g)
    del m_i, m_g
    f.mul_(1 - forget)[1:].mul_(cs[:-1])
    f[0].mul_(c0)
    M = acts[:, : 3 * H].view(T, 3, H, B)
    dy = d_out.to(dtype).permute(1, 2, 0).contiguous() if d_out is not None else acts.new_zeros(T, H, B)
    wt = w_hh.to(dtype).T.contiguous()  # each step's product runs faster on a row-major Wᵀ than on a view
    delta = acts  # step t's gate gradients written over its factors, which only step t reads
    carry = d_cn.to(dtype).T if d_cn is not None else acts.new_zeros(H, B)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            Dh = torch.addmm(dy[t], wt, delta[t + 1])
        else:
            Dh = dy[t] if d_hn is None else dy[t] + d_hn.to(dtype).T
        Dc = torch.addcmul(carry, Dh, K[t])
        M[t].mul_(Dc)
        torch.mul(Dh, N[t], out=delta[t, 3 * H :])
        carry = Dc.mul_(forget[t])
    del K, N, forget, dy, M, i, f, g, o
    return delta.permute(2, 0, 1).contiguous(), carry  # [B, T, 4H] as gx


def lstm_gate_gradients(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, w_hh: Tensor, b_hh: Tensor | None,
                        h0: Tensor, c0: Tensor, hidden: Tensor, d_out: Tensor | None, d_hn: Tensor | None,
                        d_cn: Tensor | None) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The gradient of one LSTM layer's gate pre-activations ``[B, T, 4H]`` (its weights'
    per-example gradients are its products with the inputs) and the layer's previous hidden
    states ``[B, T, H]``, given its input ``x [B, T, in]``, initial state ``h0, c0 [B, H]``,
    output ``hidden [B, T, H]`` as torch's kernel computed it, and the gradients of the
    output and the final states (``None``: zero). No autograd graph: every pre-activation
    from one product of the stacked weights ``[W_hh W_ih]`` with the stacked previous hidden
    states and inputs, then back-propagation through time (:func:`_bptt`)."""
    dtype = torch.promote_types(x.dtype, w_hh.dtype)
    B, T, H = hidden.shape
    prev = torch.cat([h0.to(dtype)[:, None], hidden.to(dtype)[:, :-1]], 1)  # [B, T, H]
    # one matrix product over all steps and examples (a batch of per-step products of B
    # columns each runs at a fraction of the speed), then hidden-major [T, 4H, B] for BPTT
    stacked = torch.cat([prev, x.to(dtype)], 2).permute(2, 1, 0).reshape(-1, T * B)  # [H + in, T·B]
    acts = (torch.cat([w_hh, w_ih], 1).to(dtype) @ stacked).view(4 * H, T, B).transpose(0, 1).contiguous()
    for b in (b_ih, b_hh):
        if b is not None:
            acts += b.to(dtype)[:, None]
    c0 = c0.to(dtype).T
    cs = _activate(acts, c0)
    d_gates, _ = _bptt(acts, cs, w_hh, c0, d_out, d_hn, d_cn)
    return d_gates, prev


class _LSTMLayer(torch.autograd.Function):
    # The state is kept hidden-major, [H, B], and the gates [T, 4H, B]: each step's product
    # is W_hh h_t-1 and every gate a contiguous block (an activation on a strided slice
    # takes a slow path on CPU).

    @staticmethod
    def forward(ctx, gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, c0: Tensor, wanted: WeightGrads):
        B, T, G = gx.shape
        H = G // 4
        dtype = torch.promote_types(gx.dtype, w_hh.dtype)  # under autocast: gx 16-bit, the state float32
        w = w_hh.to(dtype)
        h, c = h0.to(dtype).T, c0.to(dtype).T
        acts = torch.empty(T, G, B, dtype=dtype, device=gx.device)
        if b_hh is None:
            acts.copy_(gx.permute(1, 2, 0))
        else:
            torch.add(gx.permute(1, 2, 0), b_hh.to(dtype)[:, None], out=acts)
        cs, hs = acts.new_empty(T, H, B), acts.new_empty(T, H, B)
        for t in range(T):
            a = acts[t].addmm_(w, h)
            a[: 2 * H].sigmoid_()
            a[2 * H : 3 * H].tanh_()
            a[3 * H :].sigmoid_()
            i, f, g, o = a.chunk(4)
            c = torch.mul(f, c, out=cs[t]).addcmul_(i, g)
            h = torch.mul(o, c.tanh(), out=hs[t])
        ctx.save_for_backward(acts, cs, hs, w_hh, h0, c0)
        ctx.gx_dtype, ctx.wanted = gx.dtype, wanted
        return hs.permute(2, 0, 1).contiguous(), hs[-1].T.contiguous(), cs[-1].T.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None):
        if ctx.wanted is None:
            raise RuntimeError("the engine's LSTM recurrence was differentiated twice; its backward reuses its buffers")
        wanted, ctx.wanted = ctx.wanted.needed, None
        acts, cs, hs, w_hh, h0, c0 = ctx.saved_tensors
        dtype = acts.dtype
        d_gates, carry = _bptt(acts, cs, w_hh, c0.to(dtype).T, d_out, d_hn, d_cn)
        d_w = d_b = d_h0 = d_c0 = None
        if ctx.needs_input_grad[1] and wanted:
            prev = torch.cat([h0.to(dtype)[:, None], hs[:-1].permute(2, 0, 1)], 1)
            d_w = (d_gates.flatten(0, 1).T @ prev.flatten(0, 1)).to(w_hh.dtype)
        if ctx.needs_input_grad[2] and wanted:
            d_b = d_gates.sum((0, 1)).to(w_hh.dtype)
        if ctx.needs_input_grad[3]:
            d_h0 = (d_gates[:, 0] @ w_hh.to(dtype)).to(h0.dtype)
        if ctx.needs_input_grad[4]:
            d_c0 = carry.T.to(c0.dtype)
        return d_gates.to(ctx.gx_dtype), d_w, d_b, d_h0, d_c0, None


def lstm_layer(gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, c0: Tensor,
               weight_grads: WeightGrads | None = None):  # fmt: skip
    """One direction of one LSTM layer over a batch-first sequence, from the input part of its
    gates ``gx = x W_ihᵀ + b_ih`` (``[B, T, 4H]``) and the initial state ``h0, c0 [B, H]``:
    the output ``[B, T, H]`` and the final ``h_n, c_n``, torch's formulas
    (``nn.LSTM``'s documentation). Differentiable once; ``w_hh`` and ``b_hh`` get no gradient
    while ``weight_grads.needed`` is off when the backward pass runs."""
    return _LSTMLayer.apply(gx, w_hh, b_hh, h0, c0, weight_grads or WeightGrads())
