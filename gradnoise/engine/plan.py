"""What the fast engine knows of a model's structure (:class:`Plan`, computed once per model
and checked on every call), and how each parameter of one forward pass is routed
(:class:`Route`, decided after the forward pass from the recorded calls).

Paths of a parameter (visible in ``GradientStats.per_param[name].method``):

* ``"fast"``: its module has a rule and is called once;
* ``"fast-tied"``: several calls or modules share it; per-example gradients are
  materialised per call and summed — except for a weight tied between an ``nn.Embedding``
  and an ``nn.Linear`` head (``pairs``), whose norms come from the two rules and a cross
  term (:mod:`gradnoise.rules.tied`);
* a *unit* module for ``vmap`` (``"vmap-module"``, :mod:`gradnoise.engine.module_vmap`): no
  rule; the smallest called module that owns it; ``""`` (the model itself) means whole-model
  ``vmap`` for these parameters only.

Within ``"fast"``, two layer kinds skip their parameters' gradients in the backward pass:
Linear layers on 2-D inputs where the Gram form is cheaper (``gram``), and layers whose
rule has ``moments`` (``owned``).
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from gradnoise._functional import trainable_params
from gradnoise.engine.hooks import ModuleCall, batch_dim
from gradnoise.engine.rnn import unrollable
from gradnoise.rules import prefers_gram, rule_for
from gradnoise.rules.tied import tied_pair

__all__ = ["Plan", "Route", "ancestors", "on_batch", "param_owners", "plan_for", "route_for",
           "traced_calls"]  # fmt: skip


def param_owners(model: nn.Module, params: dict[str, Tensor]):
    """Map each trainable parameter to its owning (module name, local name) pairs."""
    owners: dict[int, list[tuple[str, str]]] = {}
    absorbed: list[str] = []  # modules whose children's parameters belong to their rule
    for mname, module in model.named_modules():
        if any(mname.startswith(a + ".") for a in absorbed):
            continue
        rule = rule_for(module)
        recurse = rule is not None and rule.owns_children
        if recurse:
            absorbed.append(mname)
        for pname, p in module.named_parameters(recurse=recurse, remove_duplicate=False):
            owners.setdefault(id(p), []).append((mname, pname))
    by_name = dict(model.named_parameters())
    return {n: owners[id(by_name[n])] for n in params}


def common_prefix(names: list[str]) -> str:
    parts = [n.split(".") if n else [] for n in names]
    common = []
    for level in zip(*parts, strict=False):  # stops at the shortest name
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common)


def ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:k]) for k in range(len(parts), -1, -1)]


class Plan:
    """What :func:`fast_moments` needs to know about a model's structure, computed once and
    checked on every call (:meth:`valid`) against a snapshot of the model: the identities of
    every module's children, parameters and buffers, and which parameters require grad. A
    changed model (a module or parameter replaced, added or removed, a parameter frozen or
    unfrozen) is planned again.

    The plan refers to modules through weak references, and otherwise holds only their
    registries of children, parameters and buffers (which never refer back to a parent), so
    the cache, keyed weakly on the model, never keeps a model alive.
    """

    __slots__ = ("_refs", "_registries", "_ids", "_params", "_flags", "named", "owners", "recorded",
                 "batchnorms", "attention", "rnn", "direct", "routes", "unbatched", "broadcast", "coupled", "mixed",
                 "outside")  # fmt: skip

    def __init__(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        self._refs = {name: weakref.ref(m) for name, m in modules.items()}
        self._registries = [d for m in modules.values() for d in (m._modules, m._parameters, m._buffers)]
        self._ids = self._current_ids()
        self._params = [p for m in modules.values() for p in m._parameters.values() if p is not None]
        self._flags = [p.requires_grad for p in self._params]
        self.named = trainable_params(model, detach=False)  # raises if there are none
        self.owners = param_owners(model, self.named)
        ruled = {m for os in self.owners.values() for m, _ in os if rule_for(modules[m]) is not None}
        # Record rule modules, and every module containing a rule-less owner (candidate units).
        recorded = set(ruled)
        for os in self.owners.values():
            for m, _ in os:
                if m not in ruled:
                    recorded.update(ancestors(m))
        self.recorded = [m for m in modules if m in recorded]
        self.batchnorms = [n for n, m in modules.items() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        # recorded attention layers: the engine's forward runs their calls (engine.attention_capture)
        self.attention = any(isinstance(modules[m], nn.MultiheadAttention) for m in self.recorded)
        self.rnn = any(unrollable(modules[m]) for m in self.recorded)  # likewise (engine.rnn_capture)
        # Whether the forward pass may run the caller's model as it is (faster than
        # ``functional_call``): no buffers that a forward could update, and not a DDP wrapper
        # (whose forward and backward synchronise processes). Parameter hooks: per call.
        self.direct = not isinstance(model, nn.parallel.DistributedDataParallel) and not any(
            b is not None for m in modules.values() for b in m._buffers.values()
        )
        self.routes: dict = {}  # by call signature (route_for)
        self.unbatched: dict = {}  # by input signature: module → per call, what is off the batch
        self.broadcast: dict = {}  # by input signature: layers expanded over the batch (engine.broadcast)
        self.coupled: dict = {}  # by input signature: layers whose rows are not each one example's (engine.broadcast)
        self.mixed: dict = {}  # by input signature: whether the outputs mix examples (gradnoise._coupling)
        self.outside: dict = {}  # by input signature: parameters used outside their layers' calls (engine.param_uses)

    def _current_ids(self) -> list[int]:  # ids: == on tensors would compare values
        return [id(v) for d in self._registries for v in d.values()]

    def modules(self) -> dict[str, nn.Module]:
        return {name: ref() for name, ref in self._refs.items()}

    def valid(self) -> bool:
        return self._current_ids() == self._ids and [p.requires_grad for p in self._params] == self._flags


_PLANS: weakref.WeakKeyDictionary[nn.Module, Plan] = weakref.WeakKeyDictionary()


def plan_for(model: nn.Module) -> Plan:
    """The model's :class:`Plan`, from the cache when still valid."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    plan = _PLANS.get(model)
    if plan is None or not plan.valid():
        plan = _PLANS[model] = Plan(model)
    return plan


MAX_ROUTES = 32  # routes cached per model (batch sizes × input shapes); cleared beyond


def traced_calls(plan: Plan, sig: tuple, calls: dict[str, list[ModuleCall]], traced: bool) -> None:
    """After the forward pass of inputs of signature ``sig``: remember what a traced pass
    found off the batch, or give the calls of an untraced one what the traced pass of the
    same signature found. A call the traced pass did not see (control flow that depends on
    values) stays unknown and the signature is traced again next time."""
    if traced:
        if len(plan.unbatched) >= MAX_ROUTES:
            plan.unbatched.clear()
            plan.broadcast.clear()
            plan.coupled.clear()
            plan.mixed.clear()
            plan.outside.clear()
        plan.unbatched[sig] = {m: [c.unbatched for c in cs] for m, cs in calls.items()}
        return
    known = plan.unbatched[sig]
    for m, cs in calls.items():
        flags = known.get(m, [])
        for i, c in enumerate(cs):
            c.unbatched = flags[i] if i < len(flags) else None
        if len(cs) > len(flags):
            del plan.unbatched[sig]
            plan.broadcast.pop(sig, None)
            plan.coupled.pop(sig, None)
            plan.mixed.pop(sig, None)
            plan.outside.pop(sig, None)
            break


def on_batch(call: ModuleCall) -> bool:
    """Whether the call's first argument was traced to the batch."""
    return call.unbatched is not None and 0 not in call.unbatched


@dataclass(frozen=True)
class Route:
    """How the parameters of one forward pass are computed (see the module docstring).

    Attributes:
        paths: parameter → ``"fast"`` or ``"fast-tied"`` (parameters with a rule).
        units: unit module → its rule-less parameters (``""``: whole-model ``vmap``).
        gram: Gram-path weight → its Linear module.
        owned: moments-path parameter → its module.
        actions: module → what its output hook does (:class:`~gradnoise.engine.hooks.Recorder`).
        pairs: tied weight → its (embedding, head) modules, measured without per-example
            gradients (:mod:`gradnoise.rules.tied`).
    """

    paths: dict[str, str]
    units: dict[str, list[str]]
    gram: dict[str, str]
    owned: dict[str, str]
    actions: dict[str, set[str]]
    pairs: dict[str, tuple[str, str]]


def route_for(plan: Plan, modules: dict[str, nn.Module], calls: dict[str, list[ModuleCall]], B: int,
              gram_ok: bool, pairs_ok: bool = False, outside: frozenset[str] = frozenset()) -> Route:  # fmt: skip
    """The :class:`Route` of this forward pass, cached on the plan by what it depends on: the
    batch size, and per recorded call its input and output shapes and whether its output was
    kept and may carry the gradient (which the recorder decides from Σ_i g_i² and whether
    the input needs a gradient): routing costs a few percent of a small model's step."""
    sig = (B, gram_ok, pairs_ok, outside, tuple(
        (name, tuple((c.args[0].shape if c.args and isinstance(c.args[0], Tensor) else None, c.shapes[0],
                      gram_ready(c), c.unbatched, c.projections is not None) for c in cs))
        for name, cs in calls.items()
    ))  # fmt: skip
    route = plan.routes.get(sig)
    if route is None:
        owners = plan.owners
        paths, units = decide(owners, modules, calls, B, outside)
        gram = gram_modules(owners, modules, calls, paths, B) if gram_ok else {}
        owned = moments_params(owners, modules, calls, paths, set(gram.values()))
        pairs = tied_pairs(owners, modules, calls, paths) if pairs_ok else {}
        route = Route(paths, units, gram, owned, actions_of(owners, paths, units, gram, owned, pairs), pairs)
        if len(plan.routes) >= MAX_ROUTES:
            plan.routes.clear()
        plan.routes[sig] = route
    return route


def decide(owners, modules, calls, B: int, outside: frozenset[str] = frozenset()):
    """Each parameter's path ("fast", "fast-tied" or a unit module for vmap), after forward;
    ``outside``: parameters also used outside their layers' calls, which no rule sees whole."""

    @functools.cache
    def batched(mname: str) -> bool:  # a rule needs the batch dimension on input and output
        bd = batch_dim(modules[mname])
        return all(
            on_batch(c) and c.args and isinstance(c.args[0], Tensor) and c.args[0].dim() > bd and c.args[0].shape[bd] == B
            and c.shapes[0] is not None and len(c.shapes[0]) > bd and c.shapes[0][bd] == B
            for c in calls[mname]
        )  # fmt: skip

    def captured(mname: str) -> bool:  # an RNN the engine's forward ran with its gates in view
        cs = calls[mname]
        return isinstance(modules[mname], nn.RNNBase) and len(cs) == 1 and cs[0].projections is not None

    paths: dict[str, str] = {}
    units: dict[str, list[str]] = {}
    for name, os in owners.items():
        ruled = name not in outside and all(m in calls and (rule_for(modules[m]) or captured(m)) and batched(m) for m, _ in os)
        n_calls = sum(len(calls.get(m, [])) for m, _ in os)
        if ruled and n_calls == 1:
            paths[name] = "fast"
        elif ruled and n_calls > 1:
            paths[name] = "fast-tied"
        else:
            prefix = common_prefix([m for m, _ in os])
            unit = next((a for a in ancestors(prefix) if calls.get(a) and all(map(on_batch, calls[a]))), "")
            units.setdefault(unit, []).append(name)
    return paths, units


def gram_ready(call: ModuleCall) -> bool:
    """A call whose output's gradient edge was kept (its output is differentiable), so that the
    gradient can reach its hook when its parameters are not differentiated."""
    return call.output is not None


def gram_modules(owners, modules, calls, paths: dict[str, str], B: int) -> dict[str, str]:
    """Weights (name → module) whose Linear layer takes the Gram path: called once on 2-D
    input, all its parameters on the plain fast path, and :func:`prefers_gram`."""
    out = {}
    for name, path in paths.items():
        (m, local), *rest = owners[name]
        module = modules[m]
        if path != "fast" or rest or local != "weight" or type(module) is not nn.Linear:
            continue
        call = calls[m][0]
        if not gram_ready(call) or call.args[0].dim() != 2:
            continue
        prefix = f"{m}." if m else ""
        if module.bias is not None and paths.get(prefix + "bias") != "fast":
            continue
        if prefers_gram(B, module.in_features, module.out_features):
            out[name] = m
    return out


def moments_ready(module: nn.Module, call: ModuleCall) -> bool:
    """Whether a layer takes the moments path: its rule has ``moments`` and its output may
    carry the gradient (:func:`gram_ready`) — the recorder keeps it only where skipping
    the parameters' gradients saves work (see ``Recorder.keep_output``)."""
    if isinstance(module, nn.RNNBase):
        # a captured LSTM: its gates' gradient gives the products (engine.rnn.layer_moments); a
        # GRU's or RNN's recurrent parts are gradients of the weights' own nodes, which the
        # backward pass would then skip at the first step
        return isinstance(module, nn.LSTM) and call.inner is not None
    if isinstance(module, nn.MultiheadAttention):  # captured: its projections' hooks give them
        return call.inner is not None
    return getattr(rule_for(module), "moments", None) is not None and gram_ready(call)


def moments_params(owners, modules, calls, paths: dict[str, str], taken: set[str]) -> dict[str, str]:
    """Parameters (name → module) on the moments path: every trainable parameter of a layer
    that is called once, owns them alone on the plain fast path, and :func:`moments_ready`."""
    by_module: dict[str, list[str]] = {}
    for name, path in paths.items():
        (m, _), *rest = owners[name]
        by_module.setdefault(m, []).append(name if path == "fast" and not rest else "")
    return {
        n: m for m, names in by_module.items()
        if m not in taken and all(names) and len(calls.get(m, ())) == 1 and moments_ready(modules[m], calls[m][0])
        for n in names
    }  # fmt: skip


def tied_pairs(owners, modules, calls, paths: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Tied weights (name → (embedding, head)) shared by exactly one ``nn.Embedding`` and one
    ``nn.Linear`` (as ``weight`` of both), each called once: their norms need no per-example
    gradients (:mod:`gradnoise.rules.tied`)."""
    out = {}
    for name, path in paths.items():
        pair = tied_pair(owners[name], modules) if path == "fast-tied" else None
        if pair is not None and len(calls[pair[0]]) == 1 and len(calls[pair[1]]) == 1:
            out[name] = pair
    return out


def actions_of(owners, paths: dict[str, str], units: dict[str, list[str]], gram: dict[str, str],
               owned: dict[str, str], pairs: dict[str, tuple[str, str]]) -> dict[str, set[str]]:  # fmt: skip
    actions: dict[str, set[str]] = {}
    gram_modules, owned_modules = set(gram.values()), set(owned.values())
    for name, path in paths.items():
        for m, _ in owners[name]:
            kind = ("gram" if m in gram_modules else "moments" if m in owned_modules
                    else "norms" if path == "fast" or name in pairs else "grads")  # fmt: skip
            actions.setdefault(m, set()).add(kind)
    for pair in pairs.values():
        for m in pair:
            actions[m].add("tied")
    for m in actions:  # a module with any tied parameter materialises all of them
        if "grads" in actions[m]:
            actions[m].discard("norms")
    for unit in units:
        if unit:
            actions.setdefault(unit, set()).add("store")
    return actions
