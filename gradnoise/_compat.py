"""Old spellings of the public API that keep working for one release, with a
``DeprecationWarning`` that names the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

__all__ = ["deprecated", "renamed_keywords"]

F = TypeVar("F", bound=Callable)


def deprecated(old: str, new: str, *, stacklevel: int = 3) -> None:
    """Warn that ``old`` is deprecated in favour of ``new``."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Accept each old keyword (``old=new``) as the new one, with a ``DeprecationWarning``.

    Raises:
        TypeError: both the old and the new keyword are given.
    """

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; pass {new}= only")
                    deprecated(f"{fn.__name__}({old}=...)", f"{new}=...", stacklevel=3)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap
