"""Cases that used to give a silently wrong number in the engines: each now gives the
float64 reference's number or a clear error."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests.reference import loop_stats


def _near_identical(scale, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 1 + scale * torch.randn(n, 4, generator=g)
    y = 5 + scale * torch.randn(n, 1, generator=g)
    return x, y


@pytest.mark.parametrize("scale", [1e-2, 1e-3])
@pytest.mark.parametrize("variance", [False, True])
def test_float32_cancellation_is_measured_without_it(scale, variance):
    """Near-identical examples: the mean gradient dominates the spread, and S − B|ḡ|²
    cancels in float32 (20 % and 100 % errors before). The engine detects it and measures
    those parameters from materialised per-example gradients: within 1e-4 of float64."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = _near_identical(scale)
    ref_model = nn.Linear(4, 1).double()
    ref_model.load_state_dict(model.state_dict())
    ref = gn.gradient_stats(ref_model, nn.MSELoss(), x.double(), y.double(), method="vmap")
    got = gn.gradient_stats(model, nn.MSELoss(), x, y, method="fast", variance=variance)
    assert got.trace_cov == pytest.approx(ref.trace_cov, rel=1e-4)
    for k in ref.per_param:
        assert got.per_param[k].trace_cov == pytest.approx(ref.per_param[k].trace_cov, rel=1e-4), k
        assert got.per_param[k].method == "vmap"  # says what it did
    if variance:
        for k in ref.variance:
            torch.testing.assert_close(got.variance[k].double(), ref.variance[k], rtol=1e-3, atol=1e-3 * float(ref.variance[k].abs().max()))


def test_no_fallback_where_nothing_cancels():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(64, 4), torch.randn(64, 1)
    assert {s.method for s in gn.gradient_stats(model, nn.MSELoss(), x, y, method="fast").per_param.values()} == {"fast"}


@pytest.mark.parametrize("method", ["fast", "vmap"])
@pytest.mark.parametrize("loss", [nn.MSELoss(), nn.L1Loss(), nn.BCEWithLogitsLoss()])
def test_a_broadcasting_target_is_refused(method, loss):
    """A [B] target against a [B, 1] output broadcasts to a [B, B] loss: the fast and vmap
    paths gave different B_simple (6.7 vs 170); both now refuse it and say how to fix it."""
    model = nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.rand(16)
    with pytest.raises(ValueError, match=r"targets' shape \((16|1),\) differs from the outputs' \((16|1), 1\)"):
        gn.gradient_stats(model, loss, x, y, method=method)
    ok = gn.gradient_stats(model, loss, x, y.unsqueeze(1), method=method)
    assert ok.batch_size == 16


def test_the_monitor_measures_a_cancelling_step_without_cancellation():
    """Hooks mode on near-identical float32 examples: the step whose centred sums would cancel
    is measured again by the engine; the record matches float64."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x, y = _near_identical(1e-3)
    ref_model = nn.Linear(4, 1).double()
    ref_model.load_state_dict(model.state_dict())
    ref = gn.gradient_stats(ref_model, nn.MSELoss(), x.double(), y.double(), method="vmap")
    mon = gn.Monitor(model, nn.MSELoss(), mode="hooks", strict=True)
    nn.MSELoss()(model(x), y).backward()
    rec = mon.step(x, y)
    assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-4)
    mon.close()


@pytest.mark.parametrize("seq", [5, 6, 4])  # T == B, T > B, T < B
def test_a_layer_off_the_batch_is_never_taken_for_one_example_per_row(seq):
    """nanoGPT's ``wpe(arange(T))`` with T equal to the batch size: its leading dimension is
    not the batch (traced from the inputs, not guessed from a size): its output is expanded
    over the batch (engine.broadcast) and its parameter gets the float64 loop's numbers — on
    the first (traced) call and on the second (from the plan's cache)."""
    from tests.cases import NanoGPTBlock

    torch.manual_seed(0)
    model = NanoGPTBlock().double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 9, (5, seq), generator=g), torch.randint(0, 9, (5,), generator=g)
    ref = loop_stats(model, nn.CrossEntropyLoss(), x, y)
    for _ in range(2):
        got = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast")
        assert got.per_param["wpe.weight"].method == "fast"
        assert got.per_param["wte.weight"].method == "fast"
        for name, (trace, norm) in ref.items():
            assert got.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
            assert got.per_param[name].grad_norm_sq == pytest.approx(norm, rel=1e-9, abs=1e-12), name


def test_the_monitor_never_measures_a_layer_off_the_batch_per_row():
    """The same model in the Monitor with T == B: the hooks measure the position embedding
    through the broadcast (its output expanded over the batch, checked once), never its
    positions as examples: the float64 loop's numbers, and the same training."""
    from tests.cases import NanoGPTBlock

    torch.manual_seed(0)
    model = NanoGPTBlock().double()
    twin = NanoGPTBlock().double()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 9, (5, 5), generator=g), torch.randint(0, 9, (5,), generator=g)
    ref = loop_stats(model, nn.CrossEntropyLoss(), x, y)
    with gn.Monitor(model, nn.CrossEntropyLoss(), mode="hooks", strict=True) as mon:
        for _ in range(2):  # traced, then from the plan's cache
            model.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            rec = mon.step(x, y)
            assert rec["trace_cov"] == pytest.approx(sum(t for t, _ in ref.values()), rel=1e-10)
            assert rec["grad_norm_sq"] == pytest.approx(sum(n for _, n in ref.values()), rel=1e-9)
    nn.CrossEntropyLoss()(twin(x), y).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
