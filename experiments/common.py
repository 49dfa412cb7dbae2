"""Shared experiment plumbing: config dataclasses with argparse overrides, result files with
their config and seed, skip-if-present unless --force, and training helpers.

Every experiment lives in ``experiments/<name>/run.py`` with a frozen ``Config`` (full-mode
defaults) and a ``QUICK`` override dict for ``--quick`` (the CI smoke run). Results go to
``<out>/results/<name>/<mode>.json`` (``mode`` is ``full`` or ``quick``; ``--out`` defaults
to ``gradnoise-reproduce`` in the working directory). The report's own results are in
``paper_figures/results`` (``gradnoise reproduce --out paper_figures`` renews them).

The package installs this folder as ``gradnoise.experiments`` (imports are relative, so
``python -m experiments.<name>.run`` from a checkout runs the same code).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("gradnoise.experiments")

DEFAULT_OUT = Path("gradnoise-reproduce")


def results_path(name: str, quick: bool, out: Path = DEFAULT_OUT) -> Path:
    return Path(out) / "results" / name / ("quick.json" if quick else "full.json")


def parse(config_cls, quick_overrides: dict, argv=None, description: str = ""):
    """``(config, quick, force)`` from the command line: ``--quick``, ``--force`` and one
    ``--field value`` flag per config field."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    p.add_argument("--force", action="store_true", help="re-run even if results exist")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results go to OUT/results/<name>/ (default: %(default)s)")
    for f in dataclasses.fields(config_cls):
        kind = type(f.default) if f.default is not dataclasses.MISSING else str
        if kind is tuple:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: tuple(float(v) if "." in v or "e" in v else int(v) for v in s.split(",")), default=None)
        elif kind is bool:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=lambda s: s.lower() in ("1", "true", "yes"), default=None)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=None)
    args = p.parse_args(argv)
    overrides = dict(quick_overrides) if args.quick else {}
    overrides.update({f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls) if getattr(args, f.name) is not None})
    return dataclasses.replace(config_cls(), **overrides), args.quick, args.force, args.out


def run_experiment(name: str, config, quick: bool, force: bool, body: Callable[[object], dict],
                   out: Path = DEFAULT_OUT) -> dict:  # fmt: skip
    """Run ``body(config)`` unless its results exist; write them with config, seed and timing."""
    path = results_path(name, quick, out)
    if path.exists() and not force:
        log.info("%s: results exist at %s (use --force to re-run)", name, path)
        return json.loads(path.read_text())
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    results = body(config)
    out = {
        "experiment": name,
        "mode": "quick" if quick else "full",
        "config": dataclasses.asdict(config),
        "seconds": time.perf_counter() - start,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    log.info("%s: wrote %s in %.1f s", name, path, out["seconds"])
    return out


def train(model: nn.Module, loss_fn, x, y, *, steps: int, batch: int, lr: float, seed: int,
          momentum: float = 0.0, hook: Callable | None = None) -> list[float]:  # fmt: skip
    """Plain minibatch SGD (sampling with replacement); returns the loss of every step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if hook is not None:
            hook(step, x[idx], y[idx], opt, loss)
        opt.step()
        losses.append(loss.item())
    return losses


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, loss_fn, xb, yb) -> bool:
    """One optimizer step on a batch; ``False`` (no step) when the loss is not finite."""
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(xb), yb)
    if not torch.isfinite(loss):
        return False
    loss.backward()
    opt.step()
    return True


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def main(name: str, config_cls, quick_overrides: dict, body: Callable[[object], dict], description: str, argv=None) -> dict:
    """The command line of every experiment: parse, then run (or load) it."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg, quick, force, out = parse(config_cls, quick_overrides, argv, description)
    return run_experiment(name, cfg, quick, force, body, out)
