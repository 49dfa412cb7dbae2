"""Claim 5 (Keskar et al. 2017; seeds 000 and 001): large batches converge to sharper
minima that generalise worse — and does the gap survive a learning rate tuned for the
large batch?

MNIST-1D MLP trained for the same number of epochs at a small batch (B_s) and a large one
(B_l), SGD with momentum 0.9: B_l once with B_s's learning rate (Keskar's setting) and once
with its learning rate tuned on a grid (best final training loss). Each solution: training
loss, test accuracy, λ_max of the Hessian of the training loss (Lanczos), ε-sharpness
(Keskar's metric, full space, ε = 1e-3, L-BFGS-B with 10 iterations) and the loss along the
line from the small-batch to the large-batch solution (Keskar Fig. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_data, mnist1d_mlp

from .. import common
from ..common import accuracy, train

NAME = "sharp_minima"


@dataclass(frozen=True)
class Config:
    small_batch: int = 32
    large_batch: int = 2048
    epochs: int = 100
    lr: float = 0.05
    large_lrs: tuple = (0.05, 0.2, 0.4, 0.8)
    seeds: tuple = (0, 1)
    epsilon: float = 1e-3


QUICK = {"epochs": 2, "large_lrs": (0.05, 0.2), "seeds": (0,)}


def measure(model, loss_fn, x, y, xt, yt, cfg) -> dict:
    model.eval()
    eig = gn.hessian_eigenvalues(model, loss_fn, (x, y), tol=1e-3)
    eps = gn.epsilon_sharpness(model, loss_fn, (x, y), epsilon=cfg.epsilon)
    with torch.no_grad():
        train_loss = float(loss_fn(model(x), y))
    return {"train_loss": train_loss, "train_accuracy": accuracy(model, x, y), "test_accuracy": accuracy(model, xt, yt),
            "lambda_max": eig.eigenvalues[0], "epsilon_sharpness": eps.sharpness}  # fmt: skip


def body(cfg: Config) -> dict:
    x, y, xt, yt = mnist1d_data()
    loss_fn = nn.CrossEntropyLoss()
    steps = lambda b: max(1, cfg.epochs * x.shape[0] // b)  # noqa: E731
    runs = []
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        small = mnist1d_mlp()
        train(small, loss_fn, x, y, steps=steps(cfg.small_batch), batch=cfg.small_batch, lr=cfg.lr, momentum=0.9, seed=seed)
        large = {}
        for lr in cfg.large_lrs:
            torch.manual_seed(seed)
            m = mnist1d_mlp()
            losses = train(m, loss_fn, x, y, steps=steps(cfg.large_batch), batch=cfg.large_batch, lr=lr, momentum=0.9, seed=seed)
            large[lr] = (m, sum(losses[-5:]) / 5)
        finite = {lr: v for lr, v in large.items() if v[1] == v[1] and v[1] < float("inf")}
        tuned_lr = min(finite, key=lambda lr: finite[lr][1])
        out = {"seed": seed, "tuned_lr": tuned_lr, "small": measure(small, loss_fn, x, y, xt, yt, cfg)}
        for label, lr in (("large_same_lr", cfg.lr), ("large_tuned_lr", tuned_lr)):
            m = large[lr][0]
            out[label] = measure(m, loss_fn, x, y, xt, yt, cfg)
            acc = lambda o, t: (o.argmax(1) == t).float().mean()  # noqa: E731
            line = gn.loss_along_line(small, loss_fn, (x, y), small, m, metric=acc)
            out[f"line_to_{label}"] = {"alphas": line.alphas.tolist(), "losses": line.losses.tolist(), "accuracy": line.metric.tolist()}
        runs.append(out)
    return {"runs": runs, "steps_small": steps(cfg.small_batch), "steps_large": steps(cfg.large_batch)}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
