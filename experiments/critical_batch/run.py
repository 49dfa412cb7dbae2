"""Claim 4 (McCandlish et al. 2018): steps to a target fall as S = S_min + E_min/B, and the
critical batch size B_crit = E_min/S_min is predicted by the gradient noise scale (within
an order of magnitude).

MNIST-1D MLP, SGD with momentum 0.9, learning rate tuned per batch size on a grid (the run
with the fewest steps counts), target: training accuracy on the first 1000 training
examples; several seeds (initialisation and batch order), a fit per seed and one on all
seeds' points. The noise scales B_simple and B_noise are measured along a B=64 run of each
seed (at the checkpoints) and averaged, to compare with the fitted B_crit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_data, mnist1d_mlp

from .. import common
from ..common import train

NAME = "critical_batch"


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    lrs: tuple = (0.01, 0.03, 0.1, 0.3, 1.0)
    target_accuracy: float = 0.7
    max_steps: int = 6000
    eval_every: int = 10
    seeds: tuple = (0, 1, 2)
    noise_checkpoints: tuple = (0, 100, 300, 1000)


QUICK = {"batch_sizes": (32, 128, 512), "lrs": (0.1,), "target_accuracy": 0.4, "max_steps": 400, "noise_checkpoints": (0, 50), "seeds": (0,)}


def one_seed(cfg: Config, seed: int, x, y) -> dict:
    loss_fn = nn.CrossEntropyLoss()
    sweep = gn.critical_batch_sweep(
        mnist1d_mlp, loss_fn, (x, y), list(cfg.batch_sizes), target_accuracy=cfg.target_accuracy,
        eval_data=(x[:1000], y[:1000]), lrs=list(cfg.lrs), momentum=0.9, max_steps=cfg.max_steps,
        eval_every=cfg.eval_every, seed=seed, progress=False,
    )  # fmt: skip
    ok = [r for r in sweep.best if r.steps is not None]
    fit = gn.fit_critical_batch([r.batch_size for r in ok], [r.steps for r in ok]) if len({r.batch_size for r in ok}) >= 3 else None
    # Noise scales along a B=64 run with the best learning rate found for B=64 (or the grid's middle).
    lr64 = next((r.lr for r in sweep.best if r.batch_size == 64 and r.steps), cfg.lrs[len(cfg.lrs) // 2])
    torch.manual_seed(seed)
    model = mnist1d_mlp()
    noise, done = [], 0
    for c in cfg.noise_checkpoints:
        if c > done:
            train(model, loss_fn, x, y, steps=c - done, batch=64, lr=lr64, momentum=0.9, seed=seed + c)
            done = c
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c))
        batches = [(x[i], y[i]) for i in perm[: 8 * 256].split(256)]
        ns = gn.noise_scale(model, loss_fn, batches, dataset_size=x.shape[0], hessian=True, hessian_examples=64)
        noise.append({"step": c, "b_simple": ns.b_simple, "b_noise": ns.b_noise})
    return {
        "seed": seed,
        "target": sweep.target,
        "best": [r.__dict__ for r in sweep.best],
        "runs": [r.__dict__ for r in sweep.runs],
        "fit": None if fit is None else fit.to_dict(),
        "noise_along_b64_run": noise,
    }


def body(cfg: Config) -> dict:
    x, y, _, _ = mnist1d_data()
    per_seed = [one_seed(cfg, s, x, y) for s in cfg.seeds]
    points = [(r["batch_size"], r["steps"]) for ps in per_seed for r in ps["best"] if r["steps"]]
    fit = gn.fit_critical_batch([b for b, _ in points], [s for _, s in points]) if len({b for b, _ in points}) >= 3 else None
    noise = [n for ps in per_seed for n in ps["noise_along_b64_run"]]
    finite = lambda k: [n[k] for n in noise if n[k] is not None and np.isfinite(n[k]) and n[k] > 0]  # noqa: E731
    return {
        "target": per_seed[0]["target"],
        "per_seed": per_seed,
        "fit": None if fit is None else fit.to_dict(),
        "b_simple_mean": float(np.mean(finite("b_simple"))) if finite("b_simple") else None,
        "b_noise_mean": float(np.mean(finite("b_noise"))) if finite("b_noise") else None,
    }


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
