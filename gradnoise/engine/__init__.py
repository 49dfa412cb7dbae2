"""Engines that turn a model, a loss and one batch into per-example
:class:`~gradnoise._moments.Moments` in one backward pass (hooks + layer rules).

Modules, in the order data flows through them: :mod:`.hooks` (record calls, apply rules in
the backward pass), :mod:`.plan` (the model's structure and each parameter's path),
:mod:`.graph` (gradient edges to request), :mod:`.module_vmap` (rule-less modules),
:mod:`.assemble` (merge into Moments), :mod:`.fast` (the entry point).
"""

from gradnoise.engine.fast import NotMeanLossError, fast_applies, fast_moments

__all__ = ["NotMeanLossError", "fast_applies", "fast_moments"]
