"""per_sample_grads against a float64 loop of torch.autograd.grad."""

import torch
from torch import nn

import gradnoise as gn
from tests.cases import CASES_BY_NAME


def assert_grads_equal(a, b, rtol):
    assert a.keys() == b.keys()
    for k in a:
        scale = b[k].abs().max().clamp_min(1e-30)
        assert (a[k] - b[k]).abs().max() <= rtol * scale, k


def test_vmap_equals_loop(case):
    model, loss, x, y = case.make(torch.float64)
    got = gn.per_sample_grads(model, loss, x, y)
    ref = gn.per_sample_grads_loop(model, loss, x, y)
    assert_grads_equal(got, ref, 1e-10)
    for k, p in dict(model.named_parameters()).items():
        if k in got:
            assert got[k].shape == (case.batch, *p.shape)


def test_chunked_equals_unchunked():
    model, loss, x, y = CASES_BY_NAME["conv1d"].make(torch.float64, batch=7)
    assert_grads_equal(gn.per_sample_grads(model, loss, x, y, chunk_size=3), gn.per_sample_grads(model, loss, x, y), 1e-12)


def test_tied_reported_once_and_frozen_excluded():
    model, loss, x, y = CASES_BY_NAME["tied"].make()
    assert "out.weight" not in gn.per_sample_grads(model, loss, x, y)
    model, loss, x, y = CASES_BY_NAME["frozen"].make()
    g = gn.per_sample_grads(model, loss, x, y)
    assert "0.weight" not in g and "0.bias" in g


def test_mean_of_per_example_is_batch_gradient(case):
    model, loss, x, y = case.make(torch.float64)
    g = gn.per_sample_grads(model, loss, x, y)
    out = model(*x) if isinstance(x, tuple) else model(x)
    params = dict(model.named_parameters())
    batch = torch.autograd.grad(loss(out, y), [params[k] for k in g])
    for v, b in zip(g.values(), batch, strict=True):
        torch.testing.assert_close(v.mean(0), b, rtol=1e-10, atol=1e-12)


def test_dropout_gives_independent_masks_per_example():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 2)).double()
    x = torch.randn(1, 4, dtype=torch.float64).expand(8, 4).contiguous()  # identical examples
    y = torch.zeros(8, dtype=torch.long)
    g = gn.per_sample_grads(model, nn.CrossEntropyLoss(), x, y)["0.weight"]
    assert not torch.allclose(g[0], g[1])  # different masks
    model.eval()  # no dropout: identical examples, identical gradients
    g = gn.per_sample_grads(model, nn.CrossEntropyLoss(), x, y)["0.weight"]
    torch.testing.assert_close(g[0], g[1])


def test_dropout_p0_matches_loop():
    """With p = 0 dropout is the identity: vmap (one mask per example) equals the loop."""
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0), nn.Linear(8, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    assert_grads_equal(
        gn.per_sample_grads(model, nn.CrossEntropyLoss(), x, y),
        gn.per_sample_grads_loop(model, nn.CrossEntropyLoss(), x, y),
        1e-10,
    )


def test_batchnorm_in_eval_mode_is_allowed():
    model = gn.tasks.bn_cnn(channels=4).double().eval()
    x, y = torch.randn(5, 40, dtype=torch.float64), torch.randint(0, 10, (5,))
    assert_grads_equal(
        gn.per_sample_grads(model, nn.CrossEntropyLoss(), x, y),
        gn.per_sample_grads_loop(model, nn.CrossEntropyLoss(), x, y),
        1e-10,
    )
