"""The one data convention of the public API, normalised in one place.

* One batch is ``inputs, targets``: two arguments, each a Tensor (or a tuple of Tensors)
  with a leading batch dimension.
* Many batches, or a stated data set, is ``data``: an ``(inputs, targets)`` tuple, a list of
  such pairs, or any iterable of them such as a ``torch.utils.data.DataLoader`` (a list is
  always a list of pairs).

Every function that takes ``data`` calls :func:`as_data` first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from gradnoise._functional import as_tuple, batch_size_of

__all__ = ["Data", "Pair", "as_data", "concat", "unpacked"]

Pair = tuple[tuple[Tensor, ...], tuple[Tensor, ...]]
Data = tuple | Iterable  # (inputs, targets), a list of such pairs, or a DataLoader


def _is_pair(data) -> bool:
    """``(inputs, targets)`` itself, as opposed to a collection of pairs: a tuple of two
    whose targets are a Tensor, or whose inputs are a Tensor and targets a tuple of Tensors
    (a list is always a list of pairs)."""
    if not isinstance(data, tuple) or len(data) != 2:
        return False
    x, y = data
    return isinstance(y, Tensor) or (isinstance(x, Tensor) and isinstance(y, tuple) and all(isinstance(t, Tensor) for t in y))


def as_data(data: Data, *, name: str = "data") -> list[Pair]:
    """``data`` as a list of ``(inputs, targets)`` pairs of tuples of Tensors.

    Raises:
        TypeError: ``data`` is not a pair, a list of pairs or an iterable of pairs.
        ValueError: no batch, or a batch whose inputs and targets differ in size.
    """
    if isinstance(data, Tensor):
        raise TypeError(
            f"{name} must be an (inputs, targets) pair, a list of such pairs or a DataLoader, "
            "got a Tensor: pass (inputs, targets)"
        )
    batches = [data] if _is_pair(data) else data
    if not isinstance(batches, Iterable):
        raise TypeError(f"{name} must be an (inputs, targets) pair, a list of such pairs or a DataLoader, got {type(data).__name__}")
    out = []
    for item in batches:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(
                f"each batch of {name} must be an (inputs, targets) pair, got {type(item).__name__}"
                + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
            )
        x, y = item
        batch_size_of(x, y)
        out.append((as_tuple(x), as_tuple(y)))
    if not out:
        raise ValueError(f"{name} holds no batch: pass (inputs, targets), a list of such pairs or a DataLoader")
    return out


def concat(batches: list[Pair]) -> Pair:
    """The batches of :func:`as_data` as one ``(inputs, targets)`` pair of tuples."""
    if len(batches) == 1:
        return batches[0]
    xs = tuple(torch.cat([x[i] for x, _ in batches]) for i in range(len(batches[0][0])))
    ys = tuple(torch.cat([y[i] for _, y in batches]) for i in range(len(batches[0][1])))
    return xs, ys


def unpacked(pair: Pair) -> tuple:
    """``(inputs, targets)`` as a caller would pass one batch: single tensors unwrapped."""
    xs, ys = pair
    return (xs[0] if len(xs) == 1 else xs), (ys[0] if len(ys) == 1 else ys)
