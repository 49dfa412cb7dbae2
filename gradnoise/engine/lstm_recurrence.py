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

__all__ = ["lstm_layer"]


class _LSTMLayer(torch.autograd.Function):
    # Gates are kept gate-major, [T, 4, B, H]: every gate of a step is then contiguous (an
    # activation on a strided slice of [B, 4H] takes a slow path on CPU).

    @staticmethod
    def forward(ctx, gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, c0: Tensor):
        B, T, G = gx.shape
        H = G // 4
        dtype = torch.promote_types(gx.dtype, w_hh.dtype)  # under autocast: gx 16-bit, the state float32
        w = w_hh.to(dtype).view(4, H, H).transpose(1, 2)  # w[k] = W_hh,kᵀ
        gates = gx.view(B, T, 4, H).permute(1, 2, 0, 3)
        acts = torch.empty(T, 4, B, H, dtype=dtype, device=gx.device)
        if b_hh is None:
            acts.copy_(gates)
        else:
            torch.add(gates, b_hh.to(dtype).view(4, 1, H), out=acts)
        cs, hs = acts.new_empty(T, B, H), acts.new_empty(T, B, H)
        h, c = h0.to(dtype), c0.to(dtype)
        for t in range(T):
            a = acts[t].baddbmm_(h.expand(4, B, H), w)
            a[:2].sigmoid_()
            a[2].tanh_()
            a[3].sigmoid_()
            i, f, g, o = a.unbind(0)
            c = torch.mul(f, c, out=cs[t]).addcmul_(i, g)
            h = torch.mul(o, c.tanh(), out=hs[t])
        ctx.save_for_backward(acts, cs, hs, w_hh, h0, c0)
        ctx.gx_dtype = gx.dtype
        return hs.transpose(0, 1), hs[-1].clone(), cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None):
        acts, cs, hs, w_hh, h0, c0 = ctx.saved_tensors
        T, _, B, H = acts.shape
        dtype = acts.dtype
        i, f, g, o = acts.unbind(1)
        c_prev = torch.cat([c0.to(dtype)[None], cs[:-1]])
        tc = cs.tanh()
        # What multiplies the carried gradients, for all steps at once: K takes ∂L/∂h_t to
        # ∂L/∂c_t; M holds the input, forget and cell gates' factors of ∂L/∂c_t, N the output
        # gate's of ∂L/∂h_t.
        K = o * (1 - tc * tc)
        M = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], 1)  # [T, 3, B, H]
        N = tc * o * (1 - o)
        del tc, c_prev
        dy = d_out.transpose(0, 1) if d_out is not None else acts.new_zeros(T, B, H)
        w = w_hh.to(dtype)
        delta = torch.empty_like(acts)
        carry = d_cn.to(dtype) if d_cn is not None else acts.new_zeros(B, H)
        for t in range(T - 1, -1, -1):
            if t < T - 1:
                Dh = torch.addmm(dy[t], delta[t + 1].transpose(0, 1).reshape(B, 4 * H), w)
            else:
                Dh = dy[t] if d_hn is None else dy[t] + d_hn.to(dtype)
            Dc = torch.addcmul(carry, Dh, K[t])
            torch.mul(M[t], Dc, out=delta[t, :3])
            torch.mul(Dh, N[t], out=delta[t, 3])
            carry = Dc.mul_(f[t])
        d_gx = delta.permute(2, 0, 1, 3).reshape(B, T, 4 * H).to(ctx.gx_dtype)
        d_w = d_b = d_h0 = d_c0 = None
        if ctx.needs_input_grad[1]:
            prev = torch.cat([h0.to(dtype)[None], hs[:-1]])
            d_w = torch.einsum("tkbj,tbh->kjh", delta, prev).reshape(4 * H, H).to(w_hh.dtype)
        if ctx.needs_input_grad[2]:
            d_b = delta.sum((0, 2)).reshape(4 * H).to(w_hh.dtype)
        if ctx.needs_input_grad[3]:
            d_h0 = (delta[0].transpose(0, 1).reshape(B, 4 * H) @ w).to(h0.dtype)
        if ctx.needs_input_grad[4]:
            d_c0 = carry.to(c0.dtype)
        return d_gx, d_w, d_b, d_h0, d_c0


def lstm_layer(gx: Tensor, w_hh: Tensor, b_hh: Tensor | None, h0: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One direction of one LSTM layer over a batch-first sequence, from the input part of its
    gates ``gx = x W_ihᵀ + b_ih`` (``[B, T, 4H]``) and the initial state ``h0, c0 [B, H]``:
    the output ``[B, T, H]`` and the final ``h_n, c_n``, torch's formulas
    (``nn.LSTM``'s documentation). Differentiable once."""
    return _LSTMLayer.apply(gx, w_hh, b_hh, h0, c0)
