"""The registry of layer rules: per-example gradient quantities of one layer family from a
layer's input ``a`` and output gradient ``δ``.

``δ_i`` is the gradient of example ``i``'s own loss with respect to the layer output, i.e.
``B · ∂L/∂out_i`` for a mean-reduced batch loss ``L``. Each rule gives, per parameter, either

* ``norms(module, a, d, elementwise, scale)``: per-example squared norms ``|g_i|²``
  (``[B]``) and, if asked, ``Σ_i g_i²`` (elementwise, the parameter's shape) without
  materialising ``B × P`` numbers, for ``δ = scale · d`` (the scale is applied where it
  costs least, never as an extra pass over the output gradient); or
* ``grads``: the materialised per-example gradients ``[B, *shape]`` (used when a parameter
  receives contributions from several calls, e.g. tied weights).

Adding a layer family is one module in :mod:`gradnoise.rules` that calls :func:`register`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import Size, Tensor, nn

__all__ = ["Grads", "Norms", "RULES", "RULES_BY_NAME", "Rule", "layer_type", "register", "register_by_name", "rule_for"]

Norms = dict[str, tuple[Tensor, Tensor | None]]  # name -> (sq_norms [B], sum_sq or None)
Grads = dict[str, Tensor]  # name -> [B, *shape]


@dataclass(frozen=True)
class Rule:
    """How to get per-example quantities for one module type.

    ``whole_call``: the rule gets the call's ``(args, kwargs)`` instead of its first input
    (attention needs query, key, value and masks). ``owns_children``: the parameters of the
    module's children belong to this rule (under dotted local names), for modules that use
    a child's parameters without calling it (``MultiheadAttention.out_proj``). ``moments``
    (optional): the norms of ``norms`` and the module's mean gradient ``Σ_i g_i`` (of ``d``,
    unscaled) at about the cost of the parameters' own gradients, which the backward pass
    then skips; ``moments_pay``: whether they cost no more than ``norms`` and those gradients
    when ``Σ_i g_i²`` is not asked for (``True``, or a predicate of the module and its call's
    input and output shapes; with ``Σ_i g_i²``, or an input that needs no gradient, they do).
    ``weighted`` (optional): the norms in a diagonal metric ``P`` (``|g_i|²_P =
    Σ P ⊙ g_i²`` and ``Σ_i P ⊙ g_i²``, :mod:`gradnoise.preconditioner`), or ``None`` for a
    configuration it does not cover; :func:`~gradnoise.rules.weighted_norms` otherwise
    weights materialised per-example gradients, in chunks of examples.
    """

    accepts: Callable[[nn.Module], bool]
    norms: Callable[[nn.Module, Tensor, Tensor, bool, float], Norms]
    grads: Callable[[nn.Module, Tensor, Tensor], Grads]
    whole_call: bool = False
    owns_children: bool = False
    moments: Callable[[nn.Module, Tensor, Tensor, bool, float], tuple[Norms, Grads]] | None = None
    moments_pay: bool | Callable[[nn.Module, Size, Size], bool] = False
    weighted: Callable[[nn.Module, Tensor, Tensor, Grads, bool, float], Norms | None] | None = None


def always(module: nn.Module) -> bool:
    """``Rule.accepts`` for layer types whose every configuration a rule handles."""
    return True


RULES: dict[type[nn.Module], Rule] = {}
RULES_BY_NAME: dict[str, Rule] = {}  # "module.QualName" of classes from optional packages


def register(rule: Rule, *types: type[nn.Module]) -> Rule:
    """Register ``rule`` for these exact module types (subclasses are not matched: a subclass
    may change ``forward``). Returns the rule."""
    for t in types:
        RULES[t] = rule
    return rule


def register_by_name(rule: Rule, *qualified_names: str) -> Rule:
    """Register ``rule`` for classes named ``"package.module.ClassName"`` — of optional
    packages (``transformers``), which gradnoise then never imports. Returns the rule."""
    for name in qualified_names:
        RULES_BY_NAME[name] = rule
    return rule


def layer_type(module: nn.Module) -> type:
    """The module's own class: FSDP2's ``fully_shard`` swaps a module's class for a subclass
    ``FSDP<Name>(FSDPModule, <Name>)`` whose ``forward`` is the original's (it only adds
    hooks that gather and free the parameters), so the original class is the layer."""
    cls = type(module)
    if cls in RULES:  # the common case, once per layer call in the engine's backward pass
        return cls
    # a model that fully_shard touched has imported it (importing it here would cost ~1 s)
    fsdp = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    if fsdp is not None and issubclass(cls, fsdp):
        return next((b for b in cls.__bases__ if b is not fsdp), cls)
    return cls


def rule_for(module: nn.Module) -> Rule | None:
    """The rule for this exact module type (see :func:`layer_type`), if it has one and
    accepts this configuration."""
    cls = layer_type(module)
    rule = RULES.get(cls) or RULES_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return rule if rule is not None and rule.accepts(module) else None

