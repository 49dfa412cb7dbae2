"""Layers applied off the batch (``wpe(arange(T))``): per-example gradients through the
broadcast, where the expansion leaves the model's outputs unchanged, and the vmap path
otherwise — the float64 loop's numbers either way."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests.reference import loop_stats


class Positions(nn.Module):
    """Token embeddings plus a position embedding used in one of several ways."""

    def __init__(self, use: str, vocab=7, dim=4, seq=6):
        super().__init__()
        self.use = use
        self.wte, self.wpe, self.head = nn.Embedding(vocab, dim), nn.Embedding(seq, dim), nn.Linear(dim, 3)
        self.shift = nn.Linear(2, dim)  # applied to a constant: a learned offset

    def forward(self, idx):
        T = idx.shape[1]
        pos = self.wpe(torch.arange(T)[None] if self.use == "row" else torch.arange(T))
        if self.use == "flip":  # positions reversed: not a broadcast over the batch
            pos = pos.flip(0)
        if self.use == "cumsum":  # a running sum over positions
            pos = pos.cumsum(0)
        x = self.wte(idx) + pos
        if self.use == "offset":  # a [dim] vector broadcast over batch and positions
            x = x + self.shift(torch.ones(2, dtype=x.dtype))
        return self.head(torch.tanh(x).mean(1))


@pytest.mark.parametrize(
    "use, method",
    [("arange", "fast"), ("row", "fast"), ("flip", "vmap"), ("cumsum", "vmap"), ("offset", "fast")],
)
@pytest.mark.parametrize("variance", [False, True])
def test_an_off_batch_layer_equals_the_loop(use, method, variance):
    """``arange``/``row``: the expanded output broadcasts as before, so the position
    embedding takes its rule; ``flip``/``cumsum`` change the values with the expansion
    (detected by the checked forward pass): vmap. ``offset``: the Linear on a constant keeps
    vmap (its expanded ``[B, dim]`` output would not broadcast the same way) while the
    position embedding takes its rule."""
    torch.manual_seed(0)
    model = Positions(use).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 7, (5, 6), generator=g), torch.randint(0, 3, (5,), generator=g)
    loss = nn.CrossEntropyLoss()
    ref = loop_stats(model, loss, x, y)
    for _ in range(2):  # traced, then from the plan's cache
        got = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
        assert got.per_param["wpe.weight"].method == method
        if use == "offset":
            assert got.per_param["shift.weight"].method != "fast"
        for name, (trace, norm) in ref.items():
            assert got.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10, abs=1e-14), name
            assert got.per_param[name].grad_norm_sq == pytest.approx(norm, rel=1e-9, abs=1e-12), name


def test_the_checked_forward_pass_leaves_the_rng_and_the_model_alone():
    """With dropout in train mode after the broadcast, the measurement draws from the
    caller's RNG as one forward pass would, and leaves the RNG state as it found it."""

    class Dropped(Positions):
        def __init__(self):
            super().__init__("arange")
            self.drop = nn.Dropout(0.3)

        def forward(self, idx):
            x = self.drop(self.wte(idx) + self.wpe(torch.arange(idx.shape[1])))
            return self.head(x.mean(1))

    torch.manual_seed(0)
    model = Dropped().double()
    x, y = torch.randint(0, 7, (5, 6)), torch.randint(0, 3, (5,))
    before = torch.get_rng_state()
    got = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast")
    assert torch.equal(torch.get_rng_state(), before)
    assert got.per_param["wpe.weight"].method == "fast"
    assert all(p.grad is None for p in model.parameters())
