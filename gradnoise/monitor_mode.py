"""Which way the training monitor measures (``Monitor(mode=...)``), decided once from the
model when the monitor is created, with the reason when a way cannot work."""

from __future__ import annotations

import contextlib
import logging

from torch import nn

from gradnoise._functional import trainable_params
from gradnoise.distributed import Group
from gradnoise.engine.plan import param_owners
from gradnoise.engine.rnn import unrollable
from gradnoise.rules import rule_for
from gradnoise.rules.tied import tied_pair

__all__ = ["NORM_LAYERS", "batchnorm_eval", "choose_mode", "scoped"]

log = logging.getLogger("gradnoise.monitor")


NORM_LAYERS = (nn.LayerNorm, nn.RMSNorm)  # Monitor(scope="norms")


def scoped(model: nn.Module, params: dict, scope: str) -> dict:
    """The parameters a monitor measures: all of them (``scope="all"``), or only those of the
    LayerNorm/RMSNorm layers (``"norms"``: the layer-normalisation GNS of Gray et al. 2024,
    arXiv:2411.00999, whose per-example norms cost a few elementwise operations per layer).

    Raises:
        ValueError: an unknown scope, or ``"norms"`` on a model without such parameters.
    """
    if scope not in ("all", "norms"):
        raise ValueError(f"unknown scope {scope!r}; choose 'all' or 'norms'")
    if scope == "all":
        return params
    owned = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    out = {n: p for n, p in params.items() if id(p) in owned}
    if not out:
        raise ValueError("scope='norms' measures the trainable parameters of LayerNorm/RMSNorm layers; this model has none")
    return out


def choose_mode(model: nn.Module, mode: str, *, batchnorm: str, accumulation_steps: int, group: Group | None,
                compiled: bool, tied_ok: bool = False, scope: str = "all") -> str:  # fmt: skip
    """``"hooks"``, ``"separate"`` or ``"two-batch"`` for the requested ``mode`` (see
    :class:`~gradnoise.Monitor`): hooks where every parameter is in a rule layer called
    once (or, with ``tied_ok``, a weight tied between an embedding and a Linear head), in
    the eager model, with no BatchNorm in train mode; the two-batch estimate for a
    BatchNorm model trained normally; the global batch under DDP/FSDP.

    Raises:
        ValueError: a requested mode that cannot measure this model, with what to do.
    """
    bn_train = [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if scope == "norms":  # a few layers' norms inside the user's backward pass: nothing else is near-free
        if mode not in ("auto", "hooks") or compiled or bn_train:
            raise ValueError(
                "scope='norms' measures the normalisation layers in the user's own backward pass (mode='hooks'), "
                f"which needs the eager model without BatchNorm in train mode; got mode={mode!r}"
                f"{', a compiled model' if compiled else ''}{f', BatchNorm {bn_train[:3]} in train mode' if bn_train else ''}"
            )
        return "hooks"
    if bn_train and mode in ("auto", "hooks", "separate"):
        if mode != "auto" and not (mode == "separate" and batchnorm == "eval"):
            raise ValueError(
                f"BatchNorm {bn_train[:3]} in train mode couples a batch's examples: per-example statistics are not "
                "defined. Use mode='auto' (the two-batch estimate with accumulation_steps > 1 or under DDP, or "
                "batchnorm='eval' for per-example statistics with BatchNorm in eval mode)"
            )
        mode = "separate" if batchnorm == "eval" else "two-batch"
        log.info("gradnoise.Monitor: BatchNorm in train mode %s: recording %s", bn_train[:3],
                 "per-example statistics with BatchNorm in eval mode (a separate pass)" if mode == "separate"
                 else "the two-batch estimate only")  # fmt: skip
    if mode == "two-batch":
        if accumulation_steps == 1 and group is None:
            raise ValueError(
                "the two-batch estimate needs several gradients per step: accumulation_steps > 1 or DDP "
                f"ranks{f' (BatchNorm {bn_train[:3]} is in train mode)' if bn_train else ''}; or pass "
                "batchnorm='eval' for per-example statistics with BatchNorm in eval mode"
            )
        if group is not None and group.sharded:
            raise ValueError("mode='two-batch' under FSDP: FSDP2 reduce-scatters each gradient before a hook reads it")
        return mode
    owners = param_owners(model, trainable_params(model))
    modules = dict(model.named_modules())
    # an RNN is measured by running its recurrence again (StepHooks), which needs its whole weights: not under FSDP
    sharded = group is not None and group.sharded
    uncovered = [
        n for n, os in owners.items()
        if not (tied_ok and tied_pair(os, modules))
        and (len(os) != 1 or not (rule_for(modules[os[0][0]]) is not None or (unrollable(modules[os[0][0]]) and not sharded)))
    ]  # fmt: skip
    if mode == "hooks" and uncovered:
        raise ValueError(
            f"mode='hooks' needs every trainable parameter in a supported layer "
            f"(Linear, Conv1d/2d, Embedding, LayerNorm, GroupNorm, RMSNorm, MultiheadAttention, LSTM/GRU/RNN); not covered: "
            f"{uncovered[:5]}. Use mode='separate' (one extra forward and backward per step)"
        )
    if compiled and mode == "hooks":
        raise ValueError(
            "mode='hooks' on a torch.compile'd model: the compiled graph does not run the hooks; use "
            "mode='auto' (a separate eager pass on model._orig_mod) or give the Monitor the eager model"
        )
    if mode == "auto":
        mode = "separate" if uncovered or compiled else "hooks"
    if group is not None:
        if uncovered or mode == "separate":
            rnn = sharded and any(len(os) == 1 and unrollable(modules[os[0][0]]) for n, os in owners.items() if n in uncovered)
            raise ValueError(
                "under DDP/FSDP the Monitor measures the global batch in hooks mode, which needs every "
                f"trainable parameter in a supported layer{f'; not covered: {uncovered[:5]}' if uncovered else ''}"
                f"{' (an nn.LSTM/GRU/RNN is measured by running its recurrence again from its whole weights, which FSDP shards: train it under DDP to measure it)' if rnn else ''}. "
                "mode='separate' would measure only this rank's local batch"
            )
        mode = "hooks"
    return mode



@contextlib.contextmanager
def batchnorm_eval(layers: list[nn.Module]):
    """These BatchNorm layers in eval mode for the block (their modes restored after)."""
    modes = [m.training for m in layers]
    try:
        for m in layers:
            m.training = False
        yield
    finally:
        for m, mode_ in zip(layers, modes, strict=True):
            m.training = mode_
