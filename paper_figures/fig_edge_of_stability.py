"""Figure: λ_max under full-batch gradient descent against 2/η (claim 10)."""

from .common import args, figure, load, out


def main():
    a = args(__doc__)
    runs = load("edge_of_stability", a)["results"]["runs"]
    fig, axes = figure(2, size=(5.2, 3.9))
    for i, run in enumerate(runs):
        lam = run["lambda_max"]
        axes[0].plot([p["step"] for p in lam], [p["lambda_max"] for p in lam], color=f"C{i}", lw=1.6, label=f"η = {run['lr']}")
        axes[0].axhline(run["two_over_lr"], color=f"C{i}", ls="--", lw=1)
        axes[1].plot(range(len(run["losses"])), run["losses"], color=f"C{i}", lw=1.2, label=f"η = {run['lr']}")
    axes[0].set(xlabel="step", ylabel=r"$\lambda_{\max}$ (dashed: $2/\eta$)", title="sharpness under full-batch GD")
    axes[0].legend(frameon=False, fontsize="small")
    axes[1].set(yscale="log", xlabel="step", ylabel="training loss", title="loss")
    axes[1].legend(frameon=False, fontsize="small")
    print(out(fig, "edge_of_stability", a))
    for run in runs:
        lam = [p["lambda_max"] for p in run["lambda_max"]]
        late = lam[len(lam) // 2 :]
        print(f"η={run['lr']}: 2/η={run['two_over_lr']:.1f}, λ_max start {lam[0]:.2f}, max {max(lam):.2f}, second-half mean {sum(late) / len(late):.2f}")


if __name__ == "__main__":
    main()
