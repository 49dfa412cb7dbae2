"""Per-example gradients and gradient statistics against a plain forward + backward.

    python -m benchmarks.bench_engine [--device cuda] [--models mlp,cnn,transformer]
        [--sizes 128,512,2048] [--threads 2] [--anchors] [--budget 2.0] [--out FILE]

Rows per model and batch size: the floor (plain forward + backward, ``loss.backward()``),
gradnoise's noise-scale statistics (``gradient_stats(method="fast", variance=False)``:
tr Σ, |G|², B_simple), the same with the per-element variance (and once more reading the
GSNR, which is computed when first read), the bare hooks design (tr Σ and |G|² with
nothing else: for Linear-only models with every weight gradient, and with the Gram path as
the engine takes it; for the CNN with the engine's own layer rules as it routes them; each
the lower bound of the design), ``method="vmap"``,
``per_sample_grads`` (vmap), a Python loop of ``autograd.grad`` (smallest batch only), and,
with ``--anchors`` where installed, BackPACK (BatchL2Grad, Variance) and Opacus
(GradSampleModule, per-sample gradients then their norms). Each row: median time, ratio to
the floor measured in the same process, and the peak-memory ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

import gradnoise as gn
from benchmarks._timing import interleaved_medians, peak_bytes, track_rss
from gradnoise.rules import prefers_gram, rule_for
from gradnoise.tasks import mnist1d_cnn, mnist1d_mlp, tiny_transformer


def make(name: str, batch: int, device: torch.device):
    torch.manual_seed(0)
    if name == "transformer":
        model = tiny_transformer(vocab=16, dim=64, heads=4, num_layers=2, max_len=64, classes=4).eval()
        x = torch.randint(0, 16, (batch, 64))
        y = torch.randint(0, 4, (batch,))
    else:
        model = (mnist1d_mlp() if name == "mlp" else mnist1d_cnn())
        x = torch.randn(batch, 40)
        y = torch.randint(0, 10, (batch,))
    return model.to(device), nn.CrossEntropyLoss(), x.to(device), y.to(device)


def anchors(model, loss_fn, x, y):
    """Callables for the anchor libraries that are installed (never dependencies)."""
    out = {}
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad, Variance

        bmodel, bloss = extend(model_copy(model)), extend(nn.CrossEntropyLoss())  # extend() adds hooks

        def bp(ext, field):
            def run():
                bmodel.zero_grad(set_to_none=True)
                with backpack(ext()):
                    bloss(bmodel(x), y).backward()
                # BackPACK only warns for a layer it has no extension for (an RNN): not a measurement of the model
                missing = [n for n, p in bmodel.named_parameters() if p.requires_grad and getattr(p, field, None) is None]
                if missing:
                    raise RuntimeError(f"BackPACK's {ext.__name__} does not cover {missing[0]}")
            return run

        out["BackPACK BatchL2Grad"] = bp(BatchL2Grad, "batch_l2")
        out["BackPACK Variance"] = bp(Variance, "variance")
    except Exception as exc:  # not installed or the model is unsupported
        print(f"# BackPACK skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    try:
        from opacus import GradSampleModule

        omodel = GradSampleModule(model_copy(model))

        def opacus_norms():
            omodel.zero_grad(set_to_none=True)
            loss_fn(omodel(x), y).backward()
            return torch.stack([p.grad_sample.flatten(1).square().sum(1) for p in omodel.parameters()]).sum(0)

        out["Opacus GradSampleModule"] = opacus_norms
    except Exception as exc:
        print(f"# Opacus skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    return out


def _linears_with_bias(model) -> list[nn.Linear] | None:
    """The model's Linear layers when they hold all its trainable parameters and each has a
    bias (the models the bare rows cover); else ``None``."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    params = [p for p in model.parameters() if p.requires_grad]
    if sum(len(list(m.parameters())) for m in linears) != len(params) or any(m.bias is None for m in linears):
        return None
    return linears


def bare_hooks(model, loss_fn, x, y, gram: bool):
    """The hooks design with nothing else: tr Σ and |G|² of a model made of Linear layers
    (with biases) on 2-D inputs, without checks, plans, per-layer results or a result object;
    checked against ``gradient_stats`` before it is timed; ``None`` for other models.

    ``gram=False``: |g_i|² = |a_i|²|δ_i|² and every weight gradient from the backward pass
    (the floor of the design before the Gram path). ``gram=True``: as the engine now does,
    layers where ``prefers_gram`` holds skip the weight gradient and take |g_i|² and |ḡ_W|²
    from the Gram matrices AAᵀ, DDᵀ (the floor of the current design)."""


    linears = _linears_with_bias(model)
    if linears is None:
        return None
    B = x.shape[0]
    use_gram = {m: gram and prefers_gram(B, m.in_features, m.out_features) for m in linears}
    wanted = [p for m in linears for p in ([m.bias] if use_gram[m] else [m.weight, m.bias])]

    def run():
        a_sq, d_sq, w_sq, g_sq = [], [], [], []

        def forward_hook(module, args, out):
            a = args[0]
            if use_gram[module]:
                def on_grad(g):
                    ga, gd = a @ a.t(), g @ g.t()
                    w_sq.append(ga.diagonal() * gd.diagonal())
                    d_sq.append(gd.diagonal())
                    g_sq.append(ga.flatten().dot(gd.flatten()))
            else:
                a_sq.append(torch.linalg.vector_norm(a, dim=1).square())

                def on_grad(g):
                    d = torch.linalg.vector_norm(g, dim=1).square()
                    d_sq.append(d)
                    w_sq.append(a_sq.pop() * d)
            out.register_hook(on_grad)

        handles = [m.register_forward_hook(forward_hook) for m in linears]
        try:
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, wanted)
        finally:
            for h in handles:
                h.remove()
        mean_sq = torch.stack(torch._foreach_norm(grads)).double().square().sum()
        if g_sq:
            mean_sq = mean_sq + torch.stack(g_sq).double().sum()
        return _trace_and_grad_sq(w_sq + d_sq, mean_sq, B)  # weights' and biases' |g_i|²

    return _checked(run, model, loss_fn, x, y)


def _trace_and_grad_sq(sq: list, mean_sq, B: int) -> list[float]:
    """tr Σ and |G|² from the |g_i|² rows of ∂L/∂out (scaled by B² here) and |ḡ|²."""
    m2 = (torch.stack(sq).double() * (B * B)).sum() - B * mean_sq
    s2 = m2 / (B - 1)
    return torch.stack([s2, mean_sq - s2 / B]).tolist()


def _checked(run, model, loss_fn, x, y):
    """``run`` after checking its tr Σ and |G|² against ``gradient_stats``."""
    ref = gn.gradient_stats(model, loss_fn, x, y, method="fast", variance=False)
    got = run()
    if not (abs(got[0] - ref.trace_cov) <= 1e-4 * ref.trace_cov and abs(got[1] - ref.grad_norm_sq) <= 1e-3 * abs(ref.trace_cov)):
        raise AssertionError(f"bare hooks disagree with gradient_stats: {got} vs {ref.trace_cov}, {ref.grad_norm_sq}")
    return run


def bare_variance(model, loss_fn, x, y):
    """The hooks design's per-element variance with nothing else, for models of Linear
    layers (with biases) on 2-D inputs: per layer ``Σ_i g_i² = (δ²)ᵀ(a²)`` (and ``Σ_i δ_i²``
    for the bias) in the output's hook, the mean gradient from one ``autograd.grad``, then
    ``(Σ_i g_i² − B ḡ²) / (B − 1)`` in place; no per-example norms, checks or result object;
    checked against ``gradient_stats`` before it is timed; ``None`` for other models. The
    lower bound of the design for the variance."""
    linears = _linears_with_bias(model)
    if linears is None:
        return None
    B = x.shape[0]
    wanted = [p for m in linears for p in (m.weight, m.bias)]

    def run():
        sums = []

        def forward_hook(module, args, out):
            a = args[0]

            def on_grad(g):
                d2 = torch.mul(g, g).mul_(B * B)  # δ = B · ∂L/∂out
                sums.extend((d2.t() @ torch.mul(a, a), d2.sum(0)))

            out.register_hook(on_grad)

        handles = [m.register_forward_hook(forward_hook) for m in linears]
        try:
            grads = torch.autograd.grad(loss_fn(model(x), y), wanted)
        finally:
            for h in handles:
                h.remove()
        pairs = [sums[i : i + 2] for i in range(0, len(sums), 2)][::-1]  # hooks ran last layer first
        var = [s for pair in pairs for s in pair]  # in the order of ``wanted``
        torch._foreach_addcmul_(var, list(grads), list(grads), value=-B)
        torch._foreach_mul_(var, 1.0 / (B - 1))
        return var

    ref = gn.gradient_stats(model, loss_fn, x, y, method="fast", variance=True).variance
    got = run()
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # the order of ``wanted``
    for name, v in zip(names, got, strict=True):
        torch.testing.assert_close(v, ref[name], rtol=1e-3, atol=1e-4 * float(ref[name].abs().max()))
    return run


def bare_rule_hooks(model, loss_fn, x, y):
    """The hooks design with nothing else, for models of Conv1d and Linear layers (with
    biases, Linear on 2-D inputs): tr Σ and |G|² from the engine's own layer rules, as the
    engine routes them (the first layer, whose input needs no gradient, by its moments: the
    backward pass skips its parameters), without checks, plans, per-layer results or a result
    object; checked against ``gradient_stats`` before it is timed; ``None`` for other models
    and for models without convolutions (see :func:`bare_hooks`). The lower bound of the
    design on the CNN."""


    layers = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    params = [p for p in model.parameters() if p.requires_grad]
    if (
        not any(isinstance(m, nn.Conv1d) for m in layers)
        or sum(len(list(m.parameters())) for m in layers) != len(params)
        or any(m.bias is None or rule_for(m) is None for m in layers)
    ):
        return None
    first, B = layers[0], x.shape[0]
    wanted = [p for m in layers[1:] for p in (m.weight, m.bias)]

    def run():
        sq, means, outs = [], [], []

        def forward_hook(module, args, out):
            a, rule = args[0], rule_for(module)

            def on_grad(g):
                if module is first:
                    norms, mu = rule.moments(module, a, g, False, 1.0)
                    means.extend(mu.values())
                else:
                    norms = rule.norms(module, a, g, False, 1.0)
                sq.extend(v[0] for v in norms.values())

            out.register_hook(on_grad)
            if module is first:
                outs.append(out)

        handles = [m.register_forward_hook(forward_hook) for m in layers]
        try:
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, wanted + outs)[: len(wanted)]
        finally:
            for h in handles:
                h.remove()
        mean_sq = torch.stack(torch._foreach_norm(list(grads) + means)).double().square().sum()
        return _trace_and_grad_sq(sq, mean_sq, B)

    return _checked(run, model, loss_fn, x, y)


def model_copy(model):
    import copy

    return copy.deepcopy(model)


def calls_for(name, batch, sizes, model, loss_fn, x, y, args):
    calls = {
        "gradnoise fast: noise scale": lambda: gn.gradient_stats(model, loss_fn, x, y, method="fast", variance=False),
        "gradnoise fast: + variance": lambda: gn.gradient_stats(model, loss_fn, x, y, method="fast", variance=True).variance,
        # the GSNR is computed when first read: this row reads it
        "gradnoise fast: + variance, GSNR read": lambda: gn.gradient_stats(model, loss_fn, x, y, method="fast", variance=True).gsnr,
    }
    for gram, label in ((False, "bare hooks, all weight gradients"), (True, "bare hooks + Gram (lower bound)")):
        bare = bare_hooks(model, loss_fn, x, y, gram)
        if bare is not None:
            calls[label] = bare
    bare = bare_variance(model, loss_fn, x, y)
    if bare is not None:
        calls["bare hooks, variance (lower bound)"] = bare
    bare = bare_rule_hooks(model, loss_fn, x, y)
    if bare is not None:
        calls["bare hooks, engine rules (lower bound)"] = bare
    if not args.no_vmap:
        calls["gradnoise vmap: stats"] = lambda: gn.gradient_stats(model, loss_fn, x, y, method="vmap")
        calls["per_sample_grads (vmap)"] = lambda: gn.per_sample_grads(model, loss_fn, x, y)
        if batch == min(sizes):
            calls["Python loop of autograd.grad"] = lambda: gn.per_sample_grads_loop(model, loss_fn, x, y)
    if args.anchors:
        for label, call in anchors(model, loss_fn, x, y).items():
            try:  # an anchor that cannot run this model is skipped, with a note
                call()
                calls[label] = call
            except Exception as exc:
                print(f"# {label} skipped on {name}: {type(exc).__name__}: {str(exc)[:80]}", file=sys.stderr)
    return calls


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="mlp,cnn,transformer")
    p.add_argument("--sizes", default="128,512,2048")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget", type=float, default=2.0, help="seconds per row")
    p.add_argument("--anchors", action="store_true", help="time BackPACK and Opacus where installed")
    p.add_argument("--no-vmap", action="store_true", help="skip the (slow) vmap rows")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # "model:batch", child process
    return p.parse_args(argv)


def memory_child(args) -> None:
    """Peak memory of the floor and each call, in this fresh process; prints JSON."""
    track_rss()
    name, batch = args.memory_of.split(":")
    batch = int(batch)
    sizes = [64] if name == "transformer" else [int(s) for s in args.sizes.split(",")]
    device = torch.device(args.device)
    model, loss_fn, x, y = make(name, batch, device)

    def floor():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    calls = calls_for(name, batch, sizes, model, loss_fn, x, y, args)
    floor(), [c() for c in calls.values()]  # warm up: one-time allocations are not peaks
    model.zero_grad(set_to_none=True)
    out = {"floor": max(peak_bytes(floor, device), 1)}
    model.zero_grad(set_to_none=True)
    for label, call in calls.items():
        out[label] = peak_bytes(call, device)
    print(json.dumps(out))


def memory_of(name, batch, argv) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_engine", *argv, "--memory-of", f"{name}:{batch}"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_child(args)
    device = torch.device(args.device)
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, device {device}")
    print("| model | B | method | median ms | × floor | peak mem × floor |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name in args.models.split(","):
        sizes = [64] if name == "transformer" else [int(s) for s in args.sizes.split(",")]
        for batch in sizes:
            model, loss_fn, x, y = make(name, batch, device)

            def floor():
                model.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()

            mem = memory_of(name, batch, argv)
            for label, call in calls_for(name, batch, sizes, model, loss_fn, x, y, args).items():
                t_floor, t_call, reps = interleaved_medians(floor, call, device, budget_s=args.budget)
                row = {
                    "model": name, "batch": batch, "method": label, "ms": 1e3 * t_call,
                    "floor_ms": 1e3 * t_floor, "ratio": t_call / t_floor,
                    "mem_ratio": mem[label] / mem["floor"], "floor_mem_mb": mem["floor"] / 2**20, "reps": reps,
                }  # fmt: skip
                rows.append(row)
                print(f"| {name} | {batch} | {label} | {row['ms']:.2f} | {row['ratio']:.2f} | {row['mem_ratio']:.2f} |", flush=True)
            print(f"| {name} | {batch} | *floor: forward+backward* | {rows[-1]['floor_ms']:.2f} | 1.00 | 1.00 ({mem['floor'] / 2**20:.1f} MiB) |", flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
