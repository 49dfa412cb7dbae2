"""Claims 1 and 2: gradient-noise variance falls as 1/B (with the finite-population bend
near B = N), so its standard deviation falls only as 1/√B while compute grows as B.

MNIST-1D MLP, at initialisation and after training; for each batch size, ``repeats``
batches drawn without replacement from the N training examples are compared with the
full-data gradient (gn.noise_law).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_data, mnist1d_mlp

from .. import common
from ..common import train

NAME = "noise_law"


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3000, 3600, 3900, 4000)
    repeats: int = 64
    train_steps: int = 1000
    lr: float = 0.05
    seed: int = 0


QUICK = {"batch_sizes": (2, 8, 32, 128, 512), "repeats": 6, "train_steps": 50}


def body(cfg: Config) -> dict:
    x, y, _, _ = mnist1d_data()
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(cfg.seed)
    model = mnist1d_mlp()
    out = {}
    for state in ("init", "trained"):
        if state == "trained":
            train(model, loss_fn, x, y, steps=cfg.train_steps, batch=64, lr=cfg.lr, momentum=0.9, seed=cfg.seed)
        sizes = [b for b in cfg.batch_sizes if b <= x.shape[0]]
        law = gn.noise_law(model, loss_fn, (x, y), sizes, repeats=cfg.repeats, seed=cfg.seed)
        out[state] = law.to_dict()
    return out


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
