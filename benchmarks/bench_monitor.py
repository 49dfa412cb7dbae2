"""Per-step overhead of gradnoise.Monitor on the MNIST-1D MLP, against the same training
step without it, in the same process.

    python -m benchmarks.bench_monitor [--threads 2] [--batch 128] [--steps 300]

Rows: the plain step (forward, backward, SGD step); with the noise scale every step
(hooks mode: no extra forward/backward); with the noise scale and per-element variance /
GSNR every step; separate mode (one extra forward+backward per step); and λ_max every 100
steps on a fixed set of B or 2B examples (Lanczos warm-started from the previous
eigenvector, stopped at a relative residual of 1e-2 or 1e-3), amortised over the run (the
first, cold evaluation included). Each row: median seconds per step over repeated
blocks of steps (interleaved with the plain block) and the ratio to the plain step. Then
the same configurations in lockstep (one plain and one monitored step in turn, so that the
machine's drift hits both alike): the median step ratio, and the amortised ratio of total
times (the number for schedules that skip steps, λ_max included).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch import nn

import gradnoise as gn
from gradnoise.tasks import mnist1d_data, mnist1d_mlp


def block(model, opt, x, y, batch, steps, monitor=None, seed=0, calls=None):
    """Seconds per step of a block; ``calls`` collects (step, seconds) of each monitor call."""
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(xb), yb)
        loss.backward()
        if monitor is not None:
            t = time.perf_counter()
            monitor.step(xb, yb, optimizer=opt, loss=loss)
            if calls is not None:
                calls.append((step, time.perf_counter() - t))
        opt.step()
    return (time.perf_counter() - start) / steps


def advance(runs, x, y, batch, steps, g, loss_fn) -> None:
    """``steps`` training steps of every run ``(model, opt, monitor or None, times)`` in turn
    on the same batches; each step's seconds appended to its run's ``times``."""
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        for model, opt, mon, times in runs:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            if mon is not None:
                mon.step(xb, yb, optimizer=opt, loss=loss)
            opt.step()
            times.append(time.perf_counter() - t)


def lockstep(x, y, batch, steps, kw, seed=0):
    """Per-step seconds of a plain and a monitored run advanced in lockstep (one step of
    each in turn), so that drifts of the machine hit both alike; returns both lists."""
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for monitored in (False, True):
        torch.manual_seed(0)
        model = mnist1d_mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        runs.append((model, opt, gn.Monitor(model, loss_fn, **kw) if monitored else None, []))
    advance(runs, x, y, batch, steps, g, loss_fn)
    mon = runs[1][2]
    mon.close()
    assert mon.errors == 0, mon.errors
    return runs[0][3], runs[1][3]


def adam_lockstep(x, y, batch, steps, seed=0, variance=False, every=1):
    """Per-step seconds of three AdamW runs advanced in lockstep: plain, the Monitor's noise
    scale (hooks), and the same with the preconditioned metric (``preconditioner=opt``)."""
    g = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    runs = []
    for kind in ("plain", "hooks", "precond"):
        torch.manual_seed(0)
        model = mnist1d_mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pre = opt if kind == "precond" else None
        mon = None if kind == "plain" else gn.Monitor(model, loss_fn, variance=variance, preconditioner=pre, every=every)
        runs.append((model, opt, mon, []))
    advance(runs, x, y, batch, steps, g, loss_fn)
    for _, _, mon, _ in runs[1:]:
        mon.close()
        assert mon.errors == 0, mon.errors
    assert all(torch.equal(a, b) for a, b in zip(runs[0][0].parameters(), runs[2][0].parameters(), strict=True))
    return [times for *_, times in runs]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=300, help="steps per timed block")
    p.add_argument("--sharpness-steps", type=int, default=1000, help="steps per block for the λ_max rows (one cold evaluation, then warm ones)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default=None, help="run the configurations whose label contains this text")
    p.add_argument("--lockstep-steps", type=int, default=2000, help="steps of the lockstep comparison")
    p.add_argument("--adam-only", action="store_true", help="only the AdamW rows (the preconditioned metric)")
    p.add_argument("--every", type=int, default=1, help="the AdamW rows' noise schedule (default: every step)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, y, _, _ = mnist1d_data()
    fixed = (x[: args.batch], y[: args.batch])
    big = (x[: 2 * args.batch], y[: 2 * args.batch])
    if args.adam_only:
        return adam_table(x, y, args)
    configs = {
        "noise scale every step (hooks)": dict(every=1),
        "noise scale + variance/GSNR every step (hooks)": dict(every=1, variance=True),
        "noise scale every step (separate mode)": dict(every=1, mode="separate"),
        "noise scale every 10 steps": dict(every=10),
        "λ_max every 100 steps (B examples, tol 1e-2)": dict(every=None, sharpness_every=100, sharpness_data=fixed),
        "λ_max every 100 steps (2B examples, tol 1e-2)": dict(every=None, sharpness_every=100, sharpness_data=big),
        "λ_max every 100 steps (B examples, tol 1e-3)": dict(every=None, sharpness_every=100, sharpness_data=fixed, sharpness_tol=1e-3),
        "noise scale every step + λ_max every 100 steps (B examples)": dict(every=1, sharpness_every=100, sharpness_data=fixed),
    }
    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__}, MNIST-1D MLP, B={args.batch}, {args.steps} steps per block")
    print("| configuration | ms / step | × plain step |")
    print("|---|---|---|")
    base_all, steady = [], {}
    for label, kw in configs.items():
        if args.only and args.only not in label:
            continue
        plain, watched, calls = [], [], []
        steps = args.sharpness_steps if "sharpness_every" in kw else args.steps
        for r in range(args.repeats):
            torch.manual_seed(0)
            m1 = mnist1d_mlp()
            o1 = torch.optim.SGD(m1.parameters(), lr=0.05, momentum=0.9)
            plain.append(block(m1, o1, x, y, args.batch, steps, seed=r))
            torch.manual_seed(0)
            m2 = mnist1d_mlp()
            o2 = torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9)
            mon = gn.Monitor(m2, nn.CrossEntropyLoss(), **kw)
            watched.append(block(m2, o2, x, y, args.batch, steps, monitor=mon, seed=r, calls=calls))
            mon.close()
            assert mon.errors == 0, mon.errors
            hvps = [r["lambda_max_hvps"] for r in mon.history.records if r.get("lambda_max_hvps")]
        base, t = statistics.median(plain), statistics.median(watched)
        base_all.append(base)
        note = f" (HVPs per λ_max: first {hvps[0]}, then {min(hvps[1:])}–{max(hvps[1:])})" if len(hvps) > 1 else ""
        print(f"| {label}{note} | {1e3 * t:.2f} | {t / base:.2f} |", flush=True)
        every = kw.get("sharpness_every")
        if every and kw.get("every") is None:  # warm evaluations only: the steady state of a long run
            warm = [c for st, c in calls if st % every == 0 and st > 0]
            steady[label] = (statistics.median(warm), 1 + statistics.median(warm) / (every * base))
    print(f"| *plain step (median over all blocks)* | {1e3 * statistics.median(base_all):.2f} | 1.00 |")
    chosen = {k: v for k, v in configs.items() if not args.only or args.only in k}
    if chosen:
        print(f"\nLockstep: one plain and one monitored step in turn, {args.lockstep_steps} steps (the first 50,")
        print("with the cold λ_max evaluation, left out): median per step, and amortised = total")
        print("monitored time / total plain time, λ_max evaluations included.\n")
        print("| configuration | plain ms | monitored ms | × plain step (median) | amortised × |")
        print("|---|---|---|---|---|")
        for label, kw in chosen.items():
            p, w = lockstep(x, y, args.batch, args.lockstep_steps, kw)
            p, w = p[50:], w[50:]
            pm, wm = statistics.median(p), statistics.median(w)
            print(f"| {label} | {1e3 * pm:.2f} | {1e3 * wm:.2f} | {wm / pm:.2f} | {sum(w) / sum(p):.3f} |", flush=True)
    if steady:
        print("\nSteady state of a long run (the first, cold evaluation excluded): median seconds of a warm")
        print("λ_max evaluation, and 1 + that / (100 plain steps).\n")
        print("| configuration | warm evaluation ms | amortised × plain step |")
        print("|---|---|---|")
        for label, (sec, ratio) in steady.items():
            print(f"| {label} | {1e3 * sec:.1f} | {ratio:.3f} |")

    adam_table(x, y, args)


def adam_table(x, y, args) -> None:
    # measured every k > 1 steps, the cost per training step is the mean (the median would
    # be that of the unmeasured steps)
    stat, name = (statistics.median, "median") if args.every == 1 else (statistics.fmean, "mean")
    print(f"\nAdamW, lockstep of three runs, {args.lockstep_steps} steps (the first 50 left out), measured every")
    print(f"{args.every} step(s): {name} ms per step; the preconditioned metric's own cost is the difference of the last two rows.\n")
    print("| configuration | ms / step | × plain AdamW step |")
    print("|---|---|---|")
    for variance in (False, True):
        runs = adam_lockstep(x, y, args.batch, args.lockstep_steps, variance=variance, every=args.every)
        pm, hm, wm = (stat(ts[50:]) for ts in runs)
        tag = " + variance/GSNR" if variance else ""
        print(f"| plain AdamW step | {1e3 * pm:.2f} | 1.00 |")
        when = "every step" if args.every == 1 else f"every {args.every} steps"
        print(f"| noise scale{tag} {when} (hooks) | {1e3 * hm:.2f} | {hm / pm:.2f} |")
        print(f"| + preconditioned noise scale (preconditioner=opt) | {1e3 * wm:.2f} | {wm / pm:.2f} |")
        print(f"| *the preconditioned metric alone{tag}* | {1e3 * (wm - hm):.2f} | {(wm - hm) / pm:.2f} |", flush=True)


if __name__ == "__main__":
    main()
