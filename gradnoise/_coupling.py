"""Whether a model's forward pass mixes the examples of a batch.

Example ``i``'s gradient is that of its own loss, ``loss_fn(model(x_i), y_i)``
(:mod:`gradnoise.per_sample`). A forward pass that mixes examples — centring or normalising
over the batch, in-batch attention or negatives, a batch permuted and not put back — makes
the output row of one example depend on the others. The batch loss is then not the mean of
each example's own loss, and no per-example gradient describes the step that trains: the
engine's per-layer rules would give each example a mixture of others' gradients, and
``vmap`` each example's gradient alone, through a model that no longer mixes (``x - x.mean(0)``
of a batch of one is zero). Both are wrong numbers without an error, so the engines refuse
such models, as they refuse BatchNorm in train mode (the same coupling, found by its type).

The check changes example 0 and looks at the other examples' outputs
(:func:`other_example`, :func:`mixes_examples`): one forward pass more, once per model,
mode and input signature.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from gradnoise._functional import input_signature, rng_rewinder

__all__ = ["check_examples_independent", "differ_elsewhere", "differs", "mixed_error", "mixes_examples", "other_example"]


def other_example(xs: Any, batch: int) -> Any | None:
    """The inputs with example 0 replaced by another example (the first that differs from
    it), or ``None`` if every example is the same."""
    leaves, spec = tree_flatten(xs)
    batched = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.dim() and t.shape[0] == batch]
    for k in range(1, batch):
        if any(not torch.equal(leaves[i][0], leaves[i][k]) for i in batched):
            out = list(leaves)
            for i in batched:
                out[i] = leaves[i].clone()
                out[i][0] = leaves[i][k]
            return tree_unflatten(out, spec)
    return None


def differs(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` differs from ``a``: token ids exactly, floats beyond a relative ``1e-4``
    of ``a``'s largest finite value (nondeterministic kernels reorder sums; an entry infinite
    in both, as masked logits are, is unchanged)."""
    if not a.is_floating_point():
        return not torch.equal(a, b)
    finite = a[a.isfinite()]
    scale = finite.abs().max() if finite.numel() else a.new_zeros(())
    return bool(((a - b).abs().nan_to_num(nan=0.0) > 1e-4 * scale).any())


def _moved_elsewhere(a: Tensor, b: Tensor, batch: int) -> bool:
    """Whether an output ``b`` (example 0 changed) differs from ``a`` outside example 0,
    along every dimension of the batch's size (an output may be batch-first or not)."""
    dims = [d for d in range(a.dim()) if a.shape[d] == batch]
    if not dims or a.shape != b.shape or not a.numel():
        return False  # no example rows to tell apart
    return all(differs(a.movedim(d, 0)[1:], b.movedim(d, 0)[1:]) for d in dims)


def mixes_examples(outputs: Any, moved: Any, batch: int, again: Callable[[], Any] | None = None) -> bool:
    """Whether a model's ``outputs`` and its outputs with only example 0 of the inputs
    changed (``moved``, :func:`other_example`) differ for other examples. ``again``: runs
    the forward pass on the same inputs once more, to tell mixing from a forward pass that
    does not repeat (one drawing from a generator of its own): then nothing can be told,
    and the answer is no."""
    if not differ_elsewhere(outputs, moved, batch):
        return False
    return again is None or not differ_elsewhere(outputs, again(), batch)


def differ_elsewhere(outputs: Any, moved: Any, batch: int) -> bool:
    """Whether two forward passes' outputs differ outside example 0 (:func:`_moved_elsewhere`)."""
    ta = [t for t in tree_flatten(outputs)[0] if isinstance(t, Tensor)]
    tb = [t for t in tree_flatten(moved)[0] if isinstance(t, Tensor)]
    if len(ta) != len(tb):
        return False
    return any(_moved_elsewhere(a.detach(), b.detach(), batch) for a, b in zip(ta, tb, strict=True))


def mixed_error() -> ValueError:
    """The refusal of a forward pass that mixes examples, with what to do instead."""
    return ValueError(
        "the model's forward pass mixes the examples of the batch: with only example 0 of the inputs changed, "
        "the outputs of other examples changed too (centring or normalising over the batch, in-batch attention "
        "or negatives, a permuted batch), so per-example gradients do not describe this model's step. Measure "
        "a model whose examples are independent (as with BatchNorm, put such layers in eval mode for the "
        "measurement), or use the two-batch estimate from micro-batches (gn.two_batch_stats, or the Monitor "
        "with gradient accumulation), whose gradients are well defined"
    )


_CHECKED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def check_examples_independent(model: nn.Module, forward: Callable[[Any], Any], xs: Any, batch: int) -> None:
    """Raise :func:`mixed_error` if ``forward(xs)`` (the model's forward pass on the batch
    ``xs``) mixes examples. Checked once per model, mode of its modules and input signature,
    without gradients; torch's RNG draws the same dropout masks in both passes and is left
    as it was."""
    key = (input_signature(xs), tuple(m.training for m in model.modules()))
    seen = _CHECKED.setdefault(model, {})
    if key not in seen:
        if len(seen) >= 32:
            seen.clear()
        changed = other_example(xs, batch)
        mixed = False
        if changed is not None:
            rewind = rng_rewinder()

            def run(inputs: Any) -> Any:
                rewind()
                return forward(inputs)

            try:
                with torch.no_grad():
                    mixed = mixes_examples(run(xs), run(changed), batch, lambda: run(xs))
            finally:
                rewind()
        seen[key] = mixed
    if seen[key]:
        raise mixed_error()
