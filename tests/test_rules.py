"""Each layer rule against a float64 reference: per-example gradients of ``⟨layer(x_i),
δ_i⟩`` by a Python loop of ``torch.autograd.grad``, one example at a time."""

import pytest
import torch
from torch import nn

from gradnoise.rules import RULES, rule_for
from gradnoise.rules.registry import always


def _eval_bn(bn: nn.Module) -> nn.Module:
    """BatchNorm in eval mode with non-trivial running statistics and affine parameters."""
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def _layers():
    """One configuration per registered family (several for the ones with paths)."""
    torch.manual_seed(0)
    cases = [
        ("linear-2d", nn.Linear(6, 5), lambda: torch.randn(7, 6)),
        ("linear-seq", nn.Linear(6, 5), lambda: torch.randn(7, 4, 6)),
        ("linear-seq-gram", nn.Linear(40, 30), lambda: torch.randn(7, 3, 40)),  # moments: Gram norms, mean by one product
        ("conv1d", nn.Conv1d(3, 4, 3, stride=2, padding=1), lambda: torch.randn(7, 3, 11)),
        ("conv1d-one-channel", nn.Conv1d(1, 4, 5, padding=2), lambda: torch.randn(7, 1, 13)),
        ("conv2d-groups", nn.Conv2d(4, 6, 3, groups=2, padding=1), lambda: torch.randn(7, 4, 5, 5)),
        ("conv2d-gram", nn.Conv2d(16, 32, 3, padding=1), lambda: torch.randn(7, 16, 3, 3)),
        ("embedding", nn.Embedding(9, 4, padding_idx=0), lambda: torch.randint(0, 9, (7, 5))),
        ("layernorm", nn.LayerNorm(6), lambda: torch.randn(7, 3, 6)),
        ("groupnorm", nn.GroupNorm(2, 4), lambda: torch.randn(7, 4, 5)),
        ("mha", nn.MultiheadAttention(8, 2, batch_first=True), lambda: torch.randn(7, 5, 8)),
        ("batchnorm1d-eval", _eval_bn(nn.BatchNorm1d(5)), lambda: torch.randn(7, 5)),
        ("batchnorm2d-eval", _eval_bn(nn.BatchNorm2d(3)), lambda: torch.randn(7, 3, 4, 5)),
        ("batchnorm3d-eval", _eval_bn(nn.BatchNorm3d(2)), lambda: torch.randn(7, 2, 3, 2, 3)),
    ]
    if hasattr(nn, "RMSNorm"):
        cases.append(("rmsnorm", nn.RMSNorm(6), lambda: torch.randn(7, 3, 6)))
    try:  # registered by name: tested where the optional package is installed
        from transformers.pytorch_utils import Conv1D

        cases.append(("hf-conv1d-2d", Conv1D(5, 6), lambda: torch.randn(7, 6)))
        cases.append(("hf-conv1d-seq", Conv1D(5, 6), lambda: torch.randn(7, 4, 6)))
    except ImportError:
        pass
    return cases


LAYERS = _layers()


def _call(module, x):
    if isinstance(module, nn.MultiheadAttention):
        return module(x, x, x, need_weights=False)[0]
    return module(x)


def _reference(module, x, d):
    """Per-example gradients of ⟨module(x_i), d_i⟩, one example at a time."""
    params = dict(module.named_parameters())
    rows = {n: [] for n in params}
    for i in range(x.shape[0]):
        out = _call(module, x[i : i + 1])
        grads = torch.autograd.grad((out * d[i : i + 1]).sum(), list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def test_every_registered_family_is_covered():
    assert {type(m) for _, m, _ in LAYERS} >= set(RULES)


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("name, module, make", LAYERS, ids=[c[0] for c in LAYERS])
def test_rule_equals_a_loop_of_autograd(name, module, make, elementwise):
    """``norms`` (|g_i|², Σ_i g_i²) and ``grads`` of the rule equal the loop reference."""
    module = module.double()
    x = make()
    x = x.double() if x.is_floating_point() else x
    rule = rule_for(module)
    assert rule is not None, name
    with torch.no_grad():
        d = torch.randn_like(_call(module, x))
    ref = _reference(module, x, d)
    a = ((x, x, x), {"need_weights": False}) if rule.whole_call else x  # what the engine passes
    scale = 3.0  # the rules take δ = scale · d
    norms = rule.norms(module, a, d, elementwise, scale)
    grads = rule.grads(module, a, d)
    assert norms.keys() == ref.keys() == grads.keys()
    for k, g in ref.items():
        sq = (scale * g).flatten(1).square().sum(1)
        torch.testing.assert_close(norms[k][0], sq, rtol=1e-10, atol=1e-12 * float(sq.max()))
        if elementwise:
            torch.testing.assert_close(norms[k][1], (scale * g).square().sum(0), rtol=1e-10, atol=1e-12 * float(sq.max()))
        else:
            assert norms[k][1] is None
        torch.testing.assert_close(grads[k], g, rtol=1e-10, atol=1e-12)
    if rule.moments is not None:  # norms and the mean gradient Σ_i g_i (of d)
        m_norms, means = rule.moments(module, a, d, elementwise, scale)
        for k, g in ref.items():
            torch.testing.assert_close(m_norms[k][0], norms[k][0], rtol=1e-10, atol=0)
            if elementwise:
                torch.testing.assert_close(m_norms[k][1], norms[k][1], rtol=1e-10, atol=1e-12 * float(norms[k][0].max()))
            torch.testing.assert_close(means[k], g.sum(0), rtol=1e-10, atol=1e-12)


def test_rule_refuses_configurations_it_cannot_handle():
    """``rule_for`` returns None where a rule would be wrong: the engine then falls back."""
    assert rule_for(nn.Conv1d(2, 2, 3, padding=1, padding_mode="circular")) is None
    assert rule_for(nn.Embedding(5, 2, max_norm=1.0)) is None
    assert rule_for(nn.MultiheadAttention(4, 2, kdim=3, vdim=3)) is None
    assert rule_for(nn.Identity()) is None

    class MyLinear(nn.Linear):  # a subclass may change forward: exact types only
        pass

    assert rule_for(MyLinear(2, 2)) is None
    assert always(nn.Linear(2, 2))


@pytest.mark.parametrize(
    "conv, shape",
    [
        (nn.Conv1d(4, 6, 3, stride=2, padding=1), (5, 4, 19)),
        (nn.Conv1d(4, 6, 3, dilation=2, padding="same"), (5, 4, 11)),
        (nn.Conv1d(6, 6, 5, stride=3, groups=3, padding="valid"), (5, 6, 20)),
        (nn.Conv2d(2, 4, 3, stride=(1, 2), padding=1), (5, 2, 6, 7)),
        (nn.Conv2d(4, 4, (2, 3), dilation=(2, 1), groups=2, padding=(1, 0)), (5, 4, 7, 6)),
        # shapes where the rule itself takes the input-Gram path (few output positions)
        (nn.Conv1d(25, 25, 3, stride=2, padding=1), (5, 25, 10)),
        (nn.Conv2d(16, 32, 3, padding=1), (5, 16, 3, 3)),
        (nn.Conv2d(32, 64, 3, padding=1, groups=2), (5, 32, 3, 3)),
    ],
)
@pytest.mark.parametrize("chunked", [False, True])
def test_input_gram_equals_patch_gram(conv, shape, chunked, monkeypatch):
    """P_i P_iᵀ from the input's own Gram equals the Gram of the patch matrices (float64),
    for strides, dilations, groups and every padding mode; and the rule's norms with it
    (weight, and the bias's from D_iᵀD_i) equal those of materialised per-example
    gradients, also when the rule works in chunks of two examples."""
    from gradnoise.rules import _common
    from gradnoise.rules.conv import _conv_norms, _geometry, _input_gram, _patch_columns

    if chunked:
        monkeypatch.setattr(_common, "budget", lambda a, d: 1)  # then chunks of 1 example
    conv = conv.double()
    a = torch.randn(*shape, dtype=torch.float64)
    d = torch.randn_like(conv(a))
    geo = _geometry(conv, a.shape, d.shape)
    pm = _patch_columns(conv, a, geo).transpose(1, 2)  # patch matrices [B·G, T, I]
    torch.testing.assert_close(_input_gram(a, geo), pm @ pm.transpose(-1, -2), rtol=1e-12, atol=1e-12)
    G, Og = conv.groups, d.shape[1] // conv.groups
    g = d.reshape(shape[0] * G, Og, -1) @ pm  # per-example weight gradients [B·G, O/G, I]
    norms = _conv_norms(conv, a, d, False)
    torch.testing.assert_close(norms["weight"][0], g.reshape(shape[0], -1).square().sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(norms["bias"][0], d.flatten(2).sum(2).square().sum(1), rtol=1e-10, atol=0)


@pytest.mark.parametrize("out_features", [3, 40])  # products vs Gram form without Σ_i g_i²
@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_sequence_linear_norms_in_chunks(out_features, elementwise, chunked, monkeypatch):
    """The Linear rule on sequences ``[B, T, I]`` gives the norms (and ``Σ_i g_i²``) of the
    materialised per-example gradients ``Σ_t δ_t a_tᵀ`` (float64), whole or in chunks of
    one example."""
    from gradnoise.rules import _common, linear

    if chunked:
        monkeypatch.setattr(_common, "budget", lambda a, d: 1)
    torch.manual_seed(0)
    a = torch.randn(7, 5, 6, dtype=torch.float64)
    d = torch.randn(7, 5, out_features, dtype=torch.float64)
    g = torch.einsum("bto,bti->boi", d, a)
    norms = linear.dense_norms(a, d, True, elementwise)
    torch.testing.assert_close(norms["weight"][0], g.flatten(1).square().sum(1), rtol=1e-12, atol=0)
    torch.testing.assert_close(norms["bias"][0], d.sum(1).square().sum(1), rtol=1e-12, atol=0)
    if elementwise:
        torch.testing.assert_close(norms["weight"][1], g.square().sum(0), rtol=1e-12, atol=0)
    else:
        assert norms["weight"][1] is None


@pytest.mark.parametrize("chunked", [False, True])
def test_norms_of_maps_sharing_an_output_gradient(chunked, monkeypatch):
    """An LSTM's input and recurrent weights act on the same gates: their norms from one
    ``D Dᵀ`` (the Gram form, for the wide input) or the products (the narrow one), and one
    bias norm, equal the materialised per-example gradients (float64)."""
    from gradnoise.rules import _common, linear

    if chunked:
        monkeypatch.setattr(_common, "budget", lambda a, d: 1)
    torch.manual_seed(0)
    d = torch.randn(7, 3, 64, dtype=torch.float64)
    wide, narrow = torch.randn(7, 3, 16, dtype=torch.float64), torch.randn(7, 3, 2, dtype=torch.float64)
    found = linear.shared_output_norms([wide, narrow, wide.flip(1)], d, True, scale=3.0)
    for a, norms in zip([wide, narrow, wide.flip(1)], found, strict=True):
        g = torch.einsum("bto,bti->boi", d, a)
        torch.testing.assert_close(norms["weight"][0], 9 * g.flatten(1).square().sum(1), rtol=1e-12, atol=0)
        torch.testing.assert_close(norms["bias"][0], 9 * d.sum(1).square().sum(1), rtol=1e-12, atol=0)
        assert norms["weight"][1] is None and norms["bias"][1] is None
    assert found[0]["bias"][0] is not found[1]["bias"][0]  # callers scale them in place


@pytest.mark.parametrize("elementwise", [False, True])
@pytest.mark.parametrize("name, module, make", LAYERS, ids=[c[0] for c in LAYERS])
def test_weighted_norms_equal_a_loop_of_autograd(name, module, make, elementwise):
    """Norms in a diagonal metric P (the rule's own ``weighted`` or weighted per-example
    gradients): ``Σ P ⊙ g_i²`` and ``Σ_i P ⊙ g_i²`` equal the loop reference."""
    from gradnoise.rules import weighted_norms

    module = module.double()
    x = make()
    x = x.double() if x.is_floating_point() else x
    rule = rule_for(module)
    with torch.no_grad():
        d = torch.randn_like(_call(module, x))
    ref = _reference(module, x, d)
    g = torch.Generator().manual_seed(2)
    weights = {k: torch.rand(v.shape[1:], generator=g, dtype=torch.float64) + 0.1 for k, v in ref.items()}
    a = ((x, x, x), {"need_weights": False}) if rule.whole_call else x
    scale = 3.0
    norms = weighted_norms(rule, module, a, d, weights, elementwise, scale)
    assert norms.keys() == ref.keys()
    for k, gk in ref.items():
        g2 = (scale * gk).square()
        sq = (g2 * weights[k]).flatten(1).sum(1)
        torch.testing.assert_close(norms[k][0], sq, rtol=1e-10, atol=1e-12 * float(sq.max()))
        if elementwise:
            torch.testing.assert_close(norms[k][1], g2.sum(0) * weights[k], rtol=1e-10, atol=1e-12 * float(sq.max()))
