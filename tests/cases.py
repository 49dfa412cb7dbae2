"""Shared test cases: one line per layer or model (factory, loss, data).

Every case is a small model that treats examples independently, with a mean-reduced loss.
``make(dtype)`` returns ``(model, loss_fn, inputs, targets)`` with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from gradnoise import tasks


@dataclass(frozen=True)
class Case:
    name: str
    model: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator, int], object]
    targets: Callable[[torch.Generator, int], torch.Tensor]
    loss: Callable[[], nn.Module] = nn.CrossEntropyLoss
    batch: int = 6

    def make(self, dtype: torch.dtype = torch.float64, batch: int | None = None):
        torch.manual_seed(0)
        model = self.model().to(dtype)
        g = torch.Generator().manual_seed(1)
        b = batch or self.batch
        x = self.inputs(g, b)
        cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
        x = tuple(cast(t) for t in x) if isinstance(x, tuple) else cast(x)
        y = self.targets(g, b)
        return model, self.loss(), x, cast(y)


def monitored_run(case: Case, monitored: bool, device: str = "cpu", autocast: bool = False):
    """Three AdamW steps on ``case``'s model (float32, on ``device``, the forward under bf16
    autocast with ``autocast``), with a ``strict`` Monitor if ``monitored``. Returns the
    final parameters and, per step, the Monitor's record and ``gradient_stats`` of the same
    batch (no variance)."""
    import gradnoise as gn

    model, loss, _, _ = case.make(torch.float32)
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mon = gn.Monitor(model, loss, strict=True) if monitored else None
    g, recs = torch.Generator().manual_seed(4), []
    for _ in range(3):
        x, y = case.inputs(g, 8), case.targets(g, 8).to(device)
        x = tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)
        opt.zero_grad()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            out = model(*(x if isinstance(x, tuple) else (x,)))
        loss(out.float() if autocast else out, y).backward()
        if mon is not None:
            recs.append((mon.step(x, y), gn.gradient_stats(model, loss, x, y, variance=False)))
        opt.step()
    if mon is not None:
        mon.close()
    return [p.detach().clone() for p in model.parameters()], recs


def randn(*shape):
    return lambda g, b: torch.randn(b, *shape, generator=g)


def labels(k, *shape):
    return lambda g, b: torch.randint(0, k, (b, *shape), generator=g)


def ids(vocab, seq):
    return lambda g, b: torch.randint(0, vocab, (b, seq), generator=g)


class SeqHead(nn.Module):
    """Wraps a sequence module: ``[B, T, D]`` → module → mean over time → Linear."""

    def __init__(self, body: nn.Module, dim: int, classes: int = 3, batch_first: bool = True):
        super().__init__()
        self.body, self.head, self.batch_first = body, nn.Linear(dim, classes), batch_first

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        if isinstance(self.body, nn.MultiheadAttention):
            h = self.body(x, x, x, need_weights=False)[0]
        else:
            h = self.body(x)
        h = h[0] if isinstance(h, tuple) else h
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


class MaskedAttention(nn.Module):
    """Cross-attention with a per-example key padding mask, a causal boolean mask and a float
    bias mask (a buffer); the second block has no biases."""

    def __init__(self, dim=6, heads=2, seq=5):
        super().__init__()
        self.kv = nn.Linear(dim, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.attn2 = nn.MultiheadAttention(dim, heads, batch_first=True, bias=False)
        self.register_buffer("bias", torch.randn(seq, seq, generator=torch.Generator().manual_seed(5)))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        T = x.shape[1]
        pad = x[..., 0] > 0.8
        pad[:, 0] = False  # never every key masked
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        kv = self.kv(x)
        h = self.attn(x, kv, kv, key_padding_mask=pad, attn_mask=causal, need_weights=False)[0]
        h = self.attn2(h, h, h, attn_mask=self.bias[:T, :T], need_weights=False)[0]
        return self.head(h.mean(1))


class KdimAttention(nn.Module):
    """Keys and values of another width (separate projection weights: no rule, vmap-module)."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, kdim=4, vdim=4, batch_first=True)

    def forward(self, x):
        return self.attn(x, x[..., :4], x[..., :4], need_weights=False)[0]


class TiedLM(nn.Module):
    """Embedding whose weight is tied to the output projection; predicts the last token."""

    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.embed(x))).mean(1))


class Scaled(nn.Module):
    """A raw parameter used in the model's own forward (covered by whole-model vmap)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3) * 1.5)

    def forward(self, x):
        return self.lin(x) * self.scale


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


class Reused(nn.Module):
    """The same Linear applied twice (per-example gradient is a sum over calls)."""

    def __init__(self):
        super().__init__()
        self.lin, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.lin(torch.tanh(self.lin(x))))


class ResNetBlock(nn.Module):
    """A ResNet basic block on images (conv, BatchNorm in eval mode, ReLU, conv, BatchNorm,
    a 1×1 projection shortcut), pooled into a Linear head."""

    def __init__(self, cin=3, cout=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, bias=False)
        self.head = nn.Linear(cout, 3)
        for bn in (self.bn1, self.bn2):  # non-trivial running statistics, used in eval mode
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + self.short(x))
        return self.head(h.mean((2, 3)))


class NanoGPTBlock(nn.Module):
    """nanoGPT's pattern: token and position embeddings (``wpe(arange(T))``), a pre-norm
    block with causal self-attention through one qkv Linear and SDPA, a GELU MLP, and a head
    on the last position."""

    def __init__(self, vocab=9, dim=8, heads=2, max_len=8):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.ln1, self.ln2, self.lnf = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.head, self.heads = nn.Linear(dim, vocab, bias=False), heads

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=2)
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, -1))
        x = x + self.out(torch.nn.functional.gelu(self.fc(self.ln2(x))))
        return self.head(self.lnf(x)[:, -1])


def frozen_mlp():
    m = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    m[0].weight.requires_grad_(False)
    return m


def rms_model():
    return nn.Sequential(nn.Linear(5, 6), nn.RMSNorm(6), nn.Linear(6, 3))


CASES = [
    Case("linear", lambda: nn.Linear(5, 3), randn(5), labels(3)),
    Case("mlp", lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), randn(5), labels(3)),
    # B(in + out) ≤ in·out at B=8 for the two middle layers: their means are kept factored.
    Case("mlp-wide-gram", lambda: nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 32, bias=False), nn.Tanh(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 3)), randn(5), labels(3)),
    Case("mse-mlp", lambda: nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)), randn(5), randn(2), nn.MSELoss),
    Case("seq-linear", lambda: SeqHead(nn.Linear(4, 5), 5), randn(7, 4), labels(3)),
    Case("seq-linear-gram", lambda: SeqHead(nn.Linear(16, 16), 16), randn(3, 16), labels(3)),
    Case("conv1d", lambda: nn.Sequential(nn.Conv1d(2, 4, 3, stride=2, padding=1, dilation=1), nn.Tanh(), nn.Conv1d(4, 6, 3, groups=2, dilation=2, padding="same"), nn.Flatten(), nn.Linear(30, 3)), randn(2, 9), labels(3)),
    Case("conv1d-single-channel", lambda: nn.Sequential(nn.Unflatten(1, (1, 11)), nn.Conv1d(1, 3, 3, stride=2, dilation=2, padding=2), nn.Flatten(), nn.Linear(18, 3)), randn(11), labels(3)),
    # few output positions, many channels: the rules take the input-Gram path (no variance)
    Case("conv1d-gram", lambda: nn.Sequential(nn.Conv1d(4, 16, 3, stride=2, padding=1), nn.Tanh(), nn.Conv1d(16, 16, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(48, 3)), randn(4, 10), labels(3)),
    Case("conv2d-gram", lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Flatten(), nn.Linear(144, 3)), randn(8, 3, 3), labels(3)),
    Case("conv2d", lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=(1, 2)), nn.Tanh(), nn.Conv2d(4, 4, 2, groups=4, bias=False), nn.Flatten(), nn.Linear(4 * 4 * 2, 3)), randn(2, 5, 6), labels(3)),
    Case("embedding", lambda: nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.Flatten(), nn.Linear(20, 3)), ids(10, 5), labels(3)),
    Case("layernorm", lambda: SeqHead(nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6)), 6), randn(5, 4), labels(3)),
    Case("groupnorm", lambda: tasks.gn_cnn(channels=8, groups=2), randn(40), labels(10)),
    Case("rmsnorm", rms_model, randn(5), labels(3)),
    Case("mha", lambda: SeqHead(nn.MultiheadAttention(6, 2, batch_first=True), 6), randn(5, 6), labels(3)),
    Case("mha-seq-first", lambda: SeqHead(nn.MultiheadAttention(6, 2), 6, batch_first=False), randn(5, 6), labels(3)),
    Case("mha-masked", MaskedAttention, randn(5, 6), labels(3)),
    Case("mha-kdim", lambda: SeqHead(KdimAttention(), 6), randn(5, 6), labels(3)),
    Case("lstm", lambda: SeqHead(nn.LSTM(4, 5, batch_first=True), 5), randn(6, 4), labels(3)),
    Case("gru", lambda: SeqHead(nn.GRU(4, 5, batch_first=True), 5), randn(6, 4), labels(3)),
    Case("tied", TiedLM, ids(11, 5), labels(11)),
    Case("frozen", frozen_mlp, randn(5), labels(3)),
    Case("raw-parameter", Scaled, randn(4), labels(3)),
    Case("two-inputs", TwoInputs, lambda g, b: (torch.randn(b, 4, generator=g), torch.randn(b, 2, generator=g)), labels(3)),
    Case("reused-module", Reused, randn(4), labels(3)),
    Case("transformer", lambda: tasks.tiny_transformer(vocab=8, dim=8, heads=2, max_len=6, classes=3), ids(8, 6), labels(3)),
    Case("mnist1d-cnn", lambda: tasks.mnist1d_cnn(channels=6), randn(40), labels(10)),
    Case("resnet-block", ResNetBlock, randn(3, 6, 6), labels(3)),
    # wpe(arange(T)) is off the batch (traced, not inferred from T ≠ B; T == B is tested in
    # test_silent_errors): whole-model vmap for that parameter
    Case("nanogpt-block", NanoGPTBlock, ids(9, 5), labels(9)),
]


class LastTokenLoss(nn.Module):
    """Cross-entropy of a Hugging Face model output's last-position logits (``loss_fn`` reads
    ``outputs.logits``, as the README's recipe does)."""

    def forward(self, outputs, targets):
        return nn.functional.cross_entropy(outputs.logits[:, -1], targets)


def gpt2():
    """GPT-2 from a config (no weights downloaded): Conv1D projections, wpe(arange(T)), tied
    input and output embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


try:  # transformers is an optional extra (installed by the dev extra)
    import transformers  # noqa: F401

    CASES.append(Case("gpt2", gpt2, ids(13, 5), labels(13), loss=LastTokenLoss))
except ImportError:
    pass
CASES_BY_NAME = {c.name: c for c in CASES}
