"""Claim 7 (seed 000; Goyal et al. 2017): scaling the learning rate linearly with the batch
size keeps accuracy up to a point (about the critical batch size), and warmup widens the
range.

MNIST-1D MLP, SGD with momentum 0.9, lr = base_lr · B / base_batch, a fixed number of
epochs at every B, with and without a linear warmup over the first warmup_epochs; final
training loss and test accuracy, several seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.tasks import mnist1d_data, mnist1d_mlp

from .. import common
from ..common import accuracy, sgd_step

NAME = "linear_scaling"


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple = (16, 32, 64, 128, 256, 512, 1024, 2048)
    base_lr: float = 0.02
    base_batch: int = 16
    epochs: int = 30
    warmup_epochs: float = 5.0
    seeds: tuple = (0, 1)


QUICK = {"batch_sizes": (16, 256), "epochs": 1, "seeds": (0,)}


def run(cfg: Config, B: int, warmup: bool, seed: int, x, y, xt, yt) -> dict:
    torch.manual_seed(seed)
    model = mnist1d_mlp()
    loss_fn = nn.CrossEntropyLoss()
    lr = cfg.base_lr * B / cfg.base_batch
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = max(1, cfg.epochs * x.shape[0] // B)
    warm = max(1, int(cfg.warmup_epochs * x.shape[0] / B)) if warmup else 0
    g = torch.Generator().manual_seed(seed + 1)
    diverged = False
    for step in range(steps):
        if warm:
            for group in opt.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / warm)
        idx = torch.randint(0, x.shape[0], (B,), generator=g)
        if not sgd_step(model, opt, loss_fn, x[idx], y[idx]):
            diverged = True
            break
    with torch.no_grad():
        train_loss = float(loss_fn(model(x), y))
    return {"batch_size": B, "warmup": warmup, "seed": seed, "lr": lr, "steps": steps, "warmup_steps": warm,
            "diverged": diverged or not math.isfinite(train_loss), "train_loss": train_loss,
            "test_accuracy": accuracy(model, xt, yt)}  # fmt: skip


def body(cfg: Config) -> dict:
    x, y, xt, yt = mnist1d_data()
    rows = [run(cfg, B, w, s, x, y, xt, yt) for B in cfg.batch_sizes for w in (False, True) for s in cfg.seeds]
    return {"rows": rows}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
