"""Which tensors of a forward pass depend on the batch, traced from the inputs.

A layer rule needs the batch dimension on its layer's input. A size cannot tell: nanoGPT's
position embedding ``wpe(torch.arange(T))`` has a leading dimension ``T``, equal to the
batch size whenever ``T == B``, and taking it for the batch dimension gives every
"example" the gradient of one position — a wrong number with no error. :class:`BatchTrace`
follows the data instead: a ``TorchFunctionMode`` that marks the batch's tensors and every
output of an operation with a marked input. The forward pass itself is not changed (each
operation is called as it was), so tracing the user's own forward pass is safe; it costs a
little Python per operation, so callers trace once per model and input signature.

Tracing by data flow is conservative in one direction: a tensor computed from the batch is
marked even when it no longer has a batch dimension (``x[0]``, ``x.sum(0)``), so callers
also check the size of the batch dimension; a tensor that is not marked certainly does not
depend on the batch.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["BatchTrace", "unbatched_entries"]


class BatchTrace(TorchFunctionMode):
    """Marks the tensors computed from the batch while active (a ``with`` block).

    Args:
        inputs: the batch's tensors (any nesting of tuples, lists and dicts).
    """

    def __init__(self, inputs: Any) -> None:
        super().__init__()
        self._marked = WeakIdKeyDictionary()  # by identity: never keeps a tensor alive
        self.mark(inputs)

    def mark(self, obj: Any) -> None:
        for t in tree_flatten(obj)[0]:
            if isinstance(t, Tensor):
                self._marked[t] = True

    def depends(self, obj: Any) -> bool:
        """Whether any tensor in ``obj`` was computed from the batch."""
        return any(isinstance(t, Tensor) and t in self._marked for t in tree_flatten(obj)[0])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depends((args, kwargs)):
            self.mark(out)
        return out


def unbatched_entries(trace: BatchTrace, args: tuple, kwargs: dict) -> frozenset:
    """The positions (ints) and keywords (strs) of a call's tensor arguments that do not
    depend on the batch."""
    entries = [*enumerate(args), *kwargs.items()]
    return frozenset(k for k, v in entries if isinstance(v, Tensor) and not trace.depends(v))
