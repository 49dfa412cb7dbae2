"""The fast engine: per-example gradient norms and variances from one forward and one
backward pass (the engine behind ``gradient_stats(..., method="fast")``).

It runs the model once (the caller's model as it is when nothing could change it, else
``functional_call`` on detached parameters, so the caller's ``.grad`` and buffers are never
touched) with the hooks of :mod:`gradnoise.engine.hooks`, then one ``torch.autograd.grad``
of the batch loss gives the mean gradient while the hooks turn each layer's input and
output gradient into per-example squared norms and ``Σ_i g_i²``
(:mod:`gradnoise.rules`). Routing: :mod:`gradnoise.engine.plan`.

The fast path assumes the batch loss is the mean of per-example losses; this is known for
the standard ``torch.nn`` losses and checked on the batch for any other callable.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradnoise._coupling import mixed_error
from gradnoise._functional import (
    Batch,
    LossFn,
    as_tuple,
    batch_size_of,
    check_device,
    check_loss_fn,
    check_loss_value,
    check_no_train_batchnorm,
    check_target_shape,
    explaining_checkpoint,
    frozen_state,
    input_signature,
    is_known_mean_loss,
    preserved_state,
)
from gradnoise._moments import Moments
from gradnoise.engine.assemble import Pass, assemble
from gradnoise.engine.attention_capture import AttentionCapture
from gradnoise.engine.broadcast import trace_signature
from gradnoise.engine.graph import hook_edges
from gradnoise.engine.hooks import Recorder, kept_outputs
from gradnoise.engine.plan import (
    Plan,
    Route,
    plan_for,
    route_for,
    traced_calls,
)
from gradnoise.engine.rnn_capture import RNNCapture
from gradnoise.rules import rule_for

__all__ = ["NotMeanLossError", "fast_applies", "fast_moments"]


class NotMeanLossError(ValueError):
    """The batch loss is not the mean of the per-example losses; use ``method="vmap"``."""


def fast_applies(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch) -> bool:
    """The ``method="auto"`` rule: use the fast engine unless the loss is known not to be a
    plain mean of per-example losses (class weights, ``ignore_index`` in the targets, a
    ``reduction`` other than ``"mean"``). Other callables are checked on the batch."""
    if is_known_mean_loss(loss_fn, targets):
        return True
    return not isinstance(loss_fn, nn.Module) or not hasattr(loss_fn, "reduction")


def check_mean_loss(loss_fn: LossFn, outputs: Any, ys: tuple[Tensor, ...], loss: Tensor) -> Tensor:
    """Per-example losses by ``vmap`` of ``loss_fn``; their mean must equal the batch loss."""
    B = ys[0].shape[0]
    # vmap over the outputs' tensors with the batch dimension; anything else (a model
    # output's cache object, a tensor without the batch) is passed whole
    leaves, spec = tree_flatten(outputs)
    leaves = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
    dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == B else None for t in leaves]
    y = ys[0] if len(ys) == 1 else ys

    def one(flat, t):
        o1 = tree_unflatten([v.unsqueeze(0) if d == 0 else v for v, d in zip(flat, dims, strict=True)], spec)
        t1 = t.unsqueeze(0) if isinstance(t, Tensor) else tuple(x.unsqueeze(0) for x in t)
        return loss_fn(o1, t1)

    try:
        losses = vmap(one, in_dims=(dims, 0))(leaves, y)
    except Exception as exc:  # vmap cannot run every callable; the caller falls back
        raise NotMeanLossError(f"could not evaluate loss_fn per example under vmap ({exc})") from exc
    # in float64, at the coarser of the two dtypes' precisions (under autocast the
    # per-example losses and the batch loss can come out in different dtypes)
    coarse = max(torch.finfo(losses.dtype).eps, torch.finfo(loss.dtype).eps)
    tol = 1e-9 if coarse < 1e-10 else max(1e-4, 16 * coarse)
    if not torch.allclose(losses.mean().double(), loss.detach().double(), rtol=tol, atol=tol * 1e-3):
        raise NotMeanLossError(
            f"loss_fn on the batch is {loss.item():.6g} but the mean of its per-example values "
            f"is {losses.mean().item():.6g}: the fast engine needs a mean-reduced loss; use "
            "method='vmap' (per-example losses evaluated one example at a time)"
        )
    return losses


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
    weights: dict[str, Tensor] | None = None,
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
        weights: a diagonal metric ``P`` per parameter
            (:func:`~gradnoise.preconditioner.preconditioner_weights`): the moments are then
            those of ``√P ⊙ g_i``. The rules weight their norms in the backward pass; the
            Gram and moments paths, which skip a weight gradient, are not taken.

    Raises:
        NotMeanLossError: the loss is not the mean of per-example losses.
        ValueError, FloatingPointError: as :func:`gradnoise.gradient_stats`.
    """
    plan = plan_for(model)
    named, modules = plan.named, plan.modules()
    check_loss_fn(loss_fn)
    B = batch_size_of(inputs, targets)
    check_device(named, inputs, targets)
    xs, ys = as_tuple(inputs), as_tuple(targets)
    check_no_train_batchnorm((n, modules[n]) for n in plan.batchnorms)
    gram_ok = factored_mean and not variance and weights is None
    recorded = {m: modules[m] for m in plan.recorded}
    recorder = Recorder(recorded, B, variance, kept_outputs(recorded, B, gram_ok) if weights is None else {})
    direct = plan.direct and not any(p._backward_hooks for p in named.values())
    if direct:  # the model's own parameters as graph leaves; autograd.grad leaves .grad alone
        state: dict[str, Tensor] = {}
        params = named  # detached below if vmap needs them
    else:  # what per-module and whole-model vmap differentiate: detached parameters
        state = frozen_state(model)
        params = {n: p.detach().requires_grad_(True) for n, p in named.items()}

    signature = input_signature(xs)
    run = lambda inputs: model(*inputs) if direct else functional_call(model, {**params, **state}, inputs)  # noqa: E731
    with preserved_state(model, modules.values()), torch.enable_grad():
        if signature not in plan.unbatched:
            trace_signature(plan, signature, recorded, xs, B, run)
        if plan.mixed.get(signature):
            raise mixed_error()
        if plan.coupled.get(signature):
            raise NotMeanLossError(
                f"the examples of the batch are permuted inside the model: with only example 0 changed, the inputs "
                f"of {sorted(plan.coupled[signature])[:3]} changed for other examples too, so their rows are not "
                "each one example's and the layers' rules do not apply; method='vmap' gives each example's gradient"
            )
        with recorder.installed():
            recorder.expand = plan.broadcast[signature]
            # the engine's own forward runs attention and RNN calls with their insides in view
            recorder.capture = AttentionCapture() if plan.attention and weights is None else None
            recorder.rnn_capture = RNNCapture() if plan.rnn and weights is None else None
            with recorder.capture or contextlib.nullcontext(), recorder.rnn_capture or contextlib.nullcontext():
                outputs = run(xs)
            recorder.capture = recorder.rnn_capture = None
            recorder.active = False
            traced_calls(plan, signature, recorder.calls, False)
            route = route_for(plan, modules, recorder.calls, B, gram_ok, pairs_ok=weights is None,
                              outside=plan.outside.get(signature, frozenset()))  # fmt: skip
            recorder.set_actions(route.actions, route.pairs)
            if weights is not None:
                recorder.weights = module_weights(plan, modules, route, weights)
            check_target_shape(loss_fn, outputs, ys[0] if len(ys) == 1 else ys)
            loss = loss_fn(outputs, ys[0] if len(ys) == 1 else ys)
            loss_value = check_loss_value(loss)
            if known_mean or is_known_mean_loss(loss_fn, targets):
                loss_sum = loss_value * B
            else:
                loss_sum = float(check_mean_loss(loss_fn, outputs, ys, loss).double().sum())
            del outputs
            mean = _backward(loss, params, plan, recorder, route)
        if direct and route.units:  # detached parameters and buffers for vmap
            state = frozen_state(model)
            params = {n: p.detach() for n, p in named.items()}
        return assemble(Pass(
            model, loss_fn, xs, ys, params, state, plan, modules, route, recorder, mean, loss_sum,
            variance, chunk_size, None if weights is None else {n: w.sqrt() for n, w in weights.items()},
        ))  # fmt: skip


def _backward(loss: Tensor, leaves: dict[str, Tensor], plan: Plan, recorder: Recorder, route: Route) -> dict[str, Tensor]:
    """The backward pass: the mean gradient of every differentiated parameter, while the
    recorder's hooks apply the rules.

    Gram-path weights and moments-path parameters are not differentiated; the outputs of
    their layers are, where needed (:func:`~gradnoise.engine.graph.hook_edges`), so that the
    gradient reaches those layers' hooks; their means come from the recorder.
    """
    gram, owned, owners = route.gram, route.owned, plan.owners
    wanted = [n for n in leaves if n not in gram and n not in owned]
    skip_calls = sorted((recorder.calls[m][0] for m in {*gram.values(), *owned.values()}), key=lambda c: c.seq)
    wanted_leaves = [leaves[n] for n in wanted]
    edges = hook_edges(skip_calls, wanted_leaves, {m for n in wanted for m, _ in owners[n]})
    with explaining_checkpoint():  # reentrant checkpointing: torch's error says nothing of what to do
        grads = torch.autograd.grad(loss, wanted_leaves + edges, allow_unused=True)
    del edges
    mean = {n: torch.zeros_like(leaves[n]) if g is None else g for n, g in zip(wanted, grads[: len(wanted)], strict=True)}
    for n, m in owned.items():
        local = owners[n][0][1]
        mean[n] = recorder.means[m][local] if m in recorder.means else torch.zeros_like(leaves[n])
    return mean


def module_weights(plan: Plan, modules: dict[str, nn.Module], route: Route, weights: dict[str, Tensor]):
    """The metric of each rule module's parameters by local name (ones for a frozen one,
    whose norms the rules also give and nobody reads)."""
    by_id = {id(p): weights[n] for n, p in plan.named.items()}
    out = {}
    for m in {m for n in route.paths for m, _ in plan.owners[n]}:
        module = modules[m]
        recurse = rule_for(module).owns_children
        out[m] = {
            local: by_id[id(p)] if id(p) in by_id else torch.ones_like(p)
            for local, p in module.named_parameters(recurse=recurse, remove_duplicate=False)
        }  # fmt: skip
    return out
