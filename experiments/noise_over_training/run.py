"""Claim 3: the gradient noise scale grows during training (McCandlish et al. 2018 report
10× or more as the loss falls).

MNIST-1D MLP, SGD (B=64, lr 0.05, momentum 0.9), several seeds. gn.Monitor records tr Σ,
|G|² and B_simple (EMA) every 10 steps; at checkpoints, B_simple with its
bootstrap interval and B_noise = tr(HΣ)/GᵀHG over fixed batches of training data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_data, mnist1d_mlp

from .. import common
from ..common import accuracy

NAME = "noise_over_training"


@dataclass(frozen=True)
class Config:
    steps: int = 4000
    batch: int = 64
    lr: float = 0.05
    checkpoints: tuple = (0, 100, 300, 1000, 2000, 4000)
    seeds: tuple = (0, 1, 2)
    noise_batches: int = 12
    noise_batch_size: int = 256
    hessian_examples: int = 64
    every: int = 10  # monitor schedule; the EMA (β = 0.9) then spans ≈ 100 steps


QUICK = {"steps": 150, "checkpoints": (0, 150), "seeds": (0,), "noise_batches": 4, "hessian_examples": 16}


def body(cfg: Config) -> dict:
    x, y, xt, yt = mnist1d_data()
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        model = mnist1d_mlp()
        mon = gn.Monitor(model, loss_fn, every=cfg.every, ema=0.9)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        g = torch.Generator().manual_seed(seed + 100)
        checkpoints = []

        @torch.no_grad()
        def full_loss():
            return float(loss_fn(model(x), y))

        def checkpoint(step):
            perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
            batches = [(x[i], y[i]) for i in perm[: cfg.noise_batches * cfg.noise_batch_size].split(cfg.noise_batch_size)]
            ns = gn.noise_scale(model, loss_fn, batches, dataset_size=x.shape[0], hessian=True, hessian_examples=cfg.hessian_examples, seed=seed)
            checkpoints.append({
                "step": step, "train_loss": full_loss(), "test_accuracy": accuracy(model, xt, yt),
                "b_simple": ns.b_simple, "b_simple_interval": ns.b_simple_interval, "b_noise": ns.b_noise,
                "b_noise_interval": ns.b_noise_interval, "trace_cov": ns.trace_cov, "grad_norm_sq": ns.grad_norm_sq,
            })  # fmt: skip

        for step in range(cfg.steps + 1):
            if step in cfg.checkpoints:
                checkpoint(step)
            if step == cfg.steps:
                break
            idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            mon.step(x[idx], y[idx], optimizer=opt, loss=loss)
            opt.step()
        mon.close()
        keep = ("step", "loss", "trace_cov", "grad_norm_sq", "b_simple", "b_simple_ema")
        runs.append({"seed": seed, "errors": mon.errors, "checkpoints": checkpoints,
                     "records": [{k: r.get(k) for k in keep} for r in mon.history.records]})  # fmt: skip
    return {"runs": runs}


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
