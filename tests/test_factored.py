"""Linear weights' mean gradients kept as factors (the Gram path without the variance):
the factored mean equals the dense one, and never leaks into the variance or accumulation."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from gradnoise._factored import FactoredGrads
from tests.cases import CASES_BY_NAME


def test_factored_mean_float32_on_the_mnist1d_mlp():
    """B=128 on the 40-512-512-10 MLP: the middle layer takes the Gram path on its own
    (128·1024 ≤ 512²); float32 statistics agree with vmap as the other paths do."""
    from gradnoise.tasks import mnist1d_mlp

    torch.manual_seed(0)
    model, loss = mnist1d_mlp(), nn.CrossEntropyLoss()
    x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
    a = gn.gradient_stats(model, loss, x, y, method="fast", variance=False)
    assert [k for k in a.mean if a.mean.is_factored(k)] == ["2.weight"]
    b = gn.gradient_stats(model, loss, x, y, method="vmap", variance=False)
    assert a.trace_cov == pytest.approx(b.trace_cov, rel=1e-5)
    assert abs(a.grad_norm_sq - b.grad_norm_sq) <= 1e-5 * max(abs(b.grad_norm_sq), b.trace_cov / 128)
    assert a.per_layer["2"].grad_norm_sq == pytest.approx(b.per_layer["2"].grad_norm_sq, rel=1e-5, abs=1e-5 * b.per_layer["2"].trace_cov / 128)
    torch.testing.assert_close(a.mean["2.weight"], b.mean["2.weight"], rtol=1e-5, atol=1e-6 * float(b.mean["2.weight"].abs().max()))


def test_factored_mean_stays_out_of_variance_and_accumulation():
    """The per-element variance needs ḡ itself, and so does merging batches: dense means."""
    model, loss, x, y = CASES_BY_NAME["mlp-wide-gram"].make(torch.float64, batch=8)
    assert isinstance(gn.gradient_stats(model, loss, x, y, variance=False).mean, FactoredGrads)
    assert isinstance(gn.gradient_stats(model, loss, x, y, variance=True).mean, dict)
    acc = gn.StatsAccumulator(model, loss, variance=False)
    acc.update(x, y)
    acc.update(x, y)
    assert isinstance(acc.compute().mean, dict)


def test_factored_mean_inf_gradient_is_caught():
    model, loss, x, y = CASES_BY_NAME["mlp-wide-gram"].make(torch.float64, batch=8)

    def sqrt_loss(out, target):  # finite value, infinite gradient at 0
        return loss(out, target) + torch.sqrt(out[:, 0] * 0).mean()

    with pytest.raises(FloatingPointError, match="gradient of parameter .* NaN or inf"):
        gn.gradient_stats(model, sqrt_loss, x, y, method="fast", variance=False)


def test_factored_grads_mapping():
    from gradnoise._factored import dtype_of, numel_of

    d, a = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    g = FactoredGrads(["w", "b"], {"b": torch.ones(3)}, {"w": (d, a)})
    assert list(g) == ["w", "b"] and len(g) == 2 and "w" in g and "x" not in g
    assert numel_of(g, "w") == 12 and dtype_of(g, "w") == torch.float64 and g.is_factored("w")
    assert "factored (3, 4)" in repr(g)
    torch.testing.assert_close(g["w"], d.t() @ a)
    assert not g.is_factored("w") and g["w"] is g["w"]  # multiplied out once
    with pytest.raises(KeyError):
        g["x"]
    with pytest.raises(ValueError, match="exactly once"):
        FactoredGrads(["w"], {"w": d}, {"w": (d, a)})


def test_factored_mean_of_a_layer_whose_output_is_unused():
    """A Gram-path layer called but not reaching the loss has zero gradient, as elsewhere."""

    class Detour(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(32, 32), nn.Linear(32, 32)
            self.head = nn.Linear(32, 3)

        def forward(self, x):
            self.unused(x)  # computed, discarded
            return self.head(torch.tanh(self.used(x)))

    torch.manual_seed(0)
    model = Detour().double()
    x, y = torch.randn(8, 32, dtype=torch.float64), torch.randint(0, 3, (8,))
    a = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast", variance=False)
    b = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="vmap")
    assert a.mean.is_factored("used.weight") and not a.mean.is_factored("unused.weight")
    assert a.per_param["unused.weight"].trace_cov == 0 and float(a.mean["unused.weight"].abs().max()) == 0
    assert a.trace_cov == pytest.approx(b.trace_cov, rel=1e-10)
    for k in b.mean:
        torch.testing.assert_close(a.mean[k], b.mean[k], rtol=1e-10, atol=1e-14)
