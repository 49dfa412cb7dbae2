"""The noise statistics in a diagonal metric P (Adam's preconditioner) against a float64
loop of ``torch.autograd.grad`` with weights P, and a dense Hessian for ``B_noise^P``."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import gradnoise as gn
from tests.cases import CASES_BY_NAME


def _random_metric(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.rand(p.shape, generator=g, dtype=p.dtype) + 0.1 for n, p in model.named_parameters() if p.requires_grad
    }


def _reference(model, loss, x, y, P):
    """(tr(PΣ), GᵀPG) per parameter from a loop of autograd.grad: the stats of √P ⊙ g_i."""
    grads = gn.per_sample_grads_loop(model, loss, x, y)
    B = next(iter(grads.values())).shape[0]
    out = {}
    for n, v in grads.items():
        w = v * P[n].sqrt()
        m = w.mean(0)
        tr = float(((w - m) ** 2).sum()) / (B - 1)
        out[n] = (tr, float(m.square().sum()) - tr / B)
    return out


@pytest.mark.parametrize("variance", [False, True])
@pytest.mark.parametrize("method", ["fast", "vmap"])
def test_preconditioned_stats_equal_a_weighted_loop(case, method, variance):
    model, loss, x, y = case.make(torch.float64)
    P = _random_metric(model)
    ref = _reference(model, loss, x, y, P)
    s = gn.gradient_stats(model, loss, x, y, method=method, variance=variance, preconditioner=P)
    assert s.metric == "preconditioned"
    tr, g2 = sum(t for t, _ in ref.values()), sum(g for _, g in ref.values())
    assert s.trace_cov == pytest.approx(tr, rel=1e-8)
    assert s.grad_norm_sq == pytest.approx(g2, rel=1e-8, abs=1e-8 * tr)
    for n, (t, _) in ref.items():
        assert s.per_param[n].trace_cov == pytest.approx(t, rel=1e-8, abs=1e-12 * tr), n


def _adam_trained(opt_cls=torch.optim.AdamW, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    loss = nn.CrossEntropyLoss()
    x, y = torch.randn(48, 5, dtype=torch.float64), torch.randint(0, 3, (48,))
    opt = opt_cls(model.parameters(), lr=1e-2, **kwargs)
    for _ in range(3):
        opt.zero_grad()
        loss(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    return model, loss, x, y, opt


@pytest.mark.parametrize("opt_cls, kwargs", [(torch.optim.AdamW, {}), (torch.optim.Adam, {"amsgrad": True})])
def test_adam_metric_is_its_bias_corrected_denominator(opt_cls, kwargs):
    """P = 1/(√v̂ + eps) from the optimizer's state, read without changing it."""
    model, loss, x, y, opt = _adam_trained(opt_cls, **kwargs)
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    P = {}
    for n, p in model.named_parameters():
        st = opt.state[p]
        v = st["max_exp_avg_sq"] if kwargs.get("amsgrad") else st["exp_avg_sq"]
        P[n] = 1 / ((v / (1 - 0.999 ** float(st["step"]))).sqrt() + 1e-8)
    ref = _reference(model, loss, x, y, P)
    for method in ("fast", "vmap"):
        s = gn.gradient_stats(model, loss, x, y, method=method, preconditioner=opt)
        assert s.trace_cov == pytest.approx(sum(t for t, _ in ref.values()), rel=1e-8)
        assert s.grad_norm_sq == pytest.approx(sum(g for _, g in ref.values()), rel=1e-8)
    for p, s in opt.state.items():
        assert all(torch.equal(v, state[id(p)][k]) for k, v in s.items())


def test_b_noise_in_the_metric_equals_a_dense_hessian():
    """B_noise^P = tr(PHPΣ)/GᵀPHPG with H from torch.func.hessian (every example stated)."""
    model, loss, x, y, _ = _adam_trained()
    P = _random_metric(model)
    bn = gn.b_noise(model, loss, [(x[:24], y[:24]), (x[24:], y[24:])], examples=48, preconditioner=P)
    names, shapes = [n for n, _ in model.named_parameters()], [p.shape for _, p in model.named_parameters()]

    def f(flat):
        ps, i = {}, 0
        for n, sh in zip(names, shapes, strict=True):
            k = math.prod(sh)
            ps[n], i = flat[i : i + k].reshape(sh), i + k
        return loss(functional_call(model, ps, (x,)), y)

    flat0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    H, G = hessian(f)(flat0), torch.func.grad(f)(flat0)
    Pf = torch.cat([P[n].reshape(-1) for n in names])
    g = gn.per_sample_grads_loop(model, loss, x, y)
    dev = torch.cat([g[n].reshape(48, -1) for n in names], 1)
    dev = dev - dev.mean(0)
    sigma = dev.T @ dev / 47
    tr_phps = float(torch.trace((Pf[:, None] * H * Pf[None, :]) @ sigma))
    gphpg = float((Pf * G) @ H @ (Pf * G)) - tr_phps / 48
    assert bn.trace_h_sigma == pytest.approx(tr_phps, rel=1e-9)
    assert bn.gthg == pytest.approx(gphpg, rel=1e-9)
    assert bn.grad_norm_sq == pytest.approx(float(G @ (Pf * G)) - float((dev.square() * Pf).sum()) / 47 / 48, rel=1e-9)


def test_two_batch_estimator_in_the_metric():
    """Two micro-batches: (GᵀPG, tr(PΣ)) from the P-weighted norms of their gradients."""
    model, loss, x, y, _ = _adam_trained()
    P = _random_metric(model)
    g2, tr = gn.two_batch_stats(model, loss, x, y, micro_batches=2, preconditioner=P)
    sqrt_p = torch.cat([P[n].reshape(-1) for n, _ in model.named_parameters()]).sqrt()
    halves = []
    for sl in (slice(0, 24), slice(24, 48)):
        gs = torch.autograd.grad(loss(model(x[sl]), y[sl]), list(model.parameters()))
        halves.append(torch.cat([v.reshape(-1) for v in gs]) * sqrt_p)
    small = float(sum(h.dot(h) for h in halves)) / 2
    big = (halves[0] + halves[1]) / 2
    ref = gn.two_batch(small, float(big.dot(big)), 24, 48)
    assert (g2, tr) == pytest.approx(ref, rel=1e-10)


def test_noise_scale_says_its_metric():
    model, loss, x, y, opt = _adam_trained()
    batches = [(x[:24], y[:24]), (x[24:], y[24:])]
    plain = gn.noise_scale(model, loss, batches)
    pre = gn.noise_scale(model, loss, batches, preconditioner=opt)
    assert (plain.metric, pre.metric) == ("euclidean", "preconditioned")
    each = [gn.gradient_stats(model, loss, bx, by, preconditioner=opt) for bx, by in batches]
    assert pre.trace_cov == pytest.approx(sum(s.trace_cov for s in each) / 2, rel=1e-12)


def test_bad_preconditioners_are_refused_with_what_to_do():
    model, loss, x, y = CASES_BY_NAME["mlp"].make()
    P = _random_metric(model)
    with pytest.raises(ValueError, match="first step"):
        gn.gradient_stats(model, loss, x, y, preconditioner=torch.optim.Adam(model.parameters()))
    with pytest.raises(TypeError, match="only Adam and AdamW"):
        gn.gradient_stats(model, loss, x, y, preconditioner=torch.optim.SGD(model.parameters(), lr=0.1))
    name = next(iter(P))
    with pytest.raises(ValueError, match="missing"):
        gn.gradient_stats(model, loss, x, y, preconditioner={k: v for k, v in P.items() if k != name})
    with pytest.raises(ValueError, match="shape"):
        gn.gradient_stats(model, loss, x, y, preconditioner={**P, name: P[name].reshape(-1)})
    with pytest.raises(ValueError, match="positive"):
        gn.gradient_stats(model, loss, x, y, preconditioner={**P, name: -P[name]})
    other = nn.Linear(2, 2)
    opt = torch.optim.Adam(other.parameters())
    other(torch.randn(3, 2)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="optimizer of this model"):
        gn.gradient_stats(model, loss, x, y, preconditioner=opt)


def _adam_run(monitor_kwargs=None, steps=4, accumulation=1, mode="hooks", case="mlp"):
    """A short AdamW run on a float64 case; returns the model, the loss, the parameters, the
    monitor's records and, per step, the metric P the optimizer held before its step and the
    batch."""
    model, loss, _, _ = CASES_BY_NAME[case].make(torch.float64)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = None
    if monitor_kwargs is not None:
        mon = gn.Monitor(model, loss, strict=True, mode=mode, preconditioner=opt, accumulation_steps=accumulation,
                         **monitor_kwargs)  # fmt: skip
    metrics, batches = [], []
    for _ in range(steps):
        x, y = CASES_BY_NAME[case].inputs(g, 8).double(), CASES_BY_NAME[case].targets(g, 8)
        opt.zero_grad()
        for xs, ys in zip(x.chunk(accumulation), y.chunk(accumulation), strict=True):
            (loss(model(xs), ys) / accumulation).backward()
        P = {n: 1 / ((opt.state[p]["exp_avg_sq"] / (1 - 0.999 ** float(opt.state[p]["step"]))).sqrt() + 1e-8)
             for n, p in model.named_parameters()} if opt.state else None  # fmt: skip
        metrics.append({n: w.clone() for n, w in P.items()} if P else None)
        batches.append((x, y))
        if mon is not None:
            mon.step(x, y, optimizer=opt)
        opt.step()
    records = mon.history.records if mon is not None else None
    if mon is not None:
        mon.close()
    return model, loss, [p.detach().clone() for p in model.parameters()], records, metrics, batches


@pytest.mark.parametrize("variance", [False, True])
@pytest.mark.parametrize("mode, accumulation, case", [("hooks", 1, "mlp"), ("hooks", 2, "mlp"), ("separate", 1, "mlp"),
                                                      ("hooks", 1, "layernorm"), ("hooks", 1, "mha"),
                                                      ("hooks", 1, "conv1d"), ("hooks", 1, "lstm"), ("hooks", 2, "gru")])  # fmt: skip
def test_the_monitor_records_the_preconditioned_noise_scale(mode, accumulation, case, variance):
    """With AdamW: training bitwise identical to a run without the monitor; each record holds
    tr(PΣ), GᵀPG and B_simple^P of the optimizer's metric before its step (None before the
    first step), equal to gradient_stats (vmap) in that metric at that step's parameters."""
    _, loss, plain, _, _, _ = _adam_run(None, accumulation=accumulation, case=case)
    _, _, params, records, metrics, batches = _adam_run({"variance": variance}, accumulation=accumulation, mode=mode,
                                                        case=case)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))
    assert records[0]["b_simple_precond"] is None and records[0]["b_simple"] is not None
    for k in (1, 2, 3):
        replay, _, _, _, _, _ = _adam_run(None, steps=k, accumulation=accumulation, case=case)
        x, y = batches[k]
        s = gn.gradient_stats(replay, loss, x, y, method="vmap", variance=False, preconditioner=metrics[k])
        rec = records[k]
        assert rec["trace_cov_precond"] == pytest.approx(s.trace_cov, rel=1e-9)
        assert rec["grad_norm_sq_precond"] == pytest.approx(s.grad_norm_sq, rel=1e-8, abs=1e-9 * s.trace_cov)
        assert rec["b_simple_precond"] == pytest.approx(s.b_simple, rel=1e-6)


def test_the_monitor_with_a_fixed_metric():
    """A dict P (checked once, at construction): every record in that metric, from the first."""
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=8)
    P = _random_metric(model)
    with gn.Monitor(model, loss, preconditioner=P, strict=True) as mon:
        loss(model(x), y).backward()
        rec = mon.step(x, y)
    ref = gn.gradient_stats(model, loss, x, y, method="vmap", preconditioner=P)
    assert rec["trace_cov_precond"] == pytest.approx(ref.trace_cov, rel=1e-9)
    assert rec["grad_norm_sq_precond"] == pytest.approx(ref.grad_norm_sq, rel=1e-8, abs=1e-9 * ref.trace_cov)
