"""Claim 9 (seed 000): BatchNorm degrades at small batch (B ≤ 8) while GroupNorm and a
LayerNorm-style normalisation (GroupNorm with one group) do not.

MNIST-1D CNN (16 channels) with each normalisation, trained with SGD for a fixed number of
epochs at each batch size (learning rate scaled linearly with B from 0.05 at B=32, capped),
test accuracy in eval mode (BatchNorm then uses its running statistics), several seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.tasks import mnist1d_cnn, mnist1d_data

from .. import common
from ..common import accuracy, train

NAME = "batchnorm_small_batch"

NORMS = {
    "BatchNorm": lambda c: nn.BatchNorm1d(c),
    "GroupNorm (4 groups)": lambda c: nn.GroupNorm(4, c),
    "LayerNorm-style (GroupNorm, 1 group)": lambda c: nn.GroupNorm(1, c),
}


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple = (2, 4, 8, 32, 128)
    epochs: float = 6.0
    base_lr: float = 0.05
    seeds: tuple = (0, 1)


QUICK = {"batch_sizes": (4, 64), "epochs": 0.5, "seeds": (0,)}


def body(cfg: Config) -> dict:
    x, y, xt, yt = mnist1d_data()
    rows = []
    for norm, factory in NORMS.items():
        for B in cfg.batch_sizes:
            for seed in cfg.seeds:
                torch.manual_seed(seed)
                model = mnist1d_cnn(channels=16, norm=factory)
                steps = int(cfg.epochs * x.shape[0] / B)
                lr = min(cfg.base_lr * B / 32, 0.2)
                losses = train(model, nn.CrossEntropyLoss(), x, y, steps=steps, batch=B, lr=lr, momentum=0.9, seed=seed)
                rows.append({"norm": norm, "batch_size": B, "seed": seed, "lr": lr, "steps": steps,
                             "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
                             "test_accuracy": accuracy(model, xt, yt), "train_accuracy": accuracy(model, x, y)})  # fmt: skip
    return {"rows": rows}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
