"""The engine runs simple nn.MultiheadAttention calls itself (engine.attention_capture),
with hooks on the two projections instead of the rule's recomputation: the float64 loop's
numbers, on the path it says, and torch's own function for every other call."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from gradnoise.engine import hooks
from tests.reference import loop_stats


class Encoder(nn.Module):
    """An encoder layer between two Linear layers, with one of several attention masks."""

    def __init__(self, mask: str, norm_first: bool):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.head, self.mask = nn.Linear(8, 3), mask
        self.register_buffer("allowed", torch.rand(5, 5, generator=torch.Generator().manual_seed(0)) > 0.7)

    def forward(self, x):
        h, T = self.embed(x), x.shape[1]
        if self.mask == "causal":
            h = self.layer(h, src_mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=h.dtype), is_causal=True)
        elif self.mask == "bool":
            h = self.layer(h, src_mask=self.allowed[:T, :T])
        elif self.mask == "padding":  # a key-padding mask: torch's own function and the rule
            pad = torch.zeros(x.shape[:2], dtype=torch.bool)
            pad[:, -1] = True
            h = self.layer(h, src_key_padding_mask=pad)
        else:
            h = self.layer(h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("mask, captured", [("none", True), ("causal", True), ("bool", True), ("padding", False)])
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("variance", [False, True])
def test_an_encoder_layer_equals_the_loop(mask, captured, norm_first, variance, monkeypatch):
    seen = []
    original = hooks.Recorder._on_projection
    monkeypatch.setattr(hooks.Recorder, "_on_projection", lambda self, *a: seen.append(1) or original(self, *a))
    torch.manual_seed(0)
    model = Encoder(mask, norm_first).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    ref = loop_stats(model, nn.CrossEntropyLoss(), x, y)
    got = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast", variance=variance)
    assert (len(seen) == 2) is captured  # the two projections' hooks, or the rule
    for name, (trace, norm) in ref.items():
        assert got.per_param[name].method == "fast"
        assert got.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10, abs=1e-14), name
        assert got.per_param[name].grad_norm_sq == pytest.approx(norm, rel=1e-9, abs=1e-12), name


class _AttendFirst(nn.Module):
    """Self-attention on the data itself: nothing below it needs a gradient."""

    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("make, attention", [(lambda: Encoder("none", True), "layer.self_attn"), (_AttendFirst, "attn")],
                         ids=["inside", "on-the-data"])  # fmt: skip
@pytest.mark.parametrize("variance", [False, True])
def test_a_captured_attention_takes_the_moments_path(make, attention, variance):
    """A captured attention call's projections give its norms and its mean gradient (the
    backward pass skips its weights' gradients), also where nothing below it needs a
    gradient (its input projection is then requested so that both hooks run): equal to
    the float64 loop."""
    from gradnoise.engine.plan import plan_for

    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(6, 5, 3 if attention != "attn" else 4, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    got = gn.gradient_stats(model, nn.CrossEntropyLoss(), x, y, method="fast", variance=variance)
    assert all(attention in route.owned.values() for route in plan_for(model).routes.values())
    for name, (trace, norm) in loop_stats(model, nn.CrossEntropyLoss(), x, y).items():
        assert got.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10, abs=1e-14), name
        assert got.per_param[name].grad_norm_sq == pytest.approx(norm, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("mask", ["none", "causal", "bool", "padding"])
def test_the_monitor_measures_attention_at_its_projections(mask):
    """In the user's own forward pass the capture runs only where a checked forward pass
    gives bitwise torch's outputs (with a key-padding mask torch's own function runs, and
    the rule); training stays bitwise identical, and the records equal the float64 loop."""
    torch.manual_seed(0)
    model, twin = Encoder(mask, True).double(), Encoder(mask, True).double()
    twin.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 5, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    loss = nn.CrossEntropyLoss()
    ref = loop_stats(model, loss, x, y)
    with gn.Monitor(model, loss, strict=True) as mon:
        assert mon.mode == "hooks"
        for _ in range(2):  # checked, then from the cache
            model.zero_grad()
            loss(model(x), y).backward()
            rec = mon.step(x, y)
            assert rec["trace_cov"] == pytest.approx(sum(t for t, _ in ref.values()), rel=1e-10)
            assert rec["grad_norm_sq"] == pytest.approx(sum(n for _, n in ref.values()), rel=1e-9)
        assert list(mon._hooks._capture_ok.values()) == [True]
    loss(twin(x), y).backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), twin.parameters(), strict=True))
