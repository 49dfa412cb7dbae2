"""Per-example gradients of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` from one recorded call,
without a loop over examples: the recurrence is unrolled with every weight expanded to one
copy per example (``W.expand(B, ...)``, no copy made), so that the gradient with respect
to the expanded weights *is* the per-example gradient ``Σ_t`` of each step's contribution.
Gate order and formulas are torch's (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` documentation).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["per_example_rnn_grads", "rnn_grads", "rnn_grads_looped", "unrollable"]


def unrollable(module: nn.Module) -> bool:
    """The RNN configurations unrolled here (projections, ``proj_size``, are not)."""
    return type(module) in (nn.LSTM, nn.GRU, nn.RNN) and not getattr(module, "proj_size", 0)


def _cell(module: nn.Module, x: Tensor, state, w_ih, w_hh, b_ih, b_hh):
    """One step for a batch with per-example weights ``w [B, ·, ·]``."""
    h = state[0] if isinstance(module, nn.LSTM) else state
    gi = torch.bmm(w_ih, x.unsqueeze(2)).squeeze(2) + (b_ih if b_ih is not None else 0)
    gh = torch.bmm(w_hh, h.unsqueeze(2)).squeeze(2) + (b_hh if b_hh is not None else 0)
    if isinstance(module, nn.LSTM):
        i, f, g, o = (gi + gh).chunk(4, 1)
        c = torch.sigmoid(f) * state[1] + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return h, (h, c)
    if isinstance(module, nn.GRU):
        ir, iz, in_ = gi.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        h = (1 - z) * n + z * h
        return h, h
    h = torch.tanh(gi + gh) if module.nonlinearity == "tanh" else torch.relu(gi + gh)
    return h, h


def rnn_grads(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int) -> dict[str, Tensor]:
    """Per-example gradients ``[B, *shape]`` of every parameter of ``module`` for the call
    ``module(*args)``, given the gradients of its outputs (``output``, then ``h_n`` and for an
    LSTM ``c_n``; ``None`` where none arrived), each of example ``i``'s own loss."""
    x = args[0].detach()
    if not module.batch_first:
        x = x.transpose(0, 1)
    B, T = x.shape[0], x.shape[1]
    L, D, H = module.num_layers, 2 if module.bidirectional else 1, module.hidden_size
    h0 = args[1] if len(args) > 1 else None
    leaves = {n: p.detach().unsqueeze(0).expand(B, *p.shape).requires_grad_(True) for n, p in module.named_parameters()}
    zeros = x.new_zeros(L * D, B, H)
    if isinstance(module, nn.LSTM):
        hx, cx = (h0[0].detach(), h0[1].detach()) if h0 is not None else (zeros, zeros)
    else:
        hx = h0.detach() if h0 is not None else zeros
    layer_in, finals = x, []
    with torch.enable_grad():
        for layer in range(L):
            outs = []
            for d in range(D):
                k, sfx = layer * D + d, f"_l{layer}" + ("_reverse" if d else "")
                w = [leaves.get(f"{kind}{sfx}") for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                state = (hx[k], cx[k]) if isinstance(module, nn.LSTM) else hx[k]
                steps = range(T - 1, -1, -1) if d else range(T)
                hs = [None] * T
                for t in steps:
                    hs[t], state = _cell(module, layer_in[:, t], state, *w)
                outs.append(torch.stack(hs, 1))
                finals.append(state)
            layer_in = torch.cat(outs, 2) if D == 2 else outs[0]
        out = layer_in if module.batch_first else layer_in.transpose(0, 1)
        total = (out * output_grads[0]).sum() if output_grads and output_grads[0] is not None else out.sum() * 0
        if len(output_grads) > 1 and output_grads[1] is not None:
            h_n = torch.stack([s[0] if isinstance(module, nn.LSTM) else s for s in finals])
            total = total + (h_n * output_grads[1]).sum()
        if isinstance(module, nn.LSTM) and len(output_grads) > 2 and output_grads[2] is not None:
            total = total + (torch.stack([s[1] for s in finals]) * output_grads[2]).sum()
        grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(leaf) if g is None else g for (n, leaf), g in zip(leaves.items(), grads, strict=True)}


def rnn_grads_looped(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int) -> dict[str, Tensor]:
    """:func:`rnn_grads` by a loop over examples through torch's fused kernel (one sequence
    at a time): fewer, larger operations than the unrolled recurrence when sequences are
    long and the batch is small."""
    dim = 0 if module.batch_first else 1
    params = dict(module.named_parameters())
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    h0 = args[1] if len(args) > 1 else None
    with torch.enable_grad():
        for i in range(batch):
            xi = args[0].detach().narrow(dim, i, 1)
            call = (xi,) if h0 is None else (xi, tuple(h.detach().narrow(1, i, 1) for h in h0) if isinstance(h0, tuple)
                                             else h0.detach().narrow(1, i, 1))  # fmt: skip
            out, h_n = torch.func.functional_call(module, leaves, call)
            total = (out * output_grads[0].narrow(dim, i, 1)).sum() if output_grads[0] is not None else out.sum() * 0
            for h, g in zip(h_n if isinstance(h_n, tuple) else (h_n,), output_grads[1:], strict=False):
                if g is not None:
                    total = total + (h * g.narrow(1, i, 1)).sum()
            for (n, leaf), g in zip(leaves.items(), torch.autograd.grad(total, list(leaves.values()), allow_unused=True),
                                    strict=True):  # fmt: skip
                rows[n].append(torch.zeros_like(leaf) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


_FASTER: dict[tuple, Callable] = {}  # by configuration and shapes: the faster of the two, measured


def per_example_rnn_grads(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int) -> dict[str, Tensor]:
    """Per-example gradients of an RNN call by whichever of :func:`rnn_grads` (unrolled, many
    small batched operations) and :func:`rnn_grads_looped` (fused kernel, one example at a
    time) measured faster the first time this configuration and shape were seen (each
    takes several times the other's time somewhere: long sequences and small batches favour
    the loop)."""
    key = (type(module), module.num_layers, module.hidden_size, module.input_size, module.bidirectional,
           module.batch_first, tuple(args[0].shape), len(args), args[0].device.type)  # fmt: skip
    fn = _FASTER.get(key)
    if fn is not None:
        return fn(module, args, output_grads, batch)
    timed = []
    for candidate in (rnn_grads, rnn_grads_looped):
        start = time.perf_counter()
        out = candidate(module, args, output_grads, batch)
        timed.append((time.perf_counter() - start, candidate, out))
    seconds, fn, out = min(timed, key=lambda t: t[0])
    if len(_FASTER) >= 64:
        _FASTER.clear()
    _FASTER[key] = fn
    return out
