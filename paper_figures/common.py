"""Shared figure plumbing: read an experiment's results, one seaborn style, save PDF + PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradnoise.plots import save, set_style  # noqa: E402

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT.parent / "experiments"


def load(name: str, quick: bool) -> dict:
    path = RESULTS / name / "results" / ("quick.json" if quick else "full.json")
    if not path.exists():
        raise SystemExit(f"no results at {path}: run `python -m experiments.{name}.run{' --quick' if quick else ''}` first")
    return json.loads(path.read_text())


def args(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="plot the quick (smoke) results")
    return p.parse_args()


def figure(ncols=1, size=(5.0, 3.8)):
    set_style()
    return plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), constrained_layout=True)


def out(fig, stem: str, quick: bool) -> list[str]:
    (ROOT / "figures").mkdir(exist_ok=True)
    return save(fig, ROOT / "figures" / (stem + ("_quick" if quick else "")))
