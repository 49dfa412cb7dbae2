"""The Hessian-aware noise scale ``B_noise = tr(HΣ) / GᵀHG`` (McCandlish et al. 2018,
arXiv:1812.06162, §2.2 and App. A) from per-example gradients and Hessian-vector products
over a stated set of examples; ``ε_opt(B) = ε_max / (1 + B_noise / B)`` with
``ε_max = |G|² / GᵀHG``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gradnoise._compat import renamed_keywords
from gradnoise._data import Data, as_data, concat
from gradnoise._functional import LossFn, trainable_params
from gradnoise.hessian import HVPMethod, hessian_operator
from gradnoise.per_sample import per_sample_grads
from gradnoise.preconditioner import Preconditioner, preconditioner_weights

__all__ = ["BNoise", "b_noise"]


@dataclass(frozen=True)
class BNoise:
    """``B_noise = tr(HΣ)/GᵀHG`` and the quantities it is made of.

    Attributes:
        b_noise: the estimate; interval: bootstrap over the examples of ``tr(HΣ)``.
        trace_h_sigma: ``tr(HΣ)``; gthg: ``GᵀHG`` (bias-corrected); grad_norm_sq: ``|G|²``.
        eps_max: ``|G|²/GᵀHG``, the optimal step size with an exact gradient.
        examples: examples whose gradient deviations estimate ``tr(HΣ)``; num_hvps.
    """

    b_noise: float
    interval: tuple[float, float]
    trace_h_sigma: float
    gthg: float
    grad_norm_sq: float
    eps_max: float
    examples: int
    num_hvps: int

    def eps_opt(self, batch_size: float) -> float:
        """``ε_opt(B) = ε_max / (1 + B_noise/B)`` (McCandlish et al. 2018, Eq. 2.6)."""
        return self.eps_max / (1 + self.b_noise / batch_size)


@renamed_keywords(batches="data")
def b_noise(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    *,
    examples: int = 64,
    dataset_size: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    hvp: HVPMethod = "auto",
    preconditioner: Preconditioner | None = None,
) -> BNoise:
    """Estimate ``B_noise = tr(HΣ)/GᵀHG`` with Hessian-vector products.

    ``H`` and ``G`` are the Hessian and gradient of the mean loss over all examples in
    ``data`` (the stated set). ``tr(HΣ) = E[(g_i − G)ᵀ H (g_i − G)]`` is estimated from
    the per-example gradient deviations of the first ``examples`` examples (one HVP each,
    ``1/(m−1)`` normalisation); ``GᵀHG`` from one HVP, corrected for the noise in ``Ĝ``:
    ``E[ĜᵀHĜ] = GᵀHG + tr(HΣ)(1/n − 1/N)`` over ``n`` examples (``1/N = 0`` for a stream).
    ``hvp``: how Hessian-vector products are computed, as ``method`` of
    :func:`~gradnoise.hessian_operator`.

    With a diagonal ``preconditioner`` ``P`` (as in :func:`~gradnoise.gradient_stats`), the
    P-metric quantities (McCandlish et al. 2018, §2 with ``Δθ = −εPĝ``): ``B_noise^P =
    tr(PHPΣ)/GᵀPHPG``, ``|G|²`` as ``GᵀPG`` and ``ε_max = GᵀPG/GᵀPHPG``; each product is
    ``H(P ⊙ v)``, so that ``(g_i − G)ᵀPHP(g_i − G) = uᵀHu`` with ``u = P ⊙ (g_i − G)``.

    Raises:
        ValueError: fewer than 2 examples for ``tr(HΣ)``, and as :func:`hessian_operator`.
    """
    from scipy import stats

    bs = as_data(data)
    op = hessian_operator(model, loss_fn, bs, method=hvp)
    n = op.num_examples
    xs, ys = concat(bs)
    m = min(examples, n)
    if m < 2:
        raise ValueError(f"tr(HΣ) needs at least 2 examples, got {m}")
    g = per_sample_grads(model, loss_fn, tuple(t[:m] for t in xs), ys[0][:m] if len(ys) == 1 else tuple(t[:m] for t in ys))
    flat = torch.cat([v.reshape(m, -1) for v in g.values()], dim=1)
    dev = flat - flat.mean(0)
    P = torch.ones_like(flat[0])
    if preconditioner is not None:
        weights = preconditioner_weights(trainable_params(model, detach=False), preconditioner)
        P = torch.cat([weights[k].reshape(-1) for k in g])
    q = np.concatenate([
        (u * op.matmat(u.T).T).sum(1).double().cpu().numpy() for u in (dev * P).split(256)
    ]) * m / (m - 1)  # (g_i − ḡ)ᵀPHP(g_i − ḡ); mean(q) is unbiased for tr(PHPΣ)
    tr_hs = float(q.mean())
    G = op.gradient()
    inv_n = 1.0 / n - (0.0 if dataset_size is None else 1.0 / dataset_size)
    # trace of PΣ from the same deviations, for the |G|²_P correction
    tr_s = float((dev.square() * P).sum()) / (m - 1)
    gthg = float((P * G) @ op.matvec(P * G)) - tr_hs * inv_n
    g2 = float(G @ (P * G)) - tr_s * inv_n
    res = stats.bootstrap((q,), np.mean, confidence_level=confidence, n_resamples=2000, method="percentile", random_state=np.random.default_rng(seed))
    lo, hi = res.confidence_interval
    ratio = (lambda x: x / gthg) if gthg > 0 else (lambda x: math.inf)
    return BNoise(
        b_noise=ratio(tr_hs),
        interval=(ratio(float(lo)), ratio(float(hi))),
        trace_h_sigma=tr_hs,
        gthg=gthg,
        grad_norm_sq=g2,
        eps_max=g2 / gthg if gthg > 0 else math.inf,
        examples=m,
        num_hvps=op.num_hvps,
    )
