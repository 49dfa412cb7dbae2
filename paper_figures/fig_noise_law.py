"""Figure: the 1/B law and diminishing returns (claims 1, 2)."""

import numpy as np

from gradnoise import NoiseLaw
from gradnoise.plots import plot_noise_law

from .common import args, figure, load, out


def main():
    a = args(__doc__)
    res = load("noise_law", a)["results"]
    fig, axes = figure(3, size=(4.8, 3.9))
    for ax, state in zip(axes[:2], ("init", "trained"), strict=True):
        law = NoiseLaw(**{k: tuple(v) if isinstance(v, list) else v for k, v in res[state].items()})
        plot_noise_law(law, ax=ax)
        ax.set_title(f"{'at initialisation' if state == 'init' else 'after training'} (N = {law.dataset_size})")
        ax.legend(frameon=False, fontsize="x-small", loc="lower left")
    ax = axes[2]
    for state, color in (("init", "C0"), ("trained", "C1")):
        r = res[state]
        b, e, t = np.array(r["batch_sizes"], float), np.array(r["errors"]), np.array(r["theory"])
        keep = b < r["dataset_size"] / 4
        ax.plot(b[keep], np.sqrt(e[keep] / t[keep][0]), "o-", color=color, label=f"noise std, measured ({state})")
    b = np.array(res["init"]["batch_sizes"], float)
    b = b[b < res["init"]["dataset_size"] / 4]
    ax.plot(b, np.sqrt(b[0] / b), "k--", lw=1, label=r"$1/\sqrt{B}$")
    ax.plot(b, b / b[0], ":", color="0.4", label="compute per step ∝ B")
    ax.set(xscale="log", yscale="log", xlabel="batch size $B$", ylabel="relative to theory at smallest B", title="diminishing returns")
    ax.legend(frameon=False, fontsize="x-small")
    print(out(fig, "noise_law", a))
    for state in ("init", "trained"):
        r = res[state]
        print(f"{state}: exponent {r['exponent']:.4f} {r['exponent_interval']}, raw {r['raw_exponent']:.4f}, trΣ fit {r['trace_cov_fit']:.4g} vs exact {r['trace_cov']:.4g}")


if __name__ == "__main__":
    main()
