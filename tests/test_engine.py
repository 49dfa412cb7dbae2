"""The fast engine (hooks, one backward) against materialised per-example gradients."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

import gradnoise as gn
from gradnoise._factored import FactoredGrads
from gradnoise.engine import NotMeanLossError
from tests.cases import CASES_BY_NAME
from tests.reference import loop_stats

# Expected path of every parameter of some cases: the engine must say what it did.
EXPECTED_METHODS = {
    "mlp": {"fast"},
    "conv1d": {"fast"},
    "embedding": {"fast"},
    "groupnorm": {"fast"},
    "tied": {"fast", "fast-tied"},
    "reused-module": {"fast", "fast-tied"},
    "raw-parameter": {"fast", "vmap"},
    "mha": {"fast"},
    "mha-seq-first": {"fast"},
    "mha-masked": {"fast"},
    "mha-kdim": {"fast", "vmap-module"},
    "transformer": {"fast"},
}


def _compare(fast, ref, rtol):
    def close(a, b, scale=0.0):
        return abs(a - b) <= rtol * max(abs(a), abs(b), scale, 1e-30)

    # |G|² = |ḡ|² − s²/B cancels: its error is relative to the terms, not to the difference.
    def close_g2(a, b, _):
        return close(a.grad_norm_sq, b.grad_norm_sq, a.trace_cov / a.batch_size)

    assert fast.batch_size == ref.batch_size
    assert close(fast.loss, ref.loss)
    assert close(fast.trace_cov, ref.trace_cov)
    assert close_g2(fast, ref, fast)
    # GSNR_j = ḡ_j²/σ_j²: on the fast path σ_j² = (Σg² − Bḡ²)/(B−1) loses ~B·GSNR_j digits.
    max_gsnr = max(
        float((ref.mean[k].double().square() / ref.variance[k].double().clamp_min(1e-300)).max())
        for k in ref.mean
        if ref.variance[k].abs().max() > 0
    )
    # The unbiased signal ḡ² − s²/B cancels too: scale by the size of its terms, ≥ 1/B.
    scale = max(abs(ref.gsnr), 1 / fast.batch_size)
    assert abs(fast.gsnr - ref.gsnr) <= rtol * (1 + fast.batch_size * min(max_gsnr, 1e6)) * scale
    torch.testing.assert_close(fast.sq_norms, ref.sq_norms, rtol=rtol, atol=rtol * float(ref.sq_norms.max()))
    for k in ref.mean:
        scale = float(ref.variance[k].abs().max()) + 1e-30
        assert (fast.variance[k] - ref.variance[k]).abs().max() <= rtol * scale, k
        assert close(fast.per_param[k].trace_cov, ref.per_param[k].trace_cov), k
    assert fast.per_layer.keys() == ref.per_layer.keys()
    for k in ref.per_layer:
        assert close(fast.per_layer[k].trace_cov, ref.per_layer[k].trace_cov), k
        assert close(fast.per_layer[k].grad_norm_sq, ref.per_layer[k].grad_norm_sq, fast.per_layer[k].trace_cov / fast.batch_size), k


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fast_equals_vmap(case, dtype, rtol):
    model, loss, x, y = case.make(dtype, batch=8)
    fast = gn.gradient_stats(model, loss, x, y, method="fast")
    ref = gn.gradient_stats(model, loss, x, y, method="vmap")
    _compare(fast, ref, rtol if dtype == torch.float64 else 1e-4 if case.name in ("lstm", "gru") else rtol)
    if case.name in EXPECTED_METHODS:
        assert {s.method for s in fast.per_param.values()} == EXPECTED_METHODS[case.name]


@pytest.mark.parametrize("force", ["", "every-linear-gram", "no-moments"])
def test_fast_without_variance_equals_vmap(case, force, monkeypatch):
    """Without Σ_i g_i² the rules take other paths (Gram forms, the input Gram of
    convolutions, norms scaled once for all layers, Linear weights' means kept factored,
    convolutions' means from their own per-example gradients or, with ``no-moments``, from
    the backward pass): same statistics and the same mean gradient as vmap in float64."""
    from gradnoise import rules
    from gradnoise.engine import hooks, plan
    from gradnoise.rules import conv as conv_rules

    force_gram = force == "every-linear-gram"
    model, loss, x, y = case.make(torch.float64, batch=8)
    calls, moments = [], []
    real = conv_rules._input_gram
    monkeypatch.setattr(conv_rules, "_input_gram", lambda *args: (calls.append(1), real(*args))[1])
    real_moments = conv_rules.conv_moments
    for kind in (nn.Conv1d, nn.Conv2d):
        counted = lambda *args: (moments.append(1), real_moments(*args))[1]  # noqa: E731
        monkeypatch.setitem(rules.RULES, kind, dataclasses.replace(rules.RULES[kind], moments=counted))
    if force_gram:  # every Linear layer on 2-D input that may take the Gram path takes it
        monkeypatch.setattr(plan, "prefers_gram", lambda *args: True)
        monkeypatch.setattr(hooks, "prefers_gram", lambda *args: True)
    if force == "no-moments":
        monkeypatch.setattr(plan, "moments_ready", lambda *args: False)
    a = gn.gradient_stats(model, loss, x, y, method="fast", variance=False)
    if case.name.startswith("conv"):  # the "-gram" cases exist to take the input-Gram path
        # a first convolution (input needs no gradient) takes the moments path
        assert bool(moments) == (force != "no-moments")
        if force == "no-moments":
            assert bool(calls) == case.name.endswith("-gram")
    factored = {k for k in a.mean if isinstance(a.mean, FactoredGrads) and a.mean.is_factored(k)}
    if case.name == "mlp-wide-gram" and not force_gram:
        assert factored == {"2.weight", "4.weight"}
    if force_gram and case.name in ("mlp", "mlp-wide-gram", "frozen", "two-inputs"):
        assert factored and all(k.endswith("weight") for k in factored)
    b = gn.gradient_stats(model, loss, x, y, method="vmap")
    for k in b.mean:  # reading a factored mean multiplies it out
        torch.testing.assert_close(a.mean[k], b.mean[k], rtol=1e-10, atol=1e-12 * float(b.mean[k].abs().max()))
    assert not any(a.mean.is_factored(k) for k in factored)
    assert a.variance is None and a.gsnr is None
    assert a.trace_cov == pytest.approx(b.trace_cov, rel=1e-10)
    assert abs(a.grad_norm_sq - b.grad_norm_sq) <= 1e-10 * max(abs(b.grad_norm_sq), b.trace_cov / a.batch_size)
    torch.testing.assert_close(a.sq_norms, b.sq_norms, rtol=1e-10, atol=1e-10 * float(b.sq_norms.max()))
    for k in b.per_param:
        assert a.per_param[k].trace_cov == pytest.approx(b.per_param[k].trace_cov, rel=1e-10, abs=1e-300), k


def _hook_counts(model):
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for m in model.modules()
    ]


def test_hooks_removed_after_return_and_after_exception():
    model, loss, x, y = CASES_BY_NAME["transformer"].make(torch.float64)
    before = _hook_counts(model)
    gn.gradient_stats(model, loss, x, y, method="fast")
    assert _hook_counts(model) == before

    def bad_loss(out, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        gn.gradient_stats(model, bad_loss, x, y, method="fast")
    assert _hook_counts(model) == before


def test_weighted_loss_auto_falls_back_and_fast_refuses():
    model, _, x, y = CASES_BY_NAME["mlp"].make(torch.float64)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64))
    auto = gn.gradient_stats(model, weighted, x, y)
    ref = gn.gradient_stats(model, weighted, x, y, method="vmap")
    assert {s.method for s in auto.per_param.values()} == {"vmap"}
    assert auto.trace_cov == pytest.approx(ref.trace_cov, rel=1e-12)

    def custom_weighted(out, target):  # a plain callable: checked on the batch
        return weighted(out, target)

    with pytest.raises(NotMeanLossError, match="method='vmap'"):
        gn.gradient_stats(model, custom_weighted, x, y, method="fast")
    auto = gn.gradient_stats(model, custom_weighted, x, y)
    assert auto.trace_cov == pytest.approx(ref.trace_cov, rel=1e-12)


def test_custom_mean_loss_uses_fast():
    model, _, x, y = CASES_BY_NAME["mlp"].make(torch.float64)

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out, target)

    s = gn.gradient_stats(model, loss, x, y)
    assert {v.method for v in s.per_param.values()} == {"fast"}
    assert s.trace_cov == pytest.approx(gn.gradient_stats(model, loss, x, y, method="vmap").trace_cov, rel=1e-10)


@pytest.mark.parametrize("bias", [False, True])
def test_gram_path_through_an_inplace_op_on_the_output(bias):
    """ReLU(inplace=True) after a Gram-size layer: the gradient edge kept at the forward pass
    gives the layer's own output gradient (not the ReLU's), so the Gram path stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=bias), nn.ReLU(inplace=True), nn.Linear(32, 3)).double()
    x, y = torch.randn(8, 32, dtype=torch.float64), torch.randint(0, 3, (8,))
    a = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast", variance=False)
    b = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="vmap")
    assert isinstance(a.mean, FactoredGrads) and a.mean.is_factored("0.weight")
    assert a.trace_cov == pytest.approx(b.trace_cov, rel=1e-10)
    assert abs(a.grad_norm_sq - b.grad_norm_sq) <= 1e-10 * max(abs(b.grad_norm_sq), b.trace_cov / 8)
    for k in b.mean:
        torch.testing.assert_close(a.mean[k], b.mean[k], rtol=1e-10, atol=1e-14)


def test_loss_fn_modifying_outputs_in_place_is_exact_on_the_gram_path():
    """A loss that modifies the model's output in place: the last layer's hook and gradient
    edge see the gradient of its output before the modification, as its parameters do."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 32, (8,))

    class InplaceLoss(nn.CrossEntropyLoss):  # a known mean loss, so no per-example re-check
        def forward(self, out, target):
            return super().forward(out.mul_(2), target)

    fast = gn.gradient_stats(model, InplaceLoss(), x, y, method="fast", variance=False)
    assert isinstance(fast.mean, FactoredGrads) and fast.mean.is_factored("2.weight")
    ref = loop_stats(model, InplaceLoss(), x, y)
    for name, (trace, g2) in ref.items():
        assert fast.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
        assert fast.per_param[name].grad_norm_sq == pytest.approx(g2, rel=1e-9, abs=1e-12), name


def test_plan_follows_changes_to_the_model_and_does_not_keep_it_alive():
    """The engine caches what it knows about a model's structure; every change that matters
    (a parameter frozen or swapped, a module replaced, a buffer added) is seen on the next
    call, and the cache never keeps a model alive."""
    import gc
    import weakref

    def fresh(model, x, y):  # the same measurement without any cached plan
        from gradnoise.engine import plan

        plan._PLANS.clear()
        return gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast")

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    loss = nn.CrossEntropyLoss()

    def check(model):
        got = gn.gradient_stats(model, loss, x, y, method="fast")
        ref = fresh(model, x, y)
        assert list(got.mean) == list(ref.mean)
        assert got.trace_cov == pytest.approx(ref.trace_cov, rel=1e-12)
        return got

    check(model)
    model[0].weight.requires_grad_(False)
    assert "0.weight" not in check(model).mean
    model[0].weight.requires_grad_(True)
    model[2].weight = nn.Parameter(torch.randn(3, 7, dtype=torch.float64))
    check(model)
    model[2] = nn.Linear(7, 3, bias=False).double()
    assert "2.bias" not in check(model).mean
    model[1].register_buffer("unused", torch.zeros(1))  # a buffer: the engine must not run the model directly
    check(model)
    with pytest.raises(ValueError, match="no trainable parameters"):
        gn.gradient_stats(model.requires_grad_(False), loss, x, y, method="fast")

    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.parametrize("ignore", [-100, 2])
def test_ignored_targets_are_not_a_plain_mean(ignore):
    """Cross-entropy averages over the non-ignored targets only: with an ignored target in
    the batch it is not a mean of per-example losses (auto takes vmap), without one it is."""
    from gradnoise._functional import is_known_mean_loss

    loss = nn.CrossEntropyLoss(ignore_index=ignore)
    assert is_known_mean_loss(loss, torch.tensor([0, 1, 1, 0]))
    with_ignored = torch.tensor([0, ignore, 1, 0])
    assert not is_known_mean_loss(loss, with_ignored)
    model, _, x, y = CASES_BY_NAME["mlp"].make(torch.float64)
    y = y.clone()
    y[1] = ignore
    auto = gn.gradient_stats(model, loss, x, y)
    assert {s.method for s in auto.per_param.values()} == {"vmap"}
    with pytest.raises(NotMeanLossError):
        gn.gradient_stats(model, loss, x, y, method="fast")


class _Scaled(nn.Module):
    """Raw parameters without a rule: a unit for vmap."""

    def __init__(self):
        super().__init__()
        self.w, self.v = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4, 3))

    def forward(self, x):
        return torch.tanh(x * self.w) @ self.v


class _Flipped(nn.Module):
    """One layer applied to the batch and to the batch reversed: row i of its second call is
    example B-1-i, so its rows are not each one example's."""

    def __init__(self, head=None):
        super().__init__()
        self.head = head or nn.Linear(4, 3)

    def forward(self, x):
        return self.head(x) + self.head(x.flip(0)).flip(0)


@pytest.mark.parametrize("head", [None, _Scaled], ids=["rule", "unit"])
def test_a_batch_permuted_inside_the_model_is_detected_not_measured_wrong(head, caplog):
    """A model whose layers see the batch permuted: the per-row rule, or a unit's vmap summed
    over its calls, would give each example another's gradient (the sum still right, so no
    check would notice; the unit's tr Σ was 0.41 for 1.44). The trace changes
    one example and sees other rows change: method='fast' refuses, auto takes vmap (each
    example alone, equal to the float64 loop), and the Monitor measures in its separate pass."""
    import logging

    torch.manual_seed(0)
    model, loss = _Flipped(head and head()).double(), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    with pytest.raises(NotMeanLossError, match="permuted inside the model.*'head'"):
        gn.gradient_stats(model, loss, x, y, method="fast")
    auto = gn.gradient_stats(model, loss, x, y)
    assert {s.method for s in auto.per_param.values()} == {"vmap"}
    for name, (trace, _) in loop_stats(model, loss, x, y).items():
        assert auto.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
    mon = gn.Monitor(model, loss, strict=True)
    assert mon.mode == ("hooks" if head is None else "separate")  # hooks measure rule layers only
    loss(model(x), y).backward()
    with caplog.at_level(logging.INFO, logger="gradnoise.monitor"):
        rec = mon.step(x, y)
    assert mon.mode == "separate" and rec["trace_cov"] == pytest.approx(auto.trace_cov, rel=1e-10)
    mon.close()


class _Centred(nn.Module):
    """Outputs centred over the batch: every example's output depends on every example."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        out = self.body(x)
        return out - out.mean(0, keepdim=True)


class _InBatchAttention(nn.Module):
    """Each example attends to the others (in-batch attention, as in-batch negatives)."""

    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.proj(x)
        return self.head(h + torch.softmax(h @ h.T, 1) @ h)


@pytest.mark.parametrize("make", [_Centred, _InBatchAttention])
def test_a_forward_pass_that_mixes_examples_is_refused_by_every_path(make, caplog):
    """Mixing examples makes each example's output depend on the others: the per-layer rules
    gave a mixture of examples' gradients (tr Σ 1.53 for 0.58 on the centred model) and vmap
    each example alone through a model that no longer mixes (zero for the centred one), both
    without an error. Every path refuses it; the Monitor logs why and records nothing, and
    training is untouched."""
    import logging

    torch.manual_seed(0)
    model, loss = make().double(), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for method in ("auto", "fast", "vmap"):
        with pytest.raises(ValueError, match="mixes the examples of the batch"):
            gn.gradient_stats(model, loss, x, y, method=method)
    with pytest.raises(ValueError, match="mixes the examples"):
        gn.per_sample_grads(model, loss, x, y)
    twin = copy.deepcopy(model)
    mon = gn.Monitor(model, loss)
    for m in (model, twin):
        loss(m(x), y).backward()
    with caplog.at_level(logging.WARNING, logger="gradnoise.monitor"):
        assert mon.step(x, y) is None
    assert mon.errors == 1 and "mixes the examples" in caplog.text
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
    mon.close()


class _OwnGenerator(nn.Module):
    """A mask shared by the batch, drawn from a generator of the model's own (which no
    rewinding of torch's global RNG repeats)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.g = nn.Linear(4, 6), nn.Linear(6, 3), torch.Generator().manual_seed(0)

    def forward(self, x):
        h = self.a(x)
        return self.b(h * (torch.rand(h.shape[1:], generator=self.g, dtype=h.dtype) > 0.5))


def test_a_forward_pass_that_does_not_repeat_is_not_taken_for_mixing():
    """Changing example 0 moves every example's output here because the mask is drawn
    again, not because examples mix: the same inputs run again move them too, so the
    checks cannot tell, and the model keeps the fast path."""
    torch.manual_seed(0)
    model, loss = _OwnGenerator().double(), nn.CrossEntropyLoss()
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    for method in ("auto", "fast"):
        stats = gn.gradient_stats(model, loss, x, y, method=method)
        assert {s.method for s in stats.per_param.values()} == {"fast"}
    assert set(gn.per_sample_grads(model, loss, x, y)) == {"a.weight", "a.bias", "b.weight", "b.bias"}


def test_outputs_with_the_batch_second_are_not_taken_for_mixed():
    """A sequence-first output ``[T, B, C]`` with ``T == B``: changing example 0 changes
    column 0 of every row, which is one example's, not a mixture."""
    from gradnoise._coupling import mixes_examples

    out = torch.randn(6, 6, 3)
    moved = out.clone()
    moved[:, 0] += 1.0
    assert not mixes_examples(out, moved, 6)
    moved[1:, 1:] += 1.0  # and now other examples' entries too
    assert mixes_examples(out, moved, 6)


def test_masked_outputs_do_not_hide_mixing():
    """Logits masked to -inf (infinite in both passes) are unchanged entries, not a reason
    to skip the check: the finite entries still show a mixture."""
    from gradnoise._coupling import mixes_examples

    out = torch.randn(4, 5)
    out[:, -1] = float("-inf")
    moved = out.clone()
    moved[0, :-1] += 1.0
    assert not mixes_examples(out, moved, 4)
    moved[1:, :-1] += 0.5
    assert mixes_examples(out, moved, 4)


class _TiedByHand(nn.Module):
    """An output embedding tied by hand (``h @ wte.weight.T``), and a weight used again in
    the parent's forward: both get gradient outside their layers' calls. Reading a weight's
    dtype is no such use."""

    def __init__(self):
        super().__init__()
        self.wte, self.fc = nn.Embedding(11, 6), nn.Linear(6, 6)

    def forward(self, idx):
        h = torch.tanh(self.fc(self.wte(idx).to(self.fc.weight.dtype)))
        h = h + nn.functional.linear(h, self.fc.weight)
        return h @ self.wte.weight.T


def test_a_weight_used_outside_its_layer_is_measured_whole():
    """The rules see only the gradient through a layer's own call: wte.weight's tr Σ was 0.18
    for 0.60, reported as fast. The trace names such parameters: they take vmap (equal to
    the float64 loop), the others keep their rules, and the Monitor leaves its hooks."""
    torch.manual_seed(0)
    model, loss = _TiedByHand().double(), gn.tasks.TokenLoss()
    x, y = torch.randint(0, 11, (6, 5)), torch.randint(0, 11, (6, 5))
    ref = loop_stats(model, loss, x, y)
    for method in ("auto", "fast"):
        got = gn.gradient_stats(model, loss, x, y, method=method)
        assert {n: s.method for n, s in got.per_param.items()} == {
            "wte.weight": "vmap", "fc.weight": "vmap", "fc.bias": "fast"}  # fmt: skip
        for name, (trace, norm) in ref.items():
            assert got.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
            assert got.per_param[name].grad_norm_sq == pytest.approx(norm, rel=1e-9, abs=1e-12), name
    mon = gn.Monitor(model, loss, strict=True)
    loss(model(x), y).backward()
    rec = mon.step(x, y)
    assert mon.mode == "separate" and rec["trace_cov"] == pytest.approx(sum(t for t, _ in ref.values()), rel=1e-10)
    mon.close()


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool):
        super().__init__()
        self.inp, self.head, self.reentrant = nn.Linear(4, 4), nn.Linear(6, 3), reentrant
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh())

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return self.head(checkpoint(self.body, self.inp(x), use_reentrant=self.reentrant))


def test_activation_checkpointing_is_measured_or_refused_with_what_to_do():
    """Non-reentrant checkpointing is measured (equal to the float64 loop); the reentrant
    variant, which torch cannot differentiate with autograd.grad nor under vmap, gets an
    error saying how to switch (not torch's internal one) on every path."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    model, loss = _Checkpointed(reentrant=False).double(), nn.CrossEntropyLoss()
    got = gn.gradient_stats(model, loss, x, y, method="fast")
    for name, (trace, _) in loop_stats(model, loss, x, y).items():
        assert got.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
    model.reentrant = True
    for measure in (lambda: gn.gradient_stats(model, loss, x, y), lambda: gn.gradient_stats(model, loss, x, y, method="vmap"),
                    lambda: gn.per_sample_grads(model, loss, x, y)):  # fmt: skip
        with pytest.raises(ValueError, match="use_reentrant=False"):
            measure()


def test_token_loss_is_a_known_mean_and_not_checked_on_each_call(monkeypatch):
    """gradnoise.tasks.TokenLoss (cross-entropy over every position) is a mean of per-example
    losses: the engine takes it as known, as nn.CrossEntropyLoss, without evaluating it again
    per example; with a target equal to its ignore_index it is not, and is checked."""
    from gradnoise._functional import is_known_mean_loss
    from gradnoise.engine import fast

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7)).double()
    x, y = torch.randint(0, 7, (6, 5)), torch.randint(0, 7, (6, 5))
    loss = gn.tasks.TokenLoss()
    assert is_known_mean_loss(loss, y)
    padded = y.clone()
    padded[0, :3] = -100  # example 0 keeps 2 positions, the others 5: not a mean of per-example means
    assert not is_known_mean_loss(loss, padded)

    def no_check(*args):
        raise AssertionError("a known mean loss was checked per example")

    with monkeypatch.context() as m:
        m.setattr(fast, "check_mean_loss", no_check)
        stats = gn.gradient_stats(model, loss, x, y, method="fast")
    for name, (trace, g2) in loop_stats(model, loss, x, y).items():
        assert stats.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
        assert stats.per_param[name].grad_norm_sq == pytest.approx(g2, rel=1e-9, abs=1e-12), name
    with pytest.raises(NotMeanLossError):
        gn.gradient_stats(model, loss, x, padded, method="fast")


@pytest.mark.parametrize("name", ["conv1d", "conv1d-single-channel", "conv1d-gram", "conv2d", "conv2d-gram"])
def test_conv_norms_path_equals_vmap(name, monkeypatch):
    """Convolutions on the norms path, with the backward's weight gradient (a layer called
    more than once, or not on the moments path): forced here, with and without Σ_i g_i²."""
    from gradnoise.engine import plan

    monkeypatch.setattr(plan, "moments_ready", lambda *args: False)
    model, loss, x, y = CASES_BY_NAME[name].make(torch.float64, batch=8)
    ref = gn.gradient_stats(model, loss, x, y, method="vmap")
    _compare(gn.gradient_stats(model, loss, x, y, method="fast"), ref, 1e-10)
    nv = gn.gradient_stats(model, loss, x, y, method="fast", variance=False)
    assert nv.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)
    for k in ref.mean:
        torch.testing.assert_close(nv.mean[k], ref.mean[k], rtol=1e-10, atol=1e-12 * float(ref.mean[k].abs().max()))


def test_conv_followed_by_inplace_relu_is_exact():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 5, 3)).double()
    x, y = torch.randn(6, 2, 7, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    fast = gn.gradient_stats(model, loss, x, y, method="fast")
    _compare(fast, gn.gradient_stats(model, loss, x, y, method="vmap"), 1e-10)


@pytest.mark.parametrize("variance", [False, True])
def test_conv_moments_path_with_an_unused_branch(variance):
    """A convolution on the moments path whose output never reaches the loss has zero
    gradients (its output's gradient edge is unused), like vmap says."""

    class TwoBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv1d(1, 3, 3), nn.Conv1d(1, 2, 3)
            self.head = nn.Linear(3 * 6, 3)

        def forward(self, x):
            self.unused(x)  # computed, not used
            return self.head(self.used(x).tanh().flatten(1))

    model = TwoBranches().double()
    x, y = torch.randn(5, 1, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    loss = nn.CrossEntropyLoss()
    fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    ref = gn.gradient_stats(model, loss, x, y, method="vmap", variance=variance)
    assert fast.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)
    for k in ref.mean:
        torch.testing.assert_close(fast.mean[k], ref.mean[k], rtol=1e-10, atol=1e-14)
    assert not fast.mean["unused.weight"].any() and fast.per_param["unused.weight"].trace_cov == 0


def test_only_the_lowest_skipped_layers_are_requested(monkeypatch):
    """With Σ_i g_i² every convolution of the MNIST-1D CNN skips its parameters; only the
    first one's output is requested from autograd.grad (the others lie above it, so the
    engine runs their hooks anyway, and their output gradients are not held to the end)."""
    from gradnoise.engine import fast as engine_fast
    from gradnoise.tasks import mnist1d_cnn

    seen = []
    real = engine_fast.hook_edges
    monkeypatch.setattr(engine_fast, "hook_edges", lambda *a: (seen.append(real(*a)), seen[-1])[1])
    torch.manual_seed(0)
    model = mnist1d_cnn(channels=4).double()
    x, y = torch.randn(6, 40, dtype=torch.float64), torch.randint(0, 10, (6,))
    loss = nn.CrossEntropyLoss()
    fast = gn.gradient_stats(model, loss, x, y, method="fast")
    assert len(seen[-1]) == 1
    assert {fast.per_param[k].method for k in fast.per_param} == {"fast"}
    _compare(fast, gn.gradient_stats(model, loss, x, y, method="vmap"), 1e-10)


def test_inputs_that_require_grad_with_skipped_layers():
    """Inputs that require grad: the first convolution's input needs a gradient, so its
    output is requested because nothing requested lies below it."""
    from gradnoise.tasks import mnist1d_cnn

    torch.manual_seed(0)
    model = mnist1d_cnn(channels=4).double()
    x = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (6,))
    loss = nn.CrossEntropyLoss()
    for variance in (False, True):
        fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
        ref = gn.gradient_stats(model, loss, x.detach(), y, method="vmap", variance=variance)
        assert fast.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)
        for k in ref.mean:
            torch.testing.assert_close(fast.mean[k], ref.mean[k], rtol=1e-10, atol=1e-14)
    assert x.grad is None


@pytest.mark.parametrize("frozen", ["1.weight", "1.bias", "3.weight"])
@pytest.mark.parametrize("variance", [False, True])
def test_conv_paths_with_a_frozen_parameter(frozen, variance):
    """A frozen weight or bias of a convolution on the moments path (the first) or the
    norms path (a middle one): the trainable rest equals vmap."""
    from gradnoise.tasks import mnist1d_cnn

    torch.manual_seed(0)
    model = mnist1d_cnn(channels=4).double()
    model.get_parameter(frozen).requires_grad_(False)
    x, y = torch.randn(6, 40, dtype=torch.float64), torch.randint(0, 10, (6,))
    loss = nn.CrossEntropyLoss()
    fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    ref = gn.gradient_stats(model, loss, x, y, method="vmap", variance=variance)
    assert frozen not in fast.mean and fast.mean.keys() == ref.mean.keys()
    assert fast.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)
    for k in ref.mean:
        torch.testing.assert_close(fast.mean[k], ref.mean[k], rtol=1e-10, atol=1e-14)




@pytest.mark.parametrize("name", ["conv2d", "conv2d-gram", "resnet-block", "conv1d-gram"])
def test_without_variance_convolutions_formed_by_products_take_the_moments_path(name):
    """Without Σ_i g_i² a convolution whose norms would form the per-example products takes
    the moments path (those products also give the mean: the backward skips the weight
    gradient); one whose norms take a Gram form keeps the backward's weight gradient. Both
    equal vmap in float64."""
    from gradnoise.engine.plan import plan_for
    from gradnoise.rules.conv import conv_prefers_moments

    model, loss, x, y = CASES_BY_NAME[name].make(torch.float64, batch=8)
    prefers = {}
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: prefers.__setitem__(n, conv_prefers_moments(mod, a[0].shape, o.shape)))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]  # fmt: skip
    model(x)
    for h in handles:
        h.remove()
    fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=False)
    (route,) = plan_for(model).routes.values()
    first = next(iter(prefers))  # its input needs no gradient: the moments path in any case
    assert {m for m in set(route.owned.values()) if m in prefers} == {n for n, p in prefers.items() if p or n == first}
    ref = gn.gradient_stats(model, loss, x, y, method="vmap", variance=False)
    assert fast.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)
    assert fast.grad_norm_sq == pytest.approx(ref.grad_norm_sq, rel=1e-10, abs=1e-12)
    for k in ref.mean:
        torch.testing.assert_close(fast.mean[k], ref.mean[k], rtol=1e-10, atol=1e-12 * float(ref.mean[k].abs().max()))
