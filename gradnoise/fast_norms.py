"""Per-example gradient norms and variances from one forward and one backward pass.

The engine behind ``gradient_stats(..., method="fast")``. It runs the model once (through
``functional_call`` on detached parameters, so the caller's ``.grad`` and buffers are never
touched) with forward hooks that record each layer's input and tensor hooks that record the
gradient of each layer's output, then one ``torch.autograd.grad`` of the batch loss gives
the mean gradient and the per-layer output gradients. Per-layer rules
(:mod:`gradnoise.rules`) turn these into per-example squared norms and ``Σ_i g_i²``.

Which path each parameter takes (visible in ``GradientStats.per_param[name].method``):

* ``"fast"``: its module has a rule and is called once;
* ``"fast-tied"``: several calls or modules share it; per-example gradients are
  materialised per call and summed;
* ``"vmap-module"``: no rule; ``vmap`` over examples of the vector-Jacobian product of the
  smallest called module that owns it (captured inputs and output gradients);
* ``"vmap"``: the module-level result did not reproduce the batch gradient (stochastic
  layers, inputs without a leading batch dimension), or the smallest owner is the model
  itself: per-example gradients of the whole model, for these parameters only.

Within ``"fast"``, two layer kinds skip their parameters' gradients in the backward pass (the
gradient of their output is requested instead, as a gradient edge): Linear layers on 2-D
inputs where the Gram form is cheaper, without ``Σ_i g_i²`` (``|ḡ_W|²`` from two ``B × B``
Grams, ``ḡ_W`` kept as factors), and convolutions with ``Σ_i g_i²`` or whose input needs no
gradient (per-example gradients in chunks give the norms, ``Σ_i g_i²`` and ``ḡ``; the first
convolution of a network then costs no backward pass of its own).

The fast path assumes the batch loss is the mean of per-example losses; this is known for
the standard ``torch.nn`` losses and checked on the batch for any other callable.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge
from torch.func import functional_call, grad, vmap

from gradnoise._factored import FactoredGrads
from gradnoise._functional import (
    Batch,
    LossFn,
    as_tuple,
    batch_size_of,
    check_device,
    check_loss_fn,
    check_loss_value,
    check_no_train_batchnorm,
    frozen_state,
    is_known_mean_loss,
    preserved_state,
    sdpa_math,
    trainable_params,
)
from gradnoise._lazy import LazyMap
from gradnoise._moments import Moments, centred_m2_, centred_sums, moments_from_grads, scaled_rows
from gradnoise.per_sample import needs_loop, vmap_grads_and_losses
from gradnoise.rules import linear_gram_norms, prefers_gram, rule_for

__all__ = ["NotMeanLossError", "fast_applies", "fast_moments"]


class NotMeanLossError(ValueError):
    """The batch loss is not the mean of the per-example losses; use ``method="vmap"``."""


class _Call:
    """One recorded module call (a plain class with slots: one is made per layer per call)."""

    __slots__ = ("module", "args", "kwargs", "shapes", "grads", "versions", "output", "output_version", "last", "seq")

    def __init__(self, module: str, args: tuple, kwargs: dict, shapes: list, versions: list) -> None:
        self.module, self.args, self.kwargs, self.versions = module, args, kwargs, versions
        self.shapes: list[torch.Size | None] = shapes  # of the flat tensor outputs (not kept)
        self.grads: list[Tensor | None] = [None] * len(shapes)  # kept only for vmap units
        self.output: Tensor | None = None  # kept until the Gram or moments path is decided
        self.output_version = 0
        self.last = False  # the backward pass goes no further than this call's output
        self.seq = 0  # position in the forward pass


def _flatten(obj: Any) -> list[Tensor | None]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _flatten(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _flatten(o)]
    return [None]


class _Recorder:
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
        self.modules, self.batch, self.variance = modules, batch, variance
        self.keep_output = keep_output  # outputs kept until the path is decided (_kept_outputs)
        self.calls: dict[str, list[_Call]] = {name: [] for name in modules}
        self.actions: dict[str, set[str]] = {}
        self.norms: dict[str, dict] = {}
        self.mean_sq: dict[str, Tensor] = {}  # Gram path: |ḡ_W|²
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}  # Gram path: ḡ_W = dᵀa
        self.means: dict[str, dict[str, Tensor]] = {}  # moments path: ḡ per local parameter
        self._seq = itertools.count()
        self.grads: dict[str, dict[str, Tensor]] = {}
        self.active = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Recorder]:
        handles = [
            m.register_forward_hook(self._forward_hook(name), with_kwargs=True)
            for name, m in self.modules.items()
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def set_actions(self, actions: dict[str, set[str]]) -> None:
        self.actions = actions
        for name, calls in self.calls.items():  # release what no action needs
            for c in calls:
                if not actions.get(name):
                    c.args, c.kwargs = None, {}
                if not actions.get(name, set()) & {"gram", "moments"}:
                    c.output = None

    def _forward_hook(self, name: str):
        on_grad, seq, variance = self._on_grad, self._seq, self.variance
        keep, always = name in self.keep_output, self.keep_output.get(name, False)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not self.active:
                return
            versions = [args[0]._version] if args and isinstance(args[0], Tensor) else []
            if isinstance(output, Tensor):  # the common case, kept short: once per layer per call
                call = _Call(name, args, kwargs, [output.shape], versions)
                if output.requires_grad:
                    output.register_hook(functools.partial(on_grad, call, 0))
                    if keep and (always or variance or not (args and getattr(args[0], "requires_grad", False))):
                        call.output, call.output_version, call.seq = output, output._version, next(seq)
            else:
                outs = _flatten(output)
                call = _Call(name, args, kwargs, [None if t is None else t.shape for t in outs], versions)
                for j, t in enumerate(outs):
                    if t is not None and t.requires_grad:
                        t.register_hook(functools.partial(on_grad, call, j))
            self.calls[name].append(call)

        return hook

    def _on_grad(self, call: _Call, j: int, g: Tensor) -> Tensor | None:
        actions = self.actions.get(call.module, ())
        if "store" in actions:
            call.grads[j] = g
        if j == 0 and ("norms" in actions or "grads" in actions or "gram" in actions or "moments" in actions):
            self._apply_rule(call, g)
        if call.last:
            # The gradient of this output is requested (a gradient edge) only so that this
            # hook runs; nothing is propagated below it, and what autograd.grad would hold
            # until the end of the backward pass is replaced by a zero without storage.
            return g.new_zeros(()).expand(g.shape)
        return None

    def _apply_rule(self, call: _Call, g: Tensor) -> None:
        module = self.modules[call.module]
        a = call.args[0]
        if call.versions and a._version != call.versions[0]:
            raise RuntimeError(
                f"the input of module {call.module!r} was modified in place after the call; "
                "per-example gradients need it intact (use method='vmap')"
            )
        # The rule gets ∂L/∂out = δ/B (no scaled copy) and the scale B; grads are rescaled by
        # B. Without Σ_i g_i², the squared norms are scaled by B² later, for all layers at once.
        rule, d, B = rule_for(module), g.detach(), self.batch
        a = _detached_call(call) if rule.whole_call else a.detach()
        if "gram" in self.actions[call.module]:
            self.norms[call.module], self.mean_sq[call.module] = linear_gram_norms(a, d, module.bias is not None)
            self.factors[call.module] = (d, a)
        elif "moments" in self.actions[call.module]:
            moments = rule.moments(module, a, d, self.variance, B if self.variance else 1.0)
            self.norms[call.module], self.means[call.module] = moments
        elif "norms" in self.actions[call.module]:
            self.norms[call.module] = rule.norms(module, a, d, self.variance, B if self.variance else 1.0)
        else:
            acc = self.grads.setdefault(call.module, {})
            for local, v in rule.grads(module, a, d).items():
                v = v.mul_(B)
                acc[local] = acc[local] + v if local in acc else v
        if "store" not in self.actions[call.module]:
            call.args, call.kwargs = None, {}  # free the activation early


def _kept_outputs(modules: dict[str, nn.Module], batch: int, gram: bool) -> dict[str, bool]:
    """The recorded layers whose outputs the recorder keeps until the path is decided
    (otherwise freed as in a plain forward pass), and whether always (``True``) or only with
    ``Σ_i g_i²`` or when their input needs no gradient (``False``).

    Kept: Linear layers that may take the Gram path at this batch size (always), and layers
    whose rule has moments where skipping their parameters' gradients saves work: with
    ``Σ_i g_i²`` (per-example gradients are formed anyway), or when their input needs no
    gradient (the backward pass then skips the layer). Otherwise the Gram forms of the norms
    and the backward's own weight gradient are cheaper (measured on the MNIST-1D CNN).
    Depends only on the model, the batch size and ``gram``: cached per plan.
    """
    return {
        name: type(m) is nn.Linear
        for name, m in modules.items()
        if (gram and type(m) is nn.Linear and prefers_gram(batch, m.in_features, m.out_features))
        or getattr(rule_for(m), "moments", None) is not None
    }  # fmt: skip


def _detached_call(call: _Call) -> tuple[tuple, dict]:
    det = lambda t: t.detach() if isinstance(t, Tensor) else t  # noqa: E731
    return tuple(det(t) for t in call.args), {k: det(v) for k, v in call.kwargs.items()}


def _batch_dim(module: nn.Module) -> int:
    return 1 if getattr(module, "batch_first", True) is False else 0


_UNBATCHED_MASKS = ("attn_mask", "src_mask", "tgt_mask", "memory_mask", "mask")


def _module_grads(
    module: nn.Module,
    leaves: dict[str, Tensor],
    wanted: list[str],
    call: _Call,
    batch: int,
) -> dict[str, Tensor] | None:
    """Per-example gradients of ``wanted`` (local names) of ``module`` from one recorded call.

    ``vmap`` over examples of ``grad_θ ⟨module(x_i; θ), δ_i⟩``. Returns ``None`` when the call
    cannot be split by example (a tensor without the batch dimension where one is needed).
    """
    bdim = _batch_dim(module)
    is_rnn = isinstance(module, nn.RNNBase)

    def dim_of(shape: torch.Size, position: int | str) -> int | None:
        d = 1 if (is_rnn and position != 0) else bdim
        if isinstance(position, str) and position in _UNBATCHED_MASKS and len(shape) == 2:
            return None
        return d if len(shape) > d and shape[d] == batch else None

    entries = [(i, a) for i, a in enumerate(call.args)] + list(call.kwargs.items())
    batched = [(pos, t.detach(), dim_of(t.shape, pos)) for pos, t in entries if isinstance(t, Tensor)]
    outs = [
        (t, g, None if t is None else dim_of(t, 0 if j == 0 else 1))
        for j, (t, g) in enumerate(zip(call.shapes, call.grads, strict=True))
    ]
    if any(g is not None and d is None for t, g, d in outs):
        return None
    deltas = [(g.detach() * batch, d) for t, g, d in outs if g is not None]
    used = [j for j, (t, g, d) in enumerate(outs) if g is not None]
    if not deltas:
        return None
    fixed = {k: v for k, v in leaves.items() if k not in wanted}
    in_tensors = [t for _, t, d in batched if d is not None]
    in_dims = [d for _, t, d in batched if d is not None]

    def inner(p: dict[str, Tensor], xs: list[Tensor], ds: list[Tensor]) -> Tensor:
        it = iter(xs)
        vals = {}
        for pos, t, d in batched:
            vals[pos] = next(it).unsqueeze(d) if d is not None else t
        args = tuple(vals.get(i, a) for i, a in enumerate(call.args))
        kwargs = {k: vals.get(k, v) for k, v in call.kwargs.items()}
        flat = _flatten(functional_call(module, {**fixed, **p}, args, kwargs))
        total = 0.0
        for j, dl, (_, dd) in zip(used, ds, deltas, strict=True):
            total = total + (flat[j] * dl.unsqueeze(dd)).sum()
        return total

    wanted_p = {k: leaves[k] for k in wanted}
    if needs_loop(module):
        rows = [grad(inner)(wanted_p, [t.select(d, i) for t, d in zip(in_tensors, in_dims, strict=True)],
                            [dl.select(dd, i) for dl, dd in deltas]) for i in range(batch)]  # fmt: skip
        return {k: torch.stack([r[k] for r in rows]) for k in wanted}
    fn = vmap(grad(inner), in_dims=(None, in_dims, [d for _, d in deltas]))
    with sdpa_math():  # batchable attention (the fused kernel has no vmap rule)
        return fn(wanted_p, in_tensors, [dl for dl, _ in deltas])


def fast_applies(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch) -> bool:
    """The ``method="auto"`` rule: use the fast engine unless the loss is known not to be a
    plain mean of per-example losses (class weights, ``ignore_index`` in the targets, a
    ``reduction`` other than ``"mean"``). Other callables are checked on the batch."""
    if is_known_mean_loss(loss_fn, targets):
        return True
    return not isinstance(loss_fn, nn.Module) or not hasattr(loss_fn, "reduction")


def _check_mean_loss(loss_fn: LossFn, outputs: Any, ys: tuple[Tensor, ...], loss: Tensor) -> Tensor:
    """Per-example losses by ``vmap`` of ``loss_fn``; their mean must equal the batch loss."""
    outs = outputs.detach() if isinstance(outputs, Tensor) else outputs
    y = ys[0] if len(ys) == 1 else ys

    def one(o, t):
        o1 = o.unsqueeze(0) if isinstance(o, Tensor) else o
        t1 = t.unsqueeze(0) if isinstance(t, Tensor) else tuple(x.unsqueeze(0) for x in t)
        return loss_fn(o1, t1)

    try:
        losses = vmap(one)(outs, y)
    except Exception as exc:  # vmap cannot run every callable; the caller falls back
        raise NotMeanLossError(f"could not evaluate loss_fn per example under vmap ({exc})") from exc
    tol = 1e-4 if loss.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    if not torch.allclose(losses.mean(), loss.detach(), rtol=tol, atol=tol * 1e-3):
        raise NotMeanLossError(
            f"loss_fn on the batch is {loss.item():.6g} but the mean of its per-example values "
            f"is {losses.mean().item():.6g}: the fast engine needs a mean-reduced loss; use "
            "method='vmap' (per-example losses evaluated one example at a time)"
        )
    return losses


def _owners(model: nn.Module, params: dict[str, Tensor]):
    """Map each trainable parameter to its owning (module name, local name) pairs."""
    owners: dict[int, list[tuple[str, str]]] = {}
    absorbed: list[str] = []  # modules whose children's parameters belong to their rule
    for mname, module in model.named_modules():
        if any(mname.startswith(a + ".") for a in absorbed):
            continue
        rule = rule_for(module)
        recurse = rule is not None and rule.owns_children
        if recurse:
            absorbed.append(mname)
        for pname, p in module.named_parameters(recurse=recurse, remove_duplicate=False):
            owners.setdefault(id(p), []).append((mname, pname))
    by_name = dict(model.named_parameters())
    return {n: owners[id(by_name[n])] for n in params}


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") if n else [] for n in names]
    common = []
    for level in zip(*parts, strict=False):  # stops at the shortest name
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:k]) for k in range(len(parts), -1, -1)]


def fast_moments(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Batch,
    targets: Batch,
    *,
    variance: bool = True,
    chunk_size: int | None = None,
    factored_mean: bool = False,
    known_mean: bool = False,
) -> Moments:
    """:class:`~gradnoise._moments.Moments` of one batch from one forward and one backward pass.

    Args:
        model, loss_fn, inputs, targets: as in :func:`gradnoise.gradient_stats`.
        variance: also compute ``Σ_i g_i²`` per element (one extra product per layer).
        chunk_size: examples per chunk for parameters that fall back to ``vmap``.
        factored_mean: without ``variance``, let Linear layers on 2-D inputs where
            :func:`~gradnoise.rules.prefers_gram` holds skip the weight gradient: their
            norms and ``|ḡ_W|²`` come from ``B × B`` Gram matrices and ``Moments.mean`` holds
            ``ḡ_W`` as factors (:class:`~gradnoise._factored.FactoredGrads`), multiplied out
            only if read.
        known_mean: the caller has checked with
            :func:`~gradnoise._functional.is_known_mean_loss` that the loss is a plain mean on
            these targets (``method="auto"`` does); otherwise checked here.

    Raises:
        NotMeanLossError: the loss is not the mean of per-example losses.
        ValueError, FloatingPointError: as :func:`gradnoise.gradient_stats`.
    """
    plan = _plan(model)
    named, modules = plan.named, plan.modules()
    check_loss_fn(loss_fn)
    B = batch_size_of(inputs, targets)
    check_device(named, inputs, targets)
    xs, ys = as_tuple(inputs), as_tuple(targets)
    owners, routes = plan.owners, plan.routes
    check_no_train_batchnorm((n, modules[n]) for n in plan.batchnorms)
    gram_ok = factored_mean and not variance
    recorded = {m: modules[m] for m in plan.recorded}
    recorder = _Recorder(recorded, B, variance, plan.kept_outputs(recorded, B, gram_ok))
    direct = plan.direct and not any(p._backward_hooks for p in named.values())
    if direct:  # the model's own parameters as graph leaves; autograd.grad leaves .grad alone
        state: dict[str, Tensor] = {}
        graph_leaves = params = named  # detached below if vmap needs them
    else:  # what per-module and whole-model vmap differentiate: detached parameters
        state = frozen_state(model)
        params = {n: p.detach() for n, p in named.items()}
        graph_leaves = {n: p.requires_grad_(True) for n, p in params.items()}
    leaves = params

    with preserved_state(model, modules.values()), torch.enable_grad():
        with recorder.installed():
            if direct:
                outputs = model(*xs)
            else:
                outputs = functional_call(model, {**graph_leaves, **state}, xs)
            recorder.active = False
            paths, units, gram, owned, actions = _route(routes, owners, modules, recorder.calls, B, gram_ok)
            recorder.set_actions(actions)
            loss = loss_fn(outputs, ys[0] if len(ys) == 1 else ys)
            loss_value = check_loss_value(loss)
            if known_mean or is_known_mean_loss(loss_fn, targets):
                loss_sum = loss_value * B
            else:
                loss_sum = float(_check_mean_loss(loss_fn, outputs, ys, loss).double().sum())
            del outputs
            # Gram-path weights and moments-path parameters are not differentiated; the
            # outputs of their layers are where needed (:func:`_hook_edges`), so that the
            # gradient reaches those layers' hooks.
            wanted = [n for n in graph_leaves if n not in gram and n not in owned]
            skip_calls = sorted((recorder.calls[m][0] for m in {*gram.values(), *owned.values()}), key=lambda c: c.seq)
            if not all(map(_gram_ready, skip_calls)):
                raise RuntimeError(
                    "loss_fn modified the model's outputs in place, which per-example gradients "
                    "need intact: compute the loss out of place, or use method='vmap'"
                )
            wanted_leaves = [graph_leaves[n] for n in wanted]
            edges = _hook_edges(skip_calls, wanted_leaves, {m for n in wanted for m, _ in owners[n]})
            grads = torch.autograd.grad(loss, wanted_leaves + edges, allow_unused=True)
            del edges
        mean = {
            n: torch.zeros_like(leaves[n]) if g is None else g
            for n, g in zip(wanted, grads[: len(wanted)], strict=True)
        }
        del grads
        for n, m in owned.items():
            local = owners[n][0][1]
            mean[n] = recorder.means[m][local] if m in recorder.means else torch.zeros_like(leaves[n])
        if direct and units:  # detached parameters and buffers for vmap
            state = frozen_state(model)
            params = leaves = {n: p.detach() for n, p in named.items()}
        return _assemble(
            model, loss_fn, xs, ys, params, leaves, state, owners, modules, recorder, mean,
            loss_sum, B, variance, chunk_size, paths, units, gram,
        )  # fmt: skip


class _Plan:
    """What :func:`fast_moments` needs to know about a model's structure, computed once and
    checked on every call (:meth:`valid`) against a snapshot of the model: the identities of
    every module's children, parameters and buffers, and which parameters require grad. A
    changed model (a module or parameter replaced, added or removed, a parameter frozen or
    unfrozen) is planned again.

    The plan refers to modules through weak references, and otherwise holds only their
    registries of children, parameters and buffers (which never refer back to a parent), so
    the cache, keyed weakly on the model, never keeps a model alive.
    """

    __slots__ = ("_refs", "_registries", "_ids", "_params", "_flags", "named", "owners", "recorded",
                 "batchnorms", "direct", "routes", "_kept")  # fmt: skip

    def __init__(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        self._refs = {name: weakref.ref(m) for name, m in modules.items()}
        self._registries = [d for m in modules.values() for d in (m._modules, m._parameters, m._buffers)]
        self._ids = self._current_ids()
        self._params = [p for m in modules.values() for p in m._parameters.values() if p is not None]
        self._flags = [p.requires_grad for p in self._params]
        self.named = trainable_params(model, detach=False)  # raises if there are none
        self.owners = _owners(model, self.named)
        ruled = {m for os in self.owners.values() for m, _ in os if rule_for(modules[m]) is not None}
        # Record rule modules, and every module containing a rule-less owner (candidate units).
        recorded = set(ruled)
        for os in self.owners.values():
            for m, _ in os:
                if m not in ruled:
                    recorded.update(_ancestors(m))
        self.recorded = [m for m in modules if m in recorded]
        self.batchnorms = [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # Whether the forward pass may run the caller's model as it is (faster than
        # ``functional_call``): no buffers that a forward could update, and not a DDP wrapper
        # (whose forward and backward synchronise processes). Parameter hooks: per call.
        self.direct = not isinstance(model, nn.parallel.DistributedDataParallel) and not any(
            b is not None for m in modules.values() for b in m._buffers.values()
        )
        self.routes: dict = {}  # by call signature (_route)
        self._kept: dict[tuple[int, bool], dict[str, bool]] = {}  # by (batch size, gram)

    def _current_ids(self) -> list[int]:  # ids: == on tensors would compare values
        return [id(v) for d in self._registries for v in d.values()]

    def modules(self) -> dict[str, nn.Module]:
        return {name: ref() for name, ref in self._refs.items()}

    def kept_outputs(self, recorded: dict[str, nn.Module], batch: int, gram: bool) -> dict[str, bool]:
        """:func:`_kept_outputs` of the recorded modules, cached (at most ``MAX_ROUTES``)."""
        kept = self._kept.get((batch, gram))
        if kept is None:
            if len(self._kept) >= MAX_ROUTES:
                self._kept.clear()
            kept = self._kept[batch, gram] = _kept_outputs(recorded, batch, gram)
        return kept

    def valid(self) -> bool:
        return self._current_ids() == self._ids and [p.requires_grad for p in self._params] == self._flags


_PLANS: weakref.WeakKeyDictionary[nn.Module, _Plan] = weakref.WeakKeyDictionary()


def _plan(model: nn.Module) -> _Plan:
    """The model's :class:`_Plan`, from the cache when still valid."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan = _PLANS.get(model)
    if plan is None or not plan.valid():
        plan = _PLANS[model] = _Plan(model)
    return plan


MAX_ROUTES = 32  # routes cached per model (batch sizes × input shapes); cleared beyond


def _route(routes: dict, owners, modules, calls, B: int, gram_ok: bool):
    """Paths, vmap units, Gram-path weights, moments-path parameters and recorder actions of
    this forward pass, cached by what they depend on: the batch size, and per recorded call
    its input and output shapes and whether its output was kept and may carry the gradient
    (which the recorder decides from Σ_i g_i² and whether the input needs a gradient)."""
    sig = (B, gram_ok, tuple(
        (name, tuple((c.args[0].shape if c.args and isinstance(c.args[0], Tensor) else None, c.shapes[0],
                      _gram_ready(c)) for c in cs))
        for name, cs in calls.items()
    ))  # fmt: skip
    route = routes.get(sig)
    if route is None:
        paths, units = _decide(owners, modules, calls, B)
        gram = _gram_modules(owners, modules, calls, paths, B) if gram_ok else {}
        owned = _moments_params(owners, modules, calls, paths, set(gram.values()))
        route = routes[sig] = (paths, units, gram, owned, _actions(owners, paths, units, gram, owned))
        if len(routes) > MAX_ROUTES:
            routes.clear()
            routes[sig] = route
    paths, units, gram, owned, actions = route
    return paths, {u: list(ns) for u, ns in units.items()}, gram, owned, actions


def _decide(owners, modules, calls, B: int):
    """Each parameter's path ("fast", "fast-tied" or a unit module for vmap), after forward."""

    @functools.cache
    def batched(mname: str) -> bool:  # a rule needs the batch dimension on input and output
        bd = _batch_dim(modules[mname])
        return all(
            c.args and isinstance(c.args[0], Tensor) and c.args[0].dim() > bd and c.args[0].shape[bd] == B
            and c.shapes[0] is not None and len(c.shapes[0]) > bd and c.shapes[0][bd] == B
            for c in calls[mname]
        )  # fmt: skip

    paths: dict[str, str] = {}
    units: dict[str, list[str]] = {}
    for name, os in owners.items():
        ruled = all(m in calls and rule_for(modules[m]) and batched(m) for m, _ in os)
        n_calls = sum(len(calls.get(m, [])) for m, _ in os)
        if ruled and n_calls == 1:
            paths[name] = "fast"
        elif ruled and n_calls > 1:
            paths[name] = "fast-tied"
        else:
            unit = next((a for a in _ancestors(_common_prefix([m for m, _ in os])) if calls.get(a)), "")
            units.setdefault(unit, []).append(name)
    return paths, units


def _gram_ready(call: _Call) -> bool:
    """A Linear call whose output may carry the gradient to the Gram path: kept, differentiable,
    and not modified in place since (an in-place op after the layer, e.g. ``ReLU(inplace=True)``,
    would make requesting it stop the gradient short of the layer)."""
    out = call.output
    return out is not None and out.requires_grad and out._version == call.output_version


def _gram_modules(owners, modules, calls, paths: dict[str, str], B: int) -> dict[str, str]:
    """Weights (name → module) whose Linear layer takes the Gram path: called once on 2-D
    input, all its parameters on the plain fast path, and :func:`prefers_gram`."""
    out = {}
    for name, path in paths.items():
        (m, local), *rest = owners[name]
        module = modules[m]
        if path != "fast" or rest or local != "weight" or type(module) is not nn.Linear:
            continue
        call = calls[m][0]
        if not _gram_ready(call) or call.args[0].dim() != 2:
            continue
        prefix = f"{m}." if m else ""
        if module.bias is not None and paths.get(prefix + "bias") != "fast":
            continue
        if prefers_gram(B, module.in_features, module.out_features):
            out[name] = m
    return out


def _hook_edges(calls: list[_Call], wanted_leaves: list[Tensor], differentiated: set[str]) -> list:
    """Gradient edges of skipped layers' outputs (``calls``, in forward order) to request
    from ``autograd.grad`` so that every such layer's output hook runs.

    The engine runs a node, and the hooks on its output, only if a requested input lies
    below it. A layer with a requested parameter or layer below it needs no request of its
    own (then its output gradient is not held until the backward pass ends, as requested
    ones are), nor one with a parameter of its own differentiated; one with nothing below
    (``last``: no input needs a gradient) is requested, and its hook releases what is
    captured. Releases the calls' outputs (only edges are kept).
    """
    targets = None  # AccumulateGrad nodes of the wanted leaves and requested nodes, if needed
    edges = []
    for c in calls:
        output, c.output = c.output, None
        if c.module in differentiated:  # its node runs for its own parameters
            continue
        c.last = not any(isinstance(t, Tensor) and t.requires_grad for t in c.args)
        edge = get_gradient_edge(output)
        if not c.last:
            if targets is None:
                targets = {get_gradient_edge(t).node for t in wanted_leaves} | {e.node for e in edges}
            if _reaches(edge.node, targets):
                continue
        edges.append(edge)
        if targets is not None:
            targets.add(edge.node)
    return edges


def _reaches(node, targets: set) -> bool:
    """Whether one of ``targets`` (autograd nodes) lies below ``node`` in the graph."""
    stack, seen = [node], {node}
    while stack:
        for child, _ in stack.pop().next_functions:
            if child is None or child in seen:
                continue
            if child in targets:
                return True
            seen.add(child)
            stack.append(child)
    return False


def _moments_ready(module: nn.Module, call: _Call) -> bool:
    """Whether a layer takes the moments path: its rule has ``moments`` and its output may
    carry the gradient (:func:`_gram_ready`) — the recorder keeps it only where skipping
    the parameters' gradients saves work (see ``_Recorder.keep_output``)."""
    return getattr(rule_for(module), "moments", None) is not None and _gram_ready(call)


def _moments_params(owners, modules, calls, paths: dict[str, str], taken: set[str]) -> dict[str, str]:
    """Parameters (name → module) on the moments path: every trainable parameter of a layer
    that is called once, owns them alone on the plain fast path, and :func:`_moments_ready`."""
    by_module: dict[str, list[str]] = {}
    for name, path in paths.items():
        (m, _), *rest = owners[name]
        by_module.setdefault(m, []).append(name if path == "fast" and not rest else "")
    return {
        n: m for m, names in by_module.items()
        if m not in taken and all(names) and len(calls.get(m, ())) == 1 and _moments_ready(modules[m], calls[m][0])
        for n in names
    }  # fmt: skip


def _actions(owners, paths: dict[str, str], units: dict[str, list[str]], gram: dict[str, str],
             owned: dict[str, str]) -> dict[str, set[str]]:  # fmt: skip
    actions: dict[str, set[str]] = {}
    gram_modules, owned_modules = set(gram.values()), set(owned.values())
    for name, path in paths.items():
        for m, _ in owners[name]:
            kind = "gram" if m in gram_modules else "moments" if m in owned_modules else "norms" if path == "fast" else "grads"
            actions.setdefault(m, set()).add(kind)
    for m in actions:  # a module with any tied parameter materialises all of them
        if "grads" in actions[m]:
            actions[m].discard("norms")
    for unit in units:
        if unit:
            actions.setdefault(unit, set()).add("store")
    return actions


def _assemble(model, loss_fn, xs, ys, params, leaves, state, owners, modules, recorder, mean,
              loss_sum, B, variance, chunk_size, paths, units, gram) -> Moments:  # fmt: skip
    sq: dict[str, Tensor] = {}
    sum_sq: dict[str, Tensor | None] = {}
    methods: dict[str, str] = dict(paths)
    materialised: dict[str, Tensor] = {}
    for name, path in paths.items():
        if path == "fast" and (m_local := owners[name][0])[0] in recorder.norms:
            sq[name], sum_sq[name] = recorder.norms[m_local[0]][m_local[1]]
        elif path == "fast" and owners[name][0][0] in recorder.grads:  # module has tied params
            m, local = owners[name][0]
            materialised[name] = recorder.grads[m][local]
        elif path == "fast-tied":
            parts = [recorder.grads[m][local] for m, local in owners[name] if m in recorder.grads]
            materialised[name] = sum(parts) if parts else torch.zeros(B, *params[name].shape, dtype=params[name].dtype, device=params[name].device)
        else:  # output never reached by the backward pass: zero gradient
            p = params[name]
            sq[name] = torch.zeros(B, dtype=p.dtype, device=p.device)
            sum_sq[name] = torch.zeros_like(p) if variance else None

    # Parameters without a rule: vmap over their smallest called owner, checked against the
    # batch gradient; whole-model vmap where that check fails or the owner is the model.
    calls = recorder.calls
    whole_model: list[str] = list(units.pop("", []))
    for unit, names in units.items():
        module = modules[unit]
        prefix = unit + "."
        local_leaves = _local_tensors(module, leaves, state, model)
        wanted = [n[len(prefix):] for n in names]  # noqa: E203
        total: dict[str, Tensor] | None = {}
        for call in calls[unit]:
            g = _module_grads(module, local_leaves, wanted, call, B)
            if g is None:
                total = None
                break
            for k, v in g.items():
                total[k] = total[k] + v if k in total else v
        ok = total is not None and all(
            _close(total[w].mean(0), mean[n]) for w, n in zip(wanted, names, strict=True)
        )
        if ok:
            for w, n in zip(wanted, names, strict=True):
                materialised[n] = total[w]
                methods[n] = "vmap-module"
        else:
            whole_model.extend(names)

    parts = []
    if materialised:
        part = moments_from_grads(materialised, torch.zeros(B), "fast", variance)
        part.methods = {n: methods[n] for n in materialised}
        parts.append(part)
    if whole_model:
        sub = {n: params[n] for n in whole_model}
        rest = {**{n: p for n, p in params.items() if n not in sub}, **state}
        step = chunk_size or B
        part = None
        for s in range(0, B, step):
            g, losses = vmap_grads_and_losses(
                model, loss_fn, sub, rest, tuple(t[s : s + step] for t in xs),
                tuple(t[s : s + step] for t in ys),
            )  # fmt: skip
            m = moments_from_grads(g, losses, "vmap", variance)
            part = m if part is None else part.merge(m)
        parts.append(part)

    # Rule parameters: mean from the batch gradient, centred sums by subtraction; the
    # scalars of all parameters in a few stacked operations and one transfer, and the
    # per-parameter tensors built only if read (LazyMap).
    factors = {n: recorder.factors[m] for n, m in gram.items() if m in recorder.factors}
    for n in gram.keys() - factors.keys():  # output never reached by the backward pass
        mean[n] = torch.zeros_like(params[n])
    order = list(params)
    scalars: dict[str, tuple[float, float]] = {}
    sq_map: Mapping[str, Tensor] = {}
    tm2_map: Mapping[str, Tensor] = {}
    m2_map: dict[str, Tensor] | None = {} if variance else None
    sq_total = None
    if sq:
        dense = [n for n in sq if n not in factors]
        names = dense + [n for n in sq if n in factors]
        scale = 1.0 if variance else B * B
        rows, sq_total, host = centred_sums(
            [sq[n] for n in names], [mean[n] for n in dense], B, scale=scale,
            mean_sq=[recorder.mean_sq[gram[n]] for n in names[len(dense):]], total=True,
        )  # fmt: skip
        _check_finite([h[1] + h[2] for h in host], names)
        scalars = {n: h[:2] for n, h in zip(names, host, strict=True)}
        sq_map = LazyMap(lambda: _rows_by_name(names, scaled_rows(rows, scale), order))
        tm2_map = LazyMap(functools.partial(_values_by_name, names, [h[0] for h in host], rows.device, order))
        if m2_map is not None:
            # in place on the rules' own buffers
            m2_map.update(zip(names, centred_m2_([sum_sq[n] for n in names], [mean[n] for n in names], B), strict=True))
    out_mean = {n: mean[n] for n in sq if n not in factors}
    if parts:  # some parameters materialised: plain dicts, merged
        sq_map, tm2_map = dict(sq_map), dict(tm2_map)
        for part in parts:
            out_mean.update(part.mean)
            tm2_map.update(part.trace_m2)
            if m2_map is not None:
                m2_map.update(part.m2)
            sq_map.update(part.sq_norms)
            methods.update(part.methods)
            pnames = list(part.mean)
            _check_finite(torch.stack([part.trace_m2[n] + part.sq_norms[n].sum() for n in pnames]).tolist(), pnames)
        sq_map, tm2_map = {n: sq_map[n] for n in order}, {n: tm2_map[n] for n in order}
        sq_total = None
    return Moments(
        count=B,
        mean=FactoredGrads(order, out_mean, factors) if factors else {n: out_mean[n] for n in order},
        trace_m2=tm2_map,
        m2=None if m2_map is None else {n: m2_map[n] for n in order},
        sq_norms=sq_map,
        loss_sum=loss_sum,
        methods={n: methods[n] for n in order},
        scalars=scalars if len(scalars) == len(order) else None,
        sq_total=sq_total,
        promoted=any(part.promoted for part in parts),
    )


def _rows_by_name(names: list[str], rows: Tensor, order: list[str]) -> dict[str, Tensor]:
    """``{name: rows[j]}`` in the order ``order`` (of the parameters; ``names`` is a subset)."""
    by_name = dict(zip(names, rows.unbind(), strict=True))
    return {n: by_name[n] for n in order if n in by_name}


def _values_by_name(names: list[str], values: list[float], device: torch.device, order: list[str]) -> dict[str, Tensor]:
    """0-d float64 tensors on ``device`` of host ``values``, by name in the order ``order``."""
    return _rows_by_name(names, torch.tensor(values, dtype=torch.float64, device=device), order)


def _check_finite(values: list[float], names: list[str]) -> None:
    """Any NaN/inf in a per-example gradient shows in its squared norm, and one in the mean
    gradient in ``|ḡ|²`` (cheaper than ``isfinite`` over every parameter)."""
    for name, v in zip(names, values, strict=True):
        if not math.isfinite(v):
            raise FloatingPointError(
                f"gradient of parameter {name!r} contains NaN or inf: the loss or the model "
                "overflows on this batch"
            )


def _close(a: Tensor, b: Tensor) -> bool:
    tol = 1e-3 if a.dtype != torch.float64 else 1e-8
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return bool(((a - b).abs().max() <= tol * scale).item())


def _local_tensors(module: nn.Module, leaves, state, model: nn.Module) -> dict[str, Tensor]:
    """The leaves/state tensors of ``module`` under its local names (ties resolved by identity)."""
    by_id = {}
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    for full, t in named.items():
        if full in leaves:
            by_id[id(t)] = leaves[full]
        elif full in state:
            by_id.setdefault(id(t), state[full])
    out = {}
    for local, t in module.named_parameters(remove_duplicate=False):
        out[local] = by_id[id(t)]
    for local, t in module.named_buffers(remove_duplicate=False):
        out[local] = by_id.get(id(t), t)
    return out
