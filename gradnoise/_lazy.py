"""A read-only mapping built on first access.

The fast engine and the monitor run once per training step, where every tensor operation
and every small object costs measurable time next to a forward and backward pass (on a
CPU, a few microseconds each, two to three times more right after a backward pass has
evicted the caches). Results that most callers never read — per-parameter views of a
stacked tensor, per-parameter and per-layer :class:`~gradnoise.summary.LayerStats` — are
therefore held as a :class:`LazyMap`: a ``Mapping`` like a ``dict`` in every way that
reading code can see (iteration order, ``==``, ``repr``, pickling as a plain ``dict``),
whose contents are computed once, when first read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = ["LazyMap"]

V = TypeVar("V")


class LazyMap(Mapping[str, V]):
    """``build()`` (a function returning a ``dict``) called once, on first access.

    Example:
        >>> calls = []
        >>> m = LazyMap(lambda: calls.append("built") or {"a": 1})
        >>> len(calls)
        0
        >>> m["a"], dict(m), calls
        (1, {'a': 1}, ['built'])
    """

    __slots__ = ("_build", "_data")

    def __init__(self, build: Callable[[], dict[str, V]]) -> None:
        self._build: Callable[[], dict[str, V]] | None = build
        self._data: dict[str, V] | None = None

    def _get(self) -> dict[str, V]:
        if self._data is None:
            self._data = self._build()
            self._build = None  # drop what the builder held
        return self._data

    def __getitem__(self, key: str) -> V:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, key: object) -> bool:
        return key in self._get()

    def __repr__(self) -> str:
        return repr(self._get())

    def __reduce__(self) -> tuple[Any, ...]:  # pickles (and deep-copies) as a plain dict
        return (dict, (dict(self._get()),))
