"""Time to λ_max of the MNIST-1D MLP Hessian on 4000 examples, against the anchors.

    python -m benchmarks.bench_sharpness [--device cuda] [--threads 2] [--repeats 3]

The model is trained briefly (SGD, 300 steps), then put in eval mode. The reference λ_max
is ARPACK Lanczos to 1e-10 with its residual checked. Rows: gradnoise Lanczos (checked after every
product; its products in closed form, hvp="auto") at its default tolerance (1e-3) and at
1e-4, the same at 1e-3 with autograd's double-backward products, gradnoise's ARPACK path (scipy eigsh)
at 1e-3, power iteration at 1e-4 (residual based), PyHessian's power iteration at its default tol (1e-3) and at
1e-6, curvlinops' HessianLinearOperator with scipy eigsh (where installed). Each row:
median seconds, Hessian-vector products, relative error of λ_max, and the time ratio to
the fastest anchor that reached 1e-4.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

import gradnoise as gn
from gradnoise.measure import train_sgd
from gradnoise.tasks import mnist1d_data, mnist1d_mlp


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x, y, _, _ = mnist1d_data()
    torch.manual_seed(0)
    model = mnist1d_mlp()
    loss_fn = nn.CrossEntropyLoss()
    train_sgd(model, loss_fn, x, y, steps=300, batch=64, lr=0.05, seed=0)
    model = model.to(device).eval()
    x, y = x.to(device), y.to(device)
    ref = gn.hessian_eigenvalues(model, loss_fn, (x, y), tol=1e-10, method="arpack")
    lam = ref.eigenvalues[0]
    print(f"# {platform.machine()}, {args.threads} threads, torch {torch.__version__}, device {device}")
    print(f"# reference λ_max = {lam:.10g} (ARPACK Lanczos, residual {ref.residuals[0]:.1e}), MNIST-1D MLP, 4000 examples")
    rows = {}

    def run(label, fn):
        times, outs = [], []
        for _ in range(args.repeats):
            t, out = timed(fn, device)
            times.append(t)
            outs.append(out)
        val, hvps = outs[-1]
        rows[label] = (statistics.median(times), hvps, abs(val - lam) / abs(lam))
        print(f"  {label}: {rows[label][0]:.2f} s, {hvps} HVPs, rel. error {rows[label][2]:.1e}", file=sys.stderr)

    def ours(method, tol, hvp="auto"):
        def fn():
            e = gn.hessian_eigenvalues(model, loss_fn, (x, y), tol=tol, method=method, seed=1, hvp=hvp)
            return e.eigenvalues[0], e.num_hvps
        return fn

    run("gradnoise Lanczos (default tol 1e-3)", ours("lanczos", 1e-3))
    run("gradnoise Lanczos (tol 1e-4)", ours("lanczos", 1e-4))
    run("gradnoise Lanczos (tol 1e-3, hvp='double-backward')", ours("lanczos", 1e-3, "double-backward"))
    run("gradnoise ARPACK eigsh (tol 1e-3)", ours("arpack", 1e-3))
    run("gradnoise power iteration (tol 1e-4)", ours("power", 1e-4))

    try:
        from pyhessian import hessian as PyHessian

        def pyh(tol):
            def fn():
                m = copy.deepcopy(model)
                h = PyHessian(m, loss_fn, data=(x, y), cuda=device.type == "cuda")
                calls = [0]
                ph = sys.modules["pyhessian.hessian"]  # the package's `hessian` name is the class
                real = ph.hessian_vector_product

                def counting(*a, **k):
                    calls[0] += 1
                    return real(*a, **k)

                ph.hessian_vector_product = counting
                try:
                    vals, _ = h.eigenvalues(maxIter=1000, tol=tol, top_n=1)
                finally:
                    ph.hessian_vector_product = real
                return float(vals[0]), calls[0]
            return fn

        run("PyHessian power iteration (default tol 1e-3)", pyh(1e-3))
        run("PyHessian power iteration (tol 1e-6)", pyh(1e-6))
    except ImportError as exc:
        print(f"# PyHessian skipped: {exc}", file=sys.stderr)
    try:
        from curvlinops import HessianLinearOperator
        from scipy.sparse.linalg import eigsh

        def cl():
            params = [p for p in model.parameters() if p.requires_grad]
            H = HessianLinearOperator(model, loss_fn, params, [(x, y)], check_deterministic=False)
            H = H.to_scipy() if hasattr(H, "to_scipy") else H
            calls = [0]
            from scipy.sparse.linalg import LinearOperator

            def mv(v):
                calls[0] += 1
                return H @ v

            val = eigsh(LinearOperator(H.shape, matvec=mv, dtype=np.float32), k=1, which="LA")[0][0]
            return float(val), calls[0]

        run("curvlinops + scipy eigsh (defaults)", cl)
    except Exception as exc:
        print(f"# curvlinops skipped: {type(exc).__name__}: {exc}", file=sys.stderr)

    anchors = {k: v for k, v in rows.items() if not k.startswith("gradnoise") and v[2] <= 1e-4}
    best = min((v[0] for v in anchors.values()), default=None)
    print("| method | median s | HVPs | rel. error of λ_max | × best anchor at ≤ 1e-4 |")
    print("|---|---|---|---|---|")
    for label, (t, hvps, err) in rows.items():
        ratio = f"{t / best:.2f}" if best else "n/a"
        print(f"| {label} | {t:.2f} | {hvps} | {err:.1e} | {ratio} |")


if __name__ == "__main__":
    main()
