"""Figure: small- vs large-batch solutions — the loss along the line between them, and
their sharpness and test accuracy (claim 5)."""

from .common import args, figure, load, out

LABELS = {"small": "small batch", "large_same_lr": "large batch, same lr", "large_tuned_lr": "large batch, tuned lr"}


def main():
    a = args(__doc__)
    res = load("sharp_minima", a)
    cfg, runs = res["config"], res["results"]["runs"]
    fig, axes = figure(3, size=(4.8, 3.9))
    for i, key in enumerate(("line_to_large_same_lr", "line_to_large_tuned_lr")):
        ax = axes[i]
        for j, run in enumerate(runs):
            line = run[key]
            ax.plot(line["alphas"], line["losses"], color=f"C{j}", lw=1.8, label=f"seed {run['seed']}: train loss")
            ax.plot(line["alphas"], line["accuracy"], color=f"C{j}", lw=1.2, ls="--", label=f"seed {run['seed']}: train accuracy")
        ax.axvline(0, color="0.7", lw=1, ls=":")
        ax.axvline(1, color="0.7", lw=1, ls=":")
        ax.set_yscale("log")
        ax.set(xlabel=r"$\alpha$: small-batch (0) → large-batch (1) solution", ylabel="train loss (solid), accuracy (dashed)",
               title=f"B={cfg['small_batch']} → B={cfg['large_batch']}, {'same lr' if 'same' in key else 'tuned lr'}")  # fmt: skip
        ax.legend(frameon=False, fontsize="x-small")
    ax = axes[2]
    keys = list(LABELS)
    for j, run in enumerate(runs):
        lam = [run[k]["lambda_max"] for k in keys]
        acc = [run[k]["test_accuracy"] for k in keys]
        ax.scatter(lam, acc, color=[f"C{m}" for m in range(3)], marker="os^"[j % 3], s=60, label=f"seed {run['seed']}")
    for m, k in enumerate(keys):
        ax.scatter([], [], color=f"C{m}", label=LABELS[k])
    ax.set(xlabel=r"$\lambda_{\max}$ of the training loss", ylabel="test accuracy", title="sharpness vs generalisation")
    ax.legend(frameon=False, fontsize="x-small")
    print(out(fig, "sharp_minima", a))
    for run in runs:
        print(f"seed {run['seed']} (tuned lr {run['tuned_lr']}):")
        for k in keys:
            r = run[k]
            print(f"  {LABELS[k]:>22}: train loss {r['train_loss']:.4f}, test acc {r['test_accuracy']:.3f}, λ_max {r['lambda_max']:.3g}, ε-sharpness {r['epsilon_sharpness']:.3g}")


if __name__ == "__main__":
    main()
