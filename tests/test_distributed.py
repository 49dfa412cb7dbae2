"""The Monitor under DDP and FSDP2 (two gloo processes): per-example statistics of the
global batch equal gradient_stats on the concatenated batch in one process, the two-batch
estimate equals single-process accumulation, training is bitwise identical with and
without the Monitor, only rank 0 writes, and a rank that fails or never arrives makes the
others raise instead of hang."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests import dist_worker as w

WORKER = Path(w.__file__)


def run_ranks(mode, tmp_path, timeout=180):
    with socket.socket() as sock:  # a free loopback port, chosen by the OS
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(r), port, mode, str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(w.WORLD)]  # fmt: skip
    outs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[1][-3000:] for o in outs)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(w.WORLD)]


def single_process_reference(accumulation=1, model_name="mlp"):
    """The same training on one process with the global batch; the statistics of each step."""
    model = w.model_factory(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    out = []
    for step in range(w.STEPS):
        x, y = w.data(step, model_name)
        out.append(gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="vmap", variance=False))
        if accumulation > 1:  # each rank's micro-batches: k·world of them, in order
            k = accumulation * w.WORLD
            out[-1] = (out[-1], gn.two_batch_stats(model, nn.CrossEntropyLoss(), x, y, micro_batches=k))
        opt.zero_grad()
        nn.CrossEntropyLoss()(model(x), y).backward()
        opt.step()
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-accumulate", "ddp-lstm"])
def test_global_batch_statistics_under_ddp_and_fsdp(mode, tmp_path):
    """The global batch's statistics on every rank, equal to one process's (an MLP, and an
    LSTM measured in the hooks by running its recurrence again), with training unchanged."""
    ranks = run_ranks(mode, tmp_path)
    ref = single_process_reference(2 if mode.endswith("accumulate") else 1, "lstm" if mode.endswith("lstm") else "mlp")
    for r in ranks:
        assert r["bitwise"]  # training with the Monitor is bitwise identical to without it
    assert ranks[0]["records"] == ranks[1]["records"]  # every rank gets the same record
    for rec, s in zip(ranks[0]["records"], ref, strict=True):
        s, two = s if isinstance(s, tuple) else (s, None)
        assert rec["batch_size"] == w.WORLD * w.LOCAL
        assert rec["trace_cov"] == pytest.approx(s.trace_cov, rel=1e-9)
        assert rec["grad_norm_sq"] == pytest.approx(s.grad_norm_sq, rel=1e-8, abs=1e-9 * s.trace_cov)
        assert rec["loss"] == pytest.approx(s.loss, rel=1e-12)
        if two is not None:  # micro-batches of every rank against the all-reduced gradient
            assert (rec["two_batch_grad_norm_sq"], rec["two_batch_trace_cov"]) == pytest.approx(two, rel=1e-9)
    _, records = gn.read_run(tmp_path / "run")  # both ranks were given run_dir; rank 0 wrote
    assert len(records) == w.STEPS
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "metrics.csv", "metrics.jsonl"]


def test_a_rank_that_fails_makes_the_others_raise(tmp_path):
    r0, r1 = run_ranks("rank-fails", tmp_path)
    assert r1["error"] == "HooksCannotMeasure" and "examples" in r1["message"]
    assert r0["error"] == "RankFailed" and "other rank" in r0["message"]


def test_a_rank_that_never_arrives_times_out(tmp_path):
    r0, _ = run_ranks("rank-missing", tmp_path)
    assert r0["error"] == "TimeoutError" and "did not join" in r0["message"]
    assert r0["seconds"] < 8


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_the_readme_torchrun_script_runs(kind, tmp_path):
    """The README's distributed example, run as it says: torchrun --nproc_per_node 2."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    (script,) = re.findall(r"```python title=train.py\n(.*?)```", readme, flags=re.S)
    (tmp_path / "train.py").write_text(script)
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    done = subprocess.run([*cmd, "--standalone", "--nproc_per_node", "2", "train.py", kind], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 128: B_simple = " in done.stdout
    _, records = gn.read_run(tmp_path / "runs" / kind)
    assert len(records) == 20 and all(r["trace_cov"] > 0 for r in records)


def test_what_cannot_be_the_global_batch_is_refused(tmp_path):
    """mode='separate' would measure one rank's batch; an LSTM sharded by FSDP2 cannot have
    its recurrence run again from one rank's shard of its weights; ranks with batches of
    different sizes make the averaged gradient something other than the global mean: all
    refused, the last on every rank."""
    for r in run_ranks("refusals", tmp_path):
        assert "not covered: ['body.weight_ih_l0'" in r["fsdp-rnn"] and "which FSDP shards" in r["fsdp-rnn"]
        assert "mode='separate' would measure only this rank's local batch" in r["separate"]
        assert "batches differ in size" in r["unequal"]


@pytest.mark.parametrize("mode", ["fsdp-outside", "fsdp-outside-nested"])
def test_a_weight_used_outside_its_layer_under_fsdp_is_not_measured_wrong(mode, tmp_path):
    """FSDP2 with a weight used again outside its layer's call (``F.linear(h, head.weight)``
    in the root's forward; the head in the root's group, or its own unit, whose gathered
    weight only exists from its call on): the hooks would see part of its gradient, so the
    step is not recorded, the warning says why and what measures such a model, and the
    gradients are those of an unmonitored twin."""
    for r in run_ranks(mode, tmp_path):
        assert r["record"] is None and r["mode"] == "hooks" and r["bitwise"]
        (message,) = r["warnings"]
        assert "['head.weight'] are also used outside their layers' calls" in message
        assert "would measure only this rank's batch" in message and "gn.gradient_stats in one process" in message
