"""Where monitor records go: CSV and JSONL written incrementally (one flushed line per
record: a run killed at any point loses at most the record being written, and the files
still parse), TensorBoard (optional extra), memory; and a reader for run directories.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["CSVSink", "JSONLSink", "MemorySink", "TensorBoardSink", "read_run"]


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class MemorySink:
    """Keeps every record in ``self.records`` (the monitor's history)."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(dict(record))

    def close(self) -> None:
        pass


class JSONLSink:
    """One JSON object per line, flushed after each record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class CSVSink:
    """CSV with a header of the first record's columns; later columns are added to the JSONL
    only (a CSV cannot grow columns), so put every metric in the first record."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._writer: csv.DictWriter | None = None

    def write(self, record: dict) -> None:
        if self._writer is None:
            self._writer = csv.DictWriter(self._fh, fieldnames=list(record), extrasaction="ignore")
            if self._fh.tell() == 0:
                self._writer.writeheader()
        self._writer.writerow({k: ("" if v is None else _plain(v)) for k, v in record.items()})
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class TensorBoardSink:
    """Scalars to TensorBoard (needs the ``tensorboard`` package: ``pip install gradnoise[tensorboard]``)."""

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # optional extra
            raise ImportError("TensorBoardSink needs tensorboard: pip install 'gradnoise[tensorboard]'") from exc
        self._writer = SummaryWriter(str(log_dir))

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                self._writer.add_scalar(k, v, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def read_run(run_dir: str | Path) -> tuple[dict, list[dict]]:
    """``(config, records)`` of a run directory written by :class:`gradnoise.Monitor`.

    Reads ``metrics.jsonl``; a last line cut off by a killed process is skipped.
    """
    run_dir = Path(run_dir)
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
