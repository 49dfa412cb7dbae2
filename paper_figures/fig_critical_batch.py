"""Figure: steps to target against batch size, the S = S_min + E_min/B fit, and B_crit
against the measured noise scales (claim 4)."""

from gradnoise import CriticalBatchFit
from gradnoise.plots import plot_critical_batch

from .common import args, figure, load, out


def main():
    a = args(__doc__)
    res = load("critical_batch", a)["results"]
    fig, ax = figure(size=(5.6, 4.0))
    seeds = res["per_seed"]
    points = [(r["batch_size"], r["steps"]) for ps in seeds for r in ps["best"] if r["steps"]]
    b, s = [p[0] for p in points], [p[1] for p in points]
    if res["fit"]:
        fit = CriticalBatchFit(**{k: tuple(v) if isinstance(v, list) else v for k, v in res["fit"].items()})
        plot_critical_batch(fit, b, s, ax=ax)
        ax.lines[0].set_label(f"measured ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
        for key, style, name in (("b_simple_mean", ":", r"$\bar B_{\mathrm{simple}}$"), ("b_noise_mean", "-.", r"$\bar B_{\mathrm{noise}}$")):
            if res.get(key):
                ax.axvline(res[key], color="C2" if key == "b_simple_mean" else "C4", ls=style, lw=1.5, label=f"{name} = {res[key]:.0f}")
        ax.legend(frameon=False, fontsize="x-small")
        print(f"pooled: S_min {fit.s_min:.0f} {fit.s_min_interval}, E_min {fit.e_min:.0f}, B_crit {fit.b_crit:.0f} {fit.b_crit_interval}, R² {fit.r2:.3f}")
    else:
        ax.plot(b, s, "o")
    ax.set_title(f"MNIST-1D MLP: steps to {res['target']}")
    print(out(fig, "critical_batch", a))
    for ps in seeds:
        f = ps["fit"]
        print(f"seed {ps['seed']}: best per B", [(r["batch_size"], r["lr"], r["steps"]) for r in ps["best"]])
        if f:
            print(f"  S_min {f['s_min']:.0f}, E_min {f['e_min']:.0f}, B_crit {f['b_crit']:.0f} {f['b_crit_interval']}")
        print("  noise along the B=64 run:", [(n["step"], round(n["b_simple"], 1), round(n["b_noise"], 1) if n["b_noise"] else None) for n in ps["noise_along_b64_run"]])
    print(f"mean B_simple {res['b_simple_mean']}, mean B_noise {res['b_noise_mean']}")


if __name__ == "__main__":
    main()
