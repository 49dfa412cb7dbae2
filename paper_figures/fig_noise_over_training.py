"""Figure: the noise scale over training (claim 3)."""

import numpy as np

from .common import args, figure, load, out


def main():
    a = args(__doc__)
    res = load("noise_over_training", a)["results"]
    fig, axes = figure(2, size=(5.2, 3.9))
    for i, run in enumerate(res["runs"]):
        recs = [r for r in run["records"] if r["trace_cov"] is not None and r["step"] > 0]
        s = np.array([r["step"] for r in recs])
        tr, g2 = np.array([r["trace_cov"] for r in recs]), np.array([r["grad_norm_sq"] for r in recs])
        w = max(1, min(20, len(tr) // 2))  # rolling ratio of averages over ≤ 20 records (200 steps)
        roll = np.convolve(tr, np.ones(w), "valid") / np.maximum(np.convolve(g2, np.ones(w), "valid"), 1e-30)
        roll = np.where(np.convolve(g2, np.ones(w), "valid") > 0, roll, np.nan)
        axes[0].plot(s[w - 1 :], roll, color=f"C{i}", lw=1.5, label=f"seed {run['seed']}: $B_{{simple}}$, ratio of averages over {w * 10} steps")
        cp = run["checkpoints"]
        steps = np.array([max(c["step"], 1) for c in cp])
        for key, marker in (("b_simple", "o"), ("b_noise", "s")):
            vals = np.array([c[key] if c[key] is not None else np.nan for c in cp], float)
            lo = np.array([c[f"{key}_interval"][0] if c[f"{key}_interval"] else np.nan for c in cp], float)
            hi = np.array([c[f"{key}_interval"][1] if c[f"{key}_interval"] else np.nan for c in cp], float)
            hi = np.where(np.isfinite(hi), hi, vals * 10)
            axes[0].errorbar(steps, vals, yerr=[vals - lo, hi - vals], fmt=marker, color=f"C{i}", ms=5, capsize=2,
                             mfc="white" if key == "b_noise" else None,
                             label=(r"$B_{\mathrm{simple}}$ (checkpoints, 95% CI)" if key == "b_simple" else r"$B_{\mathrm{noise}}$ (checkpoints)") if i == 0 else None)  # fmt: skip
        axes[1].plot(steps, [c["train_loss"] for c in cp], "o-", color=f"C{i}", label=f"seed {run['seed']}")
    axes[0].set(xscale="log", yscale="log", xlabel="step", ylabel="noise scale (examples)", title="noise scale during training")
    axes[0].legend(frameon=False, fontsize="x-small")
    axes[1].set(xscale="log", xlabel="step", ylabel="training loss (full set)", title="loss")
    axes[1].legend(frameon=False, fontsize="small")
    print(out(fig, "noise_over_training", a))
    for run in res["runs"]:
        cp = run["checkpoints"]
        print(f"seed {run['seed']}: B_simple {cp[0]['b_simple']:.3g} → {cp[-1]['b_simple']:.3g} ({cp[-1]['b_simple'] / cp[0]['b_simple']:.2g}×), "
              f"B_noise {cp[0]['b_noise']:.3g} → {cp[-1]['b_noise']:.3g}, loss {cp[0]['train_loss']:.3f} → {cp[-1]['train_loss']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
