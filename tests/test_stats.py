"""Estimators on the analytic linear-regression task: unbiasedness, B_simple, finite population."""

import json
import math

import numpy as np
import pytest
import torch

import gradnoise as gn
from gradnoise.tasks import LinearRegression

TASK = LinearRegression.make(dim=8, sigma=0.5, distance=1.0, seed=0)


def _many_batches(method, batch, n_batches, seed=0):
    model, loss = TASK.model(), TASK.loss_fn()
    g = torch.Generator().manual_seed(seed)
    x, y = TASK.sample(batch * n_batches, g)
    out = [gn.gradient_stats(model, loss, xb, yb, method=method, variance=False)
           for xb, yb in zip(x.split(batch), y.split(batch), strict=True)]  # fmt: skip
    return np.array([s.trace_cov for s in out]), np.array([s.grad_norm_sq for s in out])


@pytest.mark.parametrize("method,n_batches", [("fast", 3000), ("vmap", 600)])
def test_unbiased_on_linear_regression(method, n_batches):
    tr, g2 = _many_batches(method, batch=32, n_batches=n_batches)
    # Tolerance: 4 standard errors of the mean over independent batches.
    assert abs(tr.mean() - TASK.trace_cov) < 4 * tr.std(ddof=1) / math.sqrt(len(tr))
    assert abs(g2.mean() - TASK.grad_norm_sq) < 4 * g2.std(ddof=1) / math.sqrt(len(g2))


def test_b_simple_ratio_of_averages_within_3_percent():
    tr, g2 = _many_batches("fast", batch=32, n_batches=6000, seed=1)
    b = tr.mean() / g2.mean()
    # The 3 % target is only meaningful if the estimate's own error is well below it.
    se = b * math.sqrt((tr.std() / tr.mean()) ** 2 + (g2.std() / g2.mean()) ** 2) / math.sqrt(len(tr))
    assert se < 0.01 * TASK.b_simple
    assert abs(b - TASK.b_simple) < 0.03 * TASK.b_simple


def test_plug_in_norm_is_biased():
    """|ḡ|² overestimates |G|² by tr Σ / B: the correction in grad_norm_sq is needed."""
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(32 * 2000, torch.Generator().manual_seed(2))
    plug = np.array([
        sum(float(v.double().square().sum()) for v in gn.gradient_stats(model, loss, xb, yb, variance=False).mean.values())
        for xb, yb in zip(x.split(32), y.split(32), strict=True)
    ])  # fmt: skip
    se = plug.std(ddof=1) / math.sqrt(len(plug))
    assert abs(plug.mean() - (TASK.grad_norm_sq + TASK.trace_cov / 32)) < 4 * se
    assert plug.mean() - TASK.grad_norm_sq > 10 * se


def test_finite_population_correction():
    """Batches drawn without replacement from N examples: unbiased only with dataset_size=N."""
    N, B, trials = 24, 6, 4000
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(N, torch.Generator().manual_seed(3))
    g = gn.per_sample_grads(model, loss, x, y)["weight"].flatten(1)  # [N, d]
    G = g.mean(0)
    true_tr = float((g - G).square().sum(1).mean())  # population covariance (1/N)
    true_g2 = float(G.square().sum())
    gen = torch.Generator().manual_seed(4)
    tr, g2, g2_stream = [], [], []
    for _ in range(trials):
        idx = torch.randperm(N, generator=gen)[:B]
        s = gn.gradient_stats(model, loss, x[idx], y[idx], dataset_size=N, variance=False)
        tr.append(s.trace_cov)
        g2.append(s.grad_norm_sq)
        g2_stream.append(gn.gradient_stats(model, loss, x[idx], y[idx], variance=False).grad_norm_sq)
    tr, g2, g2_stream = map(np.array, (tr, g2, g2_stream))
    se = lambda a: a.std(ddof=1) / math.sqrt(trials)  # noqa: E731
    assert abs(tr.mean() - true_tr) < 4 * se(tr)
    assert abs(g2.mean() - true_g2) < 4 * se(g2)
    assert abs(g2_stream.mean() - true_g2) > 4 * se(g2_stream)  # without the correction: biased


def test_full_batch_with_dataset_size_is_exact():
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(20, torch.Generator().manual_seed(5))
    s = gn.gradient_stats(model, loss, x, y, dataset_size=20)
    g = gn.per_sample_grads(model, loss, x, y)["weight"].flatten(1)
    assert s.grad_norm_sq == pytest.approx(float(g.mean(0).square().sum()), rel=1e-12)
    assert s.trace_cov == pytest.approx(float((g - g.mean(0)).square().sum(1).mean()), rel=1e-12)


def test_variance_and_gsnr_match_definitions(case):
    model, loss, x, y = case.make(torch.float64, batch=7)
    s = gn.gradient_stats(model, loss, x, y, method="vmap")
    g = gn.per_sample_grads(model, loss, x, y)
    for k, v in g.items():
        torch.testing.assert_close(s.variance[k], v.var(0, correction=1), rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(s.mean[k], v.mean(0), rtol=1e-9, atol=1e-14)
    signal = torch.cat([(v.mean(0).square() - v.var(0) / 7).flatten() for v in g.values()])
    noise = torch.cat([v.var(0).flatten() for v in g.values()])
    second = torch.cat([(v.var(0) * 6 + 7 * v.mean(0).square()).flatten() for v in g.values()])
    # Kept (stats module docstring): not noise-free, and a centred sum of squares above 1e-12
    # of the largest in its tensor (zero-up-to-rounding gradients, e.g. attention key biases).
    above = torch.cat([(v.var(0) > 1e-12 * v.var(0).max()).flatten() for v in g.values()])
    keep = (noise * 6 > 1e-6 * second) & above
    if keep.any():
        assert s.gsnr == pytest.approx(float((signal[keep] / noise[keep]).mean()), rel=1e-8)
    sq = sum(v.flatten(1).square().sum(1) for v in g.values())
    torch.testing.assert_close(s.sq_norms, sq)
    assert s.trace_cov == pytest.approx(sum(float(v.sum()) for v in s.variance.values()), rel=1e-9)


def test_accumulator_equals_concatenated_batch():
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(50, torch.Generator().manual_seed(6))
    acc = gn.StatsAccumulator(model, loss, dataset_size=50)
    for xb, yb in zip(x.split([1, 13, 20, 16]), y.split([1, 13, 20, 16]), strict=True):
        acc.update(xb, yb)
    got, ref = acc.compute(), gn.gradient_stats(model, loss, x, y, dataset_size=50)
    assert got.batch_size == 50
    for field in ("loss", "trace_cov", "grad_norm_sq", "gsnr"):
        assert getattr(got, field) == pytest.approx(getattr(ref, field), rel=1e-10)
    torch.testing.assert_close(got.variance["weight"], ref.variance["weight"], rtol=1e-10, atol=0)
    torch.testing.assert_close(got.sq_norms, ref.sq_norms)
    acc.reset()
    with pytest.raises(ValueError, match="no batch seen"):
        acc.compute()


def test_to_dict_is_json_and_repr_is_readable():
    model, loss, x, y = __import__("tests.cases", fromlist=["x"]).CASES_BY_NAME["mlp"].make()
    s = gn.gradient_stats(model, loss, x, y)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["batch_size"] == 6 and set(d["per_layer"]) == {"0", "2"}
    assert d["per_param"]["0.weight"]["method"] == "fast"
    text = repr(s)
    assert "B_simple" in text and "GradientStats(B=6" in text and "\n" in text


def test_closed_forms_agree_with_large_sample():
    """The task's closed forms themselves, against 200k samples in float64."""
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(200_000, torch.Generator().manual_seed(7))
    g = gn.gradient_stats(model, loss, x, y, variance=False)
    assert g.loss == pytest.approx(TASK.loss, rel=0.01)
    np.testing.assert_allclose(g.mean["weight"].numpy().ravel(), TASK.gradient, atol=0.02)
    assert g.trace_cov == pytest.approx(TASK.trace_cov, rel=0.02)


def test_lazy_map_is_a_read_only_dict_built_once():
    import copy
    import pickle

    from gradnoise._lazy import LazyMap

    built = []
    m = LazyMap(lambda: built.append(1) or {"b": 2, "a": 1})
    assert built == []
    assert list(m) == ["b", "a"] and m == {"b": 2, "a": 1} and {"b": 2, "a": 1} == m
    assert "a" in m and "c" not in m and len(m) == 2 and repr(m) == "{'b': 2, 'a': 1}"
    with pytest.raises(KeyError):
        m["c"]
    assert pickle.loads(pickle.dumps(m)) == {"b": 2, "a": 1} and copy.deepcopy(m) == m
    assert built == [1]
    with pytest.raises(TypeError):
        m["a"] = 3  # read-only


@pytest.mark.parametrize("variance", [True, False])
def test_fast_moments_mappings_equal_vmap(variance):
    """The fast engine's per-parameter tensors (built on first read) in parameter order,
    equal to vmap's; and the stats pickle with their per-layer breakdown."""
    import pickle

    from gradnoise.stats import compute_moments

    model, loss, x, y = __import__("tests.cases", fromlist=["x"]).CASES_BY_NAME["mlp"].make(torch.float64, batch=9)
    fast = compute_moments(model, loss, x, y, method="fast", variance=variance, factored_mean=True)
    ref = compute_moments(model, loss, x, y, method="vmap", variance=variance)
    order = [n for n, _ in model.named_parameters()]
    for field in ("trace_m2", "sq_norms"):
        got, want = getattr(fast, field), getattr(ref, field)
        assert list(got) == order
        for k in order:
            torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-10, atol=1e-12 * float(want[k].abs().max()))
    torch.testing.assert_close(fast.sq_total, sum(ref.sq_norms[k].double() for k in order))
    s = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    back = pickle.loads(pickle.dumps(s))
    assert back.per_layer == s.per_layer and back.per_param == s.per_param and back.trace_cov == s.trace_cov


@pytest.mark.parametrize("case_name,method", [("mlp", "vmap"), ("raw-parameter", "fast")])
def test_chunked_results_are_in_the_parameters_dtype(case_name, method):
    """Chunks are merged in float64 (Moments.promoted); the results are cast back to the
    parameters' dtype, with the values of one unchunked pass. ``raw-parameter``: the fast
    engine's whole-model vmap fallback runs in chunks."""
    from gradnoise.stats import compute_moments
    from tests.cases import CASES_BY_NAME

    model, loss, x, y = CASES_BY_NAME[case_name].make(torch.float32, batch=10)
    assert compute_moments(model, loss, x, y, method=method, chunk_size=3).promoted
    assert not compute_moments(model, loss, x, y, method=method).promoted
    chunked = gn.gradient_stats(model, loss, x, y, method=method, chunk_size=3)
    whole = gn.gradient_stats(model, loss, x, y, method=method)
    for name, p in model.named_parameters():
        assert chunked.mean[name].dtype == chunked.variance[name].dtype == p.dtype
        torch.testing.assert_close(chunked.mean[name], whole.mean[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked.variance[name], whole.variance[name], rtol=1e-4, atol=1e-6)
    assert chunked.trace_cov == pytest.approx(whole.trace_cov, rel=1e-5)


@pytest.mark.parametrize("chunk", [2, 4, 1 << 16])
def test_gsnr_sums_keeps_and_drops_the_documented_elements(chunk, monkeypatch):
    import gradnoise.summary as stats
    from gradnoise.summary import NOISE_FREE, _gsnr_sums

    monkeypatch.setattr(stats, "GSNR_CHUNK", chunk)  # several passes, the last one short

    n = 8
    # kept, kept with ḡ = 0, noise-free (M2 = 0, ḡ ≠ 0), dead (0/0), negligible M2, noise-free by ratio
    mean = torch.tensor([0.5, 0.0, 1.0, 0.0, 0.3, 2.0, 0.25], dtype=torch.float64)
    m2 = torch.tensor([2.0, 1.5, 0.0, 0.0, 1e-14, 1e-7, 1.0], dtype=torch.float64)
    total, count = _gsnr_sums(mean, m2, n, None)
    kept = torch.tensor([0, 1, 6])
    q = mean[kept].square() / m2[kept]
    assert count == 3
    assert total == pytest.approx(float(((n - 1) * q - 1 / n).sum()), rel=1e-12)
    assert float(mean[5] ** 2 / m2[5]) >= (1 - NOISE_FREE) / (NOISE_FREE * n)  # really noise-free
    # inputs untouched
    assert m2[2] == 0 and mean[3] == 0 and torch.isfinite(m2).all()


def test_accumulator_compute_is_repeatable():
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(30, torch.Generator().manual_seed(7))
    acc = gn.StatsAccumulator(model, loss)
    acc.update(x, y)
    first, second = acc.compute(), acc.compute()
    torch.testing.assert_close(first.variance["weight"], second.variance["weight"], rtol=0, atol=0)
    assert first.gsnr == second.gsnr


@pytest.mark.parametrize("dataset_size", [None, 40])
def test_gsnr_is_computed_when_first_read_once_and_travels_with_the_result(dataset_size, monkeypatch):
    """gradient_stats defers the GSNR (a pass over every parameter) to its first read, from the
    result's own mean and variance; it equals the GSNR computed from the moments (float64:
    the two differ by the rounding of the variance's scale), is computed once for the total,
    per parameter and per layer, and is carried by pickles and copies."""
    import copy
    import pickle

    import gradnoise.summary as stats
    from tests.cases import CASES_BY_NAME

    calls = []
    original = stats._gsnr_sums
    monkeypatch.setattr(stats, "_gsnr_sums", lambda *a, **k: calls.append(1) or original(*a, **k))
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=9)
    n_params = len(list(model.parameters()))
    moments = gn.stats.compute_moments(model, loss, x, y, method="fast")
    total, per_param, per_layer = stats.summarise(moments, dataset_size)
    calls.clear()

    s = gn.gradient_stats(model, loss, x, y, method="fast", dataset_size=dataset_size)
    assert calls == []  # nothing computed yet
    for name, want in per_layer.items():  # the first read computes every parameter's sums
        assert s.per_layer[name].gsnr == pytest.approx(want.gsnr, rel=1e-10)
    assert len(calls) == n_params
    assert s.gsnr == pytest.approx(total.gsnr, rel=1e-10) and math.isfinite(s.gsnr)
    for name, want in per_param.items():
        assert s.per_param[name].gsnr == pytest.approx(want.gsnr, rel=1e-10)
    assert len(calls) == n_params  # once
    for back in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s)):
        assert back.gsnr == s.gsnr and back.per_layer == s.per_layer
    assert json.loads(json.dumps(s.to_dict()))["gsnr"] == s.gsnr

    fresh = gn.gradient_stats(model, loss, x, y, method="fast", dataset_size=dataset_size)
    assert pickle.loads(pickle.dumps(fresh)).gsnr == pytest.approx(total.gsnr, rel=1e-10)  # computed to pickle
    assert gn.gradient_stats(model, loss, x, y, method="fast", variance=False).gsnr is None
