"""The closed-form Hessian-vector product of Sequential chains against torch.func.hessian
in float64, the choice made by method="auto", and the refusals of method="closed-form"."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests.cases import CASES_BY_NAME
from tests.test_hessian import exact_hessian

ACTIVATIONS = {"relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.1), "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def chain(act, *, frozen=(), bias=True):
    """Flatten → Linear → act → (nested: Linear → Identity → act) → Dropout → Linear."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(6, 5, bias=bias), ACTIVATIONS[act](),
        nn.Sequential(nn.Linear(5, 4), nn.Identity(), ACTIVATIONS[act]()), nn.Dropout(0.3), nn.Linear(4, 3),
    ).double().eval()  # fmt: skip
    for name in frozen:
        model.get_parameter(name).requires_grad_(False)
    return model


def data(loss, n=7):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 2, 3, generator=g, dtype=torch.float64)
    if isinstance(loss, nn.CrossEntropyLoss):
        return x, torch.randint(0, 3, (n,), generator=g)
    return x, torch.randn(n, 3, generator=g, dtype=torch.float64)


def check_products(model, loss, x, y, batches):
    H = exact_hessian(model, loss, x, y)
    op = gn.hessian_operator(model, loss, batches)
    assert op.method == "closed-form"
    V = torch.randn(H.shape[0], 3, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-10, atol=1e-12)
    out = torch.full((H.shape[0],), float("nan"), dtype=torch.float64)  # overwritten, not added to
    assert op.matvec(V[:, 1], out=out) is out
    torch.testing.assert_close(out, H @ V[:, 1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.matmat(V), H @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", list(ACTIVATIONS))
@pytest.mark.parametrize(
    "loss", [nn.CrossEntropyLoss(), nn.CrossEntropyLoss(label_smoothing=0.1), nn.MSELoss()], ids=["ce", "ce-smooth", "mse"]
)
def test_closed_form_matches_exact_hessian(act, loss):
    model = chain(act)
    x, y = data(loss)
    check_products(model, loss, x, y, [(x[:3], y[:3]), (x[3:], y[3:])])  # weighted: the mean over 7


@pytest.mark.parametrize(
    "frozen", [("1.weight", "1.bias"), ("3.0.bias",), ("5.weight", "5.bias"), ("1.weight", "3.0.weight")], ids=str
)
def test_closed_form_with_frozen_layers(frozen):
    model = chain("tanh", frozen=frozen)
    loss = nn.CrossEntropyLoss()
    x, y = data(loss)
    check_products(model, loss, x, y, (x, y))


def test_closed_form_sequence_input_and_no_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Sigmoid(), nn.Linear(4, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 3, generator=g, dtype=torch.float64)  # [B, T, D]: Linear over rows
    y = torch.randn(5, 4, 2, generator=g, dtype=torch.float64)
    check_products(model, nn.MSELoss(), x, y, (x, y))


def test_closed_form_lanczos_matches_double_backward():
    model, loss, x, y = CASES_BY_NAME["mlp"].make(torch.float64, batch=8)
    a = gn.hessian_eigenvalues(model, loss, (x, y), k=2, tol=1e-10, hvp="closed-form")
    b = gn.hessian_eigenvalues(model, loss, (x, y), k=2, tol=1e-10, hvp="double-backward")
    assert a.eigenvalues == pytest.approx(b.eigenvalues, rel=1e-9)


class Scaled(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def tied():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    return model


@pytest.mark.parametrize(
    "make, loss, why",
    [
        (lambda: Scaled(nn.Linear(4, 3)), nn.CrossEntropyLoss(), "not an nn.Sequential"),
        (lambda: nn.Sequential(nn.Linear(4, 3), nn.GELU()), nn.CrossEntropyLoss(), "GELU"),
        (tied, nn.CrossEntropyLoss(), "tied"),  # 4 classes: y < 3 is still valid
        (lambda: nn.Sequential(nn.Linear(4, 3)), nn.CrossEntropyLoss(weight=torch.ones(3)), "no closed-form Hessian"),
        (lambda: nn.Sequential(nn.Linear(4, 3)), nn.L1Loss(), "no closed-form Hessian"),
    ],
    ids=["subclass", "gelu", "tied", "class-weights", "l1"],
)
def test_auto_falls_back_and_closed_form_says_why(make, loss, why):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,)) if isinstance(loss, nn.CrossEntropyLoss) else torch.randn(5, 3, dtype=torch.float64)
    op = gn.hessian_operator(model, loss, (x, y))
    assert op.method == "double-backward"
    with pytest.raises(ValueError, match=f"method='closed-form' cannot handle this model: .*{why}"):
        gn.hessian_operator(model, loss, (x, y), method="closed-form")


def test_batch_outside_the_closed_form_falls_back_on_first_product():
    model = chain("relu")
    loss = nn.CrossEntropyLoss(ignore_index=2)
    x, y = data(loss)
    y[0] = 2  # an ignored target: the mean is over the other rows
    H = exact_hessian(model, loss, x, y)
    op = gn.hessian_operator(model, loss, (x, y))
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.method == "double-backward"
    strict = gn.hessian_operator(model, loss, (x, y), method="closed-form")
    with pytest.raises(ValueError, match="cannot handle these batches or this model: targets contain ignore_index"):
        strict.matvec(v)


def test_user_hooks_force_autograd_monitor_hooks_do_not():
    model = chain("relu")
    loss = nn.CrossEntropyLoss()
    x, y = data(loss)
    handle = model[1].register_forward_hook(lambda m, a, out: out * 2)
    H = exact_hessian(model, loss, x, y)  # of the hooked model
    op = gn.hessian_operator(model, loss, (x, y))
    assert op.method == "double-backward"
    v = torch.randn(H.shape[0], dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    handle.remove()
    mon = gn.Monitor(model, loss, every=1)
    try:
        assert mon.mode == "hooks" and model[1]._forward_hooks
        assert gn.hessian_operator(model, loss, (x, y)).method == "closed-form"
    finally:
        mon.close()


@pytest.mark.parametrize("method", ["closed-form", "double-backward"])
def test_nan_loss_refused_on_both_paths(method):
    model = chain("relu")
    loss = nn.CrossEntropyLoss()
    x, y = data(loss)
    x[0, 0, 0] = float("nan")
    op = gn.hessian_operator(model, loss, (x, y), method=method)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        op.matvec(torch.ones(op.dim, dtype=torch.float64))


def test_mse_broadcast_target_falls_back():
    model = chain("tanh")
    loss = nn.MSELoss()
    x, _ = data(loss)
    y = torch.randn(7, 1, dtype=torch.float64)  # broadcast against [7, 3]: MSELoss warns, autograd handles it
    op = gn.hessian_operator(model, loss, (x, y))
    with pytest.warns(UserWarning, match="target size"):
        H = exact_hessian(model, loss, x, y)
        v = torch.randn(op.dim, dtype=torch.float64)
        torch.testing.assert_close(op.matvec(v), H @ v, rtol=1e-10, atol=1e-12)
    assert op.method == "double-backward"


def test_operator_built_directly():
    model = chain("sigmoid")
    loss = nn.MSELoss()
    x, y = data(loss)
    ref = gn.hessian_operator(model, loss, (x, y), method="double-backward")
    direct = gn.HessianOperator(model, loss, ref.batches, ref.params, ref.state, "closed-form")
    v = torch.randn(ref.dim, dtype=torch.float64)
    torch.testing.assert_close(direct.matvec(v), ref.matvec(v), rtol=1e-10, atol=1e-12)
    assert direct.method == "closed-form"
    gelu = nn.Sequential(nn.Linear(6, 3), nn.GELU()).double()
    ref = gn.hessian_operator(gelu, loss, (x.flatten(1), y), method="double-backward")
    direct = gn.HessianOperator(gelu, loss, ref.batches, ref.params, ref.state, "closed-form")
    with pytest.raises(ValueError, match="cannot handle these batches or this model: module '1' \\(GELU\\)"):
        direct.matvec(torch.ones(ref.dim, dtype=torch.float64))
