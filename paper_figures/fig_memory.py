"""Figure: peak memory of a training step against batch size (claim 11)."""

import numpy as np

from .common import args, figure, load, out


def main():
    a = args(__doc__)
    res = load("memory", a)["results"]
    fig, ax = figure()
    for i, (name, r) in enumerate(res.items()):
        b = np.array(r["batch_sizes"], float)
        ax.plot(b, np.array(r["peak_bytes"]) / 2**20, "o", color=f"C{i}", label=f"{name.upper()}: measured peak")
        grid = np.geomspace(b.min(), b.max(), 50)
        ax.plot(grid, (r["fit_fixed_bytes"] + r["fit_bytes_per_example"] * grid) / 2**20, "-", color=f"C{i}", lw=1, label=f"{name.upper()}: linear fit ({r['fit_bytes_per_example'] / 1024:.1f} KiB/example)")
        ax.plot(grid, (r["gn_fixed_bytes"] + r["gn_bytes_per_example"] * grid) / 2**20, ":", color=f"C{i}", lw=1.5, label=f"{name.upper()}: gn.per_example_memory ({r['gn_bytes_per_example'] / 1024:.1f} KiB)")
    ax.set(xscale="log", yscale="log", xlabel="batch size $B$", ylabel="peak memory of a step (MiB)", title="memory grows linearly in B")
    ax.legend(frameon=False, fontsize="x-small")
    print(out(fig, "memory", a))
    for name, r in res.items():
        print(f"{name}: r={r['linearity_r']:.5f}, {r['fit_bytes_per_example']:.0f} B/example (fit) vs {r['gn_bytes_per_example']:.0f} (gn), "
              f"predicted {r['predicted_peak_at_largest'] / 2**20:.1f} MiB vs measured {r['measured_peak_at_largest'] / 2**20:.1f} MiB at B={r['batch_sizes'][-1]}")  # fmt: skip


if __name__ == "__main__":
    main()
