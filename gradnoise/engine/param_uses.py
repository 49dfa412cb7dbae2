"""Parameters used outside the calls of the layers that own them.

A layer's rule (and the monitor's hook) sees the gradient that reaches the layer's output,
so it gives each example the part of its gradient that flows through the layer's own call.
A weight also used by an operation outside that call — an output embedding tied by hand,
``logits = h @ self.wte.weight.T``, or ``F.linear(h, self.fc.weight)`` in a parent's
``forward`` — gets more gradient than the rule sees, and its statistics would be wrong with
no error (``wte.weight``'s tr Σ 0.18 for 0.60 in such a model). :class:`ParamUses` watches
one forward pass (a ``TorchFunctionMode``, with hooks that track which owners are running)
and names every parameter that an operation takes while none of its owners is in a call;
the engine then measures those by ``vmap`` of a module that contains every use.
"""

from __future__ import annotations

import contextlib
import functools
from collections import Counter
from collections.abc import Iterator

from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["ParamUses"]


class ParamUses(TorchFunctionMode):
    """While active (with :meth:`watching`), collects in :attr:`outside` the names of the
    parameters that an operation took outside every call of their owners.

    Args:
        model: the model whose forward pass runs.
        owners: parameter name → ``[(owning module name, local name)]`` (the engine's plan).
    """

    def __init__(self, model: nn.Module, owners: dict[str, list[tuple[str, str]]]) -> None:
        super().__init__()
        self.model, self.owners = model, {n: {m for m, _ in os} for n, os in owners.items()}
        self._owned: dict[str, list[tuple[str, str]]] = {}  # owner → [(local name, name)]
        for n, os in owners.items():
            for m, local in os:
                self._owned.setdefault(m, []).append((local, n))
        self.running: Counter[str] = Counter()
        self.outside: set[str] = set()
        self._by_id: dict[int, str] = {}

    @contextlib.contextmanager
    def watching(self) -> Iterator[ParamUses]:
        """Hooks on the owners (which are running) and the model (which tensors are its
        parameters in this pass: ``functional_call`` swaps them in), and the mode."""
        modules = dict(self.model.named_modules())
        handles = [self.model.register_forward_pre_hook(lambda m, args: self._learn_ids())]
        for name in {m for ms in self.owners.values() for m in ms}:
            enter = lambda m, args, name=name: self._enter(name, m)  # noqa: E731
            leave = lambda m, args, out, name=name: self.running.subtract([name])  # noqa: E731
            handles.append(modules[name].register_forward_pre_hook(enter))
            handles.append(modules[name].register_forward_hook(leave, always_call=True))
        try:
            with self:
                yield self
        finally:
            for h in handles:
                h.remove()

    def _enter(self, name: str, module: nn.Module) -> None:
        # FSDP2 gathers a unit's weights in its own pre-hook, which runs before this one:
        # the tensors its operations (and any later use outside) take exist from here on
        self.running.update([name])
        for local, n in self._owned[name]:  # a plain tensor where functional_call swapped one in
            self._by_id.setdefault(id(functools.reduce(getattr, local.split("."), module)), n)

    def _learn_ids(self) -> None:
        # the trainable parameters by the names the plan knows (a tied one: its first name)
        self._by_id = {}
        for n, p in self.model.named_parameters():
            if n in self.owners:
                self._by_id.setdefault(id(p), n)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an operation that computes with a parameter returns a tensor; reading its shape,
        # dtype or device (``self.dtype`` of a Hugging Face model) does not
        if self._by_id and any(isinstance(t, Tensor) for t in tree_flatten(out)[0]):
            for t in tree_flatten((args, kwargs))[0]:
                name = self._by_id.get(id(t)) if isinstance(t, Tensor) else None
                if name is not None and not any(self.running[m] > 0 for m in self.owners[name]):
                    self.outside.add(name)
        return out
