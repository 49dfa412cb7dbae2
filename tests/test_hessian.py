"""Hessian-vector products, eigenvalues, trace, ε-sharpness and landscapes against exact
float64 references (torch.func.hessian + eigvalsh, closed forms)."""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, hessian

import gradnoise as gn
from tests.cases import CASES_BY_NAME


class Quadratic(nn.Module):
    """``L(θ) = ½ Σ_j h_j (θ_j − c_j)²`` through a model whose output is θ (any h, any sign)."""

    def __init__(self, h, c, theta):
        super().__init__()
        self.theta = nn.Parameter(torch.as_tensor(theta, dtype=torch.float64))
        self.register_buffer("h", torch.as_tensor(h, dtype=torch.float64))
        self.register_buffer("c", torch.as_tensor(c, dtype=torch.float64))

    def forward(self, x):
        return self.theta.expand(x.shape[0], -1)


def quad_loss(model):
    def loss(out, y):
        return (0.5 * model.h * (out - model.c) ** 2).sum(1).mean()

    return loss


def exact_hessian(model, loss_fn, x, y, reverse_only=False):
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    flat = torch.cat([p.reshape(-1) for p in params.values()])
    shapes = [p.shape for p in params.values()]

    def f(v):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            k = math.prod(s)
            out[n] = v[i : i + k].view(s)
            i += k
        return loss_fn(functional_call(model, out, (x,) if not isinstance(x, tuple) else x), y)

    # torch.func.hessian is forward-over-reverse; CPU flash attention has no forward-mode
    # derivative, and jacrev(jacrev) through attention came out asymmetric here, so attention
    # models use a loop of double backward (torch.autograd.grad) instead.
    if reverse_only:  # brute force: one double-backward column per parameter
        with gn.hessian.twice_differentiable():
            leaf = flat.clone().requires_grad_(True)
            g = torch.autograd.grad(f(leaf), leaf, create_graph=True)[0]
            H = torch.stack([torch.autograd.grad(g[j], leaf, retain_graph=True)[0] for j in range(len(flat))])
    else:
        H = hessian(f)(flat)
    torch.testing.assert_close(H, H.T, rtol=1e-9, atol=1e-12)  # a Hessian is symmetric
    return H


EIG_CASES = ["mlp", "mnist1d-cnn", "transformer"]


@pytest.mark.parametrize("method", ["lanczos", "arpack"])
@pytest.mark.parametrize("name", EIG_CASES)
def test_lanczos_top3_matches_eigvalsh(name, method):
    model, loss, x, y = CASES_BY_NAME[name].make(torch.float64, batch=6)
    # Train mode (no dropout here): in eval mode nn.TransformerEncoderLayer may take its fused
    # inference path under torch.func transforms, which gives a wrong (asymmetric) reference.
    model.train(name == "transformer")
    H = exact_hessian(model, loss, x, y, reverse_only=name == "transformer")
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    eig = gn.hessian_eigenvalues(model, loss, (x, y), k=3, which="LA", tol=1e-8, method=method)
    np.testing.assert_allclose(eig.eigenvalues, exact.numpy(), rtol=1e-6)
    assert eig.converged and max(eig.residuals) < 1e-6
    # Ritz vectors of a (selectively) reorthogonalised basis: orthonormal, no ghost copies
    V = eig.eigenvectors
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=V.dtype), rtol=0, atol=1e-7)


def test_lanczos_float32_at_the_monitor_tolerance():
    """At tol 1e-2 in float32 no Ritz pair reaches √ε before the stop, so the basis is never
    reorthogonalised: the eigenvalue is still within the residual bound of the dense one,
    and the basis rows stay semi-orthogonal (checked on the returned vector's norm)."""
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=6)
    lam = float(torch.linalg.eigvalsh(exact_hessian(model, loss, x, y))[-1])
    y32 = y.float() if y.is_floating_point() else y
    eig = gn.hessian_eigenvalues(model.float(), loss, (x.float(), y32), tol=1e-2)
    assert eig.converged and eig.residuals[0] <= 1e-2
    assert abs(eig.eigenvalues[0] - lam) <= 1e-2 * abs(lam)
    assert float(eig.eigenvectors[:, 0].norm()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", EIG_CASES)
def test_power_iteration_to_its_tolerance(name):
    model, loss, x, y = CASES_BY_NAME[name].make(torch.float64, batch=6)
    model.train(name == "transformer")  # see test_lanczos_top3_matches_eigvalsh
    evals = torch.linalg.eigvalsh(exact_hessian(model, loss, x, y, reverse_only=name == "transformer"))
    eig = gn.hessian_eigenvalues(model, loss, (x, y), k=1, which="LA", method="power", tol=1e-4, max_hvps=5000)
    assert eig.converged and eig.residuals[0] <= 1e-4
    # A residual r bounds the eigenvalue error by r·|λ| (Bauer–Fike for symmetric H).
    assert abs(eig.eigenvalues[0] - float(evals[-1])) <= 1e-4 * abs(eig.eigenvalues[0]) + 1e-12


def test_indefinite_la_and_lm_differ_both_right():
    model = Quadratic(h=[-3.0, 1.0, 2.0, 0.5], c=[0.0] * 4, theta=[0.3, -0.2, 0.1, 0.4])
    x, y, loss = torch.zeros(2, 1), torch.zeros(2), quad_loss(model)
    for method in ("lanczos", "arpack", "power"):
        la = gn.hessian_eigenvalues(model, loss, (x, y), which="LA", method=method, tol=1e-8)
        lm = gn.hessian_eigenvalues(model, loss, (x, y), which="LM", method=method, tol=1e-8)
        sa = gn.hessian_eigenvalues(model, loss, (x, y), which="SA", method=method, tol=1e-8)
        assert la.eigenvalues[0] == pytest.approx(2.0, rel=1e-6)
        assert lm.eigenvalues[0] == pytest.approx(-3.0, rel=1e-6)
        assert sa.eigenvalues[0] == pytest.approx(-3.0, rel=1e-6)
    top2 = gn.hessian_eigenvalues(model, loss, (x, y), k=2, which="LA", method="power", tol=1e-8)
    assert top2.eigenvalues == pytest.approx((2.0, 1.0), rel=1e-6)


def test_hvp_methods_agree_with_exact_hessian():
    model, loss, x, y = CASES_BY_NAME["conv1d"].make(torch.float64, batch=5)
    H = exact_hessian(model, loss, x, y)
    v = torch.randn(H.shape[0], dtype=torch.float64)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]  # weighted by size: the mean over all 5
    for method in ("double-backward", "forward-over-reverse"):
        op = gn.hessian_operator(model, loss, batches, method=method)
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(op.matmat(torch.stack([v, 2 * v], 1))[:, 1], 2 * H @ v, rtol=1e-10, atol=1e-12)


def test_hutchinson_within_stderr_and_hutchpp_lower_variance():
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=6)
    exact = float(torch.trace(exact_hessian(model, loss, x, y)))
    est = gn.hessian_trace(model, loss, (x, y), num_hvps=300, seed=0)
    assert abs(est.trace - exact) < 4 * est.stderr
    hutch = [gn.hessian_trace(model, loss, (x, y), num_hvps=30, seed=s).trace for s in range(40)]
    hpp = [gn.hessian_trace(model, loss, (x, y), method="hutch++", num_hvps=30, seed=s).trace for s in range(40)]
    assert np.var(hpp) < np.var(hutch)
    assert abs(np.mean(hpp) - exact) < 4 * np.std(hpp) / math.sqrt(40) + 1e-9


def test_epsilon_sharpness_on_a_quadratic():
    h, c, theta = np.array([2.0, 1.0, 0.5]), np.array([1.0, -1.0, 0.0]), np.array([0.5, 0.2, -0.3])
    model = Quadratic(h, c, theta)
    x, y, loss = torch.zeros(4, 1), torch.zeros(4), quad_loss(model)
    eps = 1e-2
    # Convex and separable: each coordinate goes to the bound in the direction of its gradient.
    r = eps * (np.abs(theta) + 1)
    best = theta + r * np.sign(h * (theta - c))
    L = lambda t: float(0.5 * np.sum(h * (t - c) ** 2))  # noqa: E731
    expected = (L(best) - L(theta)) / (1 + L(theta)) * 100
    got = gn.epsilon_sharpness(model, loss, (x, y), epsilon=eps)
    assert got.sharpness == pytest.approx(expected, rel=1e-6)
    assert got.loss == pytest.approx(L(theta))
    sub = gn.epsilon_sharpness(model, loss, (x, y), epsilon=eps, subspace_dim=2, seed=1)
    again = gn.epsilon_sharpness(model, loss, (x, y), epsilon=eps, subspace_dim=2, seed=1)
    assert sub.sharpness == again.sharpness  # seeded
    assert sub.sharpness != gn.epsilon_sharpness(model, loss, (x, y), epsilon=eps, subspace_dim=2, seed=2).sharpness


def test_relu_rescaling_changes_sharpness_not_loss():
    """Dinh et al. 2017: (W1, W2) → (αW1, W2/α) is the same function with another λ_max."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    x, y, loss = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,)), nn.CrossEntropyLoss()
    scaled = nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False)).double()
    with torch.no_grad():
        scaled[0].weight.copy_(model[0].weight * 5.0)
        scaled[2].weight.copy_(model[2].weight / 5.0)
    a = gn.hessian_eigenvalues(model, loss, (x, y), tol=1e-8)
    b = gn.hessian_eigenvalues(scaled, loss, (x, y), tol=1e-8)
    assert float(loss(model(x), y)) == pytest.approx(float(loss(scaled(x), y)), rel=1e-12)
    assert abs(b.eigenvalues[0] / a.eigenvalues[0] - 1) > 0.5  # same function, other sharpness


def test_landscapes():
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=8)
    other = CASES_BY_NAME["mlp"].model().double()
    line = gn.loss_along_line(model, loss, (x, y), model, other, alphas=[0.0, 0.5, 1.0])
    assert line.losses[0] == pytest.approx(float(loss(model(x), y)))
    assert line.losses[2] == pytest.approx(float(loss(other(x), y)))
    s1 = gn.random_slice(model, loss, (x, y), steps=5)
    assert s1.losses.shape == (5,) and s1.losses[2] == pytest.approx(line.losses[0])
    s2 = gn.random_slice(model, loss, (x, y), dims=2, steps=3, metric=lambda o, t: (o.argmax(1) == t).double().mean())
    assert s2.losses.shape == (3, 3) and s2.metric.shape == (3, 3)
    fig = gn.plots.plot_landscape(line)  # the figure draws the landscape's own numbers
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), line.losses)
    np.testing.assert_allclose(fig.axes[0].lines[0].get_xdata(), [0.0, 0.5, 1.0])
    fig = gn.plots.plot_landscape(s2)
    assert fig.axes[0].get_xlim() == (s2.alphas[0], s2.alphas[-1])
    assert fig.axes[-1].get_ylabel() == r"$\log_{10}$ loss"  # the colour bar
    d = gn.filter_normalized_direction(model)
    torch.testing.assert_close(d["0.weight"].norm(dim=1), model[0].weight.detach().norm(dim=1))
    assert d["0.bias"].abs().sum() == 0


def test_curvature_refuses_dropout_and_batchnorm_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    with pytest.raises(ValueError, match="dropout in train mode.*model.eval"):
        gn.hessian_eigenvalues(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="unknown which"):
        gn.hessian_eigenvalues(model.eval(), nn.CrossEntropyLoss(), (x, y), which="BE")
    with pytest.raises(ValueError, match="unknown method 'eigsh'; choose one of 'lanczos', 'arpack', 'power'"):
        gn.hessian_eigenvalues(model.eval(), nn.CrossEntropyLoss(), (x, y), method="eigsh")
    with pytest.raises(ValueError, match="unknown HVP method"):
        gn.hessian_operator(model, nn.CrossEntropyLoss(), (x, y), method="finite-differences")


def test_transformer_eval_mode_curvature_equals_train_mode_without_dropout():
    model, loss, x, y = CASES_BY_NAME["transformer"].make(torch.float64, batch=6)
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    hv_train = gn.hessian_operator(model.train(), loss, (x, y)).matvec(v)
    hv_eval = gn.hessian_operator(model.eval(), loss, (x, y)).matvec(v)
    torch.testing.assert_close(hv_eval, hv_train, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp", "mnist1d-cnn"])
def test_warm_started_lanczos_matches_eigvalsh_and_stops_early(name):
    model, loss, x, y = CASES_BY_NAME[name].make(torch.float64, batch=6)
    H = exact_hessian(model, loss, x, y)
    evals, evecs = torch.linalg.eigh(H)
    # From a random start (v0 given): top 2, with residuals equal to the true ones.
    v0 = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    eig = gn.hessian_eigenvalues(model, loss, (x, y), k=2, v0=v0, tol=1e-6)
    np.testing.assert_allclose(eig.eigenvalues, evals.flip(0)[:2].numpy(), rtol=1e-6)
    lam = torch.tensor(eig.eigenvalues, dtype=torch.float64)
    true_res = torch.linalg.vector_norm(H @ eig.eigenvectors - eig.eigenvectors * lam, dim=0) / lam.abs()
    assert eig.converged and max(eig.residuals) <= 1e-6 and float(true_res.max()) <= 2e-6
    # From a start close to the top eigenvector: converged after very few products.
    near = evecs[:, -1] + 1e-3 * v0 / v0.norm()
    warm = gn.hessian_eigenvalues(model, loss, (x, y), v0=near, tol=1e-3)
    assert warm.converged and warm.num_hvps <= 3
    assert warm.eigenvalues[0] == pytest.approx(float(evals[-1]), rel=1e-5)


def test_warm_started_lanczos_honours_which():
    model = Quadratic(h=[-3.0, 1.0, 2.0, 0.5], c=[0.0] * 4, theta=[0.3, -0.2, 0.1, 0.4])
    x, y, loss = torch.zeros(2, 1), torch.zeros(2), quad_loss(model)
    v0 = torch.ones(4, dtype=torch.float64)
    for which, want in (("LA", 2.0), ("LM", -3.0), ("SA", -3.0)):
        eig = gn.hessian_eigenvalues(model, loss, (x, y), which=which, v0=v0, tol=1e-8)
        assert eig.eigenvalues[0] == pytest.approx(want, rel=1e-9) and eig.converged


@pytest.mark.parametrize("k", [1, 2])
def test_checked_lanczos_restarts_with_a_bounded_basis(k):
    """With a basis of at most 2k + 2 vectors the checked Lanczos restarts (explicitly, from
    its Ritz vectors) and still converges to the dense eigenvalues; the products it reports
    exceed the basis size, so the restart path ran."""
    from gradnoise.eigen import _lanczos_checked
    from gradnoise.hessian import hessian_operator

    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=6)
    H = exact_hessian(model, loss, x, y)
    top = torch.linalg.eigvalsh(H).flip(0)[:k]
    op = hessian_operator(model, loss, (x, y))
    start = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    vals, vecs, res = _lanczos_checked(op, k, "LA", 1e-6, 2000, start, max_basis=2 * k + 2)
    assert op.num_hvps > 2 * k + 2 and max(res) <= 1e-6
    np.testing.assert_allclose(vals, top.numpy(), rtol=1e-6)
    lam = torch.tensor(vals, dtype=torch.float64)
    true_res = torch.linalg.vector_norm(H @ vecs - vecs * lam, dim=0) / lam.abs()
    assert float(true_res.max()) <= 2e-6


def test_checked_lanczos_stops_when_the_tolerance_is_below_the_precision():
    """A float32 operator cannot reach a residual of 1e-12: the restarts stop once they no
    longer reduce the residual (reported, not converged) instead of running to max_iter."""
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=6)
    lam = float(torch.linalg.eigvalsh(exact_hessian(model, loss, x, y))[-1])
    y32 = y.float() if y.is_floating_point() else y
    eig = gn.hessian_eigenvalues(model.float(), loss, (x.float(), y32), tol=1e-12, max_hvps=1000)
    assert not eig.converged and eig.num_hvps < 200
    assert eig.residuals[0] < 1e-4 and eig.eigenvalues[0] == pytest.approx(lam, rel=1e-4)


def test_lanczos_from_an_exact_eigenvector_still_returns_k_pairs():
    """A start vector that is an eigenvector spans an invariant space of dimension 1; asked
    for k=2, Lanczos continues from a new orthogonal direction and returns both."""
    model = Quadratic(h=[-3.0, 1.0, 2.0, 0.5], c=[0.0] * 4, theta=[0.3, -0.2, 0.1, 0.4])
    x, y, loss = torch.zeros(2, 1), torch.zeros(2), quad_loss(model)
    v0 = torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # eigenvector of 2.0
    eig = gn.hessian_eigenvalues(model, loss, (x, y), k=2, which="LA", v0=v0, tol=1e-8)
    assert eig.eigenvalues == pytest.approx((2.0, 1.0), rel=1e-9) and eig.converged


@pytest.mark.parametrize("k, rest", [(2, 9.0), (3, 5.0)])
def test_lanczos_long_run_has_no_ghost_eigenvalues(k, rest):
    """A well-separated top eigenvalue converges first; the next ones, in a dense spectrum,
    take dozens more products in one long run (no restart), over which plain Lanczos loses
    orthogonality and returns copies of the converged value (measured: [10, 10] and
    [10, 10, 10]). The reorthogonalisation that starts once a Ritz pair has converged keeps
    the top k distinct and right."""
    from gradnoise.eigen import _lanczos_checked
    from gradnoise.hessian import hessian_operator

    h = torch.cat([torch.tensor([10.0], dtype=torch.float64), torch.linspace(0.0, rest, 300, dtype=torch.float64)])
    model = Quadratic(h=h, c=torch.zeros(301), theta=torch.zeros(301))
    x, y, loss = torch.zeros(2, 1), torch.zeros(2), quad_loss(model)
    op = hessian_operator(model, loss, (x, y))
    start = torch.ones(301, dtype=torch.float64)
    vals, vecs, res = _lanczos_checked(op, k, "LA", 1e-8, 1000, start, max_basis=400)
    np.testing.assert_allclose(vals, h.sort(descending=True).values[:k].numpy(), rtol=1e-8)
    assert max(res) <= 1e-8 and op.num_hvps > 50  # a long run
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(k, dtype=vecs.dtype), rtol=0, atol=1e-8)


def test_batched_products_equal_single_products_on_the_case_zoo(case):
    """``matmat`` (one batched backward per block, or column by column where a layer has no
    batched second derivative, as GroupNorm) equals ``matvec`` column by column, and the
    trace estimators built on it run on every case."""
    model, loss, x, y = case.make(torch.float64)
    model.eval()
    op = gn.hessian_operator(model, loss, (x, y), method="double-backward")
    V = torch.randn(op.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cols = torch.stack([op.matvec(v) for v in V.T], dim=1)
    torch.testing.assert_close(op.matmat(V), cols, rtol=1e-10, atol=1e-12 * float(cols.abs().max()))
    est = gn.hessian_trace(model, loss, (x, y), method="hutch++", num_hvps=6)
    assert math.isfinite(est.trace) and est.num_hvps == 6


def test_a_tolerance_below_the_dtype_is_never_reported_as_converged():
    """float32 products cannot certify a relative residual of 1e-6: warned, converged=False
    (also when warm-started from the eigenvector itself); at 1e-3 the bound holds against
    the float64 eigenvalue."""
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=16)
    exact = float(torch.linalg.eigvalsh(exact_hessian(model, loss, x, y))[-1])
    m32 = CASES_BY_NAME["mlp"].make(torch.float32, batch=16)[0]
    first = gn.hessian_eigenvalues(m32, loss, (x.float(), y), tol=1e-3)
    assert first.converged and abs(first.eigenvalues[0] - exact) <= 1e-3 * abs(exact)
    with pytest.warns(RuntimeWarning, match="below what torch.float32 products resolve"):
        warm = gn.hessian_eigenvalues(m32, loss, (x.float(), y), tol=1e-6, v0=first.eigenvectors[:, 0])
    assert not warm.converged
    for bad in (0.0, -1e-3, 2.0, float("nan")):
        with pytest.raises(ValueError, match="tol is a relative residual"):
            gn.hessian_eigenvalues(model, loss, (x, y), tol=bad)
