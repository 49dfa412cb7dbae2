"""Shared figure plumbing: read an experiment's results, one seaborn style, save PDF + PNG.

Results are read from ``<out>/results/<name>/<mode>.json`` and figures written to
``<out>/figures/`` (``--out`` defaults to ``gradnoise-reproduce`` in the working directory;
the report's own are under ``paper_figures/``). The package installs this folder as
``gradnoise.paper_figures``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gradnoise.plots import save, set_style  # noqa: E402

DEFAULT_OUT = Path("gradnoise-reproduce")


def load(name: str, a: argparse.Namespace) -> dict:
    """The results of experiment ``name`` under ``a.out`` (quick ones with ``a.quick``)."""
    path = a.out / "results" / name / ("quick.json" if a.quick else "full.json")
    if not path.exists():
        raise SystemExit(
            f"no results at {path}: run `gradnoise reproduce --only {name} --out {a.out}"
            f"{' --quick' if a.quick else ''}` first"
        )
    return json.loads(path.read_text())


def args(description: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="plot the quick (smoke) results")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="read OUT/results, write OUT/figures (default: %(default)s)")
    return p.parse_args()


def figure(ncols=1, size=(5.0, 3.8)):
    set_style()
    return plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), constrained_layout=True)


def out(fig, stem: str, a: argparse.Namespace) -> list[str]:
    """Save ``fig`` as ``a.out/figures/<stem>[_quick].{pdf,png}``."""
    (a.out / "figures").mkdir(parents=True, exist_ok=True)
    return save(fig, a.out / "figures" / (stem + ("_quick" if a.quick else "")))
