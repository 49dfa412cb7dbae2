"""The Monitor's hooks mode on LSTM, GRU and RNN layers: their calls' inputs and output
gradients are kept, and after the user's backward pass (torch's fused kernel, untouched)
the recurrence runs again for their norms (engine/step_hooks.py). Against gradient_stats
by vmap in float64, with training bitwise unchanged."""

import copy
import logging

import pytest
import torch
from torch import nn

import gradnoise as gn
from tests.cases import CASES_BY_NAME, Case, SeqHead, labels, randn


class LastState(nn.Module):
    """A classifier from the LSTM's final hidden and cell states (h_n, c_n), with an initial
    state computed from the first input (in the graph, per example)."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.body, self.head = nn.LSTM(4, 5, num_layers=2, batch_first=True, dropout=dropout), nn.Linear(10, 3)
        self.init = nn.Linear(4, 10)

    def forward(self, x):
        h0 = torch.tanh(self.init(x[:, 0])).view(-1, 2, 5).transpose(0, 1).contiguous()  # [layers, B, H]
        _, (h, c) = self.body(x, (h0, torch.tanh(h0)))
        return self.head(torch.cat([h[-1], c[-1]], 1))


RNN_MODELS = {
    "lstm": CASES_BY_NAME["lstm"],
    "gru": CASES_BY_NAME["gru"],
    "rnn-stack": Case("rnn-stack", lambda: SeqHead(nn.RNN(4, 5, num_layers=2, bidirectional=True), 10, batch_first=False),
                      randn(6, 4), labels(3)),  # fmt: skip
}


def _train(model, loss, batches, monitored: bool, k: int = 1):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = gn.Monitor(model, loss, strict=True, accumulation_steps=k) if monitored else None
    recs = []
    for x, y in batches:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(k), y.chunk(k), strict=True):
            (loss(model(xs), ys) / k).backward()
        if mon is not None:
            recs.append((mon.step(x, y), gn.gradient_stats(model, loss, x, y, method="vmap", variance=False)))
        opt.step()
    mode = None if mon is None else mon.mode
    if mon is not None:
        mon.close()
    return [p.detach().clone() for p in model.parameters()], recs, mode


def _batches(case_inputs, n=3, batch=8):
    g = torch.Generator().manual_seed(3)
    return [(case_inputs(g, batch).double(), torch.randint(0, 3, (batch,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("accumulation", [1, 2])
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn-stack", "last-state"])
def test_the_monitor_measures_rnns_in_hooks_mode(name, accumulation):
    """Hooks mode (no second pass over the model): each step's record equals gradient_stats
    by vmap, through the output and through the final states, with accumulation too; and the
    training is bitwise that of a run without the monitor."""
    if name == "last-state":
        torch.manual_seed(0)
        model, loss, inputs = LastState().double(), nn.CrossEntropyLoss(), randn(6, 4)
    else:
        model, loss, _, _ = RNN_MODELS[name].make(torch.float64)
        inputs = RNN_MODELS[name].inputs
    batches = _batches(inputs)
    plain, _, _ = _train(copy.deepcopy(model), loss, batches, False, accumulation)
    params, recs, mode = _train(model, loss, batches, True, accumulation)
    assert mode == "hooks"
    assert all(torch.equal(a, b) for a, b in zip(plain, params, strict=True))
    for rec, ref in recs:
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-9)
        assert rec["grad_norm_sq"] == pytest.approx(ref.grad_norm_sq, rel=1e-8, abs=1e-9 * ref.trace_cov)


def test_an_rnn_call_the_hooks_cannot_run_again_is_measured_in_a_separate_pass(caplog):
    """Dropout between LSTM layers in training draws masks the recurrence run again would
    not: the Monitor says so and measures in mode='separate' from then on, still right."""
    torch.manual_seed(0)
    model, loss = LastState(dropout=0.5).double(), nn.CrossEntropyLoss()
    (x, y), = _batches(randn(6, 4), n=1)
    mon = gn.Monitor(model, loss)
    assert mon.mode == "hooks"
    torch.manual_seed(1)
    loss(model(x), y).backward()
    with caplog.at_level(logging.INFO, logger="gradnoise.monitor"):
        rec = mon.step(x, y)
    assert mon.mode == "separate" and "dropout between layers in training" in caplog.text
    assert rec["trace_cov"] is not None and rec["trace_cov"] > 0
    mon.close()


class InPlaceOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.body(x)
        return self.head(out.relu_().mean(1))  # the LSTM's output modified in place


def test_an_rnn_output_modified_in_place_is_measured_in_a_separate_pass(caplog):
    """torch's RNN output is a view: modified in place, its gradient reaches no hook. The
    Monitor says so and measures that step and the next in a separate pass, right."""
    torch.manual_seed(0)
    model, loss = InPlaceOutput().double(), nn.CrossEntropyLoss()
    mon = gn.Monitor(model, loss)
    assert mon.mode == "hooks"
    for x, y in _batches(randn(6, 4), n=2):
        model.zero_grad()
        loss(model(x), y).backward()
        with caplog.at_level(logging.INFO, logger="gradnoise.monitor"):
            rec = mon.step(x, y)
        ref = gn.gradient_stats(model, loss, x, y, method="vmap")
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-9)
    assert mon.mode == "separate" and "output modified in place" in caplog.text
    mon.close()


def test_an_rnn_called_with_hx_none_is_measured_in_hooks_mode():
    """``rnn(x, None)`` (zero initial states, spelled out) used to raise in the user's forward
    pass (the hooks kept the call's arguments by detaching each); now measured like any other
    call, each record equal to gradient_stats by vmap, training unchanged."""

    class Explicit(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.body(x, None)[0][:, -1])

    torch.manual_seed(0)
    model, loss = Explicit().double(), nn.CrossEntropyLoss()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 6, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    trained, recs, mode = _train(model, loss, batches, monitored=True)
    assert mode == "hooks"
    for rec, ref in recs:
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-9)
    untouched, _, _ = _train(plain, loss, batches, monitored=False)
    assert all(torch.equal(a, b) for a, b in zip(trained, untouched, strict=True))


class Packed(nn.Module):
    """An RNN on a packed batch of sequences of their own lengths (zero rows are padding, so
    that an example alone has the length it has in the batch), unsorted, with or without an
    initial state; a head on the padded outputs' sum and on the last layer's final state."""

    def __init__(self, kind="LSTM", bidirectional=False, batch_first=True, h0=False):
        super().__init__()
        self.batch_first, D = batch_first, 2 if bidirectional else 1
        self.body = getattr(nn, kind)(4, 5, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
        self.head, self.last = nn.Linear(5 * D, 3), nn.Linear(5, 3)
        self.init = nn.Linear(4, 2 * D * 5) if h0 else None

    def forward(self, x):
        lengths = (x.abs().sum(-1) != 0).sum(1)
        seq = nn.utils.rnn.pack_padded_sequence(x if self.batch_first else x.transpose(0, 1), lengths,
                                                batch_first=self.batch_first, enforce_sorted=False)  # fmt: skip
        state = None
        if self.init is not None:  # per example, from its first input
            h0 = torch.tanh(self.init(x[:, 0])).view(x.shape[0], -1, 5).transpose(0, 1).contiguous()
            state = (h0, torch.tanh(h0)) if isinstance(self.body, nn.LSTM) else h0
        out, h = self.body(seq, state)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True)
        h_n = h[0] if isinstance(h, tuple) else h
        return self.head(padded.sum(1)) + self.last(h_n[-1])


class Cells(nn.Module):
    """A packed LSTM whose loss reads its final cell states too (heads on h_n and c_n)."""

    def __init__(self):
        super().__init__()
        self.body = nn.LSTM(4, 5, num_layers=2, batch_first=True)
        self.last, self.cells = nn.Linear(5, 3), nn.Linear(5, 3)

    def forward(self, x):
        lengths = (x.abs().sum(-1) != 0).sum(1)
        seq = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, (h_n, c_n) = self.body(seq)
        return self.last(h_n[-1]) + self.cells(c_n[-1])


def _padded(g, batch=8, T=6):
    x = torch.randn(batch, T, 4, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (batch,), generator=g)
    x[torch.arange(T)[None, :] >= lengths[:, None]] = 0
    return x, torch.randint(0, 3, (batch,), generator=g)


@pytest.mark.parametrize("path", ["rnn-unrolled", "rnn-looped"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("bidirectional, batch_first, h0", [(False, True, False), (True, False, False), (True, True, True)])
def test_packed_sequences_are_measured_each_to_its_own_length(kind, bidirectional, batch_first, h0, path, monkeypatch):
    """An RNN on a packed batch (two layers, sequences of their own lengths, unsorted), on
    either path: unrolled on the padded batch, each example to its own end (the reverse
    direction starting there), or each example alone through torch's kernel; the noise
    statistics equal a float64 loop of autograd.grad."""
    from gradnoise.engine import rnn
    from tests.reference import loop_stats

    torch.manual_seed(0)
    model, loss = Packed(kind, bidirectional, batch_first, h0).double(), nn.CrossEntropyLoss()
    x, y = _padded(torch.Generator().manual_seed(5))
    monkeypatch.setattr(rnn, "_FASTER", {})
    gn.gradient_stats(model, loss, x, y)
    (key,) = rnn._FASTER
    rnn._FASTER[key] = path  # this path from now on for this shape
    stats = gn.gradient_stats(model, loss, x, y)
    assert stats.per_param["body.weight_hh_l1"].method == path
    for name, (trace, g2) in loop_stats(model, loss, x, y).items():
        assert stats.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
        assert stats.per_param[name].grad_norm_sq == pytest.approx(g2, rel=1e-9, abs=1e-12), name


def test_a_packed_lstm_whose_final_cell_state_is_used_takes_the_loop():
    """A packed LSTM's c_n is each example's cell state at its own end, which the unrolled
    recurrence does not keep: with a loss on it the call takes the loop, exact against the
    float64 loop of autograd.grad."""
    from tests.reference import loop_stats

    torch.manual_seed(0)
    model, loss = Cells().double(), nn.CrossEntropyLoss()
    x, y = _padded(torch.Generator().manual_seed(8))
    stats = gn.gradient_stats(model, loss, x, y)
    assert stats.per_param["body.weight_hh_l1"].method == "rnn-looped"
    for name, (trace, _) in loop_stats(model, loss, x, y).items():
        assert stats.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name


@pytest.mark.parametrize("kind, bidirectional, h0, accumulation", [("GRU", False, False, 1), ("LSTM", True, True, 2),
                                                                   ("RNN", True, False, 1), ("Cells", False, False, 1)])
def test_the_monitor_measures_packed_sequences_in_hooks_mode(kind, bidirectional, h0, accumulation):
    """The hooks run a packed call again, each example to its own length (an LSTM whose c_n
    the loss reads, one example at a time): each record equals gradient_stats by vmap
    (which runs one example at a time through torch's kernel), without a separate pass, and
    training is unchanged."""
    torch.manual_seed(0)
    model = Cells() if kind == "Cells" else Packed(kind, bidirectional, True, h0)
    model, loss = model.double(), nn.CrossEntropyLoss()
    plain = copy.deepcopy(model)
    g = torch.Generator().manual_seed(6)
    batches = [_padded(g) for _ in range(3)]
    trained, recs, mode = _train(model, loss, batches, monitored=True, k=accumulation)
    assert mode == "hooks"
    for rec, ref in recs:
        assert rec["trace_cov"] == pytest.approx(ref.trace_cov, rel=1e-9)
        assert rec["grad_norm_sq"] == pytest.approx(ref.grad_norm_sq, rel=1e-9)
    untouched, _, _ = _train(plain, loss, batches, monitored=False, k=accumulation)
    assert all(torch.equal(a, b) for a, b in zip(trained, untouched, strict=True))


def test_an_unused_parameter_beside_a_packed_rnn_has_zero_gradients():
    """vmap cannot batch a packed RNN, so the parameters no rule covers go to a loop over
    examples; where none of them reaches the loss (an unused layer) their gradients are
    zero, as vmap gives, and the rest is unchanged."""
    torch.manual_seed(0)
    model, loss = Packed("GRU").double(), nn.CrossEntropyLoss()
    model.unused = nn.Linear(4, 4).double()
    x, y = _padded(torch.Generator().manual_seed(9))
    stats = gn.gradient_stats(model, loss, x, y)
    ref = gn.gradient_stats(model, loss, x, y, method="vmap")
    assert stats.per_param["unused.weight"].method == "vmap"
    assert stats.per_param["unused.weight"].grad_norm_sq == 0 and stats.per_param["unused.weight"].trace_cov == 0
    assert stats.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)


def test_a_packed_sequence_the_loop_cannot_take_goes_to_vmap():
    """The same RNN run twice on packed sequences in one forward pass: the loop takes one
    call at a time, so the whole model goes to vmap, exact against the float64 loop."""
    from tests.reference import loop_stats

    class Twice(Packed):
        def forward(self, x):
            return super().forward(x) + super().forward(0.5 * x)

    torch.manual_seed(0)
    model, loss = Twice("GRU").double(), nn.CrossEntropyLoss()
    x, y = _padded(torch.Generator().manual_seed(7))
    stats = gn.gradient_stats(model, loss, x, y)
    assert stats.per_param["body.weight_hh_l1"].method == "vmap"
    for name, (trace, _) in loop_stats(model, loss, x, y).items():
        assert stats.per_param[name].trace_cov == pytest.approx(trace, rel=1e-10), name
