"""Claim 12: under Adam, does a gradient noise scale predict the critical batch size — the
SGD one, ``B_simple = tr Σ / |G|²``, or the preconditioned one of the update ``−εPĝ``,
``B_simple^P = tr(PΣ) / GᵀPG`` and ``B_noise^P = tr(PHPΣ) / GᵀPHPG`` (McCandlish et al.
2018, §2 and App. E; ``P = 1/(√v̂ + eps)``)? And does the best Adam learning rate grow as
``√B`` (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive Gradient
Algorithms") or as ``B``?

Per model (the MNIST-1D MLP and CNN) and seed: Adam from the seeded initialisation at each
batch size until the training accuracy on the first 1000 training examples reaches the
target; the learning rate is tuned per batch size on a grid that is widened (×3 or ÷3, up
to ``max_extensions`` times) while the best value sits on its edge, and the fewest steps
count. ``S = S_min + E_min/B`` is fitted per seed and on all seeds' points. Along a B = 64
Adam run with its best learning rate, the SGD and the preconditioned noise scales are
measured at checkpoints (the optimizer's state at that step gives ``P``) and averaged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_cnn, mnist1d_data, mnist1d_mlp

from .. import common

NAME = "adam_noise_scale"
MODELS = {"mlp": mnist1d_mlp, "cnn": mnist1d_cnn}


@dataclass(frozen=True)
class Config:
    models: tuple = ("mlp", "cnn")
    batch_sizes: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    lrs: tuple = (3e-4, 1e-3, 3e-3, 1e-2)
    max_extensions: int = 2
    target_accuracy: float = 0.7
    max_steps: int = 4000
    eval_every: int = 10
    seeds: tuple = (0, 1, 2)
    noise_batch: int = 64
    noise_checkpoints: tuple = (10, 100, 300, 1000)


QUICK = {"models": ("mlp",), "batch_sizes": (32, 128, 512), "lrs": (1e-3,), "max_extensions": 0,
         "target_accuracy": 0.4, "max_steps": 300, "noise_checkpoints": (10, 40), "seeds": (0,)}  # fmt: skip


def sweep_one(cfg: Config, make_model, B: int, seed: int, x, y) -> dict:
    """The best Adam run at batch size B over a grid widened while its best is on an edge."""
    grid, runs = sorted(cfg.lrs), []

    def run(lrs):
        s = gn.critical_batch_sweep(
            make_model, nn.CrossEntropyLoss(), (x, y), [B], target_accuracy=cfg.target_accuracy,
            eval_data=(x[:1000], y[:1000]), lrs=lrs, optimizer=torch.optim.Adam, max_steps=cfg.max_steps,
            eval_every=cfg.eval_every, seed=seed, progress=False,
        )  # fmt: skip
        runs.extend(r.__dict__ for r in s.runs)

    run(grid)
    for _ in range(cfg.max_extensions):
        reached = [r for r in runs if r["steps"] is not None]
        if not reached:
            break
        best = min(reached, key=lambda r: r["steps"])["lr"]
        if best == grid[0]:
            grid.insert(0, grid[0] / 3)
            run([grid[0]])
        elif best == grid[-1]:
            grid.append(grid[-1] * 3)
            run([grid[-1]])
        else:
            break
    reached = [r for r in runs if r["steps"] is not None]
    best = min(reached, key=lambda r: r["steps"]) if reached else None
    edge = best is not None and best["lr"] in (grid[0], grid[-1])
    return {"batch_size": B, "best": best, "grid": grid, "best_on_edge": edge, "runs": runs}


def noise_along_run(cfg: Config, make_model, lr: float, seed: int, x, y) -> list[dict]:
    """SGD and preconditioned noise scales at checkpoints of a B=64 Adam run."""
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 1)
    out, done = [], 0
    for c in cfg.noise_checkpoints:
        for _ in range(c - done):
            idx = torch.randint(0, x.shape[0], (cfg.noise_batch,), generator=g)
            common.sgd_step(model, opt, loss_fn, x[idx], y[idx])
        done = c
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(c))
        batches = [(x[i], y[i]) for i in perm[: 8 * 256].split(256)]
        kw = dict(dataset_size=x.shape[0], hessian=True, hessian_examples=64)
        sgd = gn.noise_scale(model, loss_fn, batches, **kw)
        pre = gn.noise_scale(model, loss_fn, batches, preconditioner=opt, **kw)
        out.append({"step": c, "b_simple": sgd.b_simple, "b_noise": sgd.b_noise,
                    "b_simple_p": pre.b_simple, "b_noise_p": pre.b_noise})  # fmt: skip
    return out


def one_model(cfg: Config, name: str, x, y) -> dict:
    make_model = MODELS[name]
    per_seed = []
    for seed in cfg.seeds:
        sweeps = [sweep_one(cfg, make_model, B, seed, x, y) for B in cfg.batch_sizes]
        ok = [s["best"] for s in sweeps if s["best"] is not None]
        fit = gn.fit_critical_batch([r["batch_size"] for r in ok], [r["steps"] for r in ok]) if len(ok) >= 3 else None
        grid = sorted(cfg.lrs)
        lr64 = next((s["best"]["lr"] for s in sweeps if s["batch_size"] == 64 and s["best"]), grid[len(grid) // 2])
        per_seed.append({
            "seed": seed, "sweeps": sweeps, "fit": None if fit is None else fit.to_dict(),
            "noise_along_b64_run": noise_along_run(cfg, make_model, lr64, seed, x, y),
        })  # fmt: skip
    points = [(s["batch_size"], s["best"]["steps"]) for ps in per_seed for s in ps["sweeps"] if s["best"]]
    fit = gn.fit_critical_batch([b for b, _ in points], [n for _, n in points]) if len({b for b, _ in points}) >= 3 else None
    noise = [n for ps in per_seed for n in ps["noise_along_b64_run"]]
    means = {}
    for k in ("b_simple", "b_noise", "b_simple_p", "b_noise_p"):
        vals = [n[k] for n in noise if n[k] is not None and math.isfinite(n[k]) and n[k] > 0]
        means[k] = float(np.mean(vals)) if vals else None
    return {"per_seed": per_seed, "fit": None if fit is None else fit.to_dict(), "noise_means": means,
            "lr_scaling": lr_scaling(per_seed, None if fit is None else fit.b_crit)}  # fmt: skip


def lr_scaling(per_seed: list[dict], b_crit: float | None) -> dict:
    """Exponent k of best lr ∝ B^k (least squares on log lr vs log B over seeds' best runs):
    over all B, and over B ≤ B_crit, where scaling rules are meant to hold."""
    pts = [(s["batch_size"], s["best"]["lr"]) for ps in per_seed for s in ps["sweeps"] if s["best"]]

    def slope(ps):
        if len({b for b, _ in ps}) < 2:
            return None
        return float(np.polyfit(np.log([b for b, _ in ps]), np.log([lr for _, lr in ps]), 1)[0])

    below = [p for p in pts if b_crit is not None and p[0] <= b_crit]
    return {"all": slope(pts), "below_b_crit": slope(below), "points": pts}


def body(cfg: Config) -> dict:
    x, y, _, _ = mnist1d_data()
    return {"target": f"accuracy ≥ {cfg.target_accuracy}", "models": {m: one_model(cfg, m, x, y) for m in cfg.models}}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
