"""The ``gradnoise`` command: a thin shell over the library.

    gradnoise measure   [--task mnist1d-mlp | --model package.module:factory] [--out FILE]
    gradnoise sharpness [--task mnist1d-mlp | --model package.module:factory] [--out FILE]
    gradnoise watch RUN_DIR [--follow] [--plot DIR]
    gradnoise reproduce [--quick] [--force] [--only NAMES]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

from gradnoise.measure import (
    MeasureConfig,
    SharpnessConfig,
    measure,
    measure_sharpness,
    parse_sizes,
)
from gradnoise.plots import plot_run
from gradnoise.rundir import read_run
from gradnoise.tasks import TASKS


def _problem_args(p, d) -> None:
    """Flags shared by the commands that train a task briefly (defaults from config ``d``)."""
    p.add_argument("--task", default=d.task, choices=sorted(TASKS), help="built-in task (default: %(default)s)")
    p.add_argument("--model", default=None, help="your own model: package.module:factory returning (model, loss_fn, (x, y))")
    p.add_argument("--train-steps", type=int, default=d.train_steps, help="SGD steps first (default: %(default)s)")
    p.add_argument("--train-batch", type=int, default=d.train_batch, help="training batch size (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate, momentum 0.9 (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--device", default=d.device, help="cpu or cuda (default: %(default)s)")


def _config(cls, args):
    """The config dataclass ``cls`` from the parsed flags of the same names."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def _measure_parser(sub) -> None:
    d = MeasureConfig()
    p = sub.add_parser(
        "measure",
        help="train a task briefly and measure gradient noise at several batch sizes",
        description="Train briefly, then measure tr Σ, |G|², the gradient noise E|ĝ−G|² and "
        "B_simple at several batch sizes (ratio of averages over disjoint batches), print a "
        "table (and JSON with --out).",
    )
    _problem_args(p, d)
    p.add_argument("--batch-sizes", type=parse_sizes, default=d.batch_sizes, help="comma-separated (default: 16,64,256,1024)")
    p.add_argument("--batches", type=int, default=d.batches, help="disjoint batches per batch size (default: %(default)s)")
    p.add_argument("--method", default=d.method, choices=["auto", "fast", "vmap"], help="per-example engine (default: %(default)s)")
    p.add_argument("--no-suggest", dest="suggest", action="store_false", help="skip B_noise and the batch-size suggestion")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")


def _sharpness_parser(sub) -> None:
    d = SharpnessConfig()
    p = sub.add_parser(
        "sharpness",
        help="train a task briefly and measure the curvature of its loss",
        description="Train briefly, then the Hessian's top-k eigenvalues (Lanczos), its trace "
        "(Hutch++) and the ε-sharpness of Keskar et al. (2017) over the first N training "
        "examples, in eval mode; print them (and JSON with --out).",
    )
    _problem_args(p, d)
    p.add_argument("--examples", type=int, default=d.examples, help="examples the loss is averaged over (default: %(default)s)")
    p.add_argument("--k", type=int, default=d.k, help="eigenvalues (default: %(default)s)")
    p.add_argument("--epsilon", type=float, default=d.epsilon, help="ε of the ε-sharpness box (default: %(default)s)")
    p.add_argument("--trace-hvps", type=int, default=d.trace_hvps)
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON to this file")


def _watch_parser(sub) -> None:
    p = sub.add_parser(
        "watch",
        help="summarise a monitored run (and render its figures)",
        description="Read RUN_DIR written by gradnoise.Monitor: print a summary of the latest "
        "records; --follow refreshes it; --plot renders the standard figures (PDF + PNG).",
    )
    p.add_argument("run_dir", type=Path)
    p.add_argument("--follow", action="store_true", help="refresh until interrupted")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--last", type=int, default=10, help="records shown (default: %(default)s)")
    p.add_argument("--plot", type=Path, default=None, help="write figures to this directory")


EXPERIMENTS = {  # experiment → the figure script that reads it (None: a table in the report)
    "noise_law": "fig_noise_law",
    "noise_over_training": "fig_noise_over_training",
    "accumulation": None,
    "batchnorm_small_batch": "fig_batchnorm",
    "edge_of_stability": "fig_edge_of_stability",
    "memory": "fig_memory",
    "critical_batch": "fig_critical_batch",
    "sharp_minima": "fig_sharp_minima",
    "linear_scaling": "fig_linear_scaling",
    "epoch_sweep": "fig_epoch_sweep",
    "adam_noise_scale": "fig_adam_noise_scale",
    "layernorm_gns": "fig_layernorm_gns",
}


def _reproduce_parser(sub) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run the experiments and render the paper figures",
        description="Run the experiments (skipping those with results unless --force), then draw "
        "their figures: results in OUT/results/<name>/, figures in OUT/figures/. --quick uses "
        "small sizes (the CI smoke run).",
    )
    p.add_argument("--quick", action="store_true", help="small sizes (minutes, not hours)")
    p.add_argument("--force", action="store_true", help="re-run experiments whose results exist")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(EXPERIMENTS)}")
    p.add_argument("--out", type=Path, default=Path("gradnoise-reproduce"), help="output folder (default: %(default)s)")


def reproduce(quick: bool, force: bool, only: str | None, out: Path = Path("gradnoise-reproduce")) -> None:
    """Run the experiments and their figure scripts (installed as ``gradnoise.experiments``
    and ``gradnoise.paper_figures``), each in its own process, writing under ``out``."""
    names = list(EXPERIMENTS) if only is None else only.split(",")
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiments {unknown}; choose from {', '.join(EXPERIMENTS)}")
    common = ["--out", str(out)] + (["--quick"] if quick else [])
    for name in names:
        print(f"== experiment {name}", flush=True)
        subprocess.run([sys.executable, "-m", f"gradnoise.experiments.{name}.run", *common, *(["--force"] if force else [])], check=True)
        if EXPERIMENTS[name]:
            subprocess.run([sys.executable, "-m", f"gradnoise.paper_figures.{EXPERIMENTS[name]}", *common], check=True)


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def watch_summary(run_dir: Path, last: int = 10) -> str:
    try:
        config, records = read_run(run_dir)
    except FileNotFoundError as exc:
        raise ValueError(f"{run_dir} holds no gradnoise run ({exc})") from None
    if not config and not records:
        raise ValueError(f"{run_dir} holds no gradnoise run (no config.json or metrics.jsonl)")
    lines = [f"run {run_dir}: {config.get('model', '?')} ({config.get('num_params', '?')} parameters), "
             f"{len(records)} records, mode {config.get('mode', '?')}"]
    cols = ["step", "loss", "lr", "grad_norm", "b_simple", "b_simple_ema", "gsnr", "lambda_max", "two_over_lr"]
    cols = [c for c in cols if any(r.get(c) is not None for r in records)]
    lines.append("  " + "".join(f"{c:>13}" for c in cols))
    for r in records[-last:]:
        lines.append("  " + "".join(f"{_fmt(r.get(c)):>13}" for c in cols))
    emas = [r["b_simple_ema"] for r in records if isinstance(r.get("b_simple_ema"), (int, float))]
    if len(emas) >= 2 and emas[0] and emas[0] > 0:
        lines.append(f"  noise scale (EMA) went from {emas[0]:.4g} to {emas[-1]:.4g} ({emas[-1] / emas[0]:.2g}×)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gradnoise", description="Measure gradient noise and curvature.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _measure_parser(sub)
    _sharpness_parser(sub)
    _watch_parser(sub)
    _reproduce_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    if args.command == "measure":
        config = _config(MeasureConfig, args)
        try:
            result = measure(config)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"gradnoise measure: {result.description} ({result.num_params:,} parameters, N={result.dataset_size})")
        print(f"trained {config.train_steps} SGD steps at B={config.train_batch}, lr={config.lr}: loss {result.train_loss:.4f}\n")
        print(result.table())
        if result.suggestion:
            print("\nWhat batch size? " + result.suggestion["reasoning"])
        if args.out is not None:
            args.out.write_text(json.dumps(result.to_dict(), indent=2) + "\n")
            print(f"\nwrote {args.out}")
    elif args.command == "sharpness":
        config = _config(SharpnessConfig, args)
        try:
            r = measure_sharpness(config)
        except ValueError as exc:
            parser.error(str(exc))
        e, t, s = r["eigenvalues"], r["trace"], r["epsilon_sharpness"]
        print(f"gradnoise sharpness: {r['description']} ({r['num_params']:,} parameters), loss over the first {r['examples']} training examples")
        print(f"trained {config.train_steps} SGD steps at B={config.train_batch}, lr={config.lr}: loss {r['train_loss']:.4f}\n")
        vals = ", ".join(f"{v:.4g}" for v in e["eigenvalues"])
        print(f"  top-{config.k} Hessian eigenvalues (Lanczos): {vals}   [{e['num_hvps']} HVPs, {r['eigen_seconds']:.2f} s, max residual {max(e['residuals']):.1e}]")
        print(f"  2/lr for SGD at lr={config.lr}: {r['two_over_lr']:.4g}  (λ_max above it: unstable for full-batch GD)")
        print(f"  trace (Hutch++, {t['num_hvps']} HVPs): {t['trace']:.4g} ± {t['stderr']:.2g}")
        print(f"  ε-sharpness (ε={s['epsilon']}, full space, L-BFGS-B): {s['sharpness']:.4g} %  (loss {s['loss']:.4g} → {s['max_loss']:.4g})")
        if args.out is not None:
            args.out.write_text(json.dumps(r, indent=2) + "\n")
            print(f"\nwrote {args.out}")
    elif args.command == "watch":
        import time

        try:
            while True:
                print(watch_summary(args.run_dir, args.last), flush=True)
                if not args.follow:
                    break
                time.sleep(args.interval)
                print()
        except ValueError as exc:
            parser.error(str(exc))
        except KeyboardInterrupt:
            pass
        if args.plot is not None:
            args.plot.mkdir(parents=True, exist_ok=True)
            plot_run(read_run(args.run_dir)[1], args.plot / "run")
            print(f"wrote {args.plot / 'run.pdf'} and {args.plot / 'run.png'}")
    elif args.command == "reproduce":
        try:
            reproduce(args.quick, args.force, args.only, args.out)
        except ValueError as exc:
            parser.error(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
