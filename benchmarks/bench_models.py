"""The noise statistics on the models researchers train, against a plain training step.

    python -m benchmarks.bench_models [--models nanogpt,encoder,gpt2,nanogpt-50k,resnet,lstm,gru-packed]
        [--threads 2] [--budget 3] [--anchors] [--no-memory] [--autocast]
        [--device cuda] [--size gpu]

Models (held out from the engine's design; CPU sizes): a nanoGPT-style decoder (4 layers,
d 256, T 128, B 16, ``wpe(arange(T))``, tied embeddings), the same with
``nn.TransformerEncoderLayer``, GPT-2 from a ``transformers`` config (2 layers; where
installed), nanoGPT with a 50k vocabulary (1 layer), a small ResNet (BatchNorm in eval,
3×32×32, B 64), Embedding → LSTM → Linear, and a GRU classifier on packed sequences of
their own lengths (16 to 64). Rows: ``gradient_stats(variance=False)``
(auto), the same with the per-element variance, ``method="vmap"``, and with ``--anchors``
BackPACK (BatchL2Grad) and Opacus where they run (models with an ``nn.CrossEntropyLoss``
on one label per example: not the language models, whose loss is per token); their floor
is a plain forward + backward of the same model and batch. One more row per model: an
AdamW training step with ``gn.Monitor(every=1)`` (the mode it chose in the label), whose
floor is the same step on an identical model without it. Each: the median times of the call
and the floor, run in turn in the same process, the median over those pairs of their ratio,
and the peak-memory ratio measured in a fresh child process. ``--device cuda`` runs it all on the GPU (memory: the allocator's peak);
``--size gpu`` takes sizes that occupy a GPU instead of the CPU sizes above (nanoGPT d 768,
12 heads, T 256, B 32; the ResNet at B 256; the LSTM and the packed GRU at d 512, B 64), so that the ratios
are not those of kernel-launch latency.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import subprocess
import sys

import torch
from torch import nn

import gradnoise as gn
from benchmarks._timing import interleaved_times, pair_ratio, peak_bytes, track_rss
from benchmarks.bench_engine import anchors
from gradnoise.tasks import CausalBlock, TokenLoss


class NanoGPT(nn.Module):
    """nanoGPT's model: token and position embeddings, pre-norm blocks, tied head; predicts
    every next token."""

    def __init__(self, vocab=512, d=256, layers=4, heads=4, T=128, encoder=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(T, d)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
            if encoder else CausalBlock(d, heads) for _ in range(layers)
        )  # fmt: skip
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        return self.head(self.lnf(x))


class LSTMModel(nn.Module):
    def __init__(self, vocab=512, d=128):
        super().__init__()
        self.embed, self.lstm, self.head = nn.Embedding(vocab, d), nn.LSTM(d, d, batch_first=True), nn.Linear(d, vocab)

    def forward(self, idx):
        return self.head(self.lstm(self.embed(idx))[0])


class PackedGRU(nn.Module):
    """A classifier of sequences of their own lengths (token 0 pads): embedding, a GRU on the
    packed batch, a head on the final state."""

    def __init__(self, vocab=512, d=128, classes=10):
        super().__init__()
        self.embed, self.gru, self.head = nn.Embedding(vocab, d), nn.GRU(d, d, batch_first=True), nn.Linear(d, classes)

    def forward(self, idx):
        lengths = (idx != 0).sum(1).cpu()
        seq = nn.utils.rnn.pack_padded_sequence(self.embed(idx), lengths, batch_first=True, enforce_sorted=False)
        return self.head(self.gru(seq)[1][-1])


def resnet():
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                             nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())  # fmt: skip

    return nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 128, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(128, 10)).eval()  # fmt: skip


SIZES = {  # (B, T, d, heads) of the language models; B of the ResNet; (B, T, d) of the LSTM
    "cpu": {"lm": (16, 128, 256, 4), "resnet": 64, "lstm": (16, 64, 128)},
    "gpu": {"lm": (32, 256, 768, 12), "resnet": 256, "lstm": (64, 128, 512)},
}


def make(name: str, size: str = "cpu", device: str = "cpu"):
    """``(model, loss_fn, inputs, targets)`` on ``device``, with a fixed seed."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    (B, T, d, heads), sz = SIZES[size]["lm"], SIZES[size]
    if name in ("nanogpt", "encoder", "nanogpt-50k"):
        vocab, layers = (50257, 1) if name == "nanogpt-50k" else (512, 4)
        model = NanoGPT(vocab=vocab, d=d, layers=layers, heads=heads, T=T, encoder=name == "encoder")
        loss_fn, x, y = TokenLoss(), *(torch.randint(0, vocab, (B, T), generator=g) for _ in range(2))
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=512, n_positions=T, n_embd=d, n_layer=2, n_head=heads, resid_pdrop=0.0,
                         embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
        model, loss_fn, x, y = GPT2LMHeadModel(cfg), TokenLoss(), *(torch.randint(0, 512, (B, T), generator=g) for _ in range(2))
    elif name == "resnet":
        B = sz["resnet"]
        model, loss_fn = resnet(), nn.CrossEntropyLoss()
        x, y = torch.randn(B, 3, 32, 32, generator=g), torch.randint(0, 10, (B,), generator=g)
    elif name == "lstm":
        B, T, d = sz["lstm"]
        model, loss_fn, x, y = LSTMModel(d=d), TokenLoss(), *(torch.randint(0, 512, (B, T), generator=g) for _ in range(2))
    elif name == "gru-packed":
        B, T, d = sz["lstm"]
        model, loss_fn = PackedGRU(d=d), nn.CrossEntropyLoss()
        x = torch.randint(1, 512, (B, T), generator=g)
        x[torch.arange(T) >= torch.randint(T // 4, T + 1, (B, 1), generator=g)] = 0  # lengths from T/4 to T
        y = torch.randint(0, 10, (B,), generator=g)
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(device), loss_fn, x.to(device), y.to(device)


def calls(name, model, loss_fn, x, y, with_anchors: bool, autocast: bool = False) -> dict:
    """Rows: label → (floor, call)."""
    floor = floor_of(model, loss_fn, x, y)
    out = {
        "gradient_stats (auto, no variance)": lambda: gn.gradient_stats(model, loss_fn, x, y, variance=False),
        "gradient_stats (auto, variance)": lambda: gn.gradient_stats(model, loss_fn, x, y),
        "gradient_stats (vmap, no variance)": lambda: gn.gradient_stats(model, loss_fn, x, y, method="vmap", variance=False),
    }
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        out["convolutions' weight gradients alone (the least the monitor adds)"] = conv_weight_grads(model, x)
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        out["recurrences' backward alone, torch's fused kernel (the least the monitor adds)"] = rnn_backward(model, x)
    if with_anchors and isinstance(loss_fn, nn.CrossEntropyLoss):
        found = anchors(model, loss_fn, x, y)
        out.update({k: v for k, v in found.items() if "Variance" not in k})
    rows = {label: (floor, c) for label, c in out.items()}
    return {**rows, **monitor_rows(model, loss_fn, x, y, autocast)}


def conv_weight_grads(model, x):
    """Every convolution's weight gradient alone, on its inputs and output-gradient shapes in
    this batch: what per-example products cost at least, and so what a monitor (which cannot
    skip the step's own weight gradients) adds at least on a convolutional network."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o: calls.append((m, a[0].detach(), torch.ones_like(o))))
             for m in model.modules() if isinstance(m, nn.Conv2d)]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    def weight_grads():
        for m, a, d in calls:
            torch.ops.aten.convolution_backward(d, a, m.weight, None, m.stride, m.padding, m.dilation, False, (0, 0),
                                                m.groups, (False, True, False))  # fmt: skip

    return weight_grads


def rnn_backward(model, x):
    """Every recurrent layer's backward pass alone, to its input (torch's fused kernel, on a
    graph kept for the purpose), on this batch's inputs: the gates' gradients that
    per-example norms need are formed inside that kernel and never shown, so a monitor must
    run at least this much again after the step's own backward pass."""
    calls = []
    hooks = [m.register_forward_hook(lambda m, a, o: calls.append((m, a))) for m in model.modules()
             if isinstance(m, nn.RNNBase)]  # fmt: skip
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    graphs = []
    for module, args in calls:
        packed = isinstance(args[0], nn.utils.rnn.PackedSequence)
        inp = (args[0].data if packed else args[0]).detach().requires_grad_()
        out = module(args[0]._replace(data=inp) if packed else inp, *args[1:])[0]
        out = out.data if packed else out
        graphs.append((inp, out, torch.ones_like(out)))

    def backward():
        for inp, out, d in graphs:
            torch.autograd.grad(out, inp, d, retain_graph=True)

    return backward


def monitor_rows(model, loss_fn, x, y, autocast: bool = False) -> dict:
    """An AdamW training step with the Monitor measuring every step, against the same step
    on an identical model without it (both under bfloat16 autocast with ``autocast``)."""
    watched = copy.deepcopy(model)
    opt_plain = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt_watched = torch.optim.AdamW(watched.parameters(), lr=1e-5)
    mon = gn.Monitor(watched, loss_fn, every=1)

    def step(m, opt, monitor=None):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(m(x), y)
        loss.backward()
        if monitor is not None:
            monitor.step(x, y)
        opt.step()

    label = f"Monitor ({mon.mode}) AdamW step, every step{', bf16 autocast' if autocast else ''}"
    return {label: (lambda: step(model, opt_plain), lambda: step(watched, opt_watched, mon))}


def floor_of(model, loss_fn, x, y):
    def floor():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    return floor


def memory_child(name: str, with_anchors: bool, size: str, device: torch.device) -> None:
    track_rss()
    model, loss_fn, x, y = make(name, size, device)
    out = {}
    for label, (floor, c) in calls(name, model, loss_fn, x, y, with_anchors).items():
        try:
            c(), floor()  # warm up: one-time allocations are not peaks
            model.zero_grad(set_to_none=True)
            out[label] = (peak_bytes(floor, device), peak_bytes(c, device))
        except Exception as exc:  # noqa: BLE001
            out[label] = f"fails: {type(exc).__name__}"
    print(json.dumps(out))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="nanogpt,encoder,gpt2,nanogpt-50k,resnet,lstm,gru-packed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=3.0, help="seconds per row")
    p.add_argument("--anchors", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--autocast", action="store_true", help="the Monitor rows under bfloat16 autocast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="model and batch sizes (see above)")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_of:
        return memory_child(args.memory_of, args.anchors, args.size, device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()}, {args.threads} threads"
    print(f"# {where}, torch {torch.__version__}, sizes: {args.size}{', bf16 autocast' if args.autocast else ''}")
    print("| model | call | floor ms | call ms | × floor | peak memory × floor |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        try:
            model, loss_fn, x, y = make(name, args.size, device)
        except ImportError as exc:
            print(f"| {name} | skipped ({exc}) | | | | |")
            continue
        mem = {}
        if not args.no_memory:
            cmd = [sys.executable, "-m", "benchmarks.bench_models", "--threads", str(args.threads), "--memory-of", name,
                   "--size", args.size, "--device", args.device]  # fmt: skip
            res = subprocess.run(cmd + (["--anchors"] if args.anchors else []), capture_output=True, text=True)
            mem = json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else {}
        for label, (floor, c) in calls(name, model, loss_fn, x, y, args.anchors, args.autocast).items():
            try:
                fs, cs = interleaved_times(floor, c, device, budget_s=args.budget, min_reps=3)
                f, t = statistics.median(fs), statistics.median(cs)
            except Exception as exc:  # noqa: BLE001  (an anchor that does not support the model)
                print(f"| {name} | {label} | | fails: {type(exc).__name__} | | |", flush=True)
                continue
            m = mem.get(label)
            ratio = f"{m[1] / m[0]:.2f}" if isinstance(m, list) and m[0] else (m or "")
            print(f"| {name} | {label} | {1e3 * f:.1f} | {1e3 * t:.1f} | {pair_ratio(fs, cs):.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
