"""The engine and the Monitor on a CUDA device (skipped where none is available).

The same statistics as the float64 loop on the CPU, the Monitor's training bitwise
identical on the GPU, and bf16 autocast, on the whole case zoo.
"""

import pytest
import torch

import gradnoise as gn
from tests.cases import CASES, CASES_BY_NAME, monitored_run
from tests.reference import loop_stats

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 rounds float32 products to 10 mantissa bits: the float32 tolerance assumes none."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def to(obj, device):
    return tuple(t.to(device) for t in obj) if isinstance(obj, tuple) else obj.to(device)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("variance", [False, True], ids=["norms", "variance"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradient_stats_on_cuda_equals_the_cpu_loop(case, dtype, rtol, variance):
    model, loss, x, y = case.make(torch.float64, batch=8)
    ref = loop_stats(model, loss, x, y)
    model = model.to("cuda", dtype)
    cast = lambda t: t.to("cuda", dtype) if t.is_floating_point() else t.to("cuda")  # noqa: E731
    x = tuple(cast(t) for t in x) if isinstance(x, tuple) else cast(x)
    s = gn.gradient_stats(model, loss, x, cast(y), variance=variance)
    trace = sum(t for t, _ in ref.values())
    g2 = sum(g for _, g in ref.values())
    assert s.trace_cov == pytest.approx(trace, rel=rtol)
    assert s.grad_norm_sq == pytest.approx(g2, rel=rtol, abs=rtol * trace)
    for name, (t, _) in ref.items():
        assert s.per_param[name].trace_cov == pytest.approx(t, rel=rtol, abs=rtol * trace), name
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["nanogpt-block", "resnet-block", "transformer", "tied", "lstm", "mha"])
def test_monitor_training_on_cuda_is_bitwise_identical(name):
    plain, _ = monitored_run(CASES_BY_NAME[name], False, "cuda")
    params, recs = monitored_run(CASES_BY_NAME[name], True, "cuda")
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))
    for rec, ref in recs:
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-4)


@pytest.mark.parametrize("name", ["nanogpt-block", "resnet-block", "transformer", "mha", "embedding"])
def test_bf16_autocast_on_cuda(name):
    """bf16 autocast on the GPU, where it is a real 16-bit matmul: training unchanged by the
    Monitor, records within the bf16 rounding of the forward pass of the float32 engine."""
    plain, _ = monitored_run(CASES_BY_NAME[name], False, "cuda", autocast=True)
    params, recs = monitored_run(CASES_BY_NAME[name], True, "cuda", autocast=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))
    for rec, ref in recs:
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=3e-2)
