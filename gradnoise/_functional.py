"""A model as a pure function of its parameters, and the rules every measurement obeys.

Conventions (see DESIGN.md §1):

* ``loss_fn(outputs, targets)`` is mean-reduced over the batch; the loss of one example is
  ``loss_fn`` on a batch of one.
* An *example* is one row of the leading batch dimension of ``inputs`` and ``targets``.
* Parameters are a ``dict[str, Tensor]`` of the trainable (``requires_grad=True``)
  parameters; tied parameters appear once, under their first name.
* Nothing changes the caller's model: parameters, buffers, ``.grad``, ``training`` flags and
  the global RNG state are as they were after every call (:func:`preserved_state`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

LossFn = Callable[[Any, Any], Tensor]
Batch = Tensor | tuple[Tensor, ...]

_MEAN_DECOMPOSABLE_LOSSES = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCEWithLogitsLoss,
    nn.BCELoss,
    nn.CrossEntropyLoss,
    nn.NLLLoss,
    nn.GaussianNLLLoss,
    nn.PoissonNLLLoss,
)


def trainable_params(model: nn.Module, *, detach: bool = True) -> dict[str, Tensor]:
    """The trainable parameters of ``model``, detached (unless ``detach=False``), by name;
    tied parameters once.

    Raises:
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if no parameter has ``requires_grad=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if is_compiled(model):
        raise TypeError(
            "model is a torch.compile'd module: gradnoise's hooks and torch.func transforms run on the eager "
            "module. Pass the original one, model._orig_mod (the same parameters; a measurement never changes them)"
        )
    params = {n: p.detach() if detach else p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            "the model has no trainable parameters (none with requires_grad=True): "
            "there is no gradient to measure"
        )
    return params


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is the wrapper ``torch.compile`` returns (``OptimizedModule``)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def frozen_state(model: nn.Module) -> dict[str, Tensor]:
    """Frozen parameters and buffers, cloned so that no forward can update the caller's."""
    state = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    state.update({n: b.clone() for n, b in model.named_buffers()})
    return state


def check_no_train_batchnorm(model: nn.Module | Iterable[tuple[str, nn.Module]]) -> None:
    """Refuse BatchNorm in train mode: it couples the examples of a batch. Takes the model or
    its ``named_modules()``.

    Raises:
        ValueError: naming the module and the fixes.
    """
    named = model.named_modules() if isinstance(model, nn.Module) else model
    for name, module in named:
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise ValueError(
                f"BatchNorm module {name or type(module).__name__!r} is in train mode: it "
                "normalises with batch statistics, so one example's gradient depends on the "
                "others and per-example gradients are not defined. Fixes: call "
                "model.eval() (or module.eval()) to use running statistics during the "
                "measurement, or replace BatchNorm by GroupNorm/LayerNorm."
            )


def check_vmappable(model: nn.Module) -> None:
    """Refuse modules that update buffers in place in train mode, which vmap cannot batch.

    Raises:
        ValueError: naming the module and the fix.
    """
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.modules.instancenorm._InstanceNorm)
            and module.training
            and module.track_running_stats
        ):
            raise ValueError(
                f"InstanceNorm module {name!r} updates running statistics in place in train "
                "mode, which torch.func.vmap cannot batch: call module.eval() for the "
                "measurement, or use gradient_stats(..., method='fast')"
            )


def as_tuple(inputs: Batch) -> tuple[Tensor, ...]:
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(t, Tensor) for t in inputs):
        return tuple(inputs)
    raise TypeError(
        "inputs must be a Tensor or a non-empty tuple of Tensors with a leading batch "
        f"dimension, got {type(inputs).__name__}"
    )


def batch_size_of(inputs: Batch, targets: Batch, *, min_size: int = 1) -> int:
    """Check that inputs and targets share a leading batch dimension and return it.

    Raises:
        TypeError: for non-tensor inputs or targets.
        ValueError: for 0-d tensors, different batch sizes, or fewer than ``min_size`` examples.
    """
    tensors = as_tuple(inputs) + as_tuple(targets)
    for t in tensors:
        if t.dim() == 0:
            raise ValueError(
                "inputs and targets need a leading batch dimension; got a 0-d tensor "
                "(use t.unsqueeze(0) for a batch of one)"
            )
    sizes = {t.shape[0] for t in tensors}
    if len(sizes) > 1:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(
            f"inputs and targets have different batch sizes (leading dimensions {shapes}): "
            "every tensor must hold one row per example"
        )
    (size,) = sizes
    if size == 0:
        raise ValueError("empty batch: inputs and targets have 0 examples")
    if size < min_size:
        raise ValueError(
            f"batch of {size} example{'s' if size > 1 else ''}: a variance needs at least "
            f"{min_size}; pass a larger batch"
        )
    return size


def check_device(model_params: dict[str, Tensor], inputs: Batch, targets: Batch) -> None:
    """Inputs and targets on the model's device. (Their dtype is the model's business: a
    model may cast its inputs; one that does not fails in its own forward, naming both.)

    Raises:
        ValueError: naming both devices and the fix.
    """
    device = next(iter(model_params.values())).device
    for t in as_tuple(inputs) + as_tuple(targets):
        if t.device != device:
            raise ValueError(
                f"the model is on {device} but an input or target is on {t.device}: "
                f"move them with .to({str(device)!r})"
            )


def check_loss_value(loss: Tensor) -> float:
    """A mean-reduced loss is a finite scalar; returns its value.

    Raises:
        ValueError: if the loss is not a scalar tensor.
        FloatingPointError: if it is NaN or infinite.
    """
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar (mean over the batch), got {shape}; use a "
            "mean-reduced loss such as nn.CrossEntropyLoss() (reduction='mean')"
        )
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(
            f"the loss is {value}: check the inputs, the learning rate and the model "
            "for overflow before measuring gradients"
        )
    return value


_ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)


def check_target_shape(loss_fn: LossFn, outputs: Any, targets: Any) -> None:
    """Refuse a target that broadcasts against the output of an elementwise loss: the batch
    loss then couples every output with every target (``[B, 1]`` against ``[B]`` is a
    ``[B, B]`` loss), which is not a mean of per-example losses.

    Raises:
        ValueError: naming both shapes and the fix.
    """
    if isinstance(loss_fn, _ELEMENTWISE_LOSSES) and isinstance(outputs, Tensor) and isinstance(targets, Tensor):
        if outputs.shape != targets.shape:
            raise ValueError(
                f"{type(loss_fn).__name__}: the targets' shape {tuple(targets.shape)} differs from the "
                f"outputs' {tuple(outputs.shape)} and would broadcast, so the loss is not a mean of "
                "per-example losses; give the targets the outputs' shape (e.g. y.view_as(outputs) or "
                "y.unsqueeze(1))"
            )


def check_loss_fn(loss_fn: LossFn) -> None:
    """Refuse loss functions that are not mean-reduced, instead of silently rescaling."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    reduction = getattr(loss_fn, "reduction", "mean")
    if reduction not in ("mean", "batchmean"):
        raise ValueError(
            f"loss_fn has reduction={reduction!r}; gradnoise expects a loss averaged over the "
            "batch (reduction='mean'), so that one example's loss is loss_fn on a batch of one"
        )


def check_finite_grads(grads: dict[str, Tensor]) -> None:
    """Raises FloatingPointError naming the first parameter with a NaN/inf gradient."""
    for name, g in grads.items():
        if not torch.isfinite(g).all():
            raise FloatingPointError(
                f"gradient of parameter {name!r} contains NaN or inf: the loss or the model "
                "overflows on this batch"
            )


def has_ignored_targets(targets: Tensor, ignore_index: int) -> bool:
    """Whether class-index ``targets`` contain ``ignore_index`` (the mean then runs over the
    other rows only). Class indices are ≥ 0, so a negative ``ignore_index`` (the default,
    -100) needs a look only when the smallest target is negative: one reduction, not two."""
    if targets.is_floating_point():
        return False
    if ignore_index < 0 and targets.min().item() >= 0:
        return False
    return bool((targets == ignore_index).any())


def is_known_mean_loss(loss_fn: LossFn, targets: Batch) -> bool:
    """True if ``loss_fn`` is known to equal the mean of its per-example losses on ``targets``.

    Class-weighted and ``ignore_index`` reductions average with weights that depend on the
    whole batch, so they are not a plain mean of per-example losses.
    """
    if getattr(type(loss_fn), "mean_of_examples", False) is True:  # gradnoise.tasks.TokenLoss
        return not has_ignored_targets(as_tuple(targets)[0], loss_fn.ignore_index)
    if not isinstance(loss_fn, _MEAN_DECOMPOSABLE_LOSSES):
        return False
    if getattr(loss_fn, "reduction", "mean") != "mean":
        return False
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if loss_fn.weight is not None:
            return False
        if has_ignored_targets(as_tuple(targets)[0], loss_fn.ignore_index):
            return False
    if isinstance(loss_fn, (nn.BCELoss, nn.BCEWithLogitsLoss)) and loss_fn.weight is not None:
        return False
    return True


_measuring = threading.local()


def is_measuring() -> bool:
    """True while a gradnoise measurement runs the model (a training monitor's hooks must
    not count those forward passes as the user's)."""
    return getattr(_measuring, "depth", 0) > 0


@contextlib.contextmanager
def preserved_state(model: nn.Module, modules: Iterable[nn.Module] | None = None) -> Iterator[None]:
    """Restore torch's global RNG state (CPU and CUDA) and all ``training`` flags on exit
    (of ``model.modules()``, or of ``modules`` when the caller has them already); marks the
    block as a measurement (:func:`is_measuring`)."""
    rewind = rng_rewinder()
    modes = [(m, m.training) for m in (model.modules() if modules is None else modules)]
    _measuring.depth = getattr(_measuring, "depth", 0) + 1
    try:
        yield
    finally:
        _measuring.depth -= 1
        rewind()
        for m, mode in modes:
            if m.training is not mode:  # nn.Module.__setattr__ costs µs per module
                m.training = mode


def input_signature(inputs: Any) -> tuple:
    """What a trace depends on: the shapes and dtypes of the inputs' tensors (the types of
    anything else), in order."""
    return tuple((t.shape, t.dtype) if isinstance(t, Tensor) else type(t) for t in tree_flatten(inputs)[0])


def rng_rewinder() -> Callable[[], None]:
    """A function that sets torch's global RNG (CPU and, where initialised, CUDA) back to
    its state now: for extra forward passes that must draw what the caller's draws."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def rewind() -> None:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)

    return rewind


def sdpa_math():
    """Scaled dot-product attention through its math backend. The fused CPU kernels have
    no vmap batching rule (vmap falls back to a loop over examples) and no second or
    forward-mode derivative; the math backend is made of ordinary, batchable ops."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


@contextlib.contextmanager
def explaining_checkpoint() -> Iterator[None]:
    """torch's errors for reentrant activation checkpointing (``autograd.grad`` refuses it;
    ``torch.func`` cannot transform its ``autograd.Function``, which has no
    ``setup_context``) turned into one that says what to do."""
    try:
        yield
    except RuntimeError as exc:
        if "use_reentrant" in str(exc) or ("setup_context" in str(exc) and _raised_in_checkpoint(exc)):
            raise ValueError(
                "the model uses reentrant activation checkpointing (torch.utils.checkpoint with use_reentrant=True, "
                "the default of older Hugging Face gradient_checkpointing_enable()), which torch can differentiate "
                "neither with autograd.grad nor under vmap: pass use_reentrant=False (Hugging Face: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), or "
                "turn checkpointing off for the measurement; the Monitor's hooks measure it as it is"
            ) from exc
        raise


def _raised_in_checkpoint(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.replace("\\", "/").endswith("torch/utils/checkpoint.py"):
            return True
        tb = tb.tb_next
    return False


def unsqueeze_all(batch: Sequence[Tensor]) -> tuple[Tensor, ...]:
    return tuple(t.unsqueeze(0) for t in batch)


def mean_gradient(model: nn.Module, loss_fn: LossFn, batches) -> dict[str, Tensor]:
    """Gradient of the mean loss over ``batches`` (pairs of tuples), weighted by batch size.

    Uses ``torch.autograd.grad`` on detached parameters: the caller's ``.grad`` is untouched.
    """
    from torch.func import functional_call

    params = trainable_params(model)
    state = frozen_state(model)
    total = sum(x[0].shape[0] for x, _ in batches)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    with preserved_state(model), torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        for xs, ys in batches:
            loss = loss_fn(functional_call(model, {**leaves, **state}, xs), ys[0] if len(ys) == 1 else ys)
            check_loss_value(loss)
            gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            w = xs[0].shape[0] / total
            for (n, _), g in zip(leaves.items(), gs, strict=True):
                if g is not None:
                    out[n] += w * g
    return out
