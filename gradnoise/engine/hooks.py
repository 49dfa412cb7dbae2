"""The hook engine: forward hooks that record module calls, and tensor hooks on their
outputs that apply the layer rules (:mod:`gradnoise.rules`) when the output gradient
arrives in the backward pass. Installed in a context manager and always removed.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from gradnoise.engine.attention_capture import AttentionCapture
from gradnoise.engine.batch_trace import BatchTrace, unbatched_entries
from gradnoise.engine.lstm_recurrence import WeightGrads
from gradnoise.engine.rnn import layer_moments, layer_norms, recurrent_gradient
from gradnoise.engine.rnn_capture import RNNCapture
from gradnoise.rules import (
    dense_linear_moments,
    dense_norms,
    linear_gram_norms,
    prefers_gram,
    rule_for,
    weighted_norms,
)
from gradnoise.rules.tied import TiedParts

__all__ = ["LOW_PRECISION", "ModuleCall", "ModuleHooks", "Recorder", "batch_dim", "flatten", "in_float32", "kept_outputs",
           "rule_input", "widen"]  # fmt: skip


class ModuleCall:
    """One recorded module call (a plain class with slots: one is made per layer per call)."""

    __slots__ = ("module", "args", "kwargs", "shapes", "grads", "versions", "output", "last", "seq", "unbatched",
                 "projections", "inner")  # fmt: skip

    def __init__(self, module: str, args: tuple, kwargs: dict, shapes: list, versions: list) -> None:
        self.module, self.args, self.kwargs, self.versions = module, args, kwargs, versions
        self.shapes: list[torch.Size | None] = shapes  # of the flat tensor outputs (not kept)
        self.grads: list[Tensor | None] = [None] * len(shapes)  # kept only for vmap units
        # The output's gradient edge, kept until the Gram or moments path is decided: the
        # gradient there is the layer's even if the output is later modified in place (which
        # requesting the tensor would not give), and it holds no activation.
        self.output: GradientEdge | None = None
        self.last = False  # the backward pass goes no further than this call's output
        self.seq = 0  # position in the forward pass
        # Argument positions and keywords that do not depend on the batch (BatchTrace);
        # None while unknown, which no rule or module vmap takes as the batch.
        self.unbatched: frozenset | None = None
        # the parts the engine's own forward ran in view: an attention call's projections
        # (engine.attention_capture), an RNN call's layers (engine.rnn_capture)
        self.projections: list | None = None
        # a captured call's innermost hooked tensors as gradient edges, whose gradient passes
        # every hook of the call (an RNN's first-layer gates, an attention call's input
        # projection), and the switch of its LSTM weights' gradients (None: autograd's own
        # nodes skip unrequested gradients)
        self.inner: tuple[list, WeightGrads | None] | None = None


def flatten(obj: Any) -> list[Tensor | None]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in flatten(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in flatten(o)]
    return [None]


class ModuleHooks(abc.ABC):
    """Forward hooks (with kwargs) on named modules, installed and removed as a unit; the
    base of the two hook sets of the package: :class:`Recorder` (one measurement) and
    :class:`~gradnoise.engine.step_hooks.StepHooks` (the user's own training steps).
    A subclass provides ``_forward_hook(name)``, the hook of one module."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self._handles: list = []

    @abc.abstractmethod
    def _forward_hook(self, name: str) -> Callable:
        """The forward hook of module ``name`` (``hook(module, args, kwargs, output)``)."""

    def install(self) -> None:
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._forward_hook(name), with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def installed(self) -> Iterator[ModuleHooks]:
        """The hooks, installed for the block and removed on exit (also on exceptions)."""
        self.install()
        try:
            yield self
        finally:
            self.remove()


def rule_input(whole_call: bool, args: tuple, kwargs: dict):
    """What a layer rule takes of a call, detached: the first input, or for a rule with
    ``whole_call`` the call's ``(args, kwargs)``."""
    if not whole_call:
        return args[0].detach()
    det = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
    return tuple(det(t) for t in args), {k: det(v) for k, v in kwargs.items()}


LOW_PRECISION = (torch.float16, torch.bfloat16)


def in_float32(a, g: Tensor):
    """A rule's input ``a`` (a tensor or whole-call ``(args, kwargs)``) and output gradient
    ``g`` in one dtype: under ``torch.autocast`` a layer's input and output gradient can differ
    (a float32 input, a bfloat16 output), and 16-bit sums of squares lose the statistics, so
    where either is a 16-bit float both are taken to float32. Otherwise unchanged."""
    tensors = [a] if isinstance(a, Tensor) else [t for part in (a[0], a[1].values()) for t in part if isinstance(t, Tensor)]
    if g.dtype not in LOW_PRECISION and not any(t.dtype in LOW_PRECISION for t in tensors):
        return a, g
    # A 16-bit output from a wider input: autocast ran the layer on the input rounded to
    # 16 bits, so the rule does too (then the hooks' norms and .grad share their inputs).
    low = g.dtype if g.dtype in LOW_PRECISION else None
    up = lambda t: (t.to(low) if low is not None else t).float() if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    if isinstance(a, Tensor):
        return up(a), g.float()
    return (tuple(up(t) for t in a[0]), {k: up(v) for k, v in a[1].items()}), g.float()


class Recorder(ModuleHooks):
    """Hooks that record module calls in the forward pass and act on output gradients in the
    backward pass; removed on exit (also on exceptions).

    After the forward pass, :meth:`set_actions` says what to do when the gradient of a
    call's output arrives: ``"norms"`` (apply the layer rule now, while the layer's input and
    output gradient are alive, and drop both), ``"gram"`` (a Linear layer whose weight
    gradient the backward pass skips: norms and ``|ḡ_W|²`` from the Gram matrices, and the
    factors of ``ḡ_W`` kept), ``"moments"`` (a layer whose parameters' gradients the
    backward pass skips: norms and the mean gradient from the rule's ``moments``),
    ``"grads"`` (materialise per-example gradients and sum over calls) or ``"store"`` (keep
    the gradient for ``vmap`` of the module). Computing during the backward pass keeps peak
    memory near a plain step.
    """

    def __init__(self, modules: dict[str, nn.Module], batch: int, variance: bool, keep_output: dict[str, bool]) -> None:
        super().__init__(modules)
        self.batch, self.variance = batch, variance
        self.keep_output = keep_output  # outputs kept until the path is decided (kept_outputs)
        self.calls: dict[str, list[ModuleCall]] = {name: [] for name in modules}
        self.actions: dict[str, set[str]] = {}
        self.norms: dict[str, dict] = {}
        self.mean_sq: dict[str, Tensor] = {}  # Gram path: |ḡ_W|²
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # Gram path: ḡ_W = dᵀa
        self.means: dict[str, dict[str, Tensor]] = {}  # moments path: ḡ per local parameter
        self._seq = itertools.count()
        self.grads: dict[str, dict[str, Tensor]] = {}
        self.active = True
        self.trace: BatchTrace | None = None  # set while the forward pass is traced
        # Layers applied off the batch whose output (and rule input) is expanded over it
        # (gradnoise.engine.broadcast): their output gradients are then per example.
        self.expand: frozenset[str] = frozenset()
        self.weights: dict[str, dict[str, Tensor]] | None = None  # a metric P per module and local name
        self.tied: dict[str, tuple[str, str, TiedParts]] = {}  # module → (tied weight, role, parts)
        self.cross: dict[str, tuple] = {}  # tied weight → ⟨E_i, L_i⟩ (and Σ_i E_i ⊙ L_i; rules.tied)
        self.capture: AttentionCapture | None = None  # active during the forward pass, if set
        self.rnn_capture: RNNCapture | None = None  # likewise

    def set_actions(self, actions: dict[str, set[str]], pairs: dict[str, tuple[str, str]] | None = None) -> None:
        self.actions = actions
        for name, (emb, head) in (pairs or {}).items():  # tied weights: both layers leave a part
            parts = TiedParts(self.modules[emb].padding_idx)
            parts.set_ids(self.calls[emb][0].args[0].detach())
            self.tied[emb], self.tied[head] = (name, "embedding", parts), (name, "head", parts)
        for name, calls in self.calls.items():  # release what no action needs
            for c in calls:
                if not actions.get(name):
                    c.args, c.kwargs = None, {}
                if not actions.get(name, set()) & {"gram", "moments"}:
                    c.output = None
                if c.inner is not None and c.inner[1] is not None and "moments" in actions.get(name, ()):
                    c.inner[1].needed = False  # the mean comes from the products (layer_moments)

    def _forward_hook(self, name: str):
        on_grad, seq, variance = self._on_grad, self._seq, self.variance
        keep, always = name in self.keep_output, self.keep_output.get(name, False)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor | None:
            if not self.active:
                return None
            expanded = name in self.expand
            if expanded:  # the same values for every example: what broadcasting gives each
                args, output = (widen(args[0], output, self.batch, args[0]), *args[1:]), widen(args[0], output, self.batch)
            versions = [args[0]._version] if args and isinstance(args[0], Tensor) else []
            if isinstance(output, Tensor):  # the common case, kept short: once per layer per call
                call = ModuleCall(name, args, kwargs, [output.shape], versions)
                if output.requires_grad:
                    output.register_hook(functools.partial(on_grad, call, 0))
                    if keep and (always is True or variance or not (args and getattr(args[0], "requires_grad", False))
                                 or (always and always(module, args[0].shape, output.shape))):
                        call.output, call.seq = get_gradient_edge(output), next(seq)
            else:
                outs = flatten(output)
                call = ModuleCall(name, args, kwargs, [None if t is None else t.shape for t in outs], versions)
                for j, t in enumerate(outs):
                    if t is not None and t.requires_grad:
                        t.register_hook(functools.partial(on_grad, call, j))
            if self.capture is not None and self.capture.calls and isinstance(module, nn.MultiheadAttention):
                self._projections(call, module)
            elif self.rnn_capture is not None and self.rnn_capture.calls and isinstance(module, nn.RNNBase):
                self._gates(call, module)
            if self.trace is not None:
                call.unbatched = frozenset() if expanded else unbatched_entries(self.trace, args, kwargs)
                if len(call.unbatched) < sum(isinstance(t, Tensor) for t in (*args, *kwargs.values())):
                    self.trace.mark(output)  # also where the module's inside is not traced
            self.calls[name].append(call)
            return output if expanded else None

        return hook

    def _on_grad(self, call: ModuleCall, j: int, g: Tensor) -> Tensor | None:
        actions = self.actions.get(call.module, ())
        if "store" in actions:
            call.grads[j] = g
        projected = call.projections is not None and actions in ({"norms"}, {"moments"}) and self.weights is None
        if j == 0 and not projected and ("norms" in actions or "grads" in actions or "gram" in actions or "moments" in actions):
            self._apply_rule(call, g)
        if call.last:
            # The gradient of this output is requested (a gradient edge) only so that this
            # hook runs; nothing is propagated below it, and what autograd.grad would hold
            # until the end of the backward pass is replaced by a zero without storage.
            return g.new_zeros(()).expand(g.shape)
        return None

    def _apply_rule(self, call: ModuleCall, g: Tensor) -> None:
        module = self.modules[call.module]
        a = call.args[0]
        if call.versions and a._version != call.versions[0]:
            raise RuntimeError(
                f"the input of module {call.module!r} was modified in place after the call; "
                "per-example gradients need it intact (use method='vmap')"
            )
        # The rule gets ∂L/∂out = δ/B (no scaled copy) and the scale B; grads are rescaled by
        # B. Without Σ_i g_i², the squared norms are scaled by B² later, for all layers at once.
        rule, B = rule_for(module), self.batch
        a, d = in_float32(rule_input(rule.whole_call, call.args, call.kwargs), g.detach())
        if "gram" in self.actions[call.module]:
            self.norms[call.module], self.mean_sq[call.module] = linear_gram_norms(a, d, module.bias is not None)
            self.factors[call.module] = (d, a)
        elif "moments" in self.actions[call.module]:
            moments = rule.moments(module, a, d, self.variance, B if self.variance else 1.0)
            self.norms[call.module], self.means[call.module] = moments
        elif "norms" in self.actions[call.module] and self.weights is not None:
            scale = B if self.variance else 1.0
            self.norms[call.module] = weighted_norms(rule, module, a, d, self.weights[call.module], self.variance, scale)
        elif "norms" in self.actions[call.module]:
            self.norms[call.module] = rule.norms(module, a, d, self.variance, B if self.variance else 1.0)
            if "tied" in self.actions[call.module]:
                self._tied_part(call.module, a, d)
        else:
            acc = self.grads.setdefault(call.module, {})
            for local, v in rule.grads(module, a, d).items():
                v = v.mul_(B)
                acc[local] = acc[local] + v if local in acc else v
        if "store" not in self.actions[call.module]:
            call.args, call.kwargs = None, {}  # free the activation early

    def _projections(self, call: ModuleCall, module: nn.MultiheadAttention) -> None:
        """Hooks on the projections of this attention call, if the capture ran it."""
        key, found = self.capture.calls[-1]
        if key != id(module.in_proj_weight):
            return
        self.capture.calls.pop()
        call.projections = [prefix for prefix, *_ in found]  # not the outputs: only their hooks are needed
        for prefix, a, y, to_batch in found:
            if y.requires_grad:
                y.register_hook(functools.partial(self._on_projection, call, prefix, a, to_batch))
        if found[0][2].requires_grad:  # the input projection: its gradient passes both hooks
            call.inner = ([get_gradient_edge(found[0][2])], None)

    def _on_projection(self, call: ModuleCall, prefix: str, a: Tensor, to_batch, g: Tensor) -> None:
        """An attention projection's output gradient: its norms, as a Linear layer's, and on
        the moments path its mean gradient."""
        actions = self.actions.get(call.module)
        if actions not in ({"norms"}, {"moments"}) or self.weights is not None:
            return  # the rule's own path (per-example gradients, or a metric)
        a, d = in_float32(a, to_batch(g.detach()))
        module = self.modules[call.module]
        bias = (module.in_proj_bias if prefix == "in_proj_" else module.out_proj.bias) is not None
        scale = self.batch if self.variance else 1.0
        if actions == {"moments"}:
            norms, means = dense_linear_moments(a, d, bias, self.variance, scale)
            self.means.setdefault(call.module, {}).update({prefix + k: v for k, v in means.items()})
        else:
            norms = dense_norms(a, d, bias, self.variance, scale)
        self.norms.setdefault(call.module, {}).update({prefix + k: v for k, v in norms.items()})

    def _gates(self, call: ModuleCall, module: nn.RNNBase) -> None:
        """Hooks on the gates of this RNN call, if the capture ran it: the gradient of each
        layer's input part (after those of its recurrent parts, which only a GRU needs)."""
        key, parts, wanted = self.rnn_capture.calls[-1]
        if key != id(module._flat_weights[0]):
            return
        self.rnn_capture.calls.pop()
        call.projections = [part.suffix for part in parts]
        call.inner = ([get_gradient_edge(p.gx) for p in parts if p.suffix in ("_l0", "_l0_reverse")], wanted)
        for part in parts:
            recurrent = [None] * len(part.gh) if isinstance(module, nn.GRU) else None
            for t, gh in enumerate(part.gh if recurrent is not None else ()):
                gh.register_hook(functools.partial(recurrent.__setitem__, t))
            part.gx.register_hook(functools.partial(self._on_gates, call, part, recurrent))

    def _on_gates(self, call: ModuleCall, part, recurrent: list | None, g: Tensor) -> None:
        """An RNN layer's gate gradients: its norms (:func:`~gradnoise.engine.rnn.layer_norms`),
        and on the moments path its mean gradient."""
        actions = self.actions.get(call.module)
        if actions not in ({"norms"}, {"moments"}):
            return
        dx = g.detach()
        dh = dx  # the gates' recurrent part enters as its input part does, except in a GRU
        if recurrent is not None:
            dh = recurrent_gradient(part, recurrent)
        (a, dx), (prev, dh) = in_float32(part.input, dx), in_float32(part.prev, dh)
        part, bias, scale = part._replace(input=a, prev=prev), self.modules[call.module].bias, self.batch if self.variance else 1.0
        if actions == {"moments"}:
            norms, means = layer_moments(part, dx, dh, bias, self.variance, scale)
            self.means.setdefault(call.module, {}).update(means)
        else:
            norms = layer_norms(part, dx, dh, bias, self.variance, scale)
        self.norms.setdefault(call.module, {}).update(norms)

    def _tied_part(self, name: str, a: Tensor, d: Tensor) -> None:
        weight, role, parts = self.tied[name]
        if role == "head":
            parts.add_head(a, d)
        else:
            parts.add_embedding(d)
        cross = parts.cross(self.modules[name].weight.shape[0] if self.variance else None)
        if cross is not None:
            self.cross[weight] = cross


def widen(a: Tensor, out: Tensor, batch: int, t: Tensor | None = None) -> Tensor:
    """``t`` (default ``out``) of a layer called off the batch on ``a``, expanded over the
    batch: a leading dimension of size 1 that both ``a`` and ``out`` have (``wpe(ids[None])``,
    broadcast along it) is expanded in place, else a new one is prepended (``wpe(arange(T))``)."""
    t = out if t is None else t
    if a.dim() and out.dim() and a.shape[0] == 1 and out.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    return t.expand(batch, *t.shape)


def kept_outputs(modules: dict[str, nn.Module], batch: int, gram: bool) -> dict[str, bool | Callable]:
    """The recorded layers whose outputs the recorder keeps until the path is decided
    (otherwise freed as in a plain forward pass), and whether always (``True``) or only with
    ``Σ_i g_i²`` or when their input needs no gradient (``False``).

    Kept: Linear layers that may take the Gram path at this batch size (always), and layers
    whose rule has moments where skipping their parameters' gradients saves work: with
    ``Σ_i g_i²`` (per-example gradients are formed anyway), when their input needs no
    gradient (the backward pass then skips the layer), or where the norms would form the
    per-example products anyway, or never cost more (the rule's ``moments_pay``: ``True``,
    or a predicate of the call's shapes in place of ``False``)). Otherwise the Gram forms of
    the norms and the backward's own weight gradient are cheaper.
    Depends only on the model, the batch size and ``gram``.
    """
    gram_linear = {n for n, m in modules.items() if gram and type(m) is nn.Linear and prefers_gram(batch, m.in_features, m.out_features)}
    return {
        name: True if name in gram_linear else rule_for(m).moments_pay
        for name, m in modules.items()
        if name in gram_linear or getattr(rule_for(m), "moments", None) is not None
    }  # fmt: skip


def batch_dim(module: nn.Module) -> int:
    return 1 if getattr(module, "batch_first", True) is False else 0
