"""Noise scale, two-batch estimator, intervals, the 1/B law, B_noise and the critical batch."""

import math

import numpy as np
import pytest
import torch

import gradnoise as gn
from gradnoise import two_batch
from gradnoise.tasks import LinearRegression

TASK = LinearRegression.make(dim=8, sigma=0.5, distance=1.0, seed=0)


def batches(n_batches, batch, seed=0):
    x, y = TASK.sample(n_batches * batch, torch.Generator().manual_seed(seed))
    return list(zip(x.split(batch), y.split(batch), strict=True))


def test_b_simple_within_3_percent():
    ns = gn.noise_scale(TASK.model(), TASK.loss_fn(), batches(4000, 32, seed=10))
    assert abs(ns.b_simple - TASK.b_simple) < 0.03 * TASK.b_simple
    lo, hi = ns.b_simple_interval
    assert lo < TASK.b_simple < hi
    assert ns.examples == 4000 * 32 and ns.num_batches == 4000


def test_mean_of_ratios_is_biased_ratio_of_averages_is_not():
    ns = gn.noise_scale(TASK.model(), TASK.loss_fn(), batches(3000, 64, seed=11))
    ratios = np.array(ns.trace_cov_batches) / np.array(ns.grad_norm_sq_batches)
    ratios = ratios[np.isfinite(ratios)]
    se = ratios.std(ddof=1) / math.sqrt(len(ratios))
    assert abs(ns.b_simple - TASK.b_simple) < 0.03 * TASK.b_simple
    # The common mistake: averaging per-batch ratios. Way off, by many standard errors.
    assert abs(np.mean(ratios) - TASK.b_simple) > 10 * se


def test_two_batch_identity_with_micro_batches_of_one():
    """With micro-batches of one example, the two-batch estimator is the per-example one."""
    model, loss = TASK.model(), TASK.loss_fn()
    (x, y), = batches(1, 12, seed=12)
    g2, tr = gn.two_batch_stats(model, loss, x, y, micro_batches=12)
    s = gn.gradient_stats(model, loss, x, y)
    assert tr == pytest.approx(s.trace_cov, rel=1e-12)
    assert g2 == pytest.approx(s.grad_norm_sq, rel=1e-12, abs=1e-14)


def test_two_batch_formula_inverts_expectations():
    # With E|g_b|² = |G|² + trΣ/b exactly, the formulas return |G|² and trΣ.
    G2, tr = 0.7, 9.0
    assert two_batch(G2 + tr / 4, G2 + tr / 32, 4, 32) == pytest.approx((G2, tr))
    with pytest.raises(ValueError, match="0 < small < large"):
        two_batch(1.0, 1.0, 8, 8)


def test_two_batch_and_per_example_agree_in_expectation():
    bs = batches(3000, 32, seed=13)
    two = gn.noise_scale(TASK.model(), TASK.loss_fn(), bs, estimator="two-batch", micro_batches=4)
    tr, g2 = np.array(two.trace_cov_batches), np.array(two.grad_norm_sq_batches)
    assert abs(tr.mean() - TASK.trace_cov) < 4 * tr.std(ddof=1) / math.sqrt(len(tr))
    assert abs(g2.mean() - TASK.grad_norm_sq) < 4 * g2.std(ddof=1) / math.sqrt(len(g2))


@pytest.mark.parametrize("method", ["bootstrap", "jackknife"])
def test_interval_coverage(method):
    trials, hits = 200, 0
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(trials * 40 * 32, torch.Generator().manual_seed(14))
    xb, yb = x.split(32), y.split(32)
    for t in range(trials):
        bs = list(zip(xb[t * 40 : (t + 1) * 40], yb[t * 40 : (t + 1) * 40], strict=True))
        lo, hi = gn.noise_scale(model, loss, bs, interval=method, seed=t).b_simple_interval
        hits += lo <= TASK.b_simple <= hi
    # 95 % nominal; binomial sd over 200 trials is 1.5 %: accept within 3 sd (a slightly
    # conservative or liberal interval at 40 batches is expected).
    assert abs(hits / trials - 0.95) <= 3 * math.sqrt(0.95 * 0.05 / trials) + 0.01


def test_ema_is_bias_corrected_ratio_of_averages():
    ema = gn.NoiseScaleEMA(beta=0.9)
    assert math.isnan(ema.b_simple)
    ema.update(10.0, 1.0)
    assert ema.b_simple == pytest.approx(10.0)  # bias correction: first value exactly
    for _ in range(200):
        ema.update(8.0, 2.0)
    assert ema.b_simple == pytest.approx(4.0, rel=1e-6)
    with pytest.raises(ValueError, match="beta"):
        gn.NoiseScaleEMA(beta=1.0)


def test_noise_law_exponent_and_finite_population_bend():
    N = 512
    x, y = TASK.sample(N, torch.Generator().manual_seed(15))
    sizes = [2, 4, 8, 16, 32, 64, 128, 256, 384, 448, 496, 512]
    law = gn.noise_law(TASK.model(), TASK.loss_fn(), (x, y), sizes, repeats=200, seed=0)
    assert abs(law.exponent + 1) < 0.05
    assert law.exponent_interval[0] < -1 < law.exponent_interval[1]
    # Near B = N the error follows tr Σ/B·(N−B)/(N−1), not tr Σ/B.
    i = sizes.index(496)
    assert abs(law.errors[i] - law.theory[i]) < 4 * law.errors_se[i]
    assert law.trace_cov / 496 - law.errors[i] > 10 * law.errors_se[i]
    assert law.errors[-1] == pytest.approx(0.0, abs=1e-20)  # B = N: the full gradient
    assert law.raw_exponent < law.exponent - 0.05  # without the correction the fit bends


def test_noise_law_figure(tmp_path):
    x, y = TASK.sample(128, torch.Generator().manual_seed(16))
    law = gn.noise_law(TASK.model(), TASK.loss_fn(), (x, y), [2, 8, 32, 128], repeats=8)
    fig = law.plot()
    paths = gn.plots.save(fig, tmp_path / "law")
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in paths)


def test_b_noise_within_its_standard_error():
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(8000, torch.Generator().manual_seed(18))
    bn = gn.b_noise(model, loss, (x, y), examples=3000)
    se = (bn.interval[1] - bn.interval[0]) / (2 * 1.96)  # bootstrap interval → standard error
    assert abs(bn.b_noise - TASK.b_noise) < 4 * se
    assert se < 0.1 * TASK.b_noise  # the check has power


@pytest.mark.slow
def test_b_noise_within_5_percent():
    model, loss = TASK.model(), TASK.loss_fn()
    x, y = TASK.sample(40000, torch.Generator().manual_seed(17))
    bn = gn.b_noise(model, loss, (x, y), examples=20000)
    assert abs(bn.b_noise - TASK.b_noise) < 0.05 * TASK.b_noise
    assert bn.interval[0] < TASK.b_noise < bn.interval[1]
    G, H = TASK.gradient, TASK.hessian
    assert bn.eps_max == pytest.approx(float(G @ G / (G @ H @ G)), rel=0.05)
    assert bn.eps_opt(TASK.b_noise) == pytest.approx(bn.eps_max / 2, rel=0.06)


def test_fit_critical_batch_recovers_parameters():
    rng = np.random.default_rng(0)
    b = np.array([8, 16, 32, 64, 128, 256, 512, 1024, 2048], dtype=float)
    s_min, e_min = 800.0, 51200.0  # B_crit = 64
    steps = (s_min + e_min / b) * np.exp(rng.normal(0, 0.03, len(b)))
    fit = gn.fit_critical_batch(b, steps)
    assert fit.s_min == pytest.approx(s_min, rel=0.1)
    assert fit.e_min == pytest.approx(e_min, rel=0.1)
    assert fit.b_crit_interval[0] < 64 < fit.b_crit_interval[1]
    assert fit.s_min_interval[0] < s_min < fit.s_min_interval[1]
    assert fit.r2 > 0.99 and fit.rms_rel_residual < 0.06


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: gn.fit_critical_batch([64, 64, 64], [10, 11, 12]), "at least 3 distinct batch sizes"),
        (lambda: gn.fit_critical_batch([8, 16, 32], [10, 0, 12]), "positive and finite"),
        (lambda: gn.fit_critical_batch([8, 16], [10, 5]), "at least 3 distinct"),
        (lambda: gn.noise_law(TASK.model(), TASK.loss_fn(), TASK.sample(64), [16]), "at least 2 distinct batch sizes"),
        (lambda: gn.noise_law(TASK.model(), TASK.loss_fn(), TASK.sample(64), [16, 64], finite_population=False), "without the finite-population correction"),
        (lambda: gn.noise_law(TASK.model(), TASK.loss_fn(), TASK.sample(64), [16, 65]), r"must lie in \[1, N=64\]"),
        (lambda: gn.noise_scale(TASK.model(), TASK.loss_fn(), batches(1, 16)), "at least 2 batches"),
        (lambda: gn.noise_scale(TASK.model(), TASK.loss_fn(), batches(3, 1)), "batch of 1 example"),
        (lambda: gn.noise_scale(TASK.model(), TASK.loss_fn(), batches(3, 8), estimator="x"), "unknown estimator"),
        (lambda: gn.noise_scale(TASK.model(), TASK.loss_fn(), batches(3, 9), estimator="two-batch", micro_batches=2), "does not split"),
    ],
)
def test_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_suggest_batch_size_on_analytic_task():
    s = gn.suggest_batch_size(TASK.model(), TASK.loss_fn(), batches(40, 256, seed=19), base_lr=0.1, base_batch=32, hessian_examples=2000)
    # B_noise ≈ 10.6: the largest power of two below it is 8 (memory is no limit here).
    assert s.suggested == 8
    assert s.b_noise_interval[0] < TASK.b_noise < s.b_noise_interval[1]
    assert s.lr_linear == pytest.approx(0.1 * 8 / 32)
    assert "B_noise" in s.reasoning and "suggested B = 8" in s.reasoning
    assert s.max_batch_memory is None or s.max_batch_memory > 8


def test_suggest_respects_memory_budget():
    model, loss = gn.tasks.mnist1d_mlp(), torch.nn.CrossEntropyLoss()
    x, y = torch.randn(512, 40), torch.randint(0, 10, (512,))
    fixed, per = gn.per_example_memory(model, loss, x, y, sizes=(64, 256))
    # Saved for backward per example: the input (40), the two ReLU outputs (512 each, also
    # the inputs of the next Linear) and the logits (10), in float32, doubled.
    assert per == pytest.approx(2 * 4 * (40 + 512 + 512 + 10), rel=0.02)
    budget = int(fixed + 100 * per)
    s = gn.suggest_batch_size(model, loss, [(x[:256], y[:256]), (x[256:], y[256:])], hessian=False, memory_budget=budget)
    assert s.max_batch_memory == 100 and s.suggested <= 64


def test_critical_batch_sweep_on_analytic_task():
    x, y = TASK.sample(4096, torch.Generator().manual_seed(21))
    sweep = gn.critical_batch_sweep(
        lambda: torch.nn.Linear(8, 1, bias=False).double(), TASK.loss_fn(), (x, y), [2, 4, 16, 64, 256],
        target_loss=TASK.sigma**2 * 1.5, lrs=[0.05, 0.2, 0.5], max_steps=3000, eval_every=5, progress=False,
    )  # fmt: skip
    steps = [r.steps for r in sweep.best]
    assert all(s is not None for s in steps)
    assert steps[0] > steps[-1]  # larger batches need fewer steps
    fit = sweep.fit()
    assert fit.r2 > 0.8  # the measured steps follow S_min + E_min/B
    # McCandlish et al. 2018: B_crit ≈ B_noise to within an order of magnitude; on this task
    # (B_noise = 10.6 at the start) the fit gives 8.5 with this seed
    assert TASK.b_noise / 3 < fit.b_crit < TASK.b_noise * 3


def test_critical_batch_sweep_takes_an_optimizer():
    """optimizer= builds each run's optimizer (Adam here): the same runs as an explicit
    loop with that optimizer; momentum= with optimizer= is refused."""
    x, y = TASK.sample(512, torch.Generator().manual_seed(3))
    make = lambda: torch.nn.Linear(8, 1, bias=False).double()  # noqa: E731
    sweep = gn.critical_batch_sweep(make, TASK.loss_fn(), (x, y), [16], target_loss=TASK.sigma**2 * 2,
                                    lrs=[0.05], optimizer=torch.optim.Adam, max_steps=500, eval_every=1,
                                    progress=False)  # fmt: skip
    torch.manual_seed(0)
    model, g = make(), torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    reached = None
    for step in range(1, 501):
        idx = torch.randint(0, 512, (16,), generator=g)
        opt.zero_grad()
        TASK.loss_fn()(model(x[idx]), y[idx]).backward()
        opt.step()
        with torch.no_grad():
            if float(TASK.loss_fn()(model(x), y)) <= TASK.sigma**2 * 2:
                reached = step
                break
    assert reached is not None and sweep.best[0].steps == reached
    with pytest.raises(ValueError, match="momentum"):
        gn.critical_batch_sweep(make, TASK.loss_fn(), (x, y), [16], target_loss=1.0, lrs=[0.05],
                                optimizer=torch.optim.Adam, momentum=0.9, progress=False)  # fmt: skip
