"""The training monitor: non-interference, agreement with the library, schedules, sinks,
crash safety, gradient accumulation and DDP."""

import csv
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradnoise as gn


def mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def dropout_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.3), nn.ReLU(), nn.Linear(16, 3))


def bn_mlp():
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def train(factory, monitor_kwargs=None, steps=6, seed=0, tmp=None):
    torch.manual_seed(seed)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    mon = None
    if monitor_kwargs is not None:
        mon = gn.Monitor(model, loss_fn, run_dir=tmp, **monitor_kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if mon is not None:
            mon.step(x, y, optimizer=opt, loss=loss)
        opt.step()
    if mon is not None:
        mon.close()
    return model, mon


@pytest.mark.parametrize("factory", [mlp, dropout_mlp, bn_mlp], ids=["mlp", "dropout", "batchnorm"])
@pytest.mark.parametrize("mode", ["auto", "separate"])
def test_training_with_monitor_is_bitwise_identical(factory, mode, tmp_path):
    data = torch.randn(32, 6), torch.randint(0, 3, (32,))
    plain, _ = train(factory)
    kwargs = {"mode": mode, "sharpness_every": 3, "sharpness_data": data, "variance": True}
    if factory is bn_mlp:  # per-example gradients need BatchNorm in eval mode for the measurement
        kwargs["batchnorm"] = "eval"
    watched, mon = train(factory, kwargs, tmp=tmp_path)
    for (k, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert mon.errors == 0 and len(mon.history.records) == 6


@pytest.mark.parametrize("variance", [True, False])
@pytest.mark.parametrize("loss_scale", [1.0, 8.0])
@pytest.mark.parametrize("defer", [True, False], ids=["after-backward", "during-backward"])
def test_hooks_mode_equals_gradient_stats(variance, loss_scale, defer, monkeypatch):
    """Hooks mode on the user's own backward (of the loss times ``loss_scale``, as under a
    gradient scaler) gives gradient_stats' numbers, with the layer rules applied after the
    backward pass (small layers) or during it (large ones)."""
    from gradnoise.engine import step_hooks

    if not defer:
        monkeypatch.setattr(step_hooks, "DEFER_ELEMENTS", 0)
    torch.manual_seed(0)
    model = mlp().double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    mon = gn.Monitor(model, loss_fn, variance=variance, loss_scale=loss_scale)
    assert mon.mode == "hooks"
    (loss_fn(model(x), y) * loss_scale).backward()
    rec = mon.step(x, y, loss=0.0)
    ref = gn.gradient_stats(model, loss_fn, x, y)
    assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-10)
    assert rec["grad_norm_sq"] == pytest.approx(ref.grad_norm_sq, rel=1e-10)
    assert rec["gsnr"] == (pytest.approx(ref.gsnr, rel=1e-8) if variance else None)
    assert rec["b_simple/0"] == pytest.approx(ref.per_layer["0"].b_simple, rel=1e-10)
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters()]).norm() / loss_scale
    assert rec["grad_norm"] == pytest.approx(float(grad_norm), rel=1e-10)
    mon.close()
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_accumulation_gives_two_batch_estimate_for_free():
    torch.manual_seed(0)
    model = mlp().double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    mon = gn.Monitor(model, loss_fn, accumulation_steps=4)
    for xb, yb in zip(x.split(4), y.split(4), strict=True):
        (loss_fn(model(xb), yb) / 4).backward()
    rec = mon.step(x, y)
    g2, tr = gn.two_batch_stats(model, loss_fn, x, y, micro_batches=4)
    assert rec["two_batch_trace_cov"] == pytest.approx(tr, rel=1e-10)
    assert rec["two_batch_grad_norm_sq"] == pytest.approx(g2, rel=1e-10)
    ref = gn.gradient_stats(model, loss_fn, x, y)  # per-example estimate over all 16 too
    assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-10)
    mon.close()


def test_metric_exception_is_counted_not_raised_unless_strict():
    def bad_loss(out, y):
        raise RuntimeError("metric boom")

    model = mlp()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    mon = gn.Monitor(model, bad_loss, mode="separate")
    assert mon.step(x, y) is None and mon.errors == 1
    strict = gn.Monitor(model, bad_loss, mode="separate", strict=True)
    with pytest.raises(RuntimeError, match="metric boom"):
        strict.step(x, y)


@pytest.mark.parametrize("defer", [True, False], ids=["after-backward", "during-backward"])
def test_failing_layer_rule_never_breaks_training(defer, monkeypatch):
    """A layer rule that raises (after or during the user's backward) is counted, not
    raised; strict=True raises it."""
    from gradnoise.engine import step_hooks

    if not defer:
        monkeypatch.setattr(step_hooks, "DEFER_ELEMENTS", 0)

    class Boom:
        whole_call = False

        def norms(self, *args):
            raise RuntimeError("rule boom")

    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for strict in (False, True):
        model = mlp()
        mon = gn.Monitor(model, nn.CrossEntropyLoss(), strict=strict)
        mon._hooks.rules["0"] = Boom()
        loss = nn.CrossEntropyLoss()(model(x), y)
        if strict and not defer:
            with pytest.raises(RuntimeError, match="rule boom"):
                loss.backward()
            continue
        loss.backward()  # the user's backward pass completes
        if strict:
            with pytest.raises(RuntimeError, match="rule boom"):
                mon.step(x, y)
        else:
            assert mon.step(x, y) is None and mon.errors == 1
            assert all(p.grad is not None for p in model.parameters())
        mon.close()


def test_hooks_let_go_of_activations_during_the_backward_pass(monkeypatch):
    """The graph keeps its hooks until the loss is freed; a hook that held its layer's input
    would keep every activation alive through the backward pass (the step's peak memory).
    Rules applied during the backward pass let go of their inputs as they run."""
    import gc
    import warnings

    from gradnoise.engine import step_hooks

    monkeypatch.setattr(step_hooks, "DEFER_ELEMENTS", 0)
    model = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 19), nn.Tanh(), nn.Linear(19, 3))
    mon = gn.Monitor(model, nn.CrossEntropyLoss())
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))

    def activations() -> int:  # tensor objects of the hidden layers' shapes still alive
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) and o.shape in ((8, 17), (8, 19)) for o in gc.get_objects())

    loss = nn.CrossEntropyLoss()(model(x), y)
    assert activations() > 0
    loss.backward()  # the loss (and with it the graph and its hooks) still alive
    assert activations() == 0, "a hook kept a layer's input alive after the backward pass"
    assert mon.step(x, y, loss=loss) is not None and mon.errors == 0
    mon.close()


def test_a_second_backward_through_a_retained_graph_is_refused():
    model = mlp()
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), strict=True)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loss = nn.CrossEntropyLoss()(model(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    with pytest.raises(RuntimeError, match="second backward pass through the same graph"):
        mon.step(x, y)
    mon.close()


def test_schedules_and_sharpness(tmp_path):
    data = torch.randn(32, 6), torch.randint(0, 3, (32,))
    _, mon = train(mlp, {"every": 2, "sharpness_every": gn.log_spaced(2.0), "sharpness_data": data}, steps=9, tmp=tmp_path)
    steps = [r["step"] for r in mon.history.records]
    assert steps == [0, 1, 2, 4, 6, 8]  # noise at 0,2,4,6,8; λ_max at 0,1,2,4,8
    with_lam = [r["step"] for r in mon.history.records if r.get("lambda_max") is not None]
    assert with_lam == [0, 1, 2, 4, 8]
    assert all(r["two_over_lr"] == pytest.approx(20.0) for r in mon.history.records if r.get("lambda_max") is not None)
    config, records = gn.read_run(tmp_path)
    assert config["every"] == 2 and len(records) == 6  # a number, as written
    with open(tmp_path / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and "lambda_max" in rows[0]


def test_sharpness_only_installs_no_hooks():
    """With no noise schedule the monitor adds nothing to the user's forward and backward."""
    torch.manual_seed(0)
    model, data = mlp(), (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    before = [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()]
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), every=None, sharpness_every=2, sharpness_data=data)
    assert [(len(m._forward_hooks), len(m._backward_hooks)) for m in model.modules()] == before
    assert all(not p._backward_hooks for p in model.parameters())
    x, y = data
    for _ in range(3):
        loss = nn.CrossEntropyLoss()(model(x), y)
        loss.backward()
        mon.step(x, y, loss=loss)
        model.zero_grad()
    mon.close()
    assert [r["step"] for r in mon.history.records] == [0, 2]
    assert all(r["lambda_max"] > 0 and "trace_cov" not in r for r in mon.history.records)


def test_bad_arguments():
    with pytest.raises(ValueError, match="sharpness_data"):
        gn.Monitor(mlp(), nn.CrossEntropyLoss(), sharpness_every=10)
    with pytest.raises(ValueError, match="unknown mode"):
        gn.Monitor(mlp(), nn.CrossEntropyLoss(), mode="magic")
    with pytest.raises(ValueError, match="mode='hooks' needs every trainable parameter"):
        gn.Monitor(nn.Sequential(nn.Linear(4, 4), nn.PReLU()), nn.MSELoss(), mode="hooks")


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys, json, torch, torch.distributed as dist, gradnoise as gn
    from torch import nn
    rank, world = int(sys.argv[1]), 2
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    ddp = nn.parallel.DistributedDataParallel(model)
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    xl, yl = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]
    mon = gn.Monitor(ddp, nn.CrossEntropyLoss(), run_dir=sys.argv[3] if rank == 0 else None)
    nn.CrossEntropyLoss()(ddp(xl), yl).backward()
    rec = mon.step(xl, yl)
    if rank == 0:
        print(json.dumps(rec), flush=True)
    mon.close()
    del mon, ddp  # the DDP reducer goes before the process group, not at interpreter exit
    dist.barrier()  # both ranks done communicating before gloo tears down
    dist.destroy_process_group()
    # gloo's threads can abort the interpreter's own teardown ("terminate called without an
    # active exception"); everything is written and flushed, so leave without it
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_ddp_two_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    import socket

    with socket.socket() as sock:  # a free loopback port, chosen by the OS
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port, str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    rec = json.loads(outs[0][0].strip().splitlines()[-1])
    # The same data on one process: two micro-batches of 8 (what each rank saw).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    x = torch.randn(16, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    g2, tr = gn.two_batch_stats(model, nn.CrossEntropyLoss(), x, y, micro_batches=2)
    assert rec["batch_size"] == 16
    assert rec["two_batch_trace_cov"] == pytest.approx(tr, rel=1e-9)
    assert rec["two_batch_grad_norm_sq"] == pytest.approx(g2, rel=1e-9)
    _, records = gn.read_run(tmp_path / "run")
    assert len(records) == 1  # only rank 0 writes


def test_lightning_callback(tmp_path):
    pl = pytest.importorskip("pytorch_lightning", reason="the lightning extra is not installed")
    from gradnoise.lightning import GradNoiseCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6), torch.randint(0, 3, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    cb = GradNoiseCallback(nn.CrossEntropyLoss(), run_dir=tmp_path / "run")
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         accumulate_grad_batches=2)  # fmt: skip
    trainer.fit(Module(), loader)
    assert cb.monitor.errors == 0
    records = gn.read_run(tmp_path / "run")[1]
    assert len(records) == 4  # 2 epochs × 4 batches / 2 micro-batches per optimizer step
    assert all(r["batch_size"] == 32 and r["trace_cov"] > 0 and "two_batch_trace_cov" in r for r in records)


def test_tensorboard_sink_and_watch(tmp_path, capsys):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from gradnoise.cli import main

    data = torch.randn(32, 6), torch.randint(0, 3, (32,))
    _, mon = train(mlp, {"tensorboard": True, "sharpness_every": 3, "sharpness_data": data}, steps=6, tmp=tmp_path)
    assert any(p.name.startswith("events.out.tfevents") for p in tmp_path.iterdir())
    assert main(["watch", str(tmp_path), "--plot", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "6 records" in out and "b_simple_ema" in out and "lambda_max" in out
    assert (tmp_path / "fig" / "run.png").stat().st_size > 10_000
    with pytest.raises(SystemExit):
        main(["watch", str(tmp_path / "missing")])


def test_measurements_between_forward_and_step_do_not_disturb_the_hooks():
    torch.manual_seed(0)
    model = mlp().double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    mon = gn.Monitor(model, loss_fn)
    loss_fn(model(x), y).backward()
    gn.per_sample_grads(model, loss_fn, x, y)  # vmap forward: must not reach the hooks
    gn.gradient_stats(model, loss_fn, x[:5], y[:5])
    loss_fn(model(x[:3]), y[:3])  # an evaluation forward with grad enabled but no backward
    rec = mon.step(x, y)
    assert mon.errors == 0
    assert rec["trace_cov"] == pytest.approx(gn.gradient_stats(model, loss_fn, x, y).trace_cov, rel=1e-10)


def test_hooks_mode_covers_attention():
    """A transformer (attention, LayerNorm, Embedding, Linear) is measured inside the user's
    own backward pass and equals the brute-force statistics."""
    from gradnoise.tasks import tiny_transformer

    torch.manual_seed(0)
    model = tiny_transformer(vocab=8, dim=8, heads=2, max_len=6, classes=3).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randint(0, 8, (10, 6)), torch.randint(0, 3, (10,))
    mon = gn.Monitor(model, loss_fn)
    assert mon.mode == "hooks"
    loss_fn(model(x), y).backward()
    rec = mon.step(x, y)
    ref = gn.gradient_stats(model, loss_fn, x, y, method="vmap")
    assert mon.errors == 0
    assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-9)
    assert rec["grad_norm_sq"] == pytest.approx(ref.grad_norm_sq, rel=1e-9)
    for name, layer in ref.per_layer.items():  # the scalar-only path groups like gradient_stats
        assert rec[f"b_simple/{name}"] == pytest.approx(layer.b_simple, rel=1e-7), name
    mon.close()


def test_monitor_on_the_case_zoo_equals_gradient_stats(case):
    """On every model of the zoo (a ResNet block, a nanoGPT block, an LSTM, attention, tied
    and reused modules...) the Monitor in its default mode records the tr Σ and |G|² of
    gradient_stats on the same batch; where the hooks cannot measure a step (a module called
    twice, a layer not on the batch) it switches to mode='separate' instead of failing."""
    model, loss, x, y = case.make(torch.float64, batch=6)
    xs = x if isinstance(x, tuple) else (x,)
    mon = gn.Monitor(model, loss, strict=True)
    for _ in range(2):  # the second step in the mode the first one settled on
        model.zero_grad()
        loss(model(*xs), y).backward()
        rec = mon.step(x, y)
    mon.close()
    ref = gn.gradient_stats(model, loss, x, y)
    assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-8)
    assert rec["grad_norm_sq"] == pytest.approx(ref.grad_norm_sq, rel=1e-8, abs=1e-8 * ref.trace_cov)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


DDP_UNCOVERED = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist, gradnoise as gn
    from torch import nn
    rank = int(sys.argv[1])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    ddp = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 4), nn.PReLU()))
    try:
        gn.Monitor(ddp, nn.MSELoss())
    except ValueError as exc:
        print("refused:", exc, flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)
    """
)


def test_ddp_refuses_a_model_it_would_measure_on_one_rank_only(tmp_path):
    """Under DDP a model the rules do not cover would be measured in separate mode on rank
    0's local batch while the record claims the global one: refused on every rank."""
    import socket

    script = tmp_path / "ddp_uncovered.py"
    script.write_text(DDP_UNCOVERED)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    procs = [subprocess.Popen([sys.executable, str(script), str(r), port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:]
    for out, _ in outs:
        assert "refused: under DDP/FSDP the Monitor measures the global batch in hooks mode" in out


@pytest.mark.parametrize("name", ["mlp", "seq-linear", "conv1d", "layernorm", "embedding", "mha", "transformer"])
def test_bf16_autocast_is_measured_and_training_unchanged(name):
    """Under torch.autocast(bfloat16) the hooks' rules get a float32 input and a bfloat16
    output gradient: taken to float32 (they used to fail every step). Training with the
    monitor is bitwise identical to without it; the records agree with the float32 engine
    to the bfloat16 rounding of the forward pass (where the 16-bit gradient cannot resolve a
    centred sum, the step is measured by the engine in float32)."""
    from tests.cases import CASES_BY_NAME, monitored_run

    plain, _ = monitored_run(CASES_BY_NAME[name], False, autocast=True)
    params, recs = monitored_run(CASES_BY_NAME[name], True, autocast=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))
    for rec, ref in recs:
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=2e-2)


def test_gradient_stats_with_a_custom_loss_under_autocast():
    """A custom loss under bf16 autocast: the per-example check of the mean loss compares
    across the two dtypes at the coarser one's precision (it used to fail on the dtypes)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    loss = lambda out, t: nn.functional.cross_entropy(out, t)  # noqa: E731
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = gn.gradient_stats(model, loss, x, y)
    assert s.trace_cov == pytest.approx(gn.gradient_stats(model, loss, x, y).trace_cov, rel=2e-2)


def _bn_run(monitor_kwargs=None, accumulation=1, steps=3):
    model = bn_mlp().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = None if monitor_kwargs is None else gn.Monitor(model, nn.CrossEntropyLoss(), strict=True,
                                                          accumulation_steps=accumulation, **monitor_kwargs)  # fmt: skip
    g, recs = torch.Generator().manual_seed(1), []
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(accumulation), y.chunk(accumulation), strict=True):
            (nn.CrossEntropyLoss()(model(xm), ym) / accumulation).backward()
        if mon is not None:
            recs.append((mon.step(x, y), {k: v.clone() for k, v in model.state_dict().items()}, x, y))
        opt.step()
    if mon is not None:
        mon.close()
    return model, recs


def test_a_batchnorm_model_trained_normally_is_measured():
    """BatchNorm in train mode: with accumulation the monitor records the two-batch estimate
    (each micro-batch's gradient is well defined) and nothing per-example; with
    batchnorm='eval' it records per-example statistics with BatchNorm in eval mode, equal to
    gradient_stats on the model in eval mode; without either it says so at construction.
    Training is unchanged in both."""
    torch.manual_seed(0)
    plain, _ = _bn_run(accumulation=2)
    torch.manual_seed(0)
    model, recs = _bn_run({}, accumulation=2)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values(), strict=True))
    for rec, _, _, _ in recs:
        assert rec["two_batch_trace_cov"] is not None and "trace_cov" not in rec
    torch.manual_seed(0)
    plain, _ = _bn_run()
    torch.manual_seed(0)
    model, recs = _bn_run({"batchnorm": "eval"})
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values(), strict=True))
    for rec, state, x, y in recs:
        ref_model = bn_mlp().double()
        ref_model.load_state_dict(state)
        ref = gn.gradient_stats(ref_model.eval(), nn.CrossEntropyLoss(), x, y)
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-10)
    with pytest.raises(ValueError, match="accumulation_steps > 1 or DDP"):
        gn.Monitor(bn_mlp(), nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="BatchNorm.*train mode"):
        gn.Monitor(bn_mlp(), nn.CrossEntropyLoss(), mode="separate")


def test_grad_scale_divides_out_gradient_clipping():
    """A loop that clips .grad after backward passes the clip coefficient: the statistics
    are those of the unclipped gradient."""
    torch.manual_seed(0)
    model = mlp().double()
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), strict=True)
    nn.CrossEntropyLoss()(model(x), y).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.1)
    coef = min(1.0, 0.1 / (float(norm) + 1e-6))
    assert coef < 0.5  # the gradient was clipped
    rec = mon.step(x, y, grad_scale=coef)
    ref = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y)
    assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-9)
    assert rec["grad_norm_sq"] == pytest.approx(ref.grad_norm_sq, rel=1e-8, abs=1e-9 * ref.trace_cov)
    with pytest.raises(ValueError, match="grad_scale"):
        mon.step(x, y, grad_scale=0.0)
    mon.close()
