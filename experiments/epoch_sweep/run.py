"""Claim 6 (seed 001): trained for a fixed 25 epochs, small batches reach a higher test
accuracy than large ones (B = 32 best, B = 2048 worst) and large batches train faster — and
the control its commenters asked for: is it the batch size, or the fewer updates and an
untuned learning rate?

MNIST-1D CNN (no normalisation layers, 5.7k parameters), SGD with momentum 0.9, B = 8 … 2048,
three protocols:

1. ``fixed_epochs``: the seed's protocol, 25 epochs and one learning rate for every B;
2. ``fixed_epochs_tuned_lr``: 25 epochs, learning rate tuned per B;
3. ``equal_updates_tuned_lr``: the same number of updates at every B (25 epochs of B = 32),
   learning rate tuned per B.

Learning rates are tuned on a validation split held out of the training set (never on the
test set), with the first seed; every protocol is then run with all seeds. Recorded per run:
test accuracy, final training loss and accuracy (to tell under-fitting from poor
generalisation), number of updates, and wall time.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise.tasks import mnist1d_cnn, mnist1d_data

from .. import common
from ..common import accuracy, sgd_step

NAME = "epoch_sweep"


@dataclass(frozen=True)
class Config:
    batch_sizes: tuple = (8, 16, 32, 64, 128, 256, 512, 1024, 2048)
    epochs: int = 25
    fixed_lr: float = 0.01
    lrs: tuple = (0.003, 0.01, 0.03, 0.1, 0.3)
    equal_updates_batch: int = 32  # equal updates = `epochs` epochs at this batch size
    validation: int = 500
    seeds: tuple = (0, 1, 2)
    timing_repeats: int = 2


QUICK = {"batch_sizes": (16, 256), "epochs": 1, "lrs": (0.03, 0.1), "seeds": (0,), "equal_updates_batch": 64, "timing_repeats": 1}


def train_run(B: int, lr: float, steps: int, seed: int, data) -> dict:
    x, y, xv, yv, xt, yt = data
    torch.manual_seed(seed)
    model = mnist1d_cnn()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed + 1)
    n = x.shape[0]
    perm, pos, diverged = torch.randperm(n, generator=g), 0, False
    start = time.perf_counter()
    for _ in range(steps):  # epochs of shuffled data, as a data loader with shuffle=True
        if pos + B > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + B]
        pos += B
        if not sgd_step(model, opt, loss_fn, x[idx], y[idx]):
            diverged = True
            break
    seconds = time.perf_counter() - start
    with torch.no_grad():
        train_loss = float(loss_fn(model(x), y))
    diverged = diverged or not math.isfinite(train_loss)
    return {
        "batch_size": B, "lr": lr, "seed": seed, "steps": steps, "seconds": seconds, "diverged": diverged,
        "train_loss": train_loss, "train_accuracy": accuracy(model, x, y),
        "val_accuracy": accuracy(model, xv, yv), "test_accuracy": accuracy(model, xt, yt),
    }  # fmt: skip


def split_data(cfg: Config):
    x_all, y_all, xt, yt = mnist1d_data()
    split = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(1234))
    tr, va = split[cfg.validation :], split[: cfg.validation]
    return x_all[tr], y_all[tr], x_all[va], y_all[va], xt, yt


def timing(cfg: Config, data, chosen: dict, equal: int) -> list[dict]:
    """Wall time per training run of the two step budgets, each B run ``timing_repeats``
    times back to back (first seed), median: the runs above are timed too, but a sweep
    that long shares the machine with whatever else runs; this phase is short."""
    n = data[0].shape[0]
    rows = []
    for protocol in ("fixed_epochs", "equal_updates_tuned_lr"):
        for B in cfg.batch_sizes:
            steps = max(1, cfg.epochs * n // B) if protocol == "fixed_epochs" else equal
            lr = cfg.fixed_lr if protocol == "fixed_epochs" else chosen[f"{protocol}/{B}"]
            times = [train_run(B, lr, steps, cfg.seeds[0], data)["seconds"] for _ in range(cfg.timing_repeats)]
            rows.append({"protocol": protocol, "batch_size": B, "steps": steps, "seconds": statistics.median(times), "all_seconds": times})
    return rows


def body(cfg: Config) -> dict:
    data = split_data(cfg)
    n = data[0].shape[0]
    epoch_steps = {B: max(1, cfg.epochs * n // B) for B in cfg.batch_sizes}  # a partial last batch is dropped
    equal = cfg.epochs * n // cfg.equal_updates_batch
    protocols = {"fixed_epochs_tuned_lr": epoch_steps, "equal_updates_tuned_lr": dict.fromkeys(cfg.batch_sizes, equal)}
    rows, tuning, chosen = [], [], {}
    for B in cfg.batch_sizes:  # the seed's protocol: one learning rate
        rows += [dict(train_run(B, cfg.fixed_lr, epoch_steps[B], s, data), protocol="fixed_epochs") for s in cfg.seeds]
    for name, steps in protocols.items():
        for B in cfg.batch_sizes:
            trials = [dict(train_run(B, lr, steps[B], cfg.seeds[0], data), protocol=name) for lr in cfg.lrs]
            tuning += trials
            best = max(trials, key=lambda r: -1.0 if r["diverged"] else r["val_accuracy"])
            chosen[f"{name}/{B}"] = best["lr"]
            rows.append(best)  # the first seed's run at the chosen rate is a final run too
            rows += [dict(train_run(B, best["lr"], steps[B], s, data), protocol=name) for s in cfg.seeds[1:]]
    return {"rows": rows, "tuning": tuning, "chosen_lr": chosen, "train_examples": n, "equal_updates": equal,
            "timing": timing(cfg, data, chosen, equal)}  # fmt: skip


def main(argv=None):
    return common.main(NAME, Config, QUICK, body, __doc__, argv)


if __name__ == "__main__":
    main()
