"""Persistent hooks that apply the layer rules inside the user's own backward pass (the
training monitor's ``"hooks"`` mode): per-example squared norms of every supported layer,
per micro-batch, without an extra forward or backward."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten

from gradnoise._functional import input_signature, is_measuring, preserved_state, rng_rewinder
from gradnoise.engine.attention_capture import AttentionCapture
from gradnoise.engine.broadcast import same_outputs, trace_signature
from gradnoise.engine.hooks import (
    LOW_PRECISION,
    ModuleHooks,
    batch_dim,
    flatten,
    in_float32,
    rule_input,
    widen,
)
from gradnoise.engine.plan import plan_for
from gradnoise.engine.rnn import norms_of_grads, per_example_rnn_norms, rnn_grads
from gradnoise.rules import dense_norms, rule_for, weighted_norms
from gradnoise.rules.tied import TiedParts, tied_pair

__all__ = ["DEFER_ELEMENTS", "StepHooks"]

DEFER_ELEMENTS = 1 << 18  # a layer's input + output gradient up to this size: rule applied after backward


def _owns_children(module: nn.Module) -> bool:
    rule = rule_for(module)
    return rule is not None and rule.owns_children


class _Projection(NamedTuple):
    """An attention projection's input (``[B, T, ·]``) and how its output gradient becomes
    ``[B, T, ·]`` (:mod:`gradnoise.engine.attention_capture`)."""

    prefix: str
    a: Tensor
    to_batch: Callable[[Tensor], Tensor]


class _RNNCall(NamedTuple):
    """An RNN call (:mod:`gradnoise.engine.rnn`): its arguments (detached) and the gradients
    of its outputs (``output``, ``h_n`` and for an LSTM ``c_n``; ``None`` where none came)."""

    args: tuple
    grads: list[Tensor | None]
    output: Tensor  # as torch's kernel computed it
    versions: list[int]  # of the input and the output, when kept


def _rnn_supported(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """A call the RNN recurrence recomputes as torch ran it: a batched tensor input or a
    packed sequence, and no dropout between layers in training (whose masks the
    recomputation would not draw)."""
    batched = bool(args) and (isinstance(args[0], PackedSequence) or isinstance(args[0], Tensor) and args[0].dim() == 3)
    return not kwargs and batched and not (module.training and module.dropout > 0 and module.num_layers > 1)


def _kept(t, how: Callable[[Tensor], Tensor]):
    """An RNN call's argument with ``how`` applied to its tensors: a packed sequence's data,
    an LSTM's two states, or the tensor itself (``None`` stays)."""
    if isinstance(t, PackedSequence):
        return t._replace(data=how(t.data))
    if isinstance(t, tuple):
        return tuple(map(how, t))
    return None if t is None else how(t)  # hx=None: zero initial states


def _data(t) -> Tensor:
    """The tensor of an RNN call's input: a packed sequence's data, or the input itself."""
    return t.data if isinstance(t, PackedSequence) else t


class StepHooks(ModuleHooks):
    """Per-example norms of the supported layers in the user's backward passes.

    A layer's rule needs its input and its output gradient. For small layers both are kept
    and the rules run together after the backward pass (:meth:`flush`): each kind of
    operation run between the backward pass's matrix products costs several times more
    than the same operation run right after it (cold caches), and small layers' tensors
    cost little to keep. Layers larger than :data:`DEFER_ELEMENTS` are done during the
    backward pass, so that their output gradients are not kept: a kept output gradient
    lives through the rest of the backward pass and raises its peak.

    Which layers run on the batch is traced from the model's inputs before the first measured
    forward pass of each input signature, as the engine does
    (:func:`~gradnoise.engine.broadcast.trace_signature`: one or two extra forward passes
    without gradients, with torch's RNG rewound). A layer applied off the batch whose output
    only broadcasts against it (``wpe(arange(T))``) has its output expanded over the batch in
    the measured forward passes — the same values, so the same training — and is measured
    like the others; any other layer off the batch is named in :attr:`off_batch`.

    ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` run torch's fused kernel in the user's forward,
    whose gates no hook sees: their calls' inputs and output gradients are kept, and after
    the backward pass the recurrence is run again from them (one forward and backward of
    that layer alone, :func:`~gradnoise.engine.rnn.per_example_rnn_norms`; a packed
    sequence padded, each example to its own length). A call that cannot be run again as
    torch ran it (dropout between layers in training, an input modified in place since, an
    output modified in place, whose gradient then reaches no hook) is named in
    :attr:`unsupported`.

    A weight tied between an ``nn.Embedding`` and an ``nn.Linear`` head (``pairs``) gets the
    two layers' norms and their cross term (:mod:`gradnoise.rules.tied`); without
    ``elementwise`` or a metric only.

    Args:
        root: the model whose forward passes' inputs are the batch.
        modules: the layers to hook (each with a rule).
        armed: whether the current step is measured (checked in each forward pass).
        elementwise: also ``Σ_i g_i²`` per parameter.
        loss_scale: the factor the loop multiplies its loss by before ``backward()``.
        strict: re-raise an exception from a rule inside the backward pass (else kept in
            :attr:`failed` and raised by :meth:`flush`'s caller).
        metric: a diagonal preconditioner ``P`` of this step by parameter name, or ``None``
            when there is none yet (read once per measured step): the hooks then also keep
            ``|g_i|²_P`` (:attr:`sq_p`), one product the size of the weight gradient per
            layer — unless ``elementwise``, whose ``Σ_i g_i²`` gives ``Σ_i |g_i|²_P =
            ⟨P, Σ_i g_i²⟩`` for one pass over the parameters.
    """

    def __init__(self, root: nn.Module, modules: dict[str, nn.Module], *, armed: Callable[[], bool],
                 elementwise: bool, loss_scale: float, strict: bool,
                 metric: Callable[[], dict[str, Tensor] | None] | None = None) -> None:  # fmt: skip
        super().__init__(modules)
        self.metric = metric
        canonical = {id(p): n for n, p in root.named_parameters()}  # a tied weight: its first name
        self.locals = {  # parameters of each hooked layer (and of children its rule owns): local → full name
            name: {local: canonical.get(id(p), f"{name}.{local}")
                   for local, p in m.named_parameters(recurse=_owns_children(m), remove_duplicate=False)}
            for name, m in modules.items()
        }  # fmt: skip
        self.root = root
        self.plan = plan_for(root)
        self.pairs = {} if elementwise or metric is not None else {
            key: pair for key, os in self.plan.owners.items()
            if (pair := tied_pair(os, self.plan.modules())) and all(m in modules for m in pair)
        }  # fmt: skip
        self._tied_keys = {m: key for key, pair in self.pairs.items() for m in pair}
        # attention calls run by AttentionCapture in measured forward passes, where a checked
        # forward pass shows the same outputs (per input signature): no recomputation
        self._attention = metric is None and any(isinstance(m, nn.MultiheadAttention) for m in modules.values())
        self._capture: AttentionCapture | None = None
        self._capture_ok: dict[tuple, bool] = {}
        self._tracing = False
        self._expand: frozenset[str] = frozenset()
        self._batch = 0
        self.armed, self.elementwise, self.loss_scale, self.strict = armed, elementwise, loss_scale, strict
        self.rules = {name: rule_for(m) for name, m in modules.items()}  # fixed per module (None: an RNN)
        self.batch_dims = {name: batch_dim(m) for name, m in modules.items()}
        self.reset()

    def reset(self) -> None:
        """Forget what the hooks saw (after each step)."""
        self.sq: dict[str, list[Tensor]] = {}  # parameter → per-micro-batch |g_i|²
        self.sum_sq: dict[str, Tensor] = {}  # parameter → Σ_i g_i² over micro-batches
        self.calls: dict[str, int] = {}
        self.failed: str | None = None
        self.pending: list[tuple] = []  # (name, module, input, output gradient, tied parts), for flush()
        self.off_batch: set[str] = set()  # layers of this step's forward passes not on the batch
        self.mixed = False  # whether a forward pass of this step mixes examples (gradnoise._coupling)
        self.outside: set[str] = set()  # parameters used outside their layers' calls (engine.param_uses)
        self.unsupported: set[str] = set()  # RNN calls that cannot be run again as torch ran them
        self.rnn_calls: list[tuple[str, _RNNCall]] = []  # this step's, to find those no gradient reached
        # parameter → the 16-bit dtype of its layer's output gradient (autocast): its .grad
        # carries that rounding (layers autocast runs in float32, LayerNorm, do not)
        self.low_precision: dict[str, torch.dtype] = {}
        self.sq_p: dict[str, list[Tensor]] = {}  # parameter → per-micro-batch |g_i|²_P
        self._weights: dict[str, Tensor] | None | bool = False  # this step's P (False: not read yet)
        self._tied: dict[str, tuple[TiedParts, list[Tensor]]] = {}  # tied weight → this forward pass's parts

    def install(self) -> None:
        super().install()
        begin = lambda m, args, kwargs: self._begin(args, kwargs)  # noqa: E731
        end = lambda m, args, kwargs, out: self._end()  # noqa: E731
        begin._gradnoise_observer = end._gradnoise_observer = True  # they read only
        self._handles.append(self.root.register_forward_pre_hook(begin, with_kwargs=True))
        self._handles.append(self.root.register_forward_hook(end, with_kwargs=True, always_call=True))

    def remove(self) -> None:
        self._end()
        super().remove()

    def _end(self) -> None:
        if self._capture is not None:
            capture, self._capture = self._capture, None
            capture.__exit__(None, None, None)

    def _capture_checked(self, signature: tuple, args: tuple, kwargs: dict) -> bool:
        """Whether a forward pass with :class:`AttentionCapture` gives bitwise the outputs of
        one without (checked once per input signature, without gradients, RNG rewound)."""
        if signature not in self._capture_ok:
            rewind = rng_rewinder()  # CPU and CUDA: the user's forward pass draws next
            self._tracing = True
            try:
                with torch.no_grad():
                    plain = self.root(*args, **kwargs)
                    rewind()
                    with AttentionCapture():
                        captured = self.root(*args, **kwargs)
            finally:
                self._tracing = False
                rewind()
            self._capture_ok[signature] = same_outputs(plain, captured)
        return self._capture_ok[signature]

    def _begin(self, args: tuple, kwargs: dict) -> None:
        """Before a measured forward pass: which layers run on the batch, and which are
        expanded over it (traced once per input signature)."""
        if not self.armed() or not torch.is_grad_enabled() or is_measuring() or self._tracing:
            return
        signature = input_signature((args, kwargs))
        leaves = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor) and t.dim()]
        self._batch = leaves[0].shape[0] if leaves else 0
        plan = self.plan
        if signature not in plan.unbatched:
            recorded = {m: mod for m, mod in plan.modules().items() if m in plan.recorded}
            self._tracing = True
            try:
                trace_signature(plan, signature, recorded, (args, kwargs), self._batch,
                                lambda inputs: self.root(*inputs[0], **inputs[1]))  # fmt: skip
            finally:
                self._tracing = False
        flags, self._expand = plan.unbatched[signature], plan.broadcast[signature]
        self._tied = {key: (TiedParts(self.modules[emb].padding_idx), []) for key, (emb, _) in self.pairs.items()}
        self.off_batch |= {
            m for m in self.modules if m not in self._expand and any(f is None or 0 in f for f in flags.get(m, ()))
        } | (plan.coupled.get(signature, frozenset()) & set(self.modules))  # fmt: skip
        self.outside |= plan.outside.get(signature, frozenset())
        if plan.mixed.get(signature):  # nothing to measure: the step is refused (step_stats)
            self.mixed = True
            self.off_batch |= set(self.modules)
        if self._attention and self._capture is None and self._capture_checked(signature, args, kwargs):
            self._capture = AttentionCapture()
            self._capture.__enter__()

    def _forward_hook(self, name: str):
        whole_call = self.rules[name] is not None and self.rules[name].whole_call

        def hook(module, args, kwargs, output):
            if not self.armed() or not torch.is_grad_enabled() or is_measuring():
                return  # only the user's own forward passes of measured steps count
            if name in self.off_batch:
                return None
            if self.rules[name] is None:
                self._rnn_call(name, module, args, kwargs, output)
                return None
            expanded = name in self._expand
            if expanded:  # the same values for every example: what broadcasting gives each
                args, output = (widen(args[0], output, self._batch, args[0]), *args[1:]), widen(args[0], output, self._batch)
            if self._capture is not None and isinstance(module, nn.MultiheadAttention) and self._captured(name, module):
                return None  # measured at its projections
            tied = self._tied.get(self._tied_keys.get(name))  # kept with the call: micro-batches may interleave
            if tied is not None and isinstance(module, nn.Embedding):
                tied[0].set_ids(args[0].detach())
            out = output[0] if isinstance(output, tuple) and output else output  # attention: (y, weights)
            if isinstance(out, Tensor) and out.requires_grad and args and isinstance(args[0], Tensor):
                out.register_hook(self._backward_hook(name, module, rule_input(whole_call, args, kwargs), tied))
            return output if expanded else None

        hook._gradnoise_observer = True  # reads only: the closed-form Hessian path may ignore it
        return hook

    def _rnn_call(self, name: str, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Keeps an RNN call's inputs and, as they arrive, its outputs' gradients (complete
        once the backward pass is over, when :meth:`flush` reads them)."""
        if not _rnn_supported(module, args, kwargs):
            self.unsupported.add(name)
            return
        outs = flatten(output)
        kept = tuple(_kept(t, Tensor.detach) for t in args)
        call = _RNNCall(kept, [None] * len(outs), outs[0].detach(), [_data(kept[0])._version, outs[0]._version])
        self.rnn_calls.append((name, call))

        def on_grad(j: int, g: Tensor) -> None:
            if not any(t is not None for t in call.grads):  # the call's first gradient: counted once
                self.calls[name] = self.calls.get(name, 0) + 1
                self.pending.append((name, module, call, None, None))
            call.grads[j] = g.detach()

        for j, t in enumerate(outs):
            if isinstance(t, Tensor) and t.requires_grad:
                t.register_hook(functools.partial(on_grad, j))

    def _captured(self, name: str, module: nn.MultiheadAttention) -> bool:
        """Hooks on this attention call's projections, if the capture ran it."""
        calls = self._capture.calls
        if not calls or calls[-1][0] != id(module.in_proj_weight):
            return False
        for prefix, a, y, to_batch in calls.pop()[1]:
            if y.requires_grad:
                y.register_hook(self._backward_hook(name, module, _Projection(prefix, a, to_batch), None))
        return True

    def _backward_hook(self, name: str, module: nn.Module, a, tied: tuple | None):
        # The graph keeps its hooks until the loss is freed, after the backward pass: a hook
        # that held its layer's input would keep every activation alive to the end of it
        # (the step's peak memory). It lets go of the input when it runs.
        held = [a]

        def hook(g: Tensor) -> None:
            if not held:  # a second backward through a retained graph: its input is gone
                self.failed = f"{name}: a second backward pass through the same graph is not measured"
                return
            a = held.pop()
            # Counted when the gradient arrives: a forward without backward (evaluation) is
            # ignored; an attention call once (at its output projection, which comes first).
            if not isinstance(a, _Projection) or a.prefix == "out_proj.":
                self.calls[name] = self.calls.get(name, 0) + 1
            first = a.a if isinstance(a, _Projection) else a[0][0] if isinstance(a, tuple) else a
            if first.numel() + g.numel() <= DEFER_ELEMENTS:
                self.pending.append((name, module, a, g.detach(), tied))
                return
            try:
                self._apply(name, module, a, g.detach(), tied)
            except Exception as exc:  # never break the user's backward pass
                if self.strict:
                    raise
                self.failed = f"{type(exc).__name__}: {exc}"

        return hook

    def flush(self) -> None:
        """Apply the rules of the layers kept for after the backward pass (in the order their
        gradients arrived)."""
        if self.calls:  # a backward pass ran: an RNN call none of whose outputs' hooks ran had its
            # output modified in place as a view (the hooks then never run): not measurable here
            self.unsupported.update(n for n, c in self.rnn_calls if all(g is None for g in c.grads))
        self.rnn_calls = []
        pending, self.pending = self.pending[::-1], []
        while pending:  # each layer's input and output gradient freed once its rule has run
            self._apply(*pending.pop())

    def _apply(self, name: str, module: nn.Module, a, g: Tensor | None, tied: tuple | None = None) -> None:
        if isinstance(a, _RNNCall):
            self._apply_rnn(name, module, a)
            return
        low = g.dtype if g.dtype in LOW_PRECISION else None
        if isinstance(a, _Projection):  # an attention projection: a Linear layer on [B, T, ·]
            prefix, bias = a.prefix, (module.in_proj_bias if a.prefix == "in_proj_" else module.out_proj.bias) is not None
            a, g = in_float32(a.a, a.to_batch(g))
            scale = a.shape[0] / self.loss_scale
            norms = {prefix + k: v for k, v in dense_norms(a, g, bias, self.elementwise, scale).items()}
        else:
            a, g = in_float32(a, g)
            first = a[0][0] if isinstance(a, tuple) else a
            scale = first.shape[self.batch_dims[name]] / self.loss_scale  # δ_i = B/scale · ∂L_user/∂out_i
            norms = self.rules[name].norms(module, a, g, self.elementwise, scale)
        full = self.locals[name]
        for local, (sq, s2) in norms.items():
            key = full[local]
            if key in self.pairs:
                sq = self._tied_norms(tied, module, a, g, sq, scale)
                if sq is None:  # the other layer of the pair is still to come
                    continue
            self._record(key, sq, s2, low)
        weights = None if self.elementwise else self.step_weights()  # else from Σ_i g_i² (no product)
        if weights is not None:
            local_w = {local: weights.get(key) for local, key in full.items()}
            local_w = {k: w if w is not None else torch.ones_like(module.get_parameter(k)) for k, w in local_w.items()}
            for local, (sq, _) in weighted_norms(self.rules[name], module, a, g, local_w, False, scale).items():
                self.sq_p.setdefault(full[local], []).append(sq)

    def _apply_rnn(self, name: str, module: nn.Module, call: _RNNCall) -> None:
        """An RNN call's norms, from its recurrence run again (16-bit tensors in float32) on the kept inputs
        with the kept output gradients; in the metric ``P`` from its per-example gradients."""
        if _data(call.args[0])._version != call.versions[0]:  # the input modified in place since the call
            self.unsupported.add(name)
            return
        output = call.output if call.output._version == call.versions[1] else None  # else not as torch computed it
        low = next((g.dtype for g in call.grads if g is not None and g.dtype in LOW_PRECISION), None)
        f32 = lambda t: t.float() if t is not None and t.dtype in LOW_PRECISION else t  # noqa: E731
        args = tuple(_kept(t, f32) for t in call.args)
        grads = [f32(g) for g in call.grads]
        x = args[0]
        B = int(x.batch_sizes[0]) if isinstance(x, PackedSequence) else x.shape[self.batch_dims[name]]
        scale = B / self.loss_scale
        weights = None if self.elementwise else self.step_weights()
        with preserved_state(module, [module]):  # its forward may run again: not a call of the user's
            if weights is None:
                _, norms, _ = per_example_rnn_norms(module, args, grads, B, self.elementwise, scale, sums=False,
                                                    output=f32(output))  # fmt: skip
            else:  # the metric needs the per-example gradients: the norms come from them too
                per_example = rnn_grads(module, args, grads, B, f32(output))
                norms, _ = norms_of_grads(per_example, False, scale)
        full = self.locals[name]
        for local, (sq, s2) in norms.items():
            self._record(full[local], sq, s2, low)
        if weights is not None:
            for local, g in per_example.items():
                w = weights.get(full[local])
                g2 = g.square().mul_(scale * scale).flatten(1)
                self.sq_p.setdefault(full[local], []).append(g2.sum(1) if w is None else g2 @ w.flatten())

    def _record(self, key: str, sq: Tensor, s2: Tensor | None, low: torch.dtype | None) -> None:
        """One parameter's ``|g_i|²`` (and ``Σ_i g_i²``) of this micro-batch."""
        if low is not None:
            self.low_precision[key] = low
        self.sq.setdefault(key, []).append(sq)
        if s2 is not None:
            self.sum_sq[key] = self.sum_sq[key] + s2 if key in self.sum_sq else s2

    def _tied_norms(self, tied: tuple, module: nn.Module, a, g: Tensor, sq: Tensor, scale: float) -> Tensor | None:
        """``|g_i|²`` of a tied weight once both of its layers are in (else ``None``): the two
        layers' norms and twice their cross term, all of ``δ = scale · d``."""
        parts, norms = tied
        norms.append(sq)
        if isinstance(module, nn.Embedding):
            parts.add_embedding(g)
        else:
            parts.add_head(a, g)
        cross = parts.cross()
        return None if cross is None else norms[0] + norms[1] + cross[0].mul_(2 * scale * scale)

    def step_weights(self) -> dict[str, Tensor] | None:
        """This step's metric ``P`` by parameter name (read once per step), or ``None``."""
        if self.metric is None:
            return None
        if self._weights is False:
            self._weights = self.metric()
        return self._weights
