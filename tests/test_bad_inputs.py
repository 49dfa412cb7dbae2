"""Every public entry point against a table of bad inputs: each gives a clear exception (a
``ValueError``, ``TypeError`` or ``FloatingPointError`` naming what was wrong; torch's own
dtype error from the model's forward) and leaves the caller's model, its hooks, ``.grad``,
modes and the RNG state exactly as they were."""

import math

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests.test_noninterference import _assert_same, _snapshot


def _model(batchnorm_train=False, frozen=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model.eval()
    if batchnorm_train:
        model[1].train()
    if frozen:
        model.requires_grad_(False)
    return model


def _xy(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _bad(name):
    """(model, loss, inputs, targets, expected message) of one bad input."""
    x, y = _xy()
    if name == "mismatched batch":
        return _model(), nn.CrossEntropyLoss(), x, y[:-1], "different batch sizes"
    if name == "0-d target":
        return _model(), nn.CrossEntropyLoss(), x, torch.tensor(1), "leading batch dimension|different batch sizes"
    if name == "non-finite input":
        x = x.clone()
        x[3, 2] = math.nan
        return _model(), nn.CrossEntropyLoss(), x, y, "NaN|nan|inf|non-finite"
    if name == "sum reduction":
        return _model(), nn.CrossEntropyLoss(reduction="sum"), x, y, "reduction='sum'"
    if name == "no trainable parameter":
        return _model(frozen=True), nn.CrossEntropyLoss(), x, y, "no trainable parameters"
    if name == "BatchNorm in train mode":
        return _model(batchnorm_train=True), nn.CrossEntropyLoss(), x, y, "BatchNorm.*train mode"
    if name == "float64 inputs, float32 model":
        return _model(), nn.CrossEntropyLoss(), x.double(), y, "dtype"
    if name == "not a model":
        return (lambda t: t), nn.CrossEntropyLoss(), x, y, "must be a torch.nn.Module"
    raise KeyError(name)


BAD = ["mismatched batch", "0-d target", "non-finite input", "sum reduction", "no trainable parameter",
       "BatchNorm in train mode", "float64 inputs, float32 model", "not a model"]  # fmt: skip


def _batches(x, y):
    return [(x[:6], y[:6]), (x[6:], y[6:])] if x.dim() and y.dim() and len(x) == len(y) else [(x, y), (x, y)]


ENTRY_POINTS = {
    "per_sample_grads": lambda m, l, x, y: gn.per_sample_grads(m, l, x, y),
    "per_sample_grads_loop": lambda m, l, x, y: gn.per_sample_grads_loop(m, l, x, y),
    "gradient_stats fast": lambda m, l, x, y: gn.gradient_stats(m, l, x, y, method="fast"),
    "gradient_stats vmap": lambda m, l, x, y: gn.gradient_stats(m, l, x, y, method="vmap"),
    "StatsAccumulator": lambda m, l, x, y: gn.StatsAccumulator(m, l).update(x, y),
    "noise_scale": lambda m, l, x, y: gn.noise_scale(m, l, _batches(x, y)),
    "two_batch_stats": lambda m, l, x, y: gn.two_batch_stats(m, l, x, y, micro_batches=2),
    "noise_law": lambda m, l, x, y: gn.noise_law(m, l, (x, y), [2, 6], repeats=2),
    "hessian_eigenvalues": lambda m, l, x, y: gn.hessian_eigenvalues(m, l, (x, y)),
    "hessian_trace": lambda m, l, x, y: gn.hessian_trace(m, l, (x, y), num_hvps=4),
    "epsilon_sharpness": lambda m, l, x, y: gn.epsilon_sharpness(m, l, (x, y), max_iter=1),
    "b_noise": lambda m, l, x, y: gn.b_noise(m, l, (x, y), examples=4),
    "suggest_batch_size": lambda m, l, x, y: gn.suggest_batch_size(m, l, _batches(x, y), hessian=False),
    "Monitor": lambda m, l, x, y: _monitor_step(m, l, x, y),
}


def _monitor_step(model, loss_fn, x, y):
    # the monitor's own pass reads the batch; in hooks mode it reads the user's backward
    # pass, which this table does not run (a NaN there gives a non-finite record error)
    mon = gn.Monitor(model, loss_fn, strict=True, mode="separate")
    try:
        mon.step(x, y)
    finally:
        mon.close()


@pytest.mark.parametrize("bad", BAD)
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=list(ENTRY_POINTS))
def test_bad_input_gives_a_clear_error_and_leaves_the_model_alone(entry, bad):
    model, loss, x, y, message = _bad(bad)
    is_model = isinstance(model, nn.Module)
    if is_model:
        before = _snapshot(model)
    rng = torch.get_rng_state().clone()
    # a dtype the model does not cast fails in the model's own forward, naming both dtypes
    errors = (ValueError, TypeError, FloatingPointError) + ((RuntimeError,) if "dtype" in message else ())
    with pytest.raises(errors, match=message):
        ENTRY_POINTS[entry](model, loss, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    if is_model:
        _assert_same(before, _snapshot(model))
