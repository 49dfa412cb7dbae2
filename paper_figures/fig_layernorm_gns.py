"""Figure: the layer-normalisation noise scale against the whole model's along a
character-level transformer's training (claim 13): both B_simple over steps (ratios of
averages over a rolling window of records), and their ratio."""

import numpy as np

from .common import args, figure, load, out


def rolling(recs, w):
    """B_simple as a ratio of tr Σ and |G|² averaged over ``w`` consecutive records."""
    tr = np.array([r["trace_cov"] for r in recs], float)
    g2 = np.array([r["grad_norm_sq"] for r in recs], float)
    k = np.ones(w)
    num, den = np.convolve(tr, k, "valid"), np.convolve(g2, k, "valid")
    return np.where(den > 0, num / np.maximum(den, 1e-30), np.nan)


def summary(res, w):
    """Per seed: the Pearson correlation of the two log B_simple curves and the spread of
    their ratio (median and the 10–90 % range)."""
    rows = []
    for run in res["runs"]:
        a, n = rolling(run["all"], w), rolling(run["norms"], w)
        ok = np.isfinite(a) & np.isfinite(n) & (a > 0) & (n > 0)
        ratio = n[ok] / a[ok]
        corr = float(np.corrcoef(np.log(a[ok]), np.log(n[ok]))[0, 1]) if ok.sum() > 2 else float("nan")
        spread = np.percentile(ratio, [50, 10, 90]) if ratio.size else (np.nan,) * 3
        rows.append((run["seed"], corr, *spread))
    return rows


def main():
    a = args(__doc__)
    res = load("layernorm_gns", a)["results"]
    n_rec = min(len(r["all"]) for r in res["runs"])
    w = max(1, min(20, n_rec // 4))
    fig, axes = figure(2, size=(5.2, 3.9))
    for i, run in enumerate(res["runs"]):
        steps = np.array([r["step"] for r in run["all"]])[w - 1 :]
        axes[0].plot(steps, rolling(run["all"], w), color=f"C{i}", lw=1.6, label=f"seed {run['seed']}: all parameters")
        axes[0].plot(steps, rolling(run["norms"], w), color=f"C{i}", lw=1.6, ls="--", label=f"seed {run['seed']}: LayerNorm only")
        axes[1].plot(steps, rolling(run["norms"], w) / rolling(run["all"], w), color=f"C{i}", lw=1.6, label=f"seed {run['seed']}")
    every = res["runs"][0]["all"][1]["step"] - res["runs"][0]["all"][0]["step"] if n_rec > 1 else 1
    axes[0].set(yscale="log", xlabel="step", ylabel=r"$B_{\mathrm{simple}}$ (examples)",
                title=f"noise scale (ratio of averages over {w * every} steps)")  # fmt: skip
    axes[0].legend(frameon=False, fontsize="x-small")
    axes[1].axhline(1.0, color="0.5", lw=0.8)
    axes[1].set(yscale="log", xlabel="step", ylabel=r"$B^{\mathrm{LN}}_{\mathrm{simple}} / B_{\mathrm{simple}}$",
                title="LayerNorm-only / whole model")  # fmt: skip
    axes[1].legend(frameon=False, fontsize="small")
    print(out(fig, "layernorm_gns", a))
    for seed, corr, med, lo, hi in summary(res, w):
        print(f"seed {seed}: corr(log B_LN, log B_all) = {corr:.3f}; ratio B_LN/B_all median {med:.3g} (10–90 %: {lo:.3g}–{hi:.3g})")
    ms = res["step_ms"]
    print(f"AdamW step: plain {ms['plain']:.1f} ms, scope='norms' {ms['norms']:.1f} ms ({ms['norms'] / ms['plain']:.2f}×), "
          f"scope='all' {ms['all']:.1f} ms ({ms['all'] / ms['plain']:.2f}×)")  # fmt: skip


if __name__ == "__main__":
    main()
