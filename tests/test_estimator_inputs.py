"""Estimators on inputs that used to give a silently wrong number: unequal batches, data
that do not support a fit, and options out of range; each ends as a right number or a
clear error."""

import math

import numpy as np
import pytest
import torch

import gradnoise as gn
from gradnoise.tasks import LinearRegression

TASK = LinearRegression.make(dim=8, sigma=0.5, distance=1.0, seed=0)


def test_unequal_batches_are_weighted_by_their_size():
    """A few tiny batches no longer swamp the estimate: each batch counts as its size. On the
    analytic task the estimate stays within its own interval of the closed form."""
    x, y = TASK.sample(64 * 200 + 2 * 400, torch.Generator().manual_seed(3))
    big = list(zip(x[: 64 * 200].split(64), y[: 64 * 200].split(64), strict=True))
    tiny = list(zip(x[64 * 200 :].split(2), y[64 * 200 :].split(2), strict=True))
    mixed = gn.noise_scale(TASK.model(), TASK.loss_fn(), big + tiny)
    lo, hi = mixed.b_simple_interval
    assert lo < TASK.b_simple < hi and mixed.grad_norm_sq > 0
    # the weighted mean, by hand
    w = np.array([64.0] * 200 + [2.0] * 400)
    tr = np.array(mixed.trace_cov_batches)
    assert mixed.trace_cov == pytest.approx(float(np.sum(w * tr) / np.sum(w)), rel=1e-12)
    # equal batches: the plain mean, as before
    same = gn.noise_scale(TASK.model(), TASK.loss_fn(), big)
    assert same.trace_cov == pytest.approx(float(np.mean(same.trace_cov_batches)), rel=1e-12)


@pytest.mark.parametrize(
    "sizes, steps, kwargs, message",
    [
        ([8, 16, 32, 64], [100, 100, 100, 100], {}, "do not fall with the batch size"),
        ([8, 16, 32, 64], [50, 80, 120, 200], {}, "do not fall with the batch size"),
        ([8, math.nan, 32, 64], [400, 300, 200, 150], {}, "positive and finite"),
        ([8, 16, 32, 64], [400, 300, 200, 150], {"confidence": 1.5}, r"confidence must lie in \(0, 1\)"),
        ([8, 16, 32, 64], [400, 300, 200, 150], {"confidence": 0.0}, r"confidence must lie in \(0, 1\)"),
    ],
)
def test_critical_batch_fit_refuses_data_that_do_not_support_it(sizes, steps, kwargs, message):
    with pytest.raises(ValueError, match=message):
        gn.fit_critical_batch(sizes, steps, **kwargs)


def test_critical_batch_fit_recovers_the_law():
    b = np.array([8, 16, 32, 64, 128, 256, 512], dtype=float)
    fit = gn.fit_critical_batch(b, 200 + 64000 / b)
    assert fit.s_min == pytest.approx(200, rel=1e-6) and fit.b_crit == pytest.approx(320, rel=1e-6)
    assert fit.predict(320) == pytest.approx(400, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"memory_budget": 0}, "memory_budget must be a positive number"),
        ({"memory_budget": -5}, "memory_budget must be a positive number"),
        ({"base_lr": -0.1, "base_batch": 32}, "base_lr must be a positive number"),
        ({"base_lr": 0.1, "base_batch": 0}, "base_batch must be a positive number"),
        ({"dataset_size": 0}, "dataset_size must be a positive number"),
    ],
)
def test_suggest_batch_size_validates(kwargs, message):
    x, y = TASK.sample(256, torch.Generator().manual_seed(4))
    with pytest.raises(ValueError, match=message):
        gn.suggest_batch_size(TASK.model(), TASK.loss_fn(), [(x[:128], y[:128]), (x[128:], y[128:])], hessian=False, **kwargs)


def test_suggest_batch_size_never_exceeds_the_data_set():
    x, y = TASK.sample(512, torch.Generator().manual_seed(5))
    data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 512, 64)]
    s = gn.suggest_batch_size(TASK.model(), TASK.loss_fn(), data, hessian=False, dataset_size=8, memory_budget=2**30)
    assert s.suggested <= 8
    assert "the whole data set (N = 8) fits" in s.reasoning


def test_sweep_stops_runs_that_cannot_win_and_reports_progress(capsys):
    """A learning rate slower than the best one at its batch size is stopped when it has
    taken as many steps (the best runs are those of a sweep without it); progress is one
    line per run on stderr when not on a terminal."""
    x, y = TASK.sample(2048, torch.Generator().manual_seed(21))
    kwargs = dict(target_loss=TASK.sigma**2 * 1.5, max_steps=3000, eval_every=5)
    make = lambda: torch.nn.Linear(8, 1, bias=False).double()  # noqa: E731
    both = gn.critical_batch_sweep(make, TASK.loss_fn(), (x, y), [4, 16, 64], lrs=[0.2, 0.01], **kwargs)
    err = capsys.readouterr().err
    assert err.count("critical_batch_sweep [") == 6 and "[6/6]" in err
    fast = gn.critical_batch_sweep(make, TASK.loss_fn(), (x, y), [4, 16, 64], lrs=[0.2], progress=False, **kwargs)
    assert [(r.lr, r.steps) for r in both.best] == [(r.lr, r.steps) for r in fast.best]
    slow = [r for r in both.runs if r.lr == 0.01]
    assert all(r.stopped and r.steps is None for r in slow)
