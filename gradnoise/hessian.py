"""The Hessian of the mean loss over a stated set of examples as a linear operator, with a
registry of Hessian-vector-product backends (:data:`HVP_METHODS`). The estimators built on
it live in :mod:`gradnoise.eigen` (eigenvalues) and :mod:`gradnoise.trace` (the trace).

The Hessian is that of ``L(θ) = Σ_b (n_b / N) loss_fn(model(x_b), y_b)``: the mean loss over
all ``N`` examples of the given batches (each batch weighted by its size). The model is
evaluated in its current mode through ``functional_call`` on detached parameters, so its
parameters, buffers, ``.grad`` and mode are never changed. A stochastic forward pass
(dropout in train mode) has no single Hessian and is refused, as is BatchNorm in train mode.

Vectors are flat (``[P]``, parameters in ``named_parameters`` order, trainable only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from gradnoise._chain_hvp import Chain, ChainBatch, Unsupported, plan_chain
from gradnoise._compat import renamed_keywords
from gradnoise._data import Data, as_data
from gradnoise._functional import (
    LossFn,
    check_device,
    check_loss_fn,
    check_loss_value,
    check_no_train_batchnorm,
    frozen_state,
    mean_gradient,
    preserved_state,
    sdpa_math,
    trainable_params,
)

__all__ = ["HVP_METHODS", "HessianOperator", "hessian_operator"]

HVPMethod = Literal["auto", "closed-form", "double-backward", "forward-over-reverse"]


twice_differentiable = sdpa_math  # the fused attention kernels have no second derivative


def _check_deterministic(model: nn.Module) -> None:
    for name, m in model.named_modules():
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "dropout", 0.0)
        if m.training and isinstance(p, float) and p > 0 and isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention, nn.RNNBase)):
            raise ValueError(
                f"module {name!r} applies dropout in train mode, so the loss is random and has "
                "no single Hessian: call model.eval() for curvature measurements"
            )


@dataclass
class HessianOperator:
    """The Hessian of the mean loss over fixed batches, as a linear operator on flat vectors.

    Attributes:
        names: parameter names, in the order of the flat vector.
        shapes: their shapes.
        num_examples: ``N``, the examples the loss is averaged over.
        method: how products are computed (resolved, never ``"auto"``):
            ``"closed-form"`` (Pearlmutter's R-operator written out for ``nn.Sequential``
            chains of Linear layers and elementwise activations under cross-entropy or
            squared error: :mod:`gradnoise._chain_hvp`; no autograd graph),
            ``"double-backward"`` (reuses each batch's first-order graph) or
            ``"forward-over-reverse"`` (``torch.func.jvp`` of ``grad``; no graph kept).
        num_hvps: Hessian-vector products computed so far.
    """

    model: nn.Module
    loss_fn: LossFn
    batches: list
    params: dict[str, Tensor]
    state: dict[str, Tensor]
    method: HVPMethod = "double-backward"
    num_hvps: int = 0
    _graphs: list | None = field(default=None, repr=False)
    _chain: Chain | None = field(default=None, repr=False)
    _chain_batches: list | None = field(default=None, repr=False)
    _requested: str = field(default="", repr=False)  # the method asked of hessian_operator
    _batched: bool = field(default=True, repr=False)  # matmat in batched backward passes

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def num_examples(self) -> int:
        return sum(x[0].shape[0] for x, _ in self.batches)

    @property
    def dim(self) -> int:
        return sum(p.numel() for p in self.params.values())

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def flatten(self, tensors: dict[str, Tensor] | list[Tensor]) -> Tensor:
        vals = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in vals])

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, p in self.params.items():
            out[n] = v[i : i + p.numel()].view_as(p)
            i += p.numel()
        return out

    def _loss(self, p: dict[str, Tensor], x, y) -> Tensor:
        out = functional_call(self.model, {**p, **self.state}, x)
        return self.loss_fn(out, y[0] if len(y) == 1 else y)

    def loss(self, params: dict[str, Tensor] | None = None) -> float:
        """Mean loss over the batches, at ``params`` (default: the model's)."""
        p = self.params if params is None else params
        total = 0.0
        with torch.no_grad(), preserved_state(self.model):
            for x, y in self.batches:
                total += check_loss_value(self._loss(p, x, y)) * x[0].shape[0]
        return total / self.num_examples

    def gradient(self) -> Tensor:
        """Flat gradient of the mean loss."""
        return self.flatten(mean_gradient(self.model, self.loss_fn, self.batches))

    def matmat(self, V: Tensor, *, chunk: int = 64) -> Tensor:
        """``H V`` for ``V`` of shape ``[P, k]``: blocks of vectors in one batched backward
        (``is_grads_batched``) with double backward, column by column otherwise, and also
        where an operation of the model has no batched second derivative (``GroupNorm``'s
        backward, for one): then column by column from the first failure on."""
        V = V.to(dtype=self.dtype, device=self.device)
        if V.shape[1] == 0:
            return V.clone()
        if self.method != "double-backward" or not self._batched:
            return torch.stack([self.matvec(c) for c in V.T], dim=1)
        self._build_graphs()
        cols = []
        for start in range(0, V.shape[1], chunk):
            block = V[:, start : start + chunk].T.contiguous()  # [c, P]
            try:
                cols.append(self._batched_block(block).T)
            except RuntimeError:  # no batching rule: this block and the rest one column at a time
                self._batched = False
                return torch.cat([*cols, self.matmat(V[:, start:])], dim=1)
            self.num_hvps += block.shape[0]
        return torch.cat(cols, dim=1)

    def _batched_block(self, block: Tensor) -> Tensor:
        out = torch.zeros_like(block)
        for leaves, gs, w in self._graphs:
            vs = [t.reshape(block.shape[0], *p.shape) for t, p in zip(self._split(block), leaves.values(), strict=True)]
            hv = torch.autograd.grad(gs, list(leaves.values()), grad_outputs=vs, retain_graph=True, allow_unused=True, is_grads_batched=True)
            out += w * torch.cat([(torch.zeros_like(v) if h is None else h).reshape(block.shape[0], -1) for v, h in zip(vs, hv, strict=True)], dim=1)
        return out

    def _split(self, block: Tensor) -> list[Tensor]:
        return list(block.split([p.numel() for p in self.params.values()], dim=1))

    def matvec(self, v: Tensor, *, out: Tensor | None = None) -> Tensor:
        """``H v`` for a flat vector ``v`` (or ``V`` of shape ``[P, k]``, see :meth:`matmat`),
        written into ``out`` if given (a flat buffer of the operator's dtype; Lanczos passes
        the next row of its basis: no fresh vector per product)."""
        if v.dim() == 2:
            return self.matmat(v)
        v = v.to(dtype=self.dtype, device=self.device)
        self.num_hvps += 1
        return HVP_METHODS[self.method](self, v, out)

    def _build_chain(self) -> bool:
        """The closed-form path's per-batch quantities; ``False`` (and double backward from
        now on) if a batch is outside it and the method was chosen by ``"auto"``."""
        if self._chain_batches is None:
            try:
                if self._chain is None:  # an operator built directly, not by hessian_operator
                    self._chain = plan_chain(self.model, self.params, self.loss_fn)
                self._chain_batches = [
                    (ChainBatch(self._chain, *_single(x, y)), x[0].shape[0] / self.num_examples) for x, y in self.batches
                ]
            except Unsupported as e:
                if self._requested != "auto":
                    raise ValueError(f"method='closed-form' cannot handle these batches or this model: {e}; use method='auto'") from None
                self.method = "double-backward"
                return False
        return True

    def _hvp_chain(self, v: Tensor, out: Tensor | None) -> Tensor:
        if not self._build_chain():  # a batch outside the closed form, method="auto"
            return self._hvp_double(v, out)
        out = torch.empty_like(v) if out is None else out
        vs, views = self.unflatten(v), self.unflatten(out)
        for i, (batch, w) in enumerate(self._chain_batches):
            batch.hvp_into(vs, views, w, first=i == 0)  # the first batch writes every block
        return out

    def _hvp_double(self, v: Tensor, out: Tensor | None = None) -> Tensor:
        self._build_graphs()
        vs = list(self.unflatten(v).values())
        for i, (leaves, gs, w) in enumerate(self._graphs):
            hv = torch.autograd.grad(gs, list(leaves.values()), grad_outputs=vs, retain_graph=True, allow_unused=True)
            parts = [(torch.zeros_like(p) if h is None else h).reshape(-1) for p, h in zip(leaves.values(), hv, strict=True)]
            if i == 0:
                out = torch.cat(parts, out=out) if out is not None else torch.cat(parts)
                if w != 1:
                    out.mul_(w)
            else:
                out.add_(torch.cat(parts), alpha=w)
        return out

    def _build_graphs(self) -> None:
        if self._graphs is None:
            self._graphs = []
            with preserved_state(self.model), torch.enable_grad(), twice_differentiable():
                leaves = {n: p.detach().requires_grad_(True) for n, p in self.params.items()}
                for x, y in self.batches:
                    loss = self._loss(leaves, x, y)
                    check_loss_value(loss)
                    gs = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
                    self._graphs.append((leaves, gs, x[0].shape[0] / self.num_examples))

    def _hvp_fwd(self, v: Tensor, out_buffer: Tensor | None = None) -> Tensor:
        out = torch.zeros_like(v)
        tangent = self.unflatten(v)
        with preserved_state(self.model), twice_differentiable():
            for x, y in self.batches:
                w = x[0].shape[0] / self.num_examples
                _, hv = jvp(grad(lambda p: self._loss(p, x, y)), (self.params,), (tangent,))
                out += w * self.flatten(hv)
        return out if out_buffer is None else out_buffer.copy_(out)

    def release(self) -> None:
        """Free the cached first-order graphs (or the closed-form path's batch quantities)."""
        self._graphs = None
        self._chain_batches = None

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` in float64 numpy (for ``eigsh``)."""
        from scipy.sparse.linalg import LinearOperator

        def mv(x: np.ndarray) -> np.ndarray:
            t = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self.dtype, device=self.device)
            return self.matvec(t).detach().to("cpu", torch.float64).numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, dtype=np.float64)


def _single(x: tuple[Tensor, ...], y: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    if len(x) != 1 or len(y) != 1:
        raise Unsupported("one input tensor and one target tensor per batch only")
    return x[0], y[0]


@renamed_keywords(batches="data")
def hessian_operator(
    model: nn.Module, loss_fn: LossFn, data: Data, *, method: HVPMethod = "auto"
) -> HessianOperator:
    """The Hessian of the mean loss over ``data`` as a :class:`HessianOperator`.

    Args:
        model: evaluated in its current mode (BatchNorm and dropout must be in eval mode).
        loss_fn: mean-reduced loss.
        data: the stated examples: ``(inputs, targets)``, a list of such pairs or a
            DataLoader; the loss is the mean over all their examples (batches weighted by
            their sizes).
        method: ``"auto"`` (default): ``"closed-form"`` where the model and loss allow it,
            else ``"double-backward"`` (it reuses each batch's first-order graph, which
            ``"forward-over-reverse"`` rebuilds per product). The closed form is exact like
            the others and does the same matrix products without an autograd graph.

    Raises:
        ValueError: BatchNorm or dropout in train mode, no batches, unknown method,
            ``"closed-form"`` for a model or loss outside it (the message says why).
    """
    if method != "auto" and method not in HVP_METHODS:
        raise ValueError(f"unknown HVP method {method!r}; choose 'auto' or one of {', '.join(map(repr, HVP_METHODS))}")
    params = trainable_params(model)
    check_loss_fn(loss_fn)
    check_no_train_batchnorm(model)
    _check_deterministic(model)
    bs = as_data(data)
    for x, y in bs:
        check_device(params, x, y)
    chain = None
    if method in ("auto", "closed-form"):
        try:
            chain = plan_chain(model, params, loss_fn)
        except Unsupported as e:
            if method == "closed-form":
                raise ValueError(f"method='closed-form' cannot handle this model: {e}; use method='auto'") from None
    resolved = "closed-form" if chain is not None else "double-backward" if method == "auto" else method
    return HessianOperator(
        model, loss_fn, bs, params, frozen_state(model), resolved, _chain=chain, _requested=method
    )


# Hessian-vector-product backends by name: ``fn(op, v, out) -> H v`` (written into ``out``
# when given). ``hessian_operator(method="auto")`` picks "closed-form" where the model and
# loss allow it, else "double-backward".
HVP_METHODS: dict[str, Callable[[HessianOperator, Tensor, Tensor | None], Tensor]] = {
    "closed-form": HessianOperator._hvp_chain,
    "double-backward": HessianOperator._hvp_double,
    "forward-over-reverse": HessianOperator._hvp_fwd,
}
