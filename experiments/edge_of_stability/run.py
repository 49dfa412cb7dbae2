"""Claim 10 (Cohen et al. 2021): with full-batch gradient descent, λ_max rises to about
2/η and hovers there ("edge of stability"), for several step sizes η.

MNIST-1D MLP (40-128-128-10, tanh), full-batch GD on the first N training examples,
λ_max of the Hessian of that loss every few steps (Lanczos, warm-started).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_data

from .. import common

NAME = "edge_of_stability"


@dataclass(frozen=True)
class Config:
    examples: int = 1000
    lrs: tuple = (0.1, 0.25, 0.5)
    steps: int = 2000
    every: int = 25
    hidden: int = 128
    seed: int = 0


QUICK = {"examples": 200, "lrs": (0.25,), "steps": 60, "every": 20}


def body(cfg: Config) -> dict:
    x, y, _, _ = mnist1d_data()
    x, y = x[: cfg.examples], y[: cfg.examples]
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for lr in cfg.lrs:
        torch.manual_seed(cfg.seed)
        model = nn.Sequential(nn.Linear(40, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 10))
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        losses, lam, v = [], [], None
        for step in range(cfg.steps + 1):
            if step % cfg.every == 0:
                eig = gn.hessian_eigenvalues(model, loss_fn, (x, y), tol=1e-3, v0=v, seed=cfg.seed)
                v = eig.eigenvectors[:, 0]
                lam.append({"step": step, "lambda_max": eig.eigenvalues[0], "hvps": eig.num_hvps})
            if step == cfg.steps:
                break
            opt.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        runs.append({"lr": lr, "two_over_lr": 2 / lr, "losses": losses, "lambda_max": lam})
    return {"runs": runs}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
