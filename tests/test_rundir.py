"""The run folder: an earlier run is never appended to silently, a killed run resumes
after its last complete record with the same columns, and records read back as numbers."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import gradnoise as gn

SCRIPT = textwrap.dedent(
    """
    import sys, torch, gradnoise as gn
    from torch import nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), run_dir=sys.argv[1], resume=sys.argv[2] == "resume")
    step = 0
    while step < int(sys.argv[3]):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt.zero_grad(); loss = nn.CrossEntropyLoss()(model(x), y); loss.backward()
        mon.step(x, y, optimizer=opt, loss=loss); opt.step()
        step += 1
        if step == 20:
            print("ready", flush=True)
    mon.close()
    """
)


def _train(model, mon, steps):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        model.zero_grad()
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        mon.step(x, y, loss=loss)


def test_an_earlier_run_is_refused_unless_resumed(tmp_path):
    model = nn.Sequential(nn.Linear(6, 3))
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), run_dir=tmp_path)
    _train(model, mon, 3)
    mon.close()
    with pytest.raises(ValueError, match="holds an earlier run.*resume=True"):
        gn.Monitor(model, nn.CrossEntropyLoss(), run_dir=tmp_path)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(ValueError, match="cannot resume.*other settings.*every"):
        gn.Monitor(model, nn.CrossEntropyLoss(), run_dir=tmp_path, resume=True, every=5)
    again = gn.Monitor(model, nn.CrossEntropyLoss(), run_dir=tmp_path, resume=True)
    _train(model, again, 2)
    again.close()
    _, records = gn.read_run(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]


def test_sigkill_leaves_parseable_files(tmp_path):
    """A run killed at any point keeps every finished record, and its files still parse."""
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), "new", "1000000"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    _, records = gn.read_run(tmp_path / "run")
    assert len(records) >= 20 and [r["step"] for r in records] == list(range(len(records)))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) - len(records) <= 1  # at most the record being written is lost
    with open(tmp_path / "run" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= len(records) - 1 and float(rows[0]["trace_cov"]) > 0


def test_a_killed_run_resumes_after_its_last_complete_record(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run), "new", "1000000"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(run / "metrics.jsonl", "ab") as fh:  # as if killed in the middle of a line
        fh.write(b'{"step": 99999, "lo')
    _, before = gn.read_run(run)
    assert before and [r["step"] for r in before] == list(range(len(before)))
    done = subprocess.run([sys.executable, str(script), str(run), "resume", "25"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    _, after = gn.read_run(run)
    steps = [r["step"] for r in after]
    assert steps == list(range(len(after))) and len(after) == len(before) + 25  # nothing lost, nothing glued
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # every line parses: the cut one was removed
    with open(run / "metrics.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert all(len(r) == len(rows[0]) for r in rows) and rows[0][0] == "step"
    assert [int(r[0]) for r in rows[1:]][-25:] == steps[-25:]


def test_records_and_config_hold_numbers(tmp_path):
    """An infinite B_simple (|G|² estimate ≤ 0) is a float when read back, and the config
    holds the schedule's number or description, not a repr."""
    model = nn.Sequential(nn.Linear(6, 3))
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), run_dir=tmp_path, every=gn.log_spaced(1.5))
    mon._write({"step": 0, "b_simple": math.inf, "loss": 1.0})
    mon.close()
    config, records = gn.read_run(tmp_path)
    assert records[0]["b_simple"] == math.inf and isinstance(records[0]["b_simple"], float)
    assert min(r["b_simple"] for r in records) == math.inf
    assert config["every"].startswith("log-spaced") and isinstance(config["num_params"], int)


def test_read_run_of_a_missing_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        gn.read_run(tmp_path / "nowhere")
