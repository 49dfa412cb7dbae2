"""Per-example gradients of ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` from one recorded call,
without a loop over examples. The recurrence is unrolled once, with the shared weights, and
its gate pre-activations are kept: the input part ``x_t W_ihᵀ + b_ih`` for all steps in one
product, the recurrent part ``h_{t-1} W_hhᵀ + b_hh`` per step (an LSTM's recurrence is one
autograd node, :mod:`~gradnoise.engine.lstm_recurrence`, whose two parts share ``δ``, the
gates' gradient). With ``δ`` and ``δ^h`` their gradients,
example ``i``'s weight gradients are sums over time, ``Σ_t δ_it ⊗ x_it`` and
``Σ_t δ^h_it ⊗ h_i,t-1`` (one batched product each, as a Linear layer's on a sequence).
Gate order and formulas are torch's (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` documentation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from gradnoise.engine.lstm_recurrence import WeightGrads, lstm_gate_gradients, lstm_layer
from gradnoise.rules import dense_moments, dense_norms, shared_output_norms
from gradnoise.rules._common import grads_norms
from gradnoise.rules.linear import dense_mean, products_pay
from gradnoise.rules.registry import Norms

__all__ = ["Unrolled", "kind_of", "layer_moments", "layer_norms", "norms_of_grads", "per_example_rnn_norms", "recurrent_gradient", "rnn_grads",
           "rnn_grads_looped", "rnn_norms", "unroll", "unrollable"]


def unrollable(module: nn.Module) -> bool:
    """The RNN configurations unrolled here (projections, ``proj_size``, are not)."""
    return type(module) in (nn.LSTM, nn.GRU, nn.RNN) and not getattr(module, "proj_size", 0)


KINDS = {nn.LSTM: "lstm", nn.GRU: "gru"}  # nn.RNN: "rnn_tanh" or "rnn_relu" (its nonlinearity)


def kind_of(module: nn.Module) -> str:
    """torch's name of the recurrence (``torch._VF``'s function): lstm, gru, rnn_tanh, rnn_relu."""
    return KINDS.get(type(module)) or f"rnn_{module.nonlinearity}"


def _cell(kind: str, gx: Tensor, gh: Tensor, state):
    """One step of a GRU or a plain RNN from the gate pre-activations: input part ``gx`` and
    recurrent part ``gh`` (an LSTM runs as one node, :func:`lstm_layer`)."""
    if kind == "gru":
        ir, iz, in_ = gx.chunk(3, 1)
        hr, hz, hn = gh.chunk(3, 1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        h = (1 - z) * torch.tanh(in_ + r * hn) + z * state
        return h, h
    h = torch.tanh(gx + gh) if kind == "rnn_tanh" else torch.relu(gx + gh)
    return h, h


class Unrolled(NamedTuple):
    """One layer and direction of an unrolled call: its parameters' suffix (``_l0``,
    ``_l1_reverse``), its input ``[B, T, in]`` (detached), the input part of its gates
    ``[B, T, G]``, the previous hidden states ``[B, T, H]`` (detached), all in time order,
    and the recurrent parts of its gates (one ``[B, G]`` per step, in the graph; none for an
    LSTM, whose recurrent part has the input part's gradient) in the order the direction
    ran: ``to_time`` takes them, stacked ``[B, T, G]``, to time order (``None``: already
    in it; :func:`recurrent_gradient`)."""

    suffix: str
    input: Tensor
    gx: Tensor
    prev: Tensor
    gh: list[Tensor]
    to_time: Callable[[Tensor], Tensor] | None = None


def recurrent_gradient(part: Unrolled, grads: list[Tensor | None]) -> Tensor:
    """The gradients of ``part.gh`` (``None``: none reached it) stacked ``[B, T, G]`` in time order."""
    stacked = torch.stack([torch.zeros_like(gh) if g is None else g for gh, g in zip(part.gh, grads, strict=True)], 1)
    return stacked if part.to_time is None else part.to_time(stacked)


def _directions(x: Tensor, lengths: Tensor | None):
    """How a reverse direction sees a batch-first sequence ``x [B, T, …]``, and where each
    direction's final state is: time reversed and the last step, or with ``lengths`` (a
    packed batch's, ``x`` padded after them) each example's own steps reversed in place and
    its own last step. Returns ``reverse`` (its own inverse) and ``final``, which takes a
    direction's outputs ``[B, T, H]`` in the order it ran to its final states ``[B, H]``."""
    if lengths is None:
        return (lambda t: t.flip(1)), (lambda y: y[:, -1])
    T, rows = x.shape[1], torch.arange(x.shape[0], device=x.device)
    ends = lengths.to(x.device)[:, None]
    steps = torch.arange(T, device=x.device)[None]
    order = torch.where(steps < ends, ends - 1 - steps, steps)  # [B, T]; padding stays where it is

    def reverse(t: Tensor) -> Tensor:
        return t.gather(1, order.view(*order.shape, *[1] * (t.dim() - 2)).expand_as(t))

    return reverse, (lambda y: y[rows, ends[:, 0] - 1])


def unroll(kind: str, x: Tensor, hx, weights: list[Tensor], has_biases: bool, layers: int, bidirectional: bool,
           weight_grads: WeightGrads | None = None, lengths: Tensor | None = None):  # fmt: skip
    """torch's recurrence (``torch._VF.<kind>`` on a batch-first input ``x [B, T, in]``, initial
    state ``hx`` as torch takes it, ``weights`` flat in torch's order), one step at a time
    with the gate pre-activations kept. Returns the output ``[B, T, D·H]``, the final states
    as torch returns them (``(h_n, c_n)`` for an LSTM) and the :class:`Unrolled` parts.
    ``weight_grads``: see :func:`~gradnoise.engine.lstm_recurrence.lstm_layer`.

    ``lengths`` (``[B]``): a packed batch's, ``x`` padded after each example's end. Each
    example's outputs up to its end are as packing computes them (the steps after it do
    not reach them), its reverse direction starts at its end, and its final hidden states
    are those at its end. Its output there is not: packing's is zero, and a loss must
    not read it. An LSTM's ``c_n`` is then ``None`` (it is not at the end of an output)."""
    D, per = 2 if bidirectional else 1, 4 if has_biases else 2
    h0, c0 = (hx[0], hx[1]) if kind == "lstm" else (hx, None)
    reverse, final = _directions(x, lengths)
    layer_in, finals, parts = x, [], []
    for layer in range(layers):
        outs = []
        for d in range(D):
            k = layer * D + d
            w_ih, w_hh, *biases = weights[k * per : (k + 1) * per]
            b_ih, b_hh = biases or (None, None)
            gx = F.linear(layer_in, w_ih, b_ih)
            if not gx.requires_grad:  # nothing below needs a gradient: a leaf, for its hook
                gx.requires_grad_(True)
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            order = reverse if d else (lambda t: t)
            if kind == "lstm":  # one autograd node for the whole recurrence
                y, h_n, c_n = lstm_layer(order(gx), w_hh, b_hh, h0[k], c0[k], weight_grads)
                prev = torch.cat([h0[k][:, None], y[:, :-1]], 1)
                outs.append(order(y))
                finals.append((h_n, c_n) if lengths is None else (final(y), None))
                parts.append(Unrolled(suffix, layer_in.detach(), gx, order(prev).detach(), []))
                continue
            state, hs, prev, ghs = h0[k], [], [], []
            for step in order(gx).unbind(1):  # one stack in the backward pass, not a copy per step
                prev.append(state)
                ghs.append(F.linear(state, w_hh, b_hh))
                if not ghs[-1].requires_grad:  # a constant initial state
                    ghs[-1].requires_grad_(True)
                h, state = _cell(kind, step, ghs[-1], state)
                hs.append(h)
            y = torch.stack(hs, 1)
            outs.append(order(y))
            finals.append(final(y))
            parts.append(Unrolled(suffix, layer_in.detach(), gx, order(torch.stack(prev, 1)).detach(), ghs,
                                  reverse if d else None))  # fmt: skip
        layer_in = torch.cat(outs, 2) if D == 2 else outs[0]
    if kind == "lstm":
        cells = None if lengths is not None else torch.stack([s[1] for s in finals])
        return layer_in, (torch.stack([s[0] for s in finals]), cells), parts
    return layer_in, torch.stack(finals), parts


def layer_norms(part: Unrolled, dx: Tensor, dh: Tensor, biases: bool, elementwise: bool, scale: float) -> Norms:
    """The norms of one layer and direction's parameters (by full name) from the gradients
    of its gates' input and recurrent parts: each weight a Linear layer's on a sequence (an
    LSTM's two parts share one gradient, ``dh is dx``, whose products are formed once)."""
    out = {}
    if dh is dx and not elementwise:
        for kind, norms in zip(("ih", "hh"), shared_output_norms([part.input, part.prev], dx, biases, scale), strict=True):
            out.update({f"{k}_{kind}{part.suffix}": v for k, v in norms.items()})
        return out
    for kind, a, d in (("ih", part.input, dx), ("hh", part.prev, dh)):
        for k, v in dense_norms(a, d, biases, elementwise, scale).items():
            out[f"{k}_{kind}{part.suffix}"] = v
    return out


def layer_moments(part: Unrolled, dx: Tensor, dh: Tensor, biases: bool, elementwise: bool,
                  scale: float) -> tuple[Norms, dict[str, Tensor]]:  # fmt: skip
    """:func:`layer_norms` and the mean gradient of each parameter, so that the backward
    pass need not form the weights' gradients: from the per-example products
    (:func:`~gradnoise.rules.dense_moments`) where they pay, or with ``Σ_i g_i²``, which
    needs them; otherwise the norms from the Gram form the two weights share and each mean
    as its weight gradient, one product (never more work than the norms and the backward
    pass's weight gradients). An LSTM's two weights act on its gates as one Linear layer
    on the stacked ``[x_t, h_t-1]``, so the products pay as that layer's would
    (:func:`~gradnoise.rules.linear.products_pay`)."""
    norms, means = {}, {}
    T = dx.shape[1]
    if dh is dx and not elementwise and not products_pay(T, part.input.shape[-1] + part.prev.shape[-1], dx.shape[-1]):
        norms = layer_norms(part, dx, dh, biases, False, scale)
        for kind, a in (("ih", part.input), ("hh", part.prev)):
            for k, v in dense_mean(a, dx, biases).items():
                means[f"{k}_{kind}{part.suffix}"] = v
        return norms, means
    for kind, a, d in (("ih", part.input, dx), ("hh", part.prev, dh)):
        n, m = dense_moments(a, d, biases, elementwise, scale)
        for k in n:
            norms[f"{k}_{kind}{part.suffix}"], means[f"{k}_{kind}{part.suffix}"] = n[k], m[k]
    return norms, means


def _batch_first(module: nn.Module, x, output_grads: list[Tensor | None]) -> tuple[Tensor, Tensor | None, list]:
    """A call's input batch-first (detached), the lengths of a packed one (else ``None``), and
    its output gradients as a batch-first call's: the output's, then the final states'. A
    packed call's are unpacked (in the batch's own order, as its ``h0`` and ``h_n``); its
    flat outputs are the packed output's four fields, then the states."""
    if isinstance(x, PackedSequence):
        states = 2 if isinstance(module, nn.LSTM) else 1
        d_out = output_grads[0] if output_grads else None
        if d_out is not None:
            d_out, _ = pad_packed_sequence(x._replace(data=d_out), batch_first=True)
        padded, lengths = pad_packed_sequence(x._replace(data=x.data.detach()), batch_first=True)
        return padded, lengths, [d_out, *output_grads[-states:]]
    grads = list(output_grads)
    if not module.batch_first:
        x = x.transpose(0, 1)
        if grads and grads[0] is not None:
            grads[0] = grads[0].transpose(0, 1)
    return x.detach(), None, grads


def _unrolls(module: nn.Module, args: tuple, output_grads: list[Tensor | None]) -> bool:
    """Whether the unrolled recurrence runs this call as torch ran it: for a packed LSTM only
    where no gradient reaches ``c_n``, which is not at the end of an output (:func:`unroll`)."""
    if not isinstance(args[0], PackedSequence) or not isinstance(module, nn.LSTM):
        return True
    return not output_grads or output_grads[-1] is None  # the flat outputs end with c_n


def _unrolled(module: nn.Module, args: tuple, output_grads: list[Tensor | None], output: Tensor | None = None) -> list[tuple]:
    """The call unrolled with the shared weights (detached): per layer and direction, its
    :class:`Unrolled` part and the gradients ``δ`` and ``δ^h`` (``[B, T, G]``) of its gates'
    input and recurrent parts. Output gradients and ``output`` as in :func:`rnn_grads`; a
    packed sequence padded, each example to its own length (:func:`unroll`'s ``lengths``)."""
    if not _unrolls(module, args, output_grads):
        raise ValueError("a packed LSTM call whose c_n has a gradient is not unrolled: its cell states run one example at a time")
    x, lengths, grads = _batch_first(module, args[0], output_grads)
    B, L, D, H = x.shape[0], module.num_layers, 2 if module.bidirectional else 1, module.hidden_size
    h0 = args[1] if len(args) > 1 else None
    zeros = x.new_zeros(L * D, B, H)
    if isinstance(module, nn.LSTM):
        hx = (h0[0].detach(), h0[1].detach()) if h0 is not None else (zeros, zeros)
    else:
        hx = h0.detach() if h0 is not None else zeros
    weights = [w.detach() for w in module._flat_weights]
    if isinstance(module, nn.LSTM) and L == 1 and output is not None and lengths is None:
        known = output.detach() if module.batch_first else output.detach().transpose(0, 1)
        return _lstm_from_output(x, hx, weights, module.bias, D, known, grads)
    with torch.enable_grad():
        out, finals, parts = unroll(kind_of(module), x, hx, weights, module.bias, L, module.bidirectional, lengths=lengths)
        # a packed output's gradient is zero past each example's end, where the unrolled output is not packing's
        total = (out * grads[0]).sum() if grads and grads[0] is not None else out.sum() * 0
        for state, g in zip(finals if isinstance(finals, tuple) else (finals,), grads[1:], strict=False):
            if g is not None:
                total = total + (state * g).sum()
        wrt = [t for part in parts for t in (part.gx, *part.gh)]
        deltas = iter(torch.autograd.grad(total, wrt, allow_unused=True))
    found = []
    for part in parts:
        dx = next(deltas)
        dh = [next(deltas) for _ in part.gh]
        dx = torch.zeros_like(part.gx) if dx is None else dx
        if part.gh:
            dh = recurrent_gradient(part, dh)
        else:  # an LSTM's recurrent part enters its gates as the input part does
            dh = dx
        found.append((part, dx, dh))
    return found


def _lstm_from_output(x: Tensor, hx: tuple, weights: list[Tensor], biases: bool, D: int, output: Tensor,
                      output_grads: list[Tensor | None]) -> list[tuple]:  # fmt: skip
    """:func:`_unrolled` of a one-layer LSTM whose output torch's kernel computed
    (batch-first, as its output's gradient): its gates from that output at once and their gradients by
    back-propagation through time, without an autograd graph
    (:func:`~gradnoise.engine.lstm_recurrence.lstm_gate_gradients`)."""
    H, per = output.shape[-1] // D, 4 if biases else 2
    d_out = output_grads[0] if output_grads else None
    d_states = [*output_grads[1:3], None, None]
    found = []
    for d in range(D):
        w_ih, w_hh, *b = weights[d * per : (d + 1) * per]
        b_ih, b_hh = b or (None, None)
        part = slice(d * H, (d + 1) * H)
        flip = (lambda t: t.flip(1)) if d else (lambda t: t)  # noqa: E731
        d_hn, d_cn = (None if g is None else g[d] for g in d_states[:2])
        d_gates, prev = lstm_gate_gradients(flip(x), w_ih, b_ih, w_hh, b_hh, hx[0][d], hx[1][d], flip(output[..., part]),
                                            None if d_out is None else flip(d_out[..., part]), d_hn, d_cn)  # fmt: skip
        d_gates = flip(d_gates)
        suffix = "_l0" + ("_reverse" if d else "")
        found.append((Unrolled(suffix, x, d_gates, flip(prev), []), d_gates, d_gates))
    return found


def rnn_grads(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int,
              output: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
    """Per-example gradients ``[B, *shape]`` of every parameter of ``module`` for the call
    ``module(*args)``, given the gradients of its outputs (``output``, then ``h_n`` and for an
    LSTM ``c_n``; ``None`` where none arrived), each of example ``i``'s own loss. ``output``:
    the call's output, if kept (a one-layer LSTM's gates are then computed from it at once).
    A packed LSTM call that the unrolled recurrence does not run takes the loop."""
    if not _unrolls(module, args, output_grads):
        return rnn_grads_looped(module, args, output_grads, batch)
    grads = {}
    for part, dx, dh in _unrolled(module, args, output_grads, output):
        sfx = part.suffix
        grads[f"weight_ih{sfx}"] = torch.einsum("btg,bti->bgi", dx, part.input)
        grads[f"weight_hh{sfx}"] = torch.einsum("btg,bth->bgh", dh, part.prev)
        grads[f"bias_ih{sfx}"], grads[f"bias_hh{sfx}"] = dx.sum(1), dh.sum(1)
    return {n: grads[n] for n, _ in module.named_parameters()}


def rnn_norms(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int, elementwise: bool,
              scale: float = 1.0, sums: bool = True, output: Tensor | None = None) -> tuple[Norms, dict[str, Tensor]]:  # fmt: skip
    """The layer-rule form of :func:`rnn_grads` without materialising ``B × P`` numbers: per
    parameter ``|g_i|²`` and (with ``elementwise``) ``Σ_i g_i²`` of ``scale · output_grads``
    (:func:`layer_norms`), and (with ``sums``, else empty) the summed gradient ``Σ_i g_i`` of
    ``output_grads``; ``output`` as in :func:`rnn_grads`."""
    norms, summed = {}, {}
    for part, dx, dh in _unrolled(module, args, output_grads, output):
        norms.update(layer_norms(part, dx, dh, module.bias, elementwise, scale))
        for kind, inp, d in (("ih", part.input, dx), ("hh", part.prev, dh)) if sums else ():
            summed[f"weight_{kind}{part.suffix}"] = d.flatten(0, 1).T @ inp.flatten(0, 1)
            if module.bias:
                summed[f"bias_{kind}{part.suffix}"] = d.sum((0, 1))
    return norms, summed


def _examples(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int):
    """Each example's own call of ``module`` (its sequence alone, as a batch of one, and its
    initial state) and the gradients of that call's outputs, from a batched call's arguments
    and output gradients. A packed sequence is unpacked: each example runs for its own
    length, as packing runs it (its output gradient is the packed output's, unpacked)."""
    x, h0 = args[0], args[1] if len(args) > 1 else None
    states = 2 if isinstance(module, nn.LSTM) else 1
    d_out = output_grads[0] if output_grads else None
    # the flat outputs: (output, h_n[, c_n]), or a packed output's four fields, then the states
    d_states = list(output_grads[-states:] if isinstance(x, PackedSequence) else [*output_grads[1:], None, None][:states])
    if isinstance(x, PackedSequence):
        if d_out is not None:
            d_out, _ = pad_packed_sequence(x._replace(data=d_out), batch_first=True)
        x, lengths = pad_packed_sequence(x, batch_first=True)
        lengths = lengths.tolist()
        step = lambda t, i: t[i : i + 1, : lengths[i]] if module.batch_first else t[i, : lengths[i]].unsqueeze(1)  # noqa: E731
    else:
        dim = 0 if module.batch_first else 1
        step = lambda t, i: t.narrow(dim, i, 1)  # noqa: E731
    one = lambda h, i: None if h is None else h.detach().narrow(1, i, 1)  # noqa: E731
    x = x.detach()
    for i in range(batch):
        state = None if h0 is None else tuple(one(h, i) for h in h0) if isinstance(h0, tuple) else one(h0, i)
        call = (step(x, i),) if state is None else (step(x, i), state)
        yield call, [None if d_out is None else step(d_out, i), *(one(g, i) for g in d_states)]


def rnn_grads_looped(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int) -> dict[str, Tensor]:
    """:func:`rnn_grads` by a loop over examples through torch's fused kernel (one sequence
    at a time): fewer, larger operations than the unrolled recurrence when sequences are
    long and the batch is small, and the path for packed sequences (:func:`_examples`)."""
    params = dict(module.named_parameters())
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    with torch.enable_grad():
        for call, grads in _examples(module, args, output_grads, batch):
            out, h_n = torch.func.functional_call(module, leaves, call)
            total = (out * grads[0]).sum() if grads[0] is not None else out.sum() * 0
            for h, g in zip(h_n if isinstance(h_n, tuple) else (h_n,), grads[1:], strict=True):
                if g is not None:
                    total = total + (h * g).sum()
            for (n, leaf), g in zip(leaves.items(), torch.autograd.grad(total, list(leaves.values()), allow_unused=True),
                                    strict=True):  # fmt: skip
                rows[n].append(torch.zeros_like(leaf) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


_FASTER: dict[tuple, str] = {}  # by configuration and shapes: the faster of the two, measured


def norms_of_grads(grads: dict[str, Tensor], elementwise: bool, scale: float) -> tuple[Norms, dict[str, Tensor]]:
    """Per-example gradients ``[B, *shape]`` by name → the norms of ``scale · g_i`` and ``Σ_i g_i``."""
    return grads_norms(grads, elementwise, scale), {n: g.sum(0) for n, g in grads.items()}


def per_example_rnn_norms(module: nn.Module, args: tuple, output_grads: list[Tensor | None], batch: int,
                          elementwise: bool, scale: float = 1.0, sums: bool = True,
                          output: Tensor | None = None) -> tuple[str, Norms, dict[str, Tensor]]:  # fmt: skip
    """:func:`rnn_norms`, or the same from :func:`rnn_grads_looped` (torch's fused kernel, one
    example at a time), whichever measured faster the first time this configuration and
    shape were seen (long sequences of few examples favour the loop). Returns the path taken
    (``"rnn-unrolled"`` or ``"rnn-looped"``), the norms and the summed gradients (``sums``,
    ``output``: see :func:`rnn_norms`). A packed batch is unrolled padded, each example to
    its own length; a packed LSTM whose ``c_n`` has a gradient takes the loop."""
    looped = lambda: norms_of_grads(rnn_grads_looped(module, args, output_grads, batch), elementwise, scale)  # noqa: E731
    if not _unrolls(module, args, output_grads):
        return "rnn-looped", *looped()
    x = args[0]
    packed = isinstance(x, PackedSequence)
    T = len(x.batch_sizes) if packed else x.shape[1 if module.batch_first and x.dim() == 3 else 0]
    # by the batch and the sequence length to the next power of two: batches padded to their own
    # longest sequence (packed ones always are) would otherwise each time both paths, the slow one too
    key = (type(module), module.num_layers, module.hidden_size, module.input_size, module.bidirectional,
           module.batch_first, batch, 1 << (T - 1).bit_length(), packed, len(args), x.data.device.type, elementwise)  # fmt: skip
    unrolled = lambda: rnn_norms(module, args, output_grads, batch, elementwise, scale, sums, output)  # noqa: E731
    candidates = {"rnn-unrolled": unrolled, "rnn-looped": looped}
    if key in _FASTER:
        return _FASTER[key], *candidates[_FASTER[key]]()
    timed = []
    sync = torch.cuda.synchronize if x.data.is_cuda else lambda: None  # CUDA runs asynchronously
    for path, fn in candidates.items():
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        timed.append((time.perf_counter() - start, path, out))
    _, path, out = min(timed, key=lambda t: t[0])
    if len(_FASTER) >= 64:
        _FASTER.clear()
    _FASTER[key] = path
    return path, *out
