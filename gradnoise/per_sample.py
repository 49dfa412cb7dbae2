"""Per-example gradients: ``torch.func`` (vmap of grad) and a reference Python loop.

The gradient of example ``i`` is the gradient of ``loss_fn(model(x_i), y_i)`` evaluated on a
batch of one. Under ``vmap`` each example gets its own dropout mask
(``randomness="different"``); BatchNorm in train mode, and any forward pass that mixes
examples (:mod:`gradnoise._coupling`), is refused: each example's gradient alone would not
describe the model's step. The caller's model, ``.grad`` and RNG state are left as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from gradnoise._coupling import check_examples_independent
from gradnoise._functional import (
    Batch,
    LossFn,
    as_tuple,
    batch_size_of,
    check_device,
    check_finite_grads,
    check_loss_fn,
    check_loss_value,
    check_no_train_batchnorm,
    check_target_shape,
    check_vmappable,
    explaining_checkpoint,
    frozen_state,
    preserved_state,
    sdpa_math,
    trainable_params,
    unsqueeze_all,
)
from gradnoise._moments import Moments, moments_from_grads

__all__ = ["per_sample_grads", "per_sample_grads_loop"]


def _validate(model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch, chunk_size):
    params = trainable_params(model)
    check_loss_fn(loss_fn)
    batch_size_of(inputs, targets)
    check_device(params, inputs, targets)
    check_no_train_batchnorm(model)
    if not needs_loop(model):
        check_vmappable(model)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return params


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Batch,
    targets: Batch,
    *,
    chunk_size: int | None = None,
) -> dict[str, Tensor]:
    """Gradients of each example's loss, one row per example.

    Uses ``torch.func``: ``vmap(grad(loss of one example))`` over ``functional_call`` of the
    model with detached parameters, so the caller's ``.grad`` is never written. Models that
    contain ``nn.RNNBase`` modules (LSTM, GRU, RNN) are computed by a loop over examples
    instead, because ``vmap`` cannot batch torch's fused RNN kernels.

    Args:
        model: any ``nn.Module``; evaluated in its current mode (dropout active in train
            mode, with an independent mask per example).
        loss_fn: ``loss_fn(outputs, targets)``, mean-reduced over the batch.
        inputs: a Tensor or a tuple of Tensors, each with a leading batch dimension.
        targets: a Tensor (or tuple of Tensors) with the same leading batch dimension.
        chunk_size: examples per vmap chunk; bounds the memory of intermediate values
            (the result still holds ``B × P`` numbers). ``None`` processes all at once.

    Returns:
        ``{name: Tensor[B, *param.shape]}`` for each trainable parameter (tied ones once),
        on the model's device and in the parameters' dtype.

    Raises:
        ValueError: empty or mismatched batch, non-scalar or non-mean loss, BatchNorm in
            train mode or another forward pass that mixes examples, no trainable
            parameters, device mismatch.
        FloatingPointError: NaN or inf in the loss or the gradients.

    Example:
        >>> import torch, gradnoise as gn
        >>> model = torch.nn.Linear(3, 2)
        >>> g = gn.per_sample_grads(model, torch.nn.MSELoss(), torch.randn(5, 3), torch.randn(5, 2))
        >>> g["weight"].shape
        torch.Size([5, 2, 3])
    """
    params = _validate(model, loss_fn, inputs, targets, chunk_size)
    state = frozen_state(model)
    xs, ys = as_tuple(inputs), as_tuple(targets)
    with preserved_state(model):
        check_first_example(model, loss_fn, params, state, xs, ys)
        grads, _ = vmap_grads_and_losses(model, loss_fn, params, state, xs, ys, chunk_size)
    check_finite_grads(grads)
    return grads


def check_first_example(model, loss_fn, params, state, xs, ys) -> None:
    """Evaluate example 0 plainly so that a bad loss gets a clear error before vmap runs, and
    refuse a model whose forward pass mixes examples (:mod:`gradnoise._coupling`)."""
    run = lambda inputs: functional_call(model, {**params, **state}, inputs)  # noqa: E731
    check_examples_independent(model, run, xs, xs[0].shape[0])
    with torch.no_grad():
        out = functional_call(model, {**params, **state}, tuple(t[:1] for t in xs))
        y1 = ys[0][:1] if len(ys) == 1 else tuple(t[:1] for t in ys)
        check_target_shape(loss_fn, out, y1)
        check_loss_value(loss_fn(out, y1))


def vmap_grads_and_losses(
    model: nn.Module,
    loss_fn: LossFn,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    xs: tuple[Tensor, ...],
    ys: tuple[Tensor, ...],
    chunk_size: int | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients and losses by ``vmap(grad_and_value(...))``; no checks, no RNG restore.

    Models containing RNN modules use :func:`loop_grads_and_losses` instead (see
    :func:`needs_loop`).
    """
    if needs_loop(model):
        return loop_grads_and_losses(model, loss_fn, params, state, xs, ys)
    n_x = len(xs)

    def example_loss(p: dict[str, Tensor], *example: Tensor) -> Tensor:
        x, y = unsqueeze_all(example[:n_x]), unsqueeze_all(example[n_x:])
        out = functional_call(model, {**p, **state}, x)
        return loss_fn(out, y[0] if len(y) == 1 else y)

    fn = vmap(
        grad_and_value(example_loss),
        in_dims=(None,) + (0,) * (len(xs) + len(ys)),
        randomness="different",
        chunk_size=chunk_size,
    )
    with sdpa_math(), explaining_checkpoint():  # batchable attention (the fused kernel has no vmap rule)
        return fn(params, *xs, *ys)


def per_sample_grads_loop(
    model: nn.Module, loss_fn: LossFn, inputs: Batch, targets: Batch
) -> dict[str, Tensor]:
    """Reference implementation: a Python loop of ``torch.autograd.grad``, one example at a time.

    Slow and simple; the ground truth the fast paths are tested against (in float64).
    Dropout masks come from the global RNG in example order, which is restored afterwards.
    """
    params = _validate(model, loss_fn, inputs, targets, None)
    state = frozen_state(model)
    with preserved_state(model):
        grads, _ = loop_grads_and_losses(model, loss_fn, params, state, as_tuple(inputs), as_tuple(targets))
    check_finite_grads(grads)
    return grads


def loop_grads_and_losses(
    model: nn.Module,
    loss_fn: LossFn,
    params: dict[str, Tensor],
    state: dict[str, Tensor],
    xs: tuple[Tensor, ...],
    ys: tuple[Tensor, ...],
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients and losses by a loop of ``torch.autograd.grad`` (no checks)."""
    leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    rows: dict[str, list[Tensor]] = {n: [] for n in params}
    losses = []
    with torch.enable_grad():
        for i in range(xs[0].shape[0]):
            x = tuple(t[i : i + 1] for t in xs)
            y = tuple(t[i : i + 1] for t in ys)
            out = functional_call(model, {**leaves, **state}, x)
            loss = loss_fn(out, y[0] if len(y) == 1 else y)
            check_loss_value(loss)
            # none of these parameters reaches the loss (all unused): their gradients are zero
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True) if loss.requires_grad else [None] * len(leaves)
            for (n, p), g in zip(leaves.items(), gs, strict=True):
                rows[n].append(torch.zeros_like(p) if g is None else g)
            losses.append(loss.detach())
    return {n: torch.stack(r) for n, r in rows.items()}, torch.stack(losses)


def needs_loop(module: nn.Module) -> bool:
    """torch.func.vmap cannot batch torch's fused RNN kernels (they allocate unbatched state)."""
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


def vmap_moments(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Batch,
    targets: Batch,
    *,
    variance: bool = True,
    chunk_size: int | None = None,
    weights: dict[str, Tensor] | None = None,
) -> Moments:
    """:class:`~gradnoise._moments.Moments` from materialised per-example gradients.

    With ``chunk_size``, the batch is processed ``chunk_size`` examples at a time and the
    chunks are merged exactly, so memory is bounded by ``chunk_size × P``. With ``weights``
    (a diagonal metric ``P``), the moments of ``√P ⊙ g_i``.
    """
    sqrt_w = None if weights is None else {n: w.sqrt() for n, w in weights.items()}
    params = _validate(model, loss_fn, inputs, targets, chunk_size)
    state = frozen_state(model)
    xs, ys = as_tuple(inputs), as_tuple(targets)
    size = xs[0].shape[0]
    step = chunk_size or size
    total = None
    with preserved_state(model):
        check_first_example(model, loss_fn, params, state, xs, ys)
        for start in range(0, size, step):
            cx = tuple(t[start : start + step] for t in xs)
            cy = tuple(t[start : start + step] for t in ys)
            grads, losses = vmap_grads_and_losses(model, loss_fn, params, state, cx, cy)
            check_finite_grads(grads)
            if sqrt_w is not None:
                grads = {n: g * sqrt_w[n] for n, g in grads.items()}
            m = moments_from_grads(grads, losses, "vmap", variance)
            total = m if total is None else total.merge(m)
    return total
