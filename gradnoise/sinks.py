"""Where monitor records go: CSV and JSONL written incrementally (one flushed line per
record: a run killed at any point loses at most the record being written, and the files
still parse), TensorBoard (optional extra), memory. The run folder: :mod:`gradnoise.rundir`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

__all__ = ["CSVSink", "JSONLSink", "MemorySink", "TensorBoardSink"]


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
        # inf and nan as JSON's Infinity and NaN: numbers again when read back (read_run)
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class CSVSink:
    """CSV with a header of the first record's columns; later columns are added to the JSONL
    only (a CSV cannot grow columns), so put every metric in the first record."""

    def __init__(self, path: str | Path, columns: list[str] | None = None) -> None:
        self.path = Path(path)
        self._fh = open(self.path, "a", encoding="utf-8", newline="")  # noqa: SIM115
        self._writer: csv.DictWriter | None = None
        if columns is not None:  # a resumed run: its header is already there
            self._writer = csv.DictWriter(self._fh, fieldnames=columns, extrasaction="ignore")

    def write(self, record: dict) -> None:
        if self._writer is None:
            self._writer = csv.DictWriter(self._fh, fieldnames=list(record), extrasaction="ignore")
            if self._fh.tell() == 0:
                self._writer.writeheader()
        self._writer.writerow({k: ("" if v is None else v) for k, v in record.items()})
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
