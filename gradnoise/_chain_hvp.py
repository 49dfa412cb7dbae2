"""Exact Hessian-vector products of a feed-forward chain in closed form, without autograd.

For an ``nn.Sequential`` of Linear layers and elementwise activations under cross-entropy
or squared-error loss, ``H v`` is the directional derivative ``R{∇L} = d/dt ∇L(θ + t v)`` at
``t = 0`` (Pearlmutter 1994, "Fast exact multiplication by the Hessian"). Everything that
depends on ``θ`` alone — each layer's input ``a``, the activations' derivatives, the output
gradients ``δ = ∂L/∂z`` — is computed once per batch; a product is then one R-forward pass

    R z_k = R a_{k-1} W_kᵀ + a_{k-1} V_kᵀ + c_k,        R a_k = σ'(z_k) ⊙ R z_k,

the loss's Hessian in the logits (cross-entropy, mean over ``n`` rows: ``R g = p ⊙ (R z −
⟨p, R z⟩) / n``; squared error: ``R g = 2 R z / n``), and one R-backward pass

    [H v]_{W_k} = R δ_kᵀ a_{k-1} + δ_kᵀ R a_{k-1},      [H v]_{b_k} = Σ_rows R δ_k,
    R d_{k-1} = R δ_k W_k + δ_k V_k,                 R δ_{k-1} = σ' ⊙ R d + σ'' ⊙ R z ⊙ d

(``V_k, c_k``: the direction's blocks; ``d = ∂L/∂a``). Per Linear layer that is at most six
matrix products of its size, which autograd's double backward also needs, but without
building and walking a graph per evaluation, flattening its output or summing the weight's
two contributions in a separate pass. Any model or loss outside this family raises
:class:`Unsupported` and :class:`~gradnoise.hessian.HessianOperator` falls back to autograd.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from gradnoise._functional import check_loss_value, has_ignored_targets

__all__ = ["Chain", "ChainBatch", "Unsupported", "plan_chain"]


class Unsupported(Exception):
    """The model or loss is not a chain this module handles; the message says why."""


@dataclass(frozen=True)
class _Linear:
    weight: Tensor
    bias: Tensor | None
    weight_name: str | None  # the parameter's name when trainable (a block of v), else None
    bias_name: str | None


@dataclass(frozen=True)
class _Activation:
    kind: str  # "relu", "leaky_relu", "tanh", "sigmoid"
    slope: float = 0.0


@dataclass(frozen=True)
class _Reshape:
    module: nn.Module  # nn.Flatten


_IDENTITY = (nn.Identity, nn.Dropout)  # dropout only in eval mode (the operator refuses train mode)
_ACTIVATIONS = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}


def is_observer(hook) -> bool:
    """gradnoise's own read-only hooks (the Monitor's) do not change a module's output."""
    return getattr(hook, "_gradnoise_observer", False)


def _leaves(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
    for name, child in module.named_children():
        if type(child) is nn.Sequential:
            _check_no_hooks(child, prefix + name)
            yield from _leaves(child, f"{prefix}{name}.")
        else:
            yield prefix + name, child


def _check_no_hooks(m: nn.Module, name: str) -> None:
    hooks = [*m._forward_pre_hooks.values(), *m._forward_hooks.values()]
    if any(not is_observer(h) for h in hooks):
        raise Unsupported(f"module {name or 'model'!r} has forward hooks (they may change its output)")


@dataclass(frozen=True)
class Chain:
    """The layers of a supported model and its loss, with the operator's parameter values."""

    steps: tuple
    loss_fn: nn.Module
    loss: str  # "ce" or "mse", both reduction="mean"
    label_smoothing: float = 0.0
    ignore_index: int = -100


def plan_chain(model: nn.Module, params: dict[str, Tensor], loss_fn) -> Chain:
    """The chain of ``model`` with the values of ``params`` (trainable, by name).

    Raises:
        Unsupported: the model is not an ``nn.Sequential`` of Linear, ReLU, LeakyReLU, Tanh,
            Sigmoid, Identity, Dropout (eval) and Flatten modules covering every trainable
            parameter once, has hooks, or the loss is not a plain ``CrossEntropyLoss`` or
            ``MSELoss`` with ``reduction="mean"`` (and no class weights).
    """
    if type(model) is not nn.Sequential:
        raise Unsupported(f"the model is a {type(model).__name__}, not an nn.Sequential")
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        raise Unsupported("global module forward hooks are registered")
    _check_no_hooks(model, "")
    steps, covered = [], set()
    for name, m in _leaves(model, ""):
        _check_no_hooks(m, name)
        if next(m.buffers(recurse=False), None) is not None:
            raise Unsupported(f"module {name!r} has buffers")
        if type(m) is nn.Linear:
            names = []
            for attr in ("weight", "bias"):
                p = getattr(m, attr)
                full = f"{name}.{attr}"
                if p is None or not p.requires_grad:
                    names.append(None)
                elif full in params and full not in covered:
                    names.append(full)
                    covered.add(full)
                else:
                    raise Unsupported(f"parameter {full!r} is tied to another module's")
            w = params[names[0]] if names[0] else m.weight.detach()
            b = None if m.bias is None else params[names[1]] if names[1] else m.bias.detach()
            steps.append(_Linear(w, b, names[0], names[1]))
        elif type(m) in _ACTIVATIONS:
            steps.append(_Activation(_ACTIVATIONS[type(m)], getattr(m, "negative_slope", 0.0)))
        elif type(m) is nn.Flatten:
            steps.append(_Reshape(m))
        elif type(m) in _IDENTITY:
            continue
        else:
            raise Unsupported(f"module {name!r} ({type(m).__name__}) has no closed-form product here")
    if covered != set(params):
        raise Unsupported(f"parameters outside the chain's Linear layers: {sorted(set(params) - covered)}")
    if type(loss_fn) is nn.CrossEntropyLoss and loss_fn.weight is None and loss_fn.reduction == "mean":
        return Chain(tuple(steps), loss_fn, "ce", loss_fn.label_smoothing, loss_fn.ignore_index)
    if type(loss_fn) is nn.MSELoss and loss_fn.reduction == "mean":
        return Chain(tuple(steps), loss_fn, "mse")
    raise Unsupported(f"loss {loss_fn!r} has no closed-form Hessian here (CrossEntropyLoss or MSELoss)")


def _derivatives(act: _Activation, z: Tensor) -> tuple[Tensor, Tensor | None]:
    """``σ'(z)`` and ``σ''(z)`` (``None`` where it is zero almost everywhere); at a kink,
    autograd's convention (ReLU: 0 at 0; LeakyReLU: the slope at 0)."""
    if act.kind == "relu":
        return (z > 0).to(z.dtype), None
    if act.kind == "leaky_relu":
        one, slope = z.new_ones(()), z.new_full((), act.slope)
        return torch.where(z > 0, one, slope), None
    s = torch.tanh(z) if act.kind == "tanh" else torch.sigmoid(z)
    if act.kind == "tanh":
        d1 = 1 - s * s
        return d1, -2 * s * d1
    d1 = s * (1 - s)
    return d1, d1 * (1 - 2 * s)


class ChainBatch:
    """The θ-dependent quantities of one batch, computed once; :meth:`hvp_into` adds
    ``weight · H_batch v`` to the operator's flat output."""

    def __init__(self, chain: Chain, x: Tensor, y: Tensor):
        self.chain = chain
        self._work: dict[tuple[int, str], Tensor] = {}
        with torch.no_grad():
            self._forward_backward(x, y)

    def _forward_backward(self, x: Tensor, y: Tensor) -> None:
        chain, a, cache = self.chain, x, []
        for step in chain.steps:
            if isinstance(step, _Linear):
                cache.append(a.reshape(-1, a.shape[-1]))
                a = F.linear(a, step.weight, step.bias)
            elif isinstance(step, _Activation):
                cache.append(_derivatives(step, a))
                a = _activation(step, a)
            else:
                cache.append(a.shape)
                a = step.module(a)
        z = a
        self.dtype, self.device = z.dtype, z.device
        if chain.loss == "ce":
            if z.dim() != 2 or y.dim() != 1 or y.dtype.is_floating_point:
                raise Unsupported("cross-entropy with logits [B, C] and class-index targets [B] only")
            if has_ignored_targets(y, chain.ignore_index):
                raise Unsupported("targets contain ignore_index")
        elif y.shape != z.shape:
            raise Unsupported(f"MSELoss with target shape {tuple(y.shape)} != output shape {tuple(z.shape)}")
        check_loss_value(chain.loss_fn(z, y))  # finite, as on the autograd paths
        if chain.loss == "ce":
            n = z.shape[0]
            p = torch.softmax(z, dim=1)
            q = F.one_hot(y, z.shape[1]).to(z.dtype)
            if chain.label_smoothing:
                q = q * (1 - chain.label_smoothing) + chain.label_smoothing / z.shape[1]
            self.p, self.scale = p, 1.0 / n
            g = (p - q) / n
        else:
            self.scale = 2.0 / z.numel()
            g = (z - y.to(z.dtype)) * self.scale
        # Backward: δ at each Linear output (rows), d = ∂L/∂a where σ'' is needed.
        grads: list = [None] * len(chain.steps)
        need = self._needs_input_grad()
        for i in range(len(chain.steps) - 1, -1, -1):
            step = chain.steps[i]
            if isinstance(step, _Linear):
                grads[i] = g.reshape(-1, g.shape[-1])
                if not need[i]:
                    break
                g = g @ step.weight
            elif isinstance(step, _Activation):
                d1, d2 = cache[i]
                grads[i] = g if d2 is not None else None
                g = g * d1
            else:
                g = g.reshape(cache[i])
        self.cache, self.grads, self.need = cache, grads, need

    def _needs_input_grad(self) -> list[bool]:
        """Whether step ``i`` must pass a gradient to its input: some earlier Linear is trainable."""
        need, seen = [], False
        for step in self.chain.steps:
            need.append(seen)
            seen = seen or (isinstance(step, _Linear) and (step.weight_name or step.bias_name) is not None)
        return need

    def _buffer(self, key: tuple[int, str], shape: tuple[int, ...]) -> Tensor:
        """A work buffer kept across products (one per step and role), so that a product
        allocates nothing after the first (A/B on the MNIST-1D MLP, 128 examples, CPU: a
        product 4.39 → 4.24 ms without its seven fresh ``[128, width]`` outputs)."""
        b = self._work.get(key)
        if b is None or b.shape != shape:
            b = self._work[key] = torch.empty(shape, dtype=self.dtype, device=self.device)
        return b

    def hvp_into(self, v: dict[str, Tensor], out: dict[str, Tensor], weight: float, *, first: bool) -> None:
        """``out[name] += weight · [H v]_name`` for this batch's Hessian; ``first``: write
        (``out`` is not read, so it needs no zeroing)."""
        beta = 0.0 if first else 1.0
        chain, cache = self.chain, self.cache
        ra, r_in = None, []  # R of the current activation (None: zero), and of each step's input
        for i, (step, c) in enumerate(zip(chain.steps, cache, strict=True)):
            r_in.append(ra)
            if isinstance(step, _Linear):
                trained = step.weight_name is not None
                if ra is None and not trained and step.bias_name is None:
                    continue  # a frozen layer on a zero R-input: R z stays zero (None)
                rz = self._buffer((i, "forward"), (c.shape[0], step.weight.shape[0]))  # rows [n, out]
                if trained:
                    torch.mm(c, v[step.weight_name].T, out=rz)
                if ra is not None:  # beta=0: the buffer's stale values are not read
                    rz.addmm_(ra.reshape(-1, ra.shape[-1]), step.weight.T, beta=1.0 if trained else 0.0)
                if step.bias_name is not None:
                    if ra is None and not trained:
                        rz.copy_(v[step.bias_name].expand_as(rz))
                    else:
                        rz.add_(v[step.bias_name])
                ra = rz  # rows [n, out]; reshaped lazily where a shape matters
            elif isinstance(step, _Activation):
                if ra is not None:  # in place unless σ'' needs R z again in the backward
                    ra = ra.reshape(c[0].shape)
                    ra = ra.mul_(c[0]) if c[1] is None else torch.mul(ra, c[0], out=self._buffer((i, "act"), ra.shape))
            else:
                ra = None if ra is None else step.module(ra.reshape(c))
        rz = ra.reshape(-1, ra.shape[-1])
        if chain.loss == "ce":
            p = self.p
            rg = p * (rz - (p * rz).sum(1, keepdim=True))
            rg.mul_(self.scale)
        else:
            rg = rz * self.scale
        for i in range(len(chain.steps) - 1, -1, -1):
            step, c, rin = chain.steps[i], cache[i], r_in[i]
            if isinstance(step, _Linear):
                rg = rg.reshape(-1, rg.shape[-1])
                delta = self.grads[i]
                rows_in = None if rin is None else rin.reshape(-1, rin.shape[-1])
                if step.weight_name is not None:
                    o = out[step.weight_name]
                    torch.addmm(o, rg.T, c, beta=beta, alpha=weight, out=o)
                    if rows_in is not None:
                        o.addmm_(delta.T, rows_in, alpha=weight)
                if step.bias_name is not None:
                    o = out[step.bias_name]
                    if first:
                        torch.sum(rg, 0, out=o).mul_(weight)
                    else:
                        o.add_(rg.sum(0), alpha=weight)
                if not self.need[i]:
                    return
                rg_in = torch.mm(rg, step.weight, out=self._buffer((i, "backward"), (rg.shape[0], step.weight.shape[1])))
                if step.weight_name is not None:
                    rg_in.addmm_(delta, v[step.weight_name])
                rg = rg_in
            elif isinstance(step, _Activation):
                d1, d2 = c
                rg = rg.reshape(d1.shape).mul_(d1)  # rg is this product's own buffer
                if d2 is not None and rin is not None:
                    rg.addcmul_(d2 * rin.reshape(d1.shape), self.grads[i])
            else:
                rg = rg.reshape(c)


def _activation(act: _Activation, z: Tensor) -> Tensor:
    if act.kind == "relu":
        return F.relu(z)
    if act.kind == "leaky_relu":
        return F.leaky_relu(z, act.slope)
    return torch.tanh(z) if act.kind == "tanh" else torch.sigmoid(z)
