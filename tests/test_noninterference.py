"""After every public call the caller's model, .grad, buffers, modes and RNG are unchanged."""

import copy

import pytest
import torch
from torch import nn

import gradnoise as gn


class Model(nn.Module):
    """Dropout (consumes RNG), BatchNorm in eval (buffers; or none: the fast engine then runs
    the caller's module itself instead of functional_call), a frozen layer, existing .grad."""

    def __init__(self, batchnorm: bool = True):
        super().__init__()
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.lin = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.bn(torch.relu(self.lin(self.frozen(x))))
        return self.out(self.drop(h))


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
        {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        [m.training for m in model.modules()],
        torch.get_rng_state().clone(),
        [len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()],
    )


def _assert_same(a, b):
    for k in a[0]:
        assert torch.equal(a[0][k], b[0][k]), k
    for k in a[1]:
        assert (a[1][k] is None) == (b[1][k] is None) and (a[1][k] is None or torch.equal(a[1][k], b[1][k])), k
    assert a[2] == b[2] and torch.equal(a[3], b[3]) and a[4] == b[4]


CALLS = {
    "per_sample_grads": lambda m, l, x, y: gn.per_sample_grads(m, l, x, y),
    "per_sample_grads_chunked": lambda m, l, x, y: gn.per_sample_grads(m, l, x, y, chunk_size=3),
    "per_sample_grads_loop": lambda m, l, x, y: gn.per_sample_grads_loop(m, l, x, y),
    "gradient_stats_fast": lambda m, l, x, y: gn.gradient_stats(m, l, x, y, method="fast"),
    "gradient_stats_vmap": lambda m, l, x, y: gn.gradient_stats(m, l, x, y, method="vmap", chunk_size=4),
    "accumulator": lambda m, l, x, y: (a := gn.StatsAccumulator(m, l), a.update(x, y), a.compute()),
    "noise_scale": lambda m, l, x, y: gn.noise_scale(m, l, [(x[:5], y[:5]), (x[5:], y[5:])]),
    "two_batch": lambda m, l, x, y: gn.two_batch_stats(m, l, x, y, micro_batches=2),
    "noise_law": lambda m, l, x, y: gn.noise_law(m, l, (x, y), [2, 5], repeats=3),
}

# Curvature needs a deterministic loss: dropout off (eval) but everything else as above.
CURVATURE = {
    "hessian_eigenvalues_lanczos": lambda m, l, x, y: gn.hessian_eigenvalues(m, l, (x, y), k=2),
    "hessian_eigenvalues_power": lambda m, l, x, y: gn.hessian_eigenvalues(m, l, (x, y), method="power", max_hvps=20),
    "hessian_trace": lambda m, l, x, y: gn.hessian_trace(m, l, (x, y), method="hutch++", num_hvps=9),
    "epsilon_sharpness": lambda m, l, x, y: gn.epsilon_sharpness(m, l, (x, y), max_iter=2),
    "random_slice": lambda m, l, x, y: gn.random_slice(m, l, (x, y), steps=3),
    "b_noise": lambda m, l, x, y: gn.b_noise(m, l, (x, y), examples=4),
    "hvp_forward_over_reverse": lambda m, l, x, y: gn.hessian_operator(m, l, (x, y), method="forward-over-reverse").matvec(
        torch.ones(sum(p.numel() for p in m.parameters() if p.requires_grad))
    ),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_model_grad_buffers_modes_rng_untouched(call):
    torch.manual_seed(0)
    model = Model()
    model.train()
    model.bn.eval()  # BatchNorm must be in eval for per-example gradients
    model.bn.running_mean.uniform_()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    nn.CrossEntropyLoss()(model(x), y).backward()  # existing .grad to preserve
    before = _snapshot(model)
    call(model, nn.CrossEntropyLoss(), x, y)
    _assert_same(before, _snapshot(model))


def test_training_trajectory_is_bitwise_identical():
    """Measure between steps of a dropout model: parameters after 5 steps equal the plain run."""

    def run(measure):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
            opt.zero_grad()
            nn.CrossEntropyLoss()(model(x), y).backward()
            if measure:
                gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y)
                gn.per_sample_grads(model, nn.CrossEntropyLoss(), x, y)
            opt.step()
        return copy.deepcopy(model.state_dict())

    plain, measured = run(False), run(True)
    for k in plain:
        assert torch.equal(plain[k], measured[k]), k


@pytest.mark.parametrize("call", CURVATURE.values(), ids=CURVATURE.keys())
def test_curvature_calls_leave_model_untouched(call):
    torch.manual_seed(0)
    model = Model()
    model.eval()
    model.bn.running_mean.uniform_()
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    nn.CrossEntropyLoss()(model(x), y).backward()
    before = _snapshot(model)
    call(model, nn.CrossEntropyLoss(), x, y)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("method", ["fast", "auto"])
def test_direct_call_path_leaves_model_untouched(method):
    torch.manual_seed(0)
    model = Model(batchnorm=False).train()
    assert next(model.buffers(), None) is None
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    nn.CrossEntropyLoss()(model(x), y).backward()
    before = _snapshot(model)
    s = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method=method)
    _assert_same(before, _snapshot(model))
    assert s.trace_cov > 0
    assert all(p.grad_fn is None and p.is_leaf for p in model.parameters())


def test_parameter_hooks_are_not_triggered():
    """A user's gradient hook on a parameter must not see the measurement's backward pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    seen = []
    handle = model[0].weight.register_hook(lambda g: seen.append(g))
    x, y = torch.randn(10, 6), torch.randint(0, 3, (10,))
    fast = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast")
    ref = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="vmap")
    assert seen == [] and fast.trace_cov == pytest.approx(ref.trace_cov, rel=1e-5)
    handle.remove()
