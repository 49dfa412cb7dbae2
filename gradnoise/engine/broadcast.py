"""Layers applied without a batch dimension: exact per-example gradients through the
broadcast.

nanoGPT adds ``wpe(torch.arange(T))``, a ``[T, d]`` tensor, to the ``[B, T, d]`` token
embeddings. Broadcasting gives every example the same rows, and the backward pass sums
their gradients over the batch before the layer sees them, so the layer's rule cannot take
per-example gradients from its output gradient. Example ``i``'s gradient of the layer's
parameters is the layer's gradient for example ``i``'s share of the output gradient alone:
what the layer would receive had its output been ``expand``\\ ed to ``[B, T, d]`` before the
broadcast, which gives every example the same values as broadcasting does. The engine does
exactly that (``Recorder.expand``): the layer's output, and the input its rule reads, are
expanded over a new leading batch dimension (or along a leading dimension of size 1, as in
GPT-2's ``wpe(position_ids)`` with ``position_ids`` of shape ``[1, T]``), and the layer
takes its rule's path.

Whether the layer's output is used only through broadcasting against the batch cannot be
read from the code, so it is checked once per model and input signature
(:func:`trace_signature`): a forward pass with the expansion must give outputs bitwise equal
to, and shaped like, a forward pass without it. An operation that reduces, indexes or
reshapes the output along its leading dimension, or dropout drawn on it, changes the
outputs' values or shapes, and the layer keeps the ``vmap`` path. Several such layers are
tried together first, then one at a time, so that one that fails does not cost the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from gradnoise._coupling import differ_elsewhere, differs, mixes_examples, other_example
from gradnoise._functional import rng_rewinder
from gradnoise.engine.batch_trace import BatchTrace
from gradnoise.engine.hooks import ModuleCall, Recorder, batch_dim
from gradnoise.engine.param_uses import ParamUses
from gradnoise.engine.plan import Plan, on_batch, traced_calls
from gradnoise.rules import rule_for

__all__ = ["candidates", "same_outputs", "trace_signature"]


def candidates(plan: Plan, modules: dict[str, nn.Module], calls: dict[str, list[ModuleCall]]) -> frozenset[str]:
    """Layers with a rule (one input, batch-first) that own trainable parameters and whose
    every call ran wholly off the batch with one tensor output: those the expansion may
    give their rule's path."""
    owning = {m for os in plan.owners.values() for m, _ in os}
    found = set()
    for name in owning:
        rule, cs = rule_for(modules[name]), calls.get(name)
        if rule is None or rule.whole_call or batch_dim(modules[name]) != 0 or not cs:
            continue
        if all(_wholly_off_batch(c) for c in cs):
            found.add(name)
    return frozenset(found)


def _wholly_off_batch(call: ModuleCall) -> bool:
    tensors = sum(isinstance(t, Tensor) for t in (*call.args, *call.kwargs.values()))
    return (
        call.unbatched is not None and len(call.unbatched) == tensors and len(call.shapes) == 1
        and call.shapes[0] is not None and bool(call.args) and isinstance(call.args[0], Tensor)
    )  # fmt: skip


def same_outputs(a: Any, b: Any) -> bool:
    """Whether two model outputs hold bitwise-equal tensors of the same shapes."""
    ta = [t for t in tree_flatten(a)[0] if isinstance(t, Tensor)]
    tb = [t for t in tree_flatten(b)[0] if isinstance(t, Tensor)]
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True))


def trace_signature(plan: Plan, signature: tuple, recorded: dict[str, nn.Module], xs: Any, batch: int,
                    forward: Callable[[Any], Any]) -> None:  # fmt: skip
    """Trace which calls of a forward pass (``forward(xs)``) run on the batch
    (:class:`~gradnoise.engine.batch_trace.BatchTrace`, without gradients), try expanding the
    layers applied off the batch (:func:`candidates`), and record on the plan, for this
    input signature, the calls' flags, the layers whose expansion left the outputs
    unchanged (``plan.broadcast``), the layers whose inputs mix examples
    (``plan.coupled``, :func:`coupled_layers`), whether the outputs do (``plan.mixed``) and
    the parameters used outside their layers' calls (``plan.outside``,
    :class:`~gradnoise.engine.param_uses.ParamUses`). Torch's RNG is the same before each forward
    pass and after the last, so that dropout draws the same masks as the caller's."""
    rewind = rng_rewinder()

    def traced(expand: frozenset[str], inputs: Any = xs, uses: ParamUses | None = None) -> tuple[Any, Recorder]:
        rewind()
        recorder = Recorder(recorded, batch, False, {})
        recorder.expand, recorder.trace = expand, BatchTrace(inputs)
        with torch.no_grad(), recorder.installed(), recorder.trace, uses.watching() if uses else contextlib.nullcontext():
            out = forward(inputs)
        return out, recorder

    uses = ParamUses(plan.modules()[""], plan.owners)
    plain, recorder = traced(frozenset(), uses=uses)
    found = candidates(plan, plan.modules(), recorder.calls)
    # all at once (the common case: one forward pass), else one at a time on top of those kept
    tries = [found] if len(found) < 2 else [found, *({m} for m in sorted(found))]
    expand: frozenset[str] = frozenset()
    for extra in tries:
        if extra <= expand:
            continue
        try:
            widened, trial = traced(expand | extra)
        except Exception:  # the expanded output broke the forward pass: not a broadcast
            continue
        if same_outputs(plain, widened):
            expand, recorder = expand | extra, trial
    coupled: frozenset[str] = frozenset()
    mixed = False
    # BatchNorm in train mode couples examples by design, and the engines refuse it with their
    # own message; a trace in that mode would be kept for the same inputs in eval mode
    changed = None if any(plan.modules()[n].training for n in plan.batchnorms) else other_example(xs, batch)
    if changed is not None:
        try:
            out, moved = traced(expand, changed)
            coupled = coupled_layers(recorder.calls, moved.calls, plan.modules(), batch)
            mixed = mixes_examples(plain, out, batch)
            if coupled or mixed:  # or a forward pass that does not repeat (a generator of its own)?
                again, repeated = traced(expand)
                if differ_elsewhere(plain, again, batch) or coupled_layers(recorder.calls, repeated.calls,
                                                                            plan.modules(), batch):  # fmt: skip
                    coupled, mixed = frozenset(), False
        except Exception:  # the forward pass cannot take the changed example: not checked
            pass
    rewind()
    traced_calls(plan, signature, recorder.calls, True)
    plan.broadcast[signature] = expand
    plan.coupled[signature] = coupled
    plan.mixed[signature] = mixed
    plan.outside[signature] = frozenset(uses.outside)


def coupled_layers(calls: dict[str, list[ModuleCall]], moved: dict[str, list[ModuleCall]], modules: dict[str, nn.Module],
                   batch: int) -> frozenset[str]:  # fmt: skip
    """The layers (with a rule, RNNs, or containers measured as a unit) whose input, on the
    batch, changed in a row other than the first when only example 0 of the model's inputs
    changed (``moved``: the calls of that forward pass): their rows are not each one
    example's (the batch permuted, or examples mixed), so neither a rule nor a unit's
    ``vmap`` applies to them (:func:`~gradnoise._coupling.differs`)."""
    found = set()
    for name, cs in calls.items():
        # a container (a unit for vmap) is split along the dimension vmap takes (module_vmap),
        # where its input was traced to the batch; the model itself is never such a unit
        container = rule_for(modules[name]) is None and not isinstance(modules[name], nn.RNNBase)
        if container and not name:
            continue
        bd = batch_dim(modules[name])
        for c, m in zip(cs, moved.get(name, ()), strict=False):
            if container and not on_batch(c):
                continue
            a, b = (c.args[0] if c.args else None), (m.args[0] if m.args else None)
            if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dim() > bd
                    and a.shape[bd] == batch):  # fmt: skip
                continue
            if differs(a.movedim(bd, 0)[1:], b.movedim(bd, 0)[1:]):
                found.add(name)
    return frozenset(found)
