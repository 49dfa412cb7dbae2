"""Figure: the seed-001 sweep (25 epochs, one learning rate) against its controls (claim 6)."""

import numpy as np
from matplotlib.ticker import LogFormatter, NullLocator

from .common import args, figure, load, out

PROTOCOLS = {
    "fixed_epochs": "25 epochs, one lr (seed 001)",
    "fixed_epochs_tuned_lr": "25 epochs, lr tuned per B",
    "equal_updates_tuned_lr": "equal updates, lr tuned per B",
}


def series(rows, protocol, key):
    sel = [r for r in rows if r["protocol"] == protocol]
    bs = sorted({r["batch_size"] for r in sel})
    vals = [[np.nan if r["diverged"] else r[key] for r in sel if r["batch_size"] == b] for b in bs]
    return np.array(bs), np.array([np.nanmean(v) for v in vals]), np.array([np.nanstd(v) for v in vals])


def main():
    a = args(__doc__)
    res = load("epoch_sweep", a)
    rows, cfg = res["results"]["rows"], res["config"]
    fig, axes = figure(3, size=(4.6, 3.9))
    for i, (p, label) in enumerate(PROTOCOLS.items()):
        bs, acc, sd = series(rows, p, "test_accuracy")
        axes[0].errorbar(bs, acc, yerr=sd, fmt="o-", capsize=3, color=f"C{i}", label=label)
        bs, loss, _ = series(rows, p, "train_loss")
        axes[1].plot(bs, loss, "o-", color=f"C{i}", label=label)
        timed = [r for r in res["results"]["timing"] if r["protocol"] == p]
        if timed:  # the timing phase (fixed_epochs_tuned_lr has the steps of fixed_epochs)
            axes[2].plot([r["batch_size"] for r in timed], [r["seconds"] for r in timed], "o-", color=f"C{i}",
                         label=f"{label}" if p == "fixed_epochs" else f"equal updates ({res['results']['equal_updates']})")  # fmt: skip
    axes[0].axhline(0.1, color="grey", lw=0.8, ls=":")
    axes[0].annotate("chance", (bs[0], 0.1), xytext=(0, 3), textcoords="offset points", ha="left", fontsize="x-small", color="grey")
    axes[0].set(xscale="log", ylim=(0, 1), xlabel="batch size $B$", ylabel="test accuracy",
                title=f"test accuracy ({len(cfg['seeds'])} seed{'s' if len(cfg['seeds']) > 1 else ''}, ±1 sd)")  # fmt: skip
    axes[1].set(xscale="log", yscale="log", xlabel="batch size $B$", ylabel="final training loss", title="training loss (under-fitting?)")
    axes[2].set(xscale="log", yscale="log", xlabel="batch size $B$", ylabel="wall time per run (s)", title="training time (2 CPU threads)")
    for ax in axes:
        ax.set_xticks(bs, [str(b) for b in bs], fontsize="x-small")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
    axes[1].legend(frameon=False, fontsize="x-small", loc="best")
    axes[2].legend(frameon=False, fontsize="x-small")
    print(out(fig, "epoch_sweep", a))
    print("chosen learning rates:", res["results"]["chosen_lr"])
    for p in PROTOCOLS:
        for b, acc, sd in zip(*series(rows, p, "test_accuracy"), strict=True):
            _, loss, _ = series([r for r in rows if r["batch_size"] == b], p, "train_loss")
            steps = next(r["steps"] for r in rows if r["protocol"] == p and r["batch_size"] == b)
            t = [r["seconds"] for r in res["results"]["timing"] if r["protocol"] == p and r["batch_size"] == b]
            timed = f"  {t[0]:.2f} s" if t else ""
            print(f"{p:24s} B={b:5d} steps={steps:6d} test acc {acc:.3f} ± {sd:.3f}  train loss {loss[0]:.3g}{timed}")


if __name__ == "__main__":
    main()
