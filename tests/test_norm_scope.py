"""Monitor(scope="norms"): the noise statistics of the LayerNorm/RMSNorm parameters alone
(the layer-normalisation GNS of Gray et al. 2024), from hooks on those layers only."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests.cases import CASES_BY_NAME
from tests.reference import loop_stats


def _reference(model, loss, x, y, names):
    stats = loop_stats(model, loss, x, y)
    return sum(stats[k][0] for k in names), sum(stats[k][1] for k in names)


@pytest.mark.parametrize("case", ["nanogpt-block", "transformer", "rmsnorm"])
def test_the_norms_scope_equals_the_loop_on_the_norm_parameters(case):
    model, loss, x, y = CASES_BY_NAME[case].make(torch.float64)
    norms = [n for n, m in model.named_modules() if isinstance(m, (nn.LayerNorm, nn.RMSNorm))]
    names = [n for n, _ in model.named_parameters() if any(n.startswith(f"{m}.") for m in norms)]
    trace, norm = _reference(model, loss, x, y, names)
    twin = CASES_BY_NAME[case].make(torch.float64)[0]
    with gn.Monitor(model, loss, scope="norms", strict=True) as mon:
        assert mon.mode == "hooks"
        assert set(mon._hooks.modules) == set(norms)  # nothing else is hooked
        loss(model(x), y).backward()
        rec = mon.step(x, y)
    assert rec["trace_cov"] == pytest.approx(trace, rel=1e-10)
    assert rec["grad_norm_sq"] == pytest.approx(norm, rel=1e-9, abs=1e-14)
    assert {k for k in rec if k.startswith("b_simple/")} == {f"b_simple/{m}" for m in norms}
    loss(twin(x), y).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters(), strict=True))


def test_the_norms_scope_says_what_it_cannot_do():
    model, loss, *_ = CASES_BY_NAME["mlp"].make(torch.float64)
    with pytest.raises(ValueError, match="LayerNorm/RMSNorm.*none"):
        gn.Monitor(model, loss, scope="norms")
    model, loss, *_ = CASES_BY_NAME["nanogpt-block"].make(torch.float64)
    with pytest.raises(ValueError, match="mode='hooks'.*got mode='separate'"):
        gn.Monitor(model, loss, scope="norms", mode="separate")
    with pytest.raises(ValueError, match="unknown scope"):
        gn.Monitor(model, loss, scope="layernorm")
