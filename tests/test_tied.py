"""A weight tied between an nn.Embedding and an nn.Linear head: per-example norms from the
two rules and their cross term (rules.tied), without B × V × d per-example gradients —
the float64 loop's numbers, in either order of the two layers in the backward pass."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from gradnoise.engine.plan import plan_for
from tests.reference import loop_stats


class TiedSequenceLM(nn.Module):
    """Predicts a class from every position's logits (the head on [B, T, d])."""

    def __init__(self, vocab=11, dim=5, padding_idx=None):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.mix = nn.Linear(dim, dim)

    def forward(self, idx):
        return self.head(torch.tanh(self.mix(self.wte(idx)))).mean(1)


class HeadFirst(nn.Module):
    """The head runs before the embedding in the forward pass, so the embedding's output
    gradient arrives first in the backward pass."""

    def __init__(self, vocab=11, dim=5):
        super().__init__()
        self.wte, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight
        self.cls = nn.Linear(vocab + dim, 3)

    def forward(self, idx, feats):
        z = self.head(feats)
        return self.cls(torch.cat([torch.tanh(z), self.wte(idx).mean(1)], -1))


def _case(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 11, (6, 4), generator=g)
    if kind == "head-first":
        model = HeadFirst().double()
        x = (idx, torch.randn(6, 5, generator=g, dtype=torch.float64))
        y = torch.randint(0, 3, (6,), generator=g)
    else:
        model = TiedSequenceLM(padding_idx=0 if kind == "padding" else None).double()
        idx[0, :2] = 0  # some padding
        x, y = idx, torch.randint(0, 11, (6,), generator=g)
    return model, x, y


@pytest.mark.parametrize("kind", ["sequence", "padding", "head-first"])
def test_a_tied_pair_equals_the_loop_without_per_example_gradients(kind):
    model, x, y = _case(kind)
    loss = nn.CrossEntropyLoss()
    ref = loop_stats(model, loss, x, y)
    got = gn.gradient_stats(model, loss, x, y, method="fast", variance=False)
    routes = list(plan_for(model).routes.values())
    assert [r.pairs for r in routes] == [{"wte.weight": ("wte", "head")}]
    assert got.per_param["wte.weight"].method == "fast-tied"
    for name, (trace, norm) in ref.items():
        assert got.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10, abs=1e-14), name
        assert got.per_param[name].grad_norm_sq == pytest.approx(norm, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("kind", ["sequence", "padding", "head-first"])
def test_the_variance_of_a_tied_pair_equals_the_loop(kind):
    """Σ_i g_i² of the tied weight from the two rules and the scattered cross term (no
    B × V × d per-example gradients): the loop's per-element variance, also with repeated
    ids within an example and the padding row."""
    model, x, y = _case(kind)
    loss = nn.CrossEntropyLoss()
    grads = gn.per_sample_grads_loop(model, loss, x, y)
    got = gn.gradient_stats(model, loss, x, y, method="fast", variance=True)
    assert [r.pairs for r in plan_for(model).routes.values()] == [{"wte.weight": ("wte", "head")}]
    for name, g in grads.items():
        torch.testing.assert_close(got.variance[name], g.var(0), rtol=1e-9, atol=1e-15)
        torch.testing.assert_close(got.mean[name], g.mean(0), rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("kind", ["sequence", "padding", "head-first"])
def test_the_monitor_measures_a_tied_pair_in_hooks_mode(kind):
    """Two accumulation micro-batches (whose small layers' rules run after both backward
    passes, so each micro-batch keeps its own pair parts): the loop's numbers for the whole
    batch, and training bitwise unchanged."""
    model, x, y = _case(kind)
    twin, _, _ = _case(kind)
    loss = nn.CrossEntropyLoss()
    ref = loop_stats(model, loss, x, y)
    xs = list(zip(*(t.chunk(2) for t in x), strict=True)) if isinstance(x, tuple) else [(c,) for c in x.chunk(2)]
    with gn.Monitor(model, loss, accumulation_steps=2, strict=True) as mon:
        assert mon.mode == "hooks"
        for xc, yc in zip(xs, y.chunk(2), strict=True):
            (loss(model(*xc), yc) / 2).backward()
        rec = mon.step(x, y)
    assert rec["trace_cov"] == pytest.approx(sum(t for t, _ in ref.values()), rel=1e-10)
    assert rec["grad_norm_sq"] == pytest.approx(sum(n for _, n in ref.values()), rel=1e-9)
    for xc, yc in zip(xs, y.chunk(2), strict=True):
        (loss(twin(*xc), yc) / 2).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
