"""Figure: under Adam, steps to target against batch size with the S = S_min + E_min/B fit,
B_crit against the SGD and the preconditioned noise scales (one panel per model), and the
best learning rate against B with the square-root and linear scaling rules (claim 12)."""

import numpy as np

from gradnoise import CriticalBatchFit
from gradnoise.plots import plot_critical_batch

from .common import args, figure, load, out

SCALES = (  # key, colour, style, label
    ("b_simple", "C2", ":", r"$B_{\mathrm{simple}}$ (SGD)"),
    ("b_simple_p", "C3", "-.", r"$B^{P}_{\mathrm{simple}}$"),
    ("b_noise_p", "C4", (0, (5, 2)), r"$B^{P}_{\mathrm{noise}}$"),
)


def main():
    a = args(__doc__)
    res = load("adam_noise_scale", a)["results"]
    models = res["models"]
    fig, axes = figure(ncols=len(models) + 1, size=(4.8, 4.0))
    for ax, (name, r) in zip(axes, models.items(), strict=False):
        pts = [(s["batch_size"], s["best"]["steps"]) for ps in r["per_seed"] for s in ps["sweeps"] if s["best"]]
        if r["fit"]:
            fit = CriticalBatchFit(**{k: tuple(v) if isinstance(v, list) else v for k, v in r["fit"].items()})
            plot_critical_batch(fit, [b for b, _ in pts], [n for _, n in pts], ax=ax)
            for key, color, style, label in SCALES:
                v = r["noise_means"].get(key)
                if v:
                    ax.axvline(v, color=color, ls=style, lw=1.5, label=f"{label} = {v:.0f}")
            ax.legend(frameon=False, fontsize="x-small", loc="upper right")
        ax.set_title(f"MNIST-1D {name.upper()}, Adam: steps to {res['target']}", fontsize="small")
    ax = axes[-1]
    for i, (name, r) in enumerate(models.items()):
        pts = np.array(r["lr_scaling"]["points"], dtype=float)
        by_b = {b: np.exp(np.mean(np.log(pts[pts[:, 0] == b, 1]))) for b in np.unique(pts[:, 0])}
        bs = np.array(sorted(by_b))
        ax.plot(bs, [by_b[b] for b in bs], "o-", color=f"C{i}", label=f"{name.upper()}: best lr (geo. mean over seeds)")
        anchor_b = bs[len(bs) // 2]
        for k, style in ((0.5, ":"), (1.0, "--")):
            ax.plot(bs, by_b[anchor_b] * (bs / anchor_b) ** k, color=f"C{i}", ls=style, lw=1, alpha=0.7)
    ax.plot([], [], "k:", lw=1, label=r"$\propto\sqrt{B}$ (Malladi et al.)")
    ax.plot([], [], "k--", lw=1, label=r"$\propto B$ (linear)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size $B$")
    ax.set_ylabel("best Adam learning rate")
    ax.set_title("learning-rate scaling", fontsize="small")
    ax.legend(frameon=False, fontsize="x-small")
    print(out(fig, "adam_noise_scale", a))
    for name, r in models.items():
        f = r["fit"]
        print(f"{name}: pooled fit", None if not f else f"B_crit {f['b_crit']:.0f} {f['b_crit_interval']}, R² {f['r2']:.3f}")
        print(f"  noise means {r['noise_means']}; lr exponent all {r['lr_scaling']['all']}, below B_crit {r['lr_scaling']['below_b_crit']}")
        for ps in r["per_seed"]:
            g = ps["fit"]
            print(f"  seed {ps['seed']}: best", [(s["batch_size"], s["best"]["lr"] if s["best"] else None, s["best"]["steps"] if s["best"] else None, "EDGE" if s["best_on_edge"] else "") for s in ps["sweeps"]])
            if g:
                print(f"    B_crit {g['b_crit']:.0f} {g['b_crit_interval']}")
            print("    noise along the B=64 run:", [(n["step"], *(round(n[k], 1) if n[k] else None for k in ("b_simple", "b_noise", "b_simple_p", "b_noise_p"))) for n in ps["noise_along_b64_run"]])


if __name__ == "__main__":
    main()
