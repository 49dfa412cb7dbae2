"""The public API's conventions: one data convention (``inputs, targets`` for one batch,
``data`` for many), results of plain Python numbers, and old spellings that still work
with a ``DeprecationWarning``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import gradnoise as gn
from gradnoise._data import as_data


def _problem(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, nn.CrossEntropyLoss(), x, y


def test_data_forms_are_the_same_examples():
    """A pair, a list of pairs and a DataLoader over the same examples give the same batches."""
    _, _, x, y = _problem()
    pair = as_data((x, y))
    listed = as_data([(x[:24], y[:24]), (x[24:], y[24:])])
    loader = as_data(DataLoader(TensorDataset(x, y), batch_size=24))
    assert len(pair) == 1 and len(listed) == len(loader) == 2
    for (xa, ya), (xb, yb) in zip(listed, loader, strict=True):
        assert torch.equal(xa[0], xb[0]) and torch.equal(ya[0], yb[0])
    assert torch.equal(torch.cat([b[0][0] for b in listed]), pair[0][0][0])


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.randn(4, 2), "got a Tensor"),
        ([], "holds no batch"),
        ([(torch.randn(4, 2),)], "must be an .inputs, targets. pair"),
        ((torch.randn(4, 2), torch.randn(5)), "different batch sizes"),
        (3, "got int"),
    ],
)
def test_bad_data_is_refused_clearly(bad, message):
    with pytest.raises((TypeError, ValueError), match=message):
        as_data(bad)


def test_curvature_takes_every_data_form_alike():
    """The Hessian over a DataLoader equals the Hessian over the pair of the same examples."""
    model, loss, x, y = _problem()
    a = gn.hessian_eigenvalues(model, loss, (x, y), k=2, tol=1e-10)
    b = gn.hessian_eigenvalues(model, loss, DataLoader(TensorDataset(x, y), batch_size=16), k=2, tol=1e-10)
    assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-8)
    t1 = gn.hessian_trace(model, loss, (x, y), num_hvps=10, seed=1, hvp="double-backward")
    t2 = gn.hessian_trace(model, loss, [(x[:30], y[:30]), (x[30:], y[30:])], num_hvps=10, seed=1, hvp="forward-over-reverse")
    assert t1.trace == pytest.approx(t2.trace, rel=1e-9)


def test_noise_scale_needs_several_batches_and_says_how():
    model, loss, x, y = _problem()
    with pytest.raises(ValueError, match="pass a list of .inputs, targets. pairs or a DataLoader"):
        gn.noise_scale(model, loss, (x, y))
    ns = gn.noise_scale(model, loss, DataLoader(TensorDataset(x, y), batch_size=12), interval="jackknife")
    assert ns.num_batches == 4 and ns.examples == 48


def _plain(value) -> bool:
    """A plain Python value: what a result's number fields may hold."""
    if value is None or type(value) in (bool, int, float, str):
        return True
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and (_plain(v) or dataclasses.is_dataclass(v)) for k, v in value.items())
    return False


def _number_fields(result) -> dict:
    return {
        f.name: getattr(result, f.name)
        for f in dataclasses.fields(result)
        if not f.name.startswith("_") and not isinstance(getattr(result, f.name), Tensor)
        and f.name not in ("mean", "variance", "per_param", "per_layer", "names")
    }  # fmt: skip


@pytest.mark.parametrize("method", ["lanczos", "arpack", "power"])
def test_eigen_results_are_plain_numbers(method):
    model, loss, x, y = _problem()
    eig = gn.hessian_eigenvalues(model, loss, (x, y), k=2, method=method, tol=1e-6)
    for name, value in _number_fields(eig).items():
        assert _plain(value), f"{method}: {name} = {value!r} is not a plain Python value"
    assert isinstance(eig.residuals, tuple) and all(type(r) is float for r in eig.residuals)


def test_estimator_results_are_plain_numbers():
    model, loss, x, y = _problem()
    batches = [(x[i : i + 12], y[i : i + 12]) for i in range(0, 48, 12)]
    results = [
        gn.noise_scale(model, loss, batches, hessian=True, hessian_examples=8),
        gn.b_noise(model, loss, (x, y), examples=8),
        gn.hessian_trace(model, loss, (x, y), num_hvps=6, method="hutch++"),
        gn.fit_critical_batch([8, 16, 32, 64, 128], [900, 500, 300, 200, 160]),
        gn.noise_law(model, loss, (x, y), [4, 12, 24], repeats=4),
        gn.epsilon_sharpness(model, loss, (x, y), max_iter=2),
    ]
    for result in results:
        for name, value in _number_fields(result).items():
            if isinstance(value, list):  # noise law grids are tuples; a list is a bug
                pytest.fail(f"{type(result).__name__}.{name} is a list")
            assert _plain(value), f"{type(result).__name__}.{name} = {value!r} is not a plain Python value"


def test_old_spellings_warn_and_give_the_same_result():
    model, loss, x, y = _problem()
    with pytest.warns(DeprecationWarning, match=r"hessian_eigenvalues\(batches=...\) is deprecated"):
        old = gn.hessian_eigenvalues(model, loss, batches=(x, y), tol=1e-8)
    assert old.eigenvalues == gn.hessian_eigenvalues(model, loss, (x, y), tol=1e-8).eigenvalues
    with pytest.warns(DeprecationWarning, match="max_iter"):
        gn.hessian_eigenvalues(model, loss, (x, y), method="power", max_iter=3)
    with pytest.warns(DeprecationWarning, match=r"noise_law\(model, loss_fn, inputs, targets, batch_sizes\)"):
        law_old = gn.noise_law(model, loss, x, y, [4, 12], repeats=3)
    assert law_old.errors == gn.noise_law(model, loss, (x, y), [4, 12], repeats=3).errors
    ns = gn.noise_scale(model, loss, [(x[:24], y[:24]), (x[24:], y[24:])], interval="jackknife", confidence=0.9)
    with pytest.warns(DeprecationWarning, match="interval_method"):
        assert ns.interval == "jackknife 90%"
    with pytest.raises(TypeError, match="both batches= and data="):
        gn.hessian_trace(model, loss, data=(x, y), batches=(x, y))
    with pytest.raises(TypeError, match="multiple values for argument 'data'"):
        gn.hessian_trace(model, loss, (x, y), batches=(x, y))


def test_eigen_product_budget_is_kept():
    """``max_hvps`` bounds the products of Lanczos and power iteration alike (the power
    method's residual checks add k)."""
    model, loss, x, y = _problem()
    lanczos = gn.hessian_eigenvalues(model, loss, (x, y), k=1, tol=1e-14, max_hvps=5)
    power = gn.hessian_eigenvalues(model, loss, (x, y), k=2, method="power", tol=1e-14, max_hvps=7)
    assert lanczos.num_hvps <= 5 and power.num_hvps <= 7 + 2
    assert not math.isnan(lanczos.eigenvalues[0])


def test_every_function_that_computes_hessian_products_takes_hvp():
    """``hvp=`` picks the product backend wherever Hessian-vector products are computed, and
    the backends agree."""
    import inspect

    for fn in (gn.hessian_eigenvalues, gn.hessian_trace, gn.b_noise, gn.noise_scale, gn.suggest_batch_size):
        assert "hvp" in inspect.signature(fn).parameters, fn.__name__
    model, loss, x, y = _problem()
    a = gn.b_noise(model, loss, (x, y), examples=8, hvp="double-backward")
    b = gn.b_noise(model, loss, (x, y), examples=8, hvp="forward-over-reverse")
    assert a.b_noise == pytest.approx(b.b_noise, rel=1e-9)
