"""Gradient statistics of one batch, and exact streaming over many batches.

Notation (McCandlish et al. 2018, arXiv:1812.06162, App. A): per-example gradients ``g_i``,
true gradient ``G = E[g_i]``, per-example covariance ``Σ``. From ``B`` examples with mean
``ḡ`` and centred sum of squares ``M2 = Σ_i |g_i − ḡ|²``:

.. math::

    s^2 = \\frac{M_2}{B-1}, \\qquad
    \\widehat{\\operatorname{tr}\\Sigma} = s^2 \\cdot \\frac{N-1}{N}, \\qquad
    \\widehat{|G|^2} = |\\bar g|^2 - s^2\\left(\\frac1B - \\frac1N\\right),
    \\qquad B_\\text{simple} = \\operatorname{tr}\\Sigma / |G|^2 .

``N`` is the data-set size when the batch was drawn without replacement from ``N`` examples
(``dataset_size``); for an infinite stream ``(N−1)/N = 1`` and ``1/N = 0``. ``Σ`` is the
population covariance ``(1/N) Σ_n (g_n − G)(g_n − G)ᵀ`` so that
``E|ḡ_B − G|² = tr(Σ)/B · (N − B)/(N − 1)``; both estimates are unbiased.

GSNR (Liu et al. 2020, "Understanding Why Neural Networks Generalize Well Through GSNR of
Parameters", Eq. 1) per element is ``G_j² / σ_j²``, estimated with the unbiased signal
``ḡ_j² − s_j²(1/B − 1/N)`` (the plug-in ``ḡ_j²`` is biased upward by ``σ_j²/B``, which would
make GSNR fall as ``1/B``); a layer's GSNR is its mean over the
elements that are not noise-free (``σ̂_j² > 10⁻⁶ E[g_j²]``, i.e. above float32 rounding) and
whose centred sum of squares exceeds ``10⁻¹²`` of the largest in its tensor (elements whose
gradient is zero up to rounding, such as attention key biases, would otherwise give
meaningless ratios).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from gradnoise._factored import dtype_of
from gradnoise._functional import (
    Batch,
    LossFn,
    as_tuple,
    batch_size_of,
    is_known_mean_loss,
    trainable_params,
)
from gradnoise._lazy import LazyMap
from gradnoise._moments import Moments
from gradnoise.engine import NotMeanLossError, fast_applies, fast_moments
from gradnoise.per_sample import vmap_moments
from gradnoise.preconditioner import Preconditioner, preconditioner_weights
from gradnoise.summary import (
    LayerStats,
    LazyGsnr,
    group_stats,
    param_sums,
    per_layer_stats,
    per_param_stats,
)

__all__ = ["GradientStats", "LayerStats", "StatsAccumulator", "gradient_stats"]

Method = Literal["auto", "fast", "vmap"]


@dataclass(frozen=True)
class GradientStats:
    """Gradient statistics of a batch (or of the union of many batches).

    Attributes:
        batch_size: number of examples ``B`` the statistics are computed from.
        dataset_size: ``N`` for the finite-population correction, or ``None`` (stream).
        loss: mean loss over the ``B`` examples.
        mean: mean gradient ``ḡ`` per parameter (the usual minibatch gradient), a read-only
            mapping. Without ``variance``, the fast engine skips the weight gradient of a
            Linear layer where its Gram form is cheaper (``B(in + out) ≤ in · out``) and keeps
            ``ḡ_W = Dᵀ A`` as its two factors, which hold fewer numbers; reading
            ``mean[name]`` multiplies them out once.
        variance: unbiased per-element variance of per-example gradients per parameter
            (finite-population convention as ``trace_cov``), or ``None`` if not computed.
        trace_cov: unbiased ``tr Σ``.
        grad_norm_sq: unbiased ``|G|²``.
        gsnr: mean per-element gradient signal-to-noise ratio, or ``None`` (a property,
            computed when first read).
        b_simple: ``trace_cov / grad_norm_sq`` of this batch (a single-batch ratio: for a
            noise scale, average numerator and denominator over batches, see
            :func:`gradnoise.noise_scale`). ``inf`` when the ``|G|²`` estimate is ``≤ 0``.
        per_param: the same statistics per parameter name (a read-only mapping, computed
            when first read).
        per_layer: the same statistics per module (parameters grouped by owner; likewise).
        sq_norms: ``|g_i|²`` of each example over all parameters, ``[B]`` float64.
        metric: ``"euclidean"``, or ``"preconditioned"`` when computed with a diagonal
            preconditioner ``P``: every statistic is then that of the whitened gradients
            ``√P ⊙ g_i`` — ``mean`` is ``√P ⊙ ḡ``, ``variance`` is ``P ⊙ Var g``,
            ``trace_cov`` is ``tr(PΣ)``, ``grad_norm_sq`` is ``GᵀPG`` and ``b_simple`` is
            ``B_simple^P`` (:mod:`gradnoise.preconditioner`).
    """

    batch_size: int
    dataset_size: int | None
    loss: float
    mean: Mapping[str, Tensor] = field(repr=False)
    variance: dict[str, Tensor] | None = field(repr=False)
    trace_cov: float
    grad_norm_sq: float
    b_simple: float
    per_param: Mapping[str, LayerStats] = field(repr=False)
    per_layer: Mapping[str, LayerStats] = field(repr=False)
    sq_norms: Tensor = field(repr=False)
    metric: Literal["euclidean", "preconditioned"] = "euclidean"
    # the GSNR's per-parameter sums, computed once when first read (see ``gsnr``)
    _gsnr: LazyGsnr | None = field(default=None, repr=False, compare=False)

    @property
    def gsnr(self) -> float | None:
        """Mean per-element gradient signal-to-noise ratio, or ``None`` without ``variance``.

        Computed when first read (then kept), from ``mean`` and ``variance``: a pass over
        every parameter that callers who do not read it do not pay.
        """
        return None if self._gsnr is None else self._gsnr.total()

    def __getstate__(self) -> dict:  # pickles and copies with the GSNR computed
        if self._gsnr is not None:
            self._gsnr.sums()  # drops the table's references to the tensors
        return dict(self.__dict__)

    def to_dict(self) -> dict:
        """Plain numbers only (JSON-serialisable): scalars, per-parameter and per-layer stats."""
        out = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("mean", "variance", "per_param", "per_layer", "sq_norms", "_gsnr")
        }
        out["gsnr"] = self.gsnr
        out["per_param"] = {k: dataclasses.asdict(v) for k, v in self.per_param.items()}
        out["per_layer"] = {k: dataclasses.asdict(v) for k, v in self.per_layer.items()}
        return out

    def __repr__(self) -> str:
        n = "∞" if self.dataset_size is None else self.dataset_size
        gsnr = "n/a" if self.gsnr is None else f"{self.gsnr:.4g}"
        metric = "metric=preconditioned, " if self.metric != "euclidean" else ""
        lines = [
            f"GradientStats(B={self.batch_size}, N={n}, loss={self.loss:.4g}, {metric}"
            f"trace_cov={self.trace_cov:.4g}, grad_norm_sq={self.grad_norm_sq:.4g}, "
            f"b_simple={self.b_simple:.4g}, gsnr={gsnr})",
            f"  {'layer':<28}{'params':>9}{'tr Σ':>12}{'|G|²':>12}{'B_simple':>11}  method",
        ]
        for name, s in self.per_layer.items():
            lines.append(
                f"  {name:<28}{s.num_params:>9}{s.trace_cov:>12.4g}{s.grad_norm_sq:>12.4g}"
                f"{s.b_simple:>11.4g}  {s.method}"
            )
        return "\n".join(lines)


def stats_from_moments(
    m: Moments, *, dataset_size: int | None = None, dtypes: dict[str, torch.dtype] | None = None,
    consume: bool = False, metric: str = "euclidean",
) -> GradientStats:
    """Finalise :class:`Moments` into :class:`GradientStats` (unbiased, see module docstring).

    ``consume``: ``m`` is not used again, so the variance is scaled in place in ``m.m2``.
    """
    if m.count < 2:
        raise ValueError(f"batch of {m.count} example: a variance needs at least 2")
    check_dataset_size(m.count, dataset_size)
    dtypes = {k: t for k, t in (dtypes or {}).items() if k in m.mean and t != dtype_of(m.mean, k)}
    has_gsnr = m.m2 is not None
    sums = param_sums(m, dataset_size, gsnr=False)
    pop = 1.0 if dataset_size is None else (dataset_size - 1) / dataset_size
    cast = lambda k, t: t.to(dtypes[k]) if k in dtypes else t  # noqa: E731
    scale = pop / (m.count - 1)
    table = None
    if has_gsnr and dtypes:  # from the moments' own precision, now, before the cast
        table = LazyGsnr(m.mean, m.m2, m.count, dataset_size, 1.0)
        table.sums()
    if m.m2 is None:
        variance = None
    elif consume:
        torch._foreach_mul_(list(m.m2.values()), scale)
        variance = {k: cast(k, v) for k, v in m.m2.items()}
    else:
        variance = {k: cast(k, v * scale) for k, v in m.m2.items()}
    if has_gsnr and table is None:  # from the result's own mean and variance, when first read
        table = LazyGsnr(m.mean, variance, m.count, dataset_size, scale)
    total = group_stats(list(sums.values()), m.count, dataset_size, False)
    # The per-parameter and per-module tables are built when first read: with the GSNR, they
    # need its per-parameter sums (a pass over every parameter).
    filled = (lambda: table.fill(sums)) if table is not None else (lambda: sums)  # noqa: E731
    per_param = LazyMap(lambda: per_param_stats(filled(), m.count, dataset_size, has_gsnr))
    per_layer = LazyMap(lambda: per_layer_stats(filled(), m.count, dataset_size, has_gsnr))
    return GradientStats(
        batch_size=m.count,
        dataset_size=dataset_size,
        loss=m.loss_sum / m.count,
        mean={k: cast(k, v) for k, v in m.mean.items()} if dtypes else m.mean,
        variance=variance,
        trace_cov=total.trace_cov,
        grad_norm_sq=total.grad_norm_sq,
        b_simple=total.b_simple,
        per_param=per_param,
        per_layer=per_layer,
        sq_norms=m.sq_total if m.sq_total is not None else torch.stack(list(m.sq_norms.values())).sum(0),
        metric=metric,
        _gsnr=table,
    )


def check_dataset_size(batch_size: int, dataset_size: int | None) -> None:
    if dataset_size is None:
        return
    if not isinstance(dataset_size, int) or dataset_size < 2:
        raise ValueError(f"dataset_size must be an int ≥ 2 or None, got {dataset_size!r}")
    if batch_size > dataset_size:
        raise ValueError(
            f"{batch_size} examples but dataset_size={dataset_size}: with the finite-population "
            "correction the examples must be drawn without replacement from the data set; "
            "pass the right dataset_size, or None for an infinite stream"
        )


# The engines that produce Moments of one batch, by name (``method=``).
ENGINES: dict[str, Callable[..., Moments]] = {"vmap": vmap_moments, "fast": fast_moments}


def compute_moments(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Batch,
    targets: Batch,
    *,
    method: Method = "auto",
    variance: bool = True,
    chunk_size: int | None = None,
    factored_mean: bool = False,
    preconditioner: Preconditioner | None = None,
) -> Moments:
    """Moments of per-example gradients of one batch with the engine ``method`` picks
    (``factored_mean``: see :func:`gradnoise.engine.fast_moments`).

    ``"auto"`` picks ``"fast"`` (one forward and one backward with hooks, see
    :mod:`gradnoise.engine`) when the loss is known to be the mean of per-example
    losses (or is verified to be on this batch), else ``"vmap"``. With a ``preconditioner``
    (:func:`~gradnoise.preconditioner.preconditioner_weights`), the moments of ``√P ⊙ g_i``.
    """
    backends = ENGINES
    if method != "auto" and method not in backends:
        raise ValueError(f"unknown method {method!r}; choose one of 'auto', {', '.join(map(repr, backends))}")
    kwargs: dict = {"variance": variance, "chunk_size": chunk_size}
    if preconditioner is not None:
        kwargs["weights"] = preconditioner_weights(trainable_params(model, detach=False), preconditioner)
    fast_kwargs = {**kwargs, "factored_mean": factored_mean}
    if method != "auto":
        return backends[method](model, loss_fn, inputs, targets, **(fast_kwargs if method == "fast" else kwargs))
    known = is_known_mean_loss(loss_fn, targets)  # then fast_moments need not check it again
    if known or fast_applies(model, loss_fn, inputs, targets):
        try:
            return backends["fast"](model, loss_fn, inputs, targets, **fast_kwargs, known_mean=known)
        except NotMeanLossError:
            pass  # the loss is not a plain mean of per-example losses on this batch
    return backends["vmap"](model, loss_fn, inputs, targets, **kwargs)


def gradient_stats(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Batch,
    targets: Batch,
    *,
    method: Method = "auto",
    dataset_size: int | None = None,
    variance: bool = True,
    chunk_size: int | None = None,
    preconditioner: Preconditioner | None = None,
) -> GradientStats:
    """Mean, variance, ``tr Σ``, ``|G|²``, GSNR and ``B_simple`` of one batch's gradients.

    Args:
        model: the model, evaluated in its current mode; never modified.
        loss_fn: mean-reduced ``loss_fn(outputs, targets)``.
        inputs: Tensor or tuple of Tensors with a leading batch dimension ``B ≥ 2``.
        targets: Tensor (or tuple) with the same leading dimension.
        method: ``"fast"`` (hooks, one backward; :mod:`gradnoise.engine`), ``"vmap"``
            (materialised per-example gradients, :func:`gradnoise.per_sample_grads`), or
            ``"auto"`` (``"fast"`` unless the loss is not a plain mean of per-example losses,
            e.g. class-weighted cross-entropy or ``ignore_index`` targets).
        dataset_size: ``N`` if the batch was drawn without replacement from ``N`` examples
            (finite-population correction); ``None`` for an infinite stream.
        variance: also compute the per-element variance and GSNR (one extra matrix product
            per layer on the fast path).
        chunk_size: for ``"vmap"``, examples per chunk; bounds memory to ``chunk × P``.
        preconditioner: a diagonal metric ``P``: a dict ``{name: positive tensor}`` over the
            trainable parameters, or an ``Adam``/``AdamW`` optimizer (``P = 1/(√v̂ + eps)``
            from its state, read only). Every statistic is then in the P-metric
            (``tr(PΣ)``, ``GᵀPG``, ``B_simple^P``; see ``GradientStats.metric``), unbiased
            as without it.

    Returns:
        :class:`GradientStats`.

    Raises:
        ValueError: batch of fewer than 2 examples, mismatched batch, non-scalar or
            non-mean loss, BatchNorm in train mode or another forward pass that mixes
            examples, no trainable parameters, unknown method.
        FloatingPointError: NaN or inf in the loss or gradients.

    Example:
        >>> import torch, gradnoise as gn
        >>> model = torch.nn.Linear(4, 1)
        >>> s = gn.gradient_stats(model, torch.nn.MSELoss(), torch.randn(32, 4), torch.randn(32, 1))
        >>> s.batch_size, s.trace_cov > 0
        (32, True)
    """
    batch_size_of(inputs, targets, min_size=2)
    check_dataset_size(as_tuple(inputs)[0].shape[0], dataset_size)
    m = compute_moments(
        model, loss_fn, inputs, targets, method=method, variance=variance, chunk_size=chunk_size,
        factored_mean=True, preconditioner=preconditioner,
    )  # fmt: skip
    # Results in the parameters' dtypes; only merged (chunked) moments are promoted to float64.
    dtypes = {n: p.dtype for n, p in model.named_parameters()} if m.promoted else None
    metric = "euclidean" if preconditioner is None else "preconditioned"
    return stats_from_moments(m, dataset_size=dataset_size, dtypes=dtypes, consume=True, metric=metric)


class StatsAccumulator:
    """Streams many batches into exact data-set-level statistics (float64, Chan's merge).

    The result equals :func:`gradient_stats` on the concatenation of all batches (up to
    float64 rounding), without holding more than one batch of gradients.

    Example:
        >>> import torch, gradnoise as gn
        >>> model, loss = torch.nn.Linear(4, 1), torch.nn.MSELoss()
        >>> acc = gn.StatsAccumulator(model, loss)
        >>> for _ in range(3):
        ...     acc.update(torch.randn(16, 4), torch.randn(16, 1))
        >>> acc.compute().batch_size
        48
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        *,
        method: Method = "auto",
        dataset_size: int | None = None,
        variance: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        self.model, self.loss_fn = model, loss_fn
        self.method, self.dataset_size = method, dataset_size
        self.variance, self.chunk_size = variance, chunk_size
        self._moments: Moments | None = None

    @property
    def count(self) -> int:
        return 0 if self._moments is None else self._moments.count

    def update(self, inputs: Batch, targets: Batch) -> None:
        """Add one batch (any size ≥ 1)."""
        m = compute_moments(
            self.model,
            self.loss_fn,
            inputs,
            targets,
            method=self.method,
            variance=self.variance,
            chunk_size=self.chunk_size,
        )
        self._moments = m if self._moments is None else self._moments.merge(m)

    def compute(self) -> GradientStats:
        """Statistics of all examples seen so far.

        Raises:
            ValueError: fewer than 2 examples seen.
        """
        if self._moments is None:
            raise ValueError("no batch seen: call update(inputs, targets) first")
        dtypes = {n: p.dtype for n, p in self.model.named_parameters()}
        return stats_from_moments(self._moments, dataset_size=self.dataset_size, dtypes=dtypes)

    def reset(self) -> None:
        self._moments = None
