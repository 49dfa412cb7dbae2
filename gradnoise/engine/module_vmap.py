"""Per-example gradients of one module's parameters by ``vmap`` over examples of the
vector-Jacobian product of a recorded call: the fallback for parameters without a layer
rule (the ``"vmap-module"`` path)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from gradnoise._functional import explaining_checkpoint, sdpa_math
from gradnoise.engine.hooks import ModuleCall, batch_dim, flatten
from gradnoise.engine.rnn import rnn_grads, unrollable
from gradnoise.per_sample import needs_loop

__all__ = ["close_to", "local_tensors", "module_grads", "rnn_call"]


_UNBATCHED_MASKS = ("attn_mask", "src_mask", "tgt_mask", "memory_mask", "mask")


def module_grads(
    module: nn.Module,
    leaves: dict[str, Tensor],
    wanted: list[str],
    call: ModuleCall,
    batch: int,
) -> dict[str, Tensor] | None:
    """Per-example gradients of ``wanted`` (local names) of ``module`` from one recorded call.

    ``vmap`` over examples of ``grad_θ ⟨module(x_i; θ), δ_i⟩``. Returns ``None`` when the call
    cannot be split by example (a tensor without the batch dimension where one is needed).
    """
    bdim = batch_dim(module)
    is_rnn = isinstance(module, nn.RNNBase)

    def dim_of(shape: torch.Size, position: int | str, output: bool = False) -> int | None:
        d = 1 if (is_rnn and position != 0) else bdim
        if not output and (call.unbatched is None or position in call.unbatched):
            return None  # traced off the batch (BatchTrace), or not traced
        if isinstance(position, str) and position in _UNBATCHED_MASKS and len(shape) == 2:
            return None
        return d if len(shape) > d and shape[d] == batch else None

    if rnn_call(module, call):  # fused kernels have no vmap rule: unrolled (several calls of one RNN)
        grads = rnn_grads(module, call.args, [None if g is None else g.detach() * batch for g in call.grads], batch)
        return {k: grads[k] for k in wanted}
    entries = [(i, a) for i, a in enumerate(call.args)] + list(call.kwargs.items())
    batched = [(pos, t.detach(), dim_of(t.shape, pos)) for pos, t in entries if isinstance(t, Tensor)]
    outs = [
        (t, g, None if t is None else dim_of(t, 0 if j == 0 else 1, output=True))
        for j, (t, g) in enumerate(zip(call.shapes, call.grads, strict=True))
    ]
    if any(g is not None and d is None for t, g, d in outs):
        return None
    deltas = [(g.detach() * batch, d) for t, g, d in outs if g is not None]
    used = [j for j, (t, g, d) in enumerate(outs) if g is not None]
    if not deltas:
        return None
    fixed = {k: v for k, v in leaves.items() if k not in wanted}
    in_tensors = [t for _, t, d in batched if d is not None]
    in_dims = [d for _, t, d in batched if d is not None]

    def inner(p: dict[str, Tensor], xs: list[Tensor], ds: list[Tensor]) -> Tensor:
        it = iter(xs)
        vals = {}
        for pos, t, d in batched:
            vals[pos] = next(it).unsqueeze(d) if d is not None else t
        args = tuple(vals.get(i, a) for i, a in enumerate(call.args))
        kwargs = {k: vals.get(k, v) for k, v in call.kwargs.items()}
        flat = flatten(functional_call(module, {**fixed, **p}, args, kwargs))
        total = 0.0
        for j, dl, (_, dd) in zip(used, ds, deltas, strict=True):
            total = total + (flat[j] * dl.unsqueeze(dd)).sum()
        return total

    wanted_p = {k: leaves[k] for k in wanted}
    if needs_loop(module):
        rows = [grad(inner)(wanted_p, [t.select(d, i) for t, d in zip(in_tensors, in_dims, strict=True)],
                            [dl.select(dd, i) for dl, dd in deltas]) for i in range(batch)]  # fmt: skip
        return {k: torch.stack([r[k] for r in rows]) for k in wanted}
    fn = vmap(grad(inner), in_dims=(None, in_dims, [d for _, d in deltas]))
    with sdpa_math(), explaining_checkpoint():  # batchable attention (the fused kernel has no vmap rule)
        return fn(wanted_p, in_tensors, [dl for dl, _ in deltas])


def rnn_call(module: nn.Module, call: ModuleCall) -> bool:
    """A call of an RNN that :mod:`gradnoise.engine.rnn` unrolls: its input a tensor (not a
    packed sequence) on the batch."""
    return (unrollable(module) and not call.kwargs and bool(call.args) and isinstance(call.args[0], Tensor)
            and call.unbatched is not None and 0 not in call.unbatched)  # fmt: skip


def local_tensors(module: nn.Module, leaves, state, model: nn.Module) -> dict[str, Tensor]:
    """The leaves/state tensors of ``module`` under its local names (ties resolved by identity)."""
    by_id = {}
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    for full, t in named.items():
        if full in leaves:
            by_id[id(t)] = leaves[full]
        elif full in state:
            by_id.setdefault(id(t), state[full])
    out = {}
    for local, t in module.named_parameters(remove_duplicate=False):
        out[local] = by_id[id(t)]
    for local, t in module.named_buffers(remove_duplicate=False):
        out[local] = by_id.get(id(t), t)
    return out


def close_to(a: Tensor, b: Tensor) -> bool:
    tol = 1e-3 if a.dtype != torch.float64 else 1e-8
    scale = b.abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return bool(((a - b).abs().max() <= tol * scale).item())
