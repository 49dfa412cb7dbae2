"""Diagonal preconditioners: the metric of the noise scale under an adaptive optimizer.

For an update ``Δθ = −ε P ĝ_B`` with a diagonal preconditioner ``P`` (Adam:
``P = 1 / (√v̂ + eps)``), the quadratic model of McCandlish et al. 2018 ("An Empirical
Model of Large-Batch Training", §2 and App. E) gives

    E L(θ + Δθ) = L − ε GᵀPG + ½ ε² (GᵀPHPG + tr(PHPΣ)/B),

so the noise scales in the P-metric are ``B_simple^P = tr(PΣ) / (GᵀPG)`` and
``B_noise^P = tr(PHPΣ) / (GᵀPHPG)``. Both are the ordinary noise scales of the whitened
gradients ``g̃ = √P ⊙ g`` (with Hessian ``√P H √P``), which is how every engine computes
them: the same unbiased estimators, applied to ``√P ⊙ g_i``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["Preconditioner", "check_preconditioner", "preconditioner_weights", "step_metric"]

Preconditioner = Mapping[str, Tensor] | torch.optim.Adam | torch.optim.AdamW


def preconditioner_weights(named: Mapping[str, Tensor], preconditioner: Preconditioner) -> dict[str, Tensor]:
    """``P`` per trainable parameter (detached, in the parameter's dtype and device).

    Args:
        named: the trainable parameters by name.
        preconditioner: a dict of positive tensors shaped like the parameters (every
            trainable parameter), or an ``Adam``/``AdamW`` optimizer over them, whose ``P``
            is ``1 / (√v̂ + eps)`` from its state (``v̂`` bias-corrected; AMSGrad's maximum
            where enabled), read without changing it.

    Raises:
        TypeError: another optimizer, or not a mapping.
        ValueError: a missing or extra name, a wrong shape, a value that is not positive and
            finite, or an optimizer without state (before its first step) or not over the
            model's parameters.
    """
    if isinstance(preconditioner, (torch.optim.Adam, torch.optim.AdamW)):
        return _from_adam(named, preconditioner)
    if isinstance(preconditioner, torch.optim.Optimizer):
        raise TypeError(
            f"preconditioner={type(preconditioner).__name__}: only Adam and AdamW define the diagonal "
            "preconditioner read here; pass a dict {name: P} for another optimizer"
        )
    if not isinstance(preconditioner, Mapping):
        raise TypeError(f"preconditioner must be a dict of tensors or an Adam/AdamW optimizer, got {type(preconditioner).__name__}")
    missing, extra = named.keys() - preconditioner.keys(), preconditioner.keys() - named.keys()
    if missing or extra:
        raise ValueError(
            f"the preconditioner needs exactly the trainable parameters; missing {sorted(missing)[:3]}, "
            f"not trainable or unknown {sorted(extra)[:3]}"
        )
    out = {}
    for name, p in named.items():
        w = preconditioner[name]
        if not isinstance(w, Tensor) or w.shape != p.shape:
            shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(f"preconditioner[{name!r}] has shape {shape}, the parameter {tuple(p.shape)}")
        w = w.detach().to(device=p.device, dtype=p.dtype)
        if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
            raise ValueError(f"preconditioner[{name!r}] must be positive and finite everywhere (a diagonal metric)")
        out[name] = w
    return out


def _from_adam(named: Mapping[str, Tensor], optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """``1 / (√v̂ + eps)`` of each parameter, ``v̂ = v / (1 − β₂ᵗ)`` (Kingma & Ba 2015, Alg. 1;
    torch's Adam divides by ``√v / √(1 − β₂ᵗ) + eps``, the same), a few ``foreach``
    operations per parameter group."""
    by_id = {id(p): n for n, p in named.items()}
    out = {}
    for group in optimizer.param_groups:
        beta2, eps = group["betas"][1], group["eps"]
        names, vs, corrections = [], [], []
        for p in group["params"]:
            name = by_id.get(id(p))
            if name is None:
                continue
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                raise ValueError(
                    f"{type(optimizer).__name__} has no state for {name!r} yet: its preconditioner exists "
                    "after the optimizer's first step"
                )
            names.append(name)
            vs.append((state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]).detach())
            corrections.append(1.0 / (1 - beta2 ** float(state["step"])) ** 0.5)
        if not names:
            continue
        with torch.no_grad():
            # v ≥ 0: its sum is finite exactly when every element is (one cheap pass)
            if not bool(torch.stack([v.sum() for v in vs]).isfinite().all()):
                raise ValueError(
                    f"{type(optimizer).__name__}'s second moments hold inf or NaN (an overflowed gradient): "
                    "its preconditioner is undefined"
                )
            denom = torch._foreach_sqrt(vs)
            torch._foreach_mul_(denom, corrections)
            torch._foreach_add_(denom, eps)
            torch._foreach_reciprocal_(denom)
        out.update(zip(names, denom, strict=True))
    if len(out) != len(named):
        raise ValueError(
            f"the optimizer does not hold the trainable parameters {sorted(named.keys() - out.keys())[:3]}: "
            "pass the optimizer of this model"
        )
    return {n: out[n] for n in named}


def check_preconditioner(named: Mapping[str, Tensor], preconditioner: Preconditioner | None) -> dict[str, Tensor] | None:
    """What can be checked before training: an Adam/AdamW over these parameters (whose state
    comes with its first step), or a valid dict, returned as :func:`preconditioner_weights`
    gives it (a fixed metric need not be checked again every step)."""
    if preconditioner is None:
        return None
    if isinstance(preconditioner, (torch.optim.Adam, torch.optim.AdamW)):
        held = {id(p) for g in preconditioner.param_groups for p in g["params"]}
        missing = [n for n, p in named.items() if id(p) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the trainable parameters {missing[:3]}: pass the optimizer of this model")
        return None
    return preconditioner_weights(named, preconditioner)


def step_metric(named: Mapping[str, Tensor], preconditioner: Preconditioner) -> dict[str, Tensor] | None:
    """``P`` now, or ``None`` for an optimizer that has not stepped yet (no state)."""
    if isinstance(preconditioner, torch.optim.Optimizer) and any(
        "exp_avg_sq" not in preconditioner.state.get(p, {}) for p in named.values()
    ):
        return None
    return preconditioner_weights(named, preconditioner)
