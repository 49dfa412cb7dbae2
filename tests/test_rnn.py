"""RNNs unrolled once with their gate pre-activations kept (engine/rnn.py), and looped
through the fused kernel, against a float64 loop of torch.autograd.grad through torch's
own fused kernels."""

import pytest
import torch
from torch import nn

import gradnoise as gn
from gradnoise.engine import rnn
from gradnoise.engine.rnn import rnn_grads, rnn_grads_looped, rnn_norms
from tests.cases import CASES_BY_NAME, Case, SeqHead, labels, randn


def _reference(module, x, h0, d_out, d_h, batch_first):
    rows = {n: [] for n, _ in module.named_parameters()}
    dim = 0 if batch_first else 1
    for i in range(x.shape[dim]):
        xi = x.narrow(dim, i, 1)
        hi = None if h0 is None else (tuple(h.narrow(1, i, 1) for h in h0) if isinstance(h0, tuple) else h0.narrow(1, i, 1))
        out, h_n = module(xi, hi) if hi is not None else module(xi)
        total = (out * d_out.narrow(dim, i, 1)).sum()
        hs = h_n if isinstance(h_n, tuple) else (h_n,)
        for h, dh in zip(hs, d_h, strict=False):
            total = total + (h * dh.narrow(1, i, 1)).sum()
        for (n, _), g in zip(module.named_parameters(), torch.autograd.grad(total, list(module.parameters())), strict=True):
            rows[n].append(g)
    return {n: torch.stack(r) for n, r in rows.items()}


@pytest.mark.parametrize("kind", [nn.LSTM, nn.GRU, nn.RNN])
@pytest.mark.parametrize("batch_first, layers, bidirectional, with_h0", [
    (True, 1, False, False), (False, 2, True, True), (True, 2, False, True), (False, 1, True, True),
])  # fmt: skip
def test_unrolled_rnn_equals_a_loop_of_autograd(kind, batch_first, layers, bidirectional, with_h0):
    torch.manual_seed(0)
    module = kind(3, 4, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first).double()
    B, T, D = 5, 6, 2 if bidirectional else 1
    x = torch.randn(B, T, 3, dtype=torch.float64) if batch_first else torch.randn(T, B, 3, dtype=torch.float64)
    h0 = None
    if with_h0:
        h = torch.randn(layers * D, B, 4, dtype=torch.float64)
        h0 = (h, torch.randn_like(h)) if kind is nn.LSTM else h
    out_shape = (B, T, 4 * D) if batch_first else (T, B, 4 * D)
    d_out = torch.randn(out_shape, dtype=torch.float64)
    d_h = [torch.randn(layers * D, B, 4, dtype=torch.float64) for _ in range(2 if kind is nn.LSTM else 1)]
    args = (x,) if h0 is None else (x, h0)
    ref = _reference(module, x, h0, d_out, d_h, batch_first)
    for fn in (rnn_grads, rnn_grads_looped):
        got = fn(module, args, [d_out, *d_h], B)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12)
    # given torch's output (the training monitor keeps it), a one-layer LSTM's gates come from it
    given = rnn_grads(module, args, [d_out, *d_h], B, output=module(*args)[0])
    for n in ref:
        torch.testing.assert_close(given[n], ref[n], rtol=1e-10, atol=1e-12)
    for elementwise in (False, True):  # the norms without materialising, scaled by 3
        norms, sums = rnn_norms(module, args, [d_out, *d_h], B, elementwise, 3.0)
        assert norms.keys() == sums.keys() == ref.keys()
        for n, g in ref.items():
            sq, s2 = norms[n]
            torch.testing.assert_close(sq, 9 * g.flatten(1).square().sum(1), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(sums[n], g.sum(0), rtol=1e-10, atol=1e-12)
            if elementwise:
                torch.testing.assert_close(s2, 9 * g.square().sum(0), rtol=1e-10, atol=1e-12)
            else:
                assert s2 is None


@pytest.mark.parametrize("variance", [False, True])
@pytest.mark.parametrize("name", ["lstm", "gru", "rnn-stack"])
def test_the_engine_runs_rnns_with_their_gates_in_view(name, variance):
    """gradient_stats on a model with an RNN: the engine's own forward runs it unrolled
    (engine.rnn_capture) and its parameters take the rule path, equal to vmap."""
    model, loss, x, y = RNN_CASES[name].make(torch.float64)
    fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    assert {fast.per_param[n].method for n in fast.per_param if n.startswith("body.")} == {"fast"}
    _equal_to_vmap(fast, gn.gradient_stats(model, loss, x, y, method="vmap", variance=variance), variance)


@pytest.mark.parametrize("path", ["rnn-unrolled", "rnn-looped"])
@pytest.mark.parametrize("variance", [False, True])
@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_an_rnn_call_the_capture_does_not_run_is_recomputed(name, variance, path, monkeypatch):
    """An RNN call that the engine's forward leaves to torch's kernel (packed sequences,
    dropout between layers in training; forced here) is recomputed, on the path measured
    faster for the shape, each path equal to vmap."""
    from gradnoise.engine import rnn_capture

    monkeypatch.setattr(rnn_capture.RNNCapture, "__torch_function__", lambda self, f, t, a=(), k=None: f(*a, **(k or {})))
    model, loss, x, y = CASES_BY_NAME[name].make(torch.float64)
    monkeypatch.setattr(rnn, "_FASTER", {})
    fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    assert {fast.per_param[n].method for n in fast.per_param if n.startswith("body.")} == set(rnn._FASTER.values())
    (key,) = rnn._FASTER
    rnn._FASTER[key] = path  # the other path, taken from now on for this shape
    again = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    assert {again.per_param[n].method for n in again.per_param if n.startswith("body.")} == {path}
    ref = gn.gradient_stats(model, loss, x, y, method="vmap", variance=variance)
    for s in (fast, again):
        _equal_to_vmap(s, ref, variance)


def _equal_to_vmap(s, ref, variance):
    assert s.trace_cov == pytest.approx(ref.trace_cov, rel=1e-10)
    assert s.grad_norm_sq == pytest.approx(ref.grad_norm_sq, rel=1e-10, abs=1e-12)
    for k in ref.per_param:
        assert s.per_param[k].trace_cov == pytest.approx(ref.per_param[k].trace_cov, rel=1e-9, abs=1e-14), k
    if variance:
        for k in ref.variance:
            torch.testing.assert_close(s.variance[k], ref.variance[k], rtol=1e-9, atol=1e-14)


RNN_CASES = {
    **CASES_BY_NAME,
    # two layers, bidirectional, sequence-first, tanh: every parameter suffix and layout
    "rnn-stack": Case("rnn-stack", lambda: SeqHead(nn.RNN(4, 5, num_layers=2, bidirectional=True), 10, batch_first=False),
                      randn(6, 4), labels(3)),
}


def test_a_projected_lstm_beside_a_plain_one_keeps_torchs_kernel():
    """While the engine's forward runs a plain LSTM unrolled, an LSTM with ``proj_size`` in
    the same model (whose weights the unroll does not cover) runs torch's kernel and is
    measured by module vmap: the statistics equal vmap's."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain = nn.LSTM(4, 5, batch_first=True)
            self.projected = nn.LSTM(5, 6, batch_first=True, proj_size=3)
            self.head = nn.Linear(3, 3)

        def forward(self, x):
            return self.head(self.projected(self.plain(x)[0])[0].mean(1))

    torch.manual_seed(0)
    model = Two().double()
    x, y = torch.randn(6, 7, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss = nn.CrossEntropyLoss()
    fast = gn.gradient_stats(model, loss, x, y, method="fast")
    assert {fast.per_param[n].method for n in fast.per_param if n.startswith("plain.")} == {"fast"}
    assert {fast.per_param[n].method for n in fast.per_param if n.startswith("projected.")} == {"vmap-module"}
    _equal_to_vmap(fast, gn.gradient_stats(model, loss, x, y, method="vmap"), True)


@pytest.mark.parametrize("bias", [True, False])
def test_the_lstm_recurrence_node_has_torchs_values_and_gradients(bias):
    """engine/lstm_recurrence.py's hand-written backward: every input's gradient, through
    the output and both final states, against torch's fused kernel in float64, and its own
    finite differences; a second backward through the same graph is refused."""
    from gradnoise.engine.lstm_recurrence import lstm_layer

    torch.manual_seed(0)
    B, T, I, H = 3, 6, 5, 4
    lstm = nn.LSTM(I, H, batch_first=True, bias=bias).double()
    x = torch.randn(B, T, I, dtype=torch.float64, requires_grad=True)
    h0, c0 = (torch.randn(1, B, H, dtype=torch.float64, requires_grad=True) for _ in range(2))
    d_out, d_hn, d_cn = torch.randn(B, T, H, dtype=torch.float64), *torch.randn(2, 1, B, H, dtype=torch.float64)
    weights = list(lstm.parameters())

    def loss(out, h_n, c_n):
        return (out * d_out).sum() + (h_n * d_hn).sum() + (c_n * d_cn).sum()

    out, (h_n, c_n) = lstm(x, (h0, c0))
    expected = torch.autograd.grad(loss(out, h_n, c_n), [x, h0, c0, *weights])
    b_ih, b_hh = (lstm.bias_ih_l0, lstm.bias_hh_l0) if bias else (None, None)
    got_out, got_hn, got_cn = lstm_layer(nn.functional.linear(x, lstm.weight_ih_l0, b_ih), lstm.weight_hh_l0, b_hh, h0[0], c0[0])
    torch.testing.assert_close(got_out, out, rtol=0, atol=1e-14)
    torch.testing.assert_close((got_hn, got_cn), (h_n[0], c_n[0]), rtol=0, atol=1e-14)
    got = torch.autograd.grad(loss(got_out, got_hn[None], got_cn[None]), [x, h0, c0, *weights])
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-13)
    # its own central differences along a random direction of every input
    args = [torch.randn(*s, dtype=torch.float64) for s in ((2, 3, 8), (8, 2), (8,), (2, 2), (2, 2))]
    if not bias:
        args[2] = None
    cots = [torch.randn(*s, dtype=torch.float64) for s in ((2, 3, 2), (2, 2), (2, 2))]
    dirs = [None if a is None else torch.randn_like(a) for a in args]

    def value(eps):
        moved = [None if a is None else a + eps * u for a, u in zip(args, dirs, strict=True)]
        return sum((o * c).sum() for o, c in zip(lstm_layer(*moved), cots, strict=True))

    leaves = [None if a is None else a.clone().requires_grad_(True) for a in args]
    outs = lstm_layer(*leaves)
    total = sum((o * c).sum() for o, c in zip(outs, cots, strict=True))
    grads = torch.autograd.grad(total, [a for a in leaves if a is not None], retain_graph=True)
    analytic = sum((g * u).sum() for g, u in zip(grads, [u for u in dirs if u is not None], strict=True))
    numeric = (value(1e-6) - value(-1e-6)) / 2e-6
    assert float(analytic) == pytest.approx(float(numeric), rel=1e-7, abs=1e-9)
    with pytest.raises(RuntimeError, match="differentiated twice"):  # its buffers are reused: never silently
        torch.autograd.grad(total, [a for a in leaves if a is not None])


@pytest.mark.parametrize("variance", [False, True])
@pytest.mark.parametrize("layout", ["batch-first", "stack"])
def test_a_captured_lstm_whose_products_do_not_pay_takes_the_shared_gram_form(layout, variance, monkeypatch):
    """Short sequences of a wide LSTM (``2T(I + H + 4H) < 4H(I + H)``, a Linear layer's
    rule on the stacked ``[x_t, h_t-1]``): without the
    variance, its norms from the Gram form its two weights share and each mean as its weight
    gradient (no per-example products); with it, the products, which Σ_i g_i² needs. Either
    way equal to vmap's, the recurrence's backward skipping the weights' gradients."""
    from gradnoise.engine import lstm_recurrence, rnn
    from gradnoise.rules.linear import products_pay

    assert not products_pay(3, 12 + 12, 48) and products_pay(40, 12 + 12, 48)  # [x_t, h_t-1] → 4H gates
    skipped, products = [], []
    backward, dense_moments = lstm_recurrence._LSTMLayer.backward, rnn.dense_moments

    def spy(ctx, *grads):
        skipped.append(not ctx.wanted.needed)
        return backward(ctx, *grads)

    monkeypatch.setattr(lstm_recurrence._LSTMLayer, "backward", staticmethod(spy))
    monkeypatch.setattr(rnn, "dense_moments", lambda *args: (products.append(1), dense_moments(*args))[1])
    torch.manual_seed(0)
    if layout == "stack":
        model, x = SeqHead(nn.LSTM(12, 12, num_layers=2, bidirectional=True), 24, batch_first=False), torch.randn(6, 3, 12)
    else:
        model, x = SeqHead(nn.LSTM(12, 12, batch_first=True), 12), torch.randn(6, 3, 12)
    model, x = model.double(), x.double()
    y, loss = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(1)), nn.CrossEntropyLoss()
    fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    assert skipped and all(skipped)
    assert bool(products) == variance
    assert {fast.per_param[n].method for n in fast.per_param if n.startswith("body.")} == {"fast"}
    _equal_to_vmap(fast, gn.gradient_stats(model, loss, x, y, method="vmap", variance=variance), variance)


class _EmbeddedLSTM(nn.Module):
    def __init__(self, frozen: bool):
        super().__init__()
        self.embed, self.body, self.head = nn.Embedding(11, 4), nn.LSTM(4, 5, batch_first=True), nn.Linear(5, 3)
        self.embed.weight.requires_grad_(not frozen)

    def forward(self, idx):
        return self.head(self.body(self.embed(idx))[0].mean(1))


@pytest.mark.parametrize("variance", [False, True])
@pytest.mark.parametrize("where", ["on-data", "on-input-with-grad", "after-embedding", "after-frozen-embedding", "stack"])
def test_a_captured_lstm_takes_its_mean_from_the_products(where, variance, monkeypatch):
    """A captured LSTM's weights on the moments path (engine.rnn.layer_moments): the
    recurrence's backward skips their gradients, and the statistics equal vmap's wherever
    the LSTM sits — its gates are requested from autograd where nothing below leads on."""
    from gradnoise.engine import lstm_recurrence

    skipped = []
    backward = lstm_recurrence._LSTMLayer.backward

    def spy(ctx, *grads):
        skipped.append(not ctx.wanted.needed)
        return backward(ctx, *grads)

    monkeypatch.setattr(lstm_recurrence._LSTMLayer, "backward", staticmethod(spy))
    g = torch.Generator().manual_seed(0)
    if where in ("after-embedding", "after-frozen-embedding"):
        torch.manual_seed(0)
        model, x = _EmbeddedLSTM(frozen=where == "after-frozen-embedding").double(), torch.randint(0, 11, (6, 7), generator=g)
    else:
        case = RNN_CASES["lstm"] if where != "stack" else Case(
            "lstm-stack", lambda: SeqHead(nn.LSTM(4, 5, num_layers=2, bidirectional=True), 10, batch_first=False),
            randn(6, 4), labels(3))  # fmt: skip
        model, _, x, _ = case.make(torch.float64)
        x = x.requires_grad_(where == "on-input-with-grad")
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    loss = nn.CrossEntropyLoss()
    fast = gn.gradient_stats(model, loss, x, y, method="fast", variance=variance)
    assert skipped and all(skipped)
    assert {fast.per_param[n].method for n in fast.per_param if n.startswith("body.")} == {"fast"}
    _equal_to_vmap(fast, gn.gradient_stats(model, loss, x, y, method="vmap", variance=variance), variance)
