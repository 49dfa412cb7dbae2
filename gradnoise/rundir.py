"""A training run's folder on disk: ``config.json``, ``metrics.jsonl`` and ``metrics.csv``,
created new or resumed after the last complete record, and read back.

Records are written one flushed line at a time (:mod:`gradnoise.sinks`), so a run killed
at any point leaves at most one cut line; resuming removes it before appending.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDir", "open_run_dir", "read_run"]

FILES = ("config.json", "metrics.jsonl", "metrics.csv")
# Config entries that must agree for a run to be resumed (the rest may change).
RESUME_KEYS = ("model", "num_params", "loss_fn", "every", "variance", "accumulation_steps", "loss_scale", "mode", "world_size")


@dataclass(frozen=True)
class RunDir:
    """Where a monitor writes, and where a resumed run stands: the next step and the CSV's
    columns (``None`` for a new run)."""

    path: Path
    next_step: int
    columns: list[str] | None


def open_run_dir(path: str | Path, config: dict, *, resume: bool) -> RunDir:
    """Create the run folder and write ``config.json``, or resume the run already there.

    Raises:
        ValueError: the folder holds an earlier run and ``resume`` is false; or ``resume``
            with a config that differs from the run's in :data:`RESUME_KEYS`.
    """
    path = Path(path)
    existing = [f for f in FILES if (path / f).exists()]
    if not existing:
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return RunDir(path, 0, None)
    if not resume:
        raise ValueError(
            f"{path} holds an earlier run ({', '.join(existing)}): pass resume=True to continue it "
            "after its last complete record, or choose a new run_dir"
        )
    old = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    changed = {k: (old.get(k), config.get(k)) for k in RESUME_KEYS if k in old and old.get(k) != config.get(k)}
    if changed:
        raise ValueError(f"cannot resume {path}: the run was made with other settings {changed} (was, now)")
    _drop_cut_line(path / "metrics.jsonl")
    _drop_cut_line(path / "metrics.csv")
    _, records = read_run(path)
    columns = None
    if (path / "metrics.csv").exists():
        with open(path / "metrics.csv", newline="", encoding="utf-8") as fh:
            columns = next(csv.reader(fh), None)
    return RunDir(path, records[-1]["step"] + 1 if records else 0, columns)


def _drop_cut_line(path: Path) -> None:
    """Remove a last line without its newline (the record being written when a process died)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """``(config, records)`` of a run folder written by :class:`gradnoise.Monitor`.

    Reads ``metrics.jsonl``; a last line cut off by a killed process is skipped. Numbers
    come back as numbers (``inf`` and ``nan`` as floats).

    Raises:
        FileNotFoundError: no such folder.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    config_path = run_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    records = []
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # the record being written when the process died
    return config, records
