"""Figure: BatchNorm vs GroupNorm/LayerNorm-style at small batch (claim 9)."""

import numpy as np

from .common import args, figure, load, out


def main():
    a = args(__doc__)
    rows = load("batchnorm_small_batch", a)["results"]["rows"]
    fig, ax = figure()
    for i, norm in enumerate(dict.fromkeys(r["norm"] for r in rows)):
        bs = sorted({r["batch_size"] for r in rows if r["norm"] == norm})
        acc = [[r["test_accuracy"] for r in rows if r["norm"] == norm and r["batch_size"] == b] for b in bs]
        m, s = np.array([np.mean(v) for v in acc]), np.array([np.std(v) for v in acc])
        ax.errorbar(bs, m, yerr=s, fmt="o-", capsize=3, color=f"C{i}", label=norm)
    ax.set(xscale="log", xlabel="batch size $B$", ylabel="test accuracy (eval mode)", title="MNIST-1D CNN: normalisation vs batch size")
    ax.legend(frameon=False, fontsize="small")
    print(out(fig, "batchnorm_small_batch", a))


if __name__ == "__main__":
    main()
