"""Per-parameter gradients, some held as two factors and multiplied out on first access.

The mean gradient of a Linear layer on 2-D inputs is ``ḡ = Dᵀ A``, with ``A [B, in]`` the
layer's inputs and ``D [B, out]`` the gradients of the mean loss with respect to its
outputs. When ``B (in + out) ≤ in · out`` the two factors hold fewer numbers than ``ḡ`` and
the noise statistics need only ``|ḡ|² = ⟨A Aᵀ, D Dᵀ⟩_F`` (the "ghost norm" of the mean,
Li et al. 2022 for per-example norms), so the fast engine skips the weight gradient in the
backward pass and keeps the factors; :class:`FactoredGrads` forms ``ḡ`` only if it is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["FactoredGrads", "dtype_of", "numel_of"]


class FactoredGrads(Mapping[str, Tensor]):
    """A read-only ``{name: Tensor}`` mapping whose factored entries ``Dᵀ A`` are multiplied
    out (once, then cached) when first read; iteration order is the given ``order``.

    Example:
        >>> d, a = torch.ones(3, 2), torch.ones(3, 4)
        >>> g = FactoredGrads(["w", "b"], {"b": torch.zeros(2)}, {"w": (d, a)})
        >>> g.is_factored("w"), tuple(g["w"].shape), g.is_factored("w")
        (True, (2, 4), False)
    """

    def __init__(self, order: list[str], dense: dict[str, Tensor], factors: dict[str, tuple[Tensor, Tensor]]) -> None:
        if set(order) != dense.keys() | factors.keys() or dense.keys() & factors.keys():
            raise ValueError("every name must be given exactly once, dense or factored")
        self._order, self._dense, self._factors = list(order), dict(dense), dict(factors)

    def __getitem__(self, name: str) -> Tensor:
        t = self._dense.get(name)
        if t is None:
            d, a = self._factors.pop(name)  # KeyError for unknown names, as a dict
            t = self._dense[name] = d.t() @ a
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._dense or name in self._factors

    def is_factored(self, name: str) -> bool:
        """Whether ``name`` is still held as factors (reading it multiplies them out)."""
        return name in self._factors

    def shape_of(self, name: str) -> torch.Size:
        if name in self._factors:
            d, a = self._factors[name]
            return torch.Size((d.shape[1], a.shape[1]))
        return self._dense[name].shape

    def dtype_of(self, name: str) -> torch.dtype:
        return self._factors[name][0].dtype if name in self._factors else self._dense[name].dtype

    def __repr__(self) -> str:
        parts = [f"{n!r}: {'factored' if n in self._factors else 'tensor'} {tuple(self.shape_of(n))}" for n in self._order]
        return f"FactoredGrads({{{', '.join(parts)}}})"


def numel_of(grads: Mapping[str, Tensor], name: str) -> int:
    """Number of elements of ``grads[name]`` without multiplying out a factored entry."""
    return grads.shape_of(name).numel() if isinstance(grads, FactoredGrads) else grads[name].numel()


def dtype_of(grads: Mapping[str, Tensor], name: str) -> torch.dtype:
    """dtype of ``grads[name]`` without multiplying out a factored entry."""
    return grads.dtype_of(name) if isinstance(grads, FactoredGrads) else grads[name].dtype
