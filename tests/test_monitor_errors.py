"""The monitor never records a wrong number: inputs it cannot measure are refused clearly,
a failed measurement is counted and logged (raised with ``strict=True``), and nothing stays
on the caller's model when the constructor fails."""

import math

import pytest
import torch
from torch import nn

import gradnoise as gn


def _step(model, mon, x, y, loss_fn=None):
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    model.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    return mon.step(x, y, loss=loss)


def _data(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _hooks_on(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) + sum(
        len(p._backward_hooks or {}) for p in model.parameters()
    )


def test_sum_reduced_loss_is_refused():
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="reduction='sum'"):
        gn.Monitor(model, nn.CrossEntropyLoss(reduction="sum"))
    assert _hooks_on(model) == 0


@pytest.mark.parametrize("kwargs, message", [
    ({"every": 0}, "every: an integer schedule means every k ≥ 1 steps"),
    ({"sharpness_every": -3, "sharpness_data": _data()}, "sharpness_every: an integer schedule"),
    ({"accumulation_steps": 2, "every": 2.5}, "every: an integer schedule"),
])  # fmt: skip
def test_a_failing_constructor_leaves_no_hook(kwargs, message):
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=message):
        gn.Monitor(model, nn.CrossEntropyLoss(), **kwargs)
    assert _hooks_on(model) == 0


def test_step_after_close_is_a_clear_error():
    model = nn.Sequential(nn.Linear(6, 3))
    mon = gn.Monitor(model, nn.CrossEntropyLoss())
    mon.close()
    with pytest.raises(RuntimeError, match=r"step\(\) after close\(\)"):
        _step(model, mon, *_data())
    assert _hooks_on(model) == 0


@pytest.mark.parametrize("n, message", [(1, "batch of 1 example"), (0, "empty batch")])
def test_a_batch_too_small_for_a_variance(n, message):
    model = nn.Sequential(nn.Linear(6, 3))
    x, y = _data(max(n, 1))
    x, y = x[:n], y[:n]
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), strict=True)
    with pytest.raises(ValueError, match=message):
        _step(model, mon, x, y, loss_fn=lambda o, t: o.sum() * 0 if len(t) == 0 else nn.functional.cross_entropy(o, t))
    lenient = gn.Monitor(model, nn.CrossEntropyLoss())
    assert _step(model, lenient, x, y, loss_fn=lambda o, t: o.sum() * 0 if len(t) == 0 else nn.functional.cross_entropy(o, t)) is None
    assert lenient.errors == 1 and lenient.history.records == []


@pytest.mark.parametrize("mode", ["hooks", "separate"])
def test_non_finite_measurements_are_errors(mode):
    model = nn.Sequential(nn.Linear(6, 3))
    x, y = _data()
    x[0, 0] = math.inf
    strict = gn.Monitor(model, nn.CrossEntropyLoss(), mode=mode, strict=True)
    with pytest.raises(FloatingPointError):
        _step(model, strict, x, y)
    strict.close()
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), mode=mode)
    assert _step(model, mon, x, y) is None
    assert mon.errors == 1 and mon.history.records == []


def test_batchnorm_without_parameters_in_train_mode_is_refused_in_hooks_mode():
    """BatchNorm(affine=False) has no parameters but still couples the examples."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 3))
    mon = gn.Monitor(model, nn.CrossEntropyLoss(), mode="hooks", strict=True)
    with pytest.raises(ValueError, match="BatchNorm.*train mode"):
        _step(model, mon, *_data())
    model.eval()  # eval-mode statistics: no coupling, and the hooks measure
    rec = _step(model, mon, *_data())
    ref = gn.gradient_stats(model, nn.CrossEntropyLoss(), *_data())
    assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-5)
