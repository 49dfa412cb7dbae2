"""The Monitor's hooks mode under bf16 autocast: the per-example statistics of the 16-bit
computation itself, from the hooks, without measuring the step again in float32."""

import math

import pytest
import torch

import gradnoise as gn
import gradnoise.monitor as monitor_module
from gradnoise import step_stats
from tests.cases import CASES_BY_NAME


def autocast_loop(model, loss, x, y):
    """The reference: per-example gradients of the bf16 autocast computation, one example
    at a time, accumulated in float64 (tr Σ and |G|²)."""
    grads = []
    for i in range(y.shape[0]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x[i : i + 1])
        g = torch.autograd.grad(loss(out.float(), y[i : i + 1]), list(model.parameters()))
        grads.append(torch.cat([t.double().flatten() for t in g]))
    G = torch.stack(grads)
    mean = G.mean(0)
    trace = float((G - mean).square().sum() / (len(grads) - 1))
    return trace, float(mean.square().sum()) - trace / len(grads)


def monitored_step(model, loss, x, y, monkeypatch):
    """One autocast step measured by the Monitor; also whether it called the engine."""
    engine_calls, low = [], {}
    real = monitor_module.gradient_stats
    monkeypatch.setattr(monitor_module, "gradient_stats", lambda *a, **k: engine_calls.append(1) or real(*a, **k))
    check = step_stats._cancelled
    monkeypatch.setattr(step_stats, "_cancelled", lambda hooks, *a: low.update(hooks.low_precision) or check(hooks, *a))
    mon = gn.Monitor(model, loss, strict=True)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss(out.float(), y).backward()
    rec = mon.step(x, y)
    mon.close()
    return rec, bool(engine_calls), low


@pytest.mark.parametrize("name", ["mlp", "seq-linear", "conv1d", "layernorm", "embedding", "mha", "transformer",
                                  "nanogpt-block", "resnet-block", "tied"])  # fmt: skip
def test_hooks_under_autocast_equal_the_autocast_loop(name, monkeypatch):
    """The hooks' statistics are those of the bf16 computation (the reference loops over the
    examples under autocast), within the rounding bound the step is accepted on, and the
    step is not measured again by the float32 engine."""
    model, loss, x, y = CASES_BY_NAME[name].make(torch.float32, batch=16)
    trace, g2 = autocast_loop(model, loss, x, y)
    rec, engine, _ = monitored_step(model, loss, x, y, monkeypatch)
    assert not engine
    tol = step_stats.ROUNDED_TOLERANCE
    assert rec["trace_cov"] == pytest.approx(trace, rel=tol)
    # |G|² = |ḡ|² − tr Σ/B: its error is relative to its terms
    assert rec["grad_norm_sq"] == pytest.approx(g2, abs=tol * (abs(g2) + trace / 16))


def test_only_layers_run_in_16_bits_carry_its_rounding(monkeypatch):
    """Autocast runs Linear layers in bf16 and LayerNorm and Embedding in float32: only the
    former's gradients are taken to carry 16-bit rounding."""
    model, loss, x, y = CASES_BY_NAME["transformer"].make(torch.float32, batch=8)
    _, _, low = monitored_step(model, loss, x, y, monkeypatch)
    names = dict(model.named_parameters())
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) for n in (f"{n}.weight", f"{n}.bias")}
    norm = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.Embedding))
            for n in (f"{n}.weight", f"{n}.bias") if n in names}  # fmt: skip
    assert linear & set(names) <= set(low) and set(low.values()) == {torch.bfloat16}
    assert not norm & set(low)


def test_a_step_the_rounding_cannot_resolve_is_measured_in_float32(monkeypatch):
    """Examples that are nearly copies of one another: tr Σ is a tiny fraction of B|ḡ|²,
    below what .grad's bf16 rounding resolves; the step is measured by the float32 engine."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x = torch.randn(1, 8).repeat(32, 1) + 1e-3 * torch.randn(32, 8)
    y = torch.zeros(32, dtype=torch.long)
    loss = torch.nn.CrossEntropyLoss()
    rec, engine, _ = monitored_step(model, loss, x, y, monkeypatch)
    assert engine
    assert rec["trace_cov"] == pytest.approx(gn.gradient_stats(model, loss, x, y, variance=False).trace_cov, rel=1e-6)


@pytest.mark.parametrize("n", [16, 1000, 100_000])
def test_the_rounding_model_of_bf16_gradients(n):
    """The model behind the acceptance bound: rounding g to bf16 changes |g|² by a random
    amount of standard deviation (2u/√3)‖g‖₄² (u = 2⁻⁸), checked over many draws; the
    6-deviation bound holds in every draw and is not loose by more than a small factor."""
    u = torch.finfo(torch.bfloat16).eps / 2
    g = torch.Generator().manual_seed(n)
    errors, sigmas = [], []
    for _ in range(200):
        v = torch.randn(n, generator=g, dtype=torch.float64) * torch.rand(n, generator=g, dtype=torch.float64)
        err = float(v.to(torch.bfloat16).double().square().sum() - v.square().sum())
        (flat,) = step_stats.flatness([v])
        sigma = 2 * u / math.sqrt(3) * flat * float(v.square().sum())
        assert abs(err) <= step_stats.ROUNDING_SIGMAS * sigma + u * u * float(v.square().sum())
        errors.append(err / sigma)
        sigmas.append(sigma)
    spread = float(torch.tensor(errors).std())
    assert 0.5 < spread < 1.5
