"""Claim 8 (seed 000): k micro-batches of b give the same update as one batch of kb — to
float tolerance without BatchNorm, and a different one with BatchNorm in train mode (its
statistics are per micro-batch).

One SGD step from the same initialisation, both ways, in float32 and float64; the result
is the largest parameter difference relative to the update size.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.tasks import bn_cnn, gn_cnn, mnist1d_data, mnist1d_mlp

from .. import common

NAME = "accumulation"


@dataclass(frozen=True)
class Config:
    batch: int = 64
    micro_batches: tuple = (2, 4, 8, 16)
    lr: float = 0.1
    seed: int = 0


QUICK = {"micro_batches": (4,)}


def one_step(model, x, y, k, lr):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt.zero_grad()
    for xb, yb in zip(x.chunk(k), y.chunk(k), strict=True):
        (nn.functional.cross_entropy(model(xb), yb) / k).backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def body(cfg: Config) -> dict:
    x, y, _, _ = mnist1d_data()
    out = []
    for name, factory in (("MLP", mnist1d_mlp), ("CNN + GroupNorm", gn_cnn), ("CNN + BatchNorm", bn_cnn)):
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(cfg.seed)
            base = factory().to(dtype).train()
            xb, yb = x[: cfg.batch].to(dtype), y[: cfg.batch]
            start = torch.cat([p.detach().flatten() for p in base.parameters()])
            full = one_step(copy.deepcopy(base), xb, yb, 1, cfg.lr)
            update = float((full - start).norm())
            for k in cfg.micro_batches:
                acc = one_step(copy.deepcopy(base), xb, yb, k, cfg.lr)
                out.append({"model": name, "dtype": str(dtype).split(".")[1], "micro_batches": k,
                            "micro_batch": cfg.batch // k, "max_abs_diff": float((acc - full).abs().max()),
                            "rel_diff": float((acc - full).norm()) / update})  # fmt: skip
    return {"rows": out}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
