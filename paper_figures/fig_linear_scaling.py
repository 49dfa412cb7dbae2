"""Figure: test accuracy under the linear scaling rule, with and without warmup (claim 7)."""

import numpy as np

from .common import args, figure, load, out


def main():
    a = args(__doc__)
    res = load("linear_scaling", a)
    rows, cfg = res["results"]["rows"], res["config"]
    fig, axes = figure(2, size=(5.0, 3.9))
    for i, warm in enumerate((False, True)):
        sel = [r for r in rows if r["warmup"] == warm]
        bs = sorted({r["batch_size"] for r in sel})
        acc = [[r["test_accuracy"] if not r["diverged"] else np.nan for r in sel if r["batch_size"] == b] for b in bs]
        loss = [[r["train_loss"] if not r["diverged"] else np.nan for r in sel if r["batch_size"] == b] for b in bs]
        label = f"{'with' if warm else 'no'} warmup"
        axes[0].errorbar(bs, [np.nanmean(v) for v in acc], yerr=[np.nanstd(v) for v in acc], fmt="o-", capsize=3, color=f"C{i}", label=label)
        axes[1].plot(bs, [np.nanmean(v) for v in loss], "o-", color=f"C{i}", label=label)
        for b, v in zip(bs, acc, strict=True):
            if any(np.isnan(v)):
                axes[0].annotate("diverged", (b, 0.1), color=f"C{i}", fontsize="x-small", ha="center")
    axes[0].set(xscale="log", ylim=(0, 0.85), xlabel="batch size $B$", ylabel="test accuracy",
                title=f"lr = {cfg['base_lr']}·B/{cfg['base_batch']}, {cfg['epochs']} epochs")  # fmt: skip
    axes[1].set(xscale="log", yscale="log", xlabel="batch size $B$", ylabel="final training loss", title="training loss")
    for ax in axes:
        ax.legend(frameon=False, fontsize="small")
    print(out(fig, "linear_scaling", a))
    for r in rows:
        print(f"B={r['batch_size']:5d} warmup={r['warmup']!s:5} seed={r['seed']} lr={r['lr']:.3g} train loss {r['train_loss']:.4g} test acc {r['test_accuracy']:.3f} diverged={r['diverged']}")


if __name__ == "__main__":
    main()
