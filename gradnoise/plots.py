"""Seaborn figures from gradnoise results, in one shared style.

Every function takes a result object (or arrays), draws on ``ax`` (a new figure if ``None``)
and returns the figure; nothing is computed here.
"""

from __future__ import annotations

import numpy as np

__all__ = ["plot_critical_batch", "plot_landscape", "plot_noise_law", "plot_run", "save", "set_style"]

PALETTE = "colorblind"


def set_style() -> None:
    """The shared paper style: seaborn ``ticks``, colour-blind palette, readable sizes."""
    import seaborn as sns

    sns.set_theme(context="paper", style="ticks", palette=PALETTE, font_scale=1.25)


def _axes(ax, size=(5.0, 3.8)):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    set_style()
    if ax is None:
        fig, ax = plt.subplots(figsize=size, constrained_layout=True)
    return ax.figure, ax


def save(fig, path_stem) -> list[str]:
    """Write ``<stem>.pdf`` and ``<stem>.png`` (200 dpi); returns the paths."""
    paths = [f"{path_stem}.pdf", f"{path_stem}.png"]
    fig.savefig(paths[0])
    fig.savefig(paths[1], dpi=200)
    return paths


def plot_noise_law(law, ax=None):
    """``E|ĝ_B − G|²`` against ``B`` (log-log): measurements ± 2 SE, the fitted power law,
    and the theory ``tr Σ/B · (N−B)/(N−1)`` with and without the finite-population factor.
    ``B = N`` (error exactly 0) is left out of the log axes."""
    fig, ax = _axes(ax)
    N = law.dataset_size
    b = np.asarray(law.batch_sizes, dtype=float)
    e, se = np.asarray(law.errors), np.asarray(law.errors_se)
    keep = b < N
    b, e, se = b[keep], e[keep], se[keep]
    grid = np.geomspace(b.min(), b.max(), 300)
    fpc = (N - grid) / (N - 1)
    ax.plot(grid, law.trace_cov / grid, color="0.6", ls=":", lw=1.5, label=r"$\mathrm{tr}\,\Sigma / B$ (infinite data)")
    ax.plot(grid, law.trace_cov / grid * fpc, color="0.3", ls="--", lw=1.5, label=r"$\mathrm{tr}\,\Sigma / B \cdot (N-B)/(N-1)$")
    lo, hi = law.exponent_interval
    ax.plot(grid, law.trace_cov_fit * grid**law.exponent * fpc, color="C0", lw=2, label=f"fit: exponent {law.exponent:.3f} [{lo:.3f}, {hi:.3f}]")
    lower = np.minimum(2 * se, 0.9 * e)  # log axes: clip bars that would cross zero
    ax.errorbar(b, e, yerr=[lower, 2 * se], fmt="o", color="C1", ms=5, capsize=2, label=f"measured ± 2 SE ({law.repeats} batches each)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size $B$")
    ax.set_ylabel(r"$\mathbb{E}\,|\hat g_B - G|^2$")
    ax.set_title(f"gradient noise vs batch size (N = {N}; at B = N it is 0)")
    ax.legend(frameon=False, fontsize="small")
    return fig


def plot_critical_batch(fit, batch_sizes, steps, ax=None):
    """Steps to target against ``B`` with the fitted ``S = S_min + E_min/B`` and ``B_crit``."""
    fig, ax = _axes(ax)
    b = np.asarray(batch_sizes, dtype=float)
    grid = np.geomspace(b.min(), b.max(), 200)
    ax.plot(b, steps, "o", color="C1", ms=6, label="measured")
    ax.plot(grid, fit.s_min + fit.e_min / grid, color="C0", lw=2, label=r"$S_{\min} + E_{\min}/B$")
    ax.axvline(fit.b_crit, color="0.3", ls="--", lw=1.2, label=f"$B_{{crit}}$ = {fit.b_crit:.0f}")
    ax.axhline(fit.s_min, color="0.6", ls=":", lw=1.2, label=f"$S_{{min}}$ = {fit.s_min:.0f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullLocator

    ticks = np.unique(b)  # the measured batch sizes, as plain numbers (no crowded minor labels)
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("batch size $B$")
    ax.set_ylabel("steps to target")
    ax.legend(frameon=False, fontsize="small")
    return fig


def _series(records, key):
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts])) if pts else (np.array([]), np.array([]))


def plot_run(records, path_stem=None):
    """The standard figures of a monitored run: loss, the noise scale (raw and EMA, per
    layer), and λ_max against 2/η when recorded. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    set_style()
    has_lam = any(r.get("lambda_max") is not None for r in records)
    ncols = 3 if has_lam else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.6), constrained_layout=True)
    s, v = _series(records, "loss")
    axes[0].plot(s, v, color="C0")
    axes[0].set(xlabel="step", ylabel="training loss", title="loss")
    s, v = _series(records, "b_simple")
    pos = v > 0
    axes[1].plot(s[pos], v[pos], ".", color="0.6", ms=3, label=r"$B_{\mathrm{simple}}$ (one batch)")
    s, v = _series(records, "b_simple_ema")
    axes[1].plot(s, v, color="C1", lw=2, label="EMA (ratio of averages)")
    layers = sorted({k for r in records for k in r if k.startswith("b_simple/")})
    for i, k in enumerate(layers[:6]):
        s, v = _series(records, k)
        axes[1].plot(s, np.where(v > 0, v, np.nan), lw=0.8, alpha=0.6, color=f"C{(i + 2) % 10}", label=f"layer {k.split('/', 1)[1]} (one batch)")
    axes[1].set_yscale("log")
    axes[1].set(xlabel="step", ylabel="noise scale", title="gradient noise scale")
    axes[1].legend(frameon=False, fontsize="x-small")
    if has_lam:
        s, v = _series(records, "lambda_max")
        axes[2].plot(s, v, "o-", color="C3", ms=3, label=r"$\lambda_{\max}$")
        s2, v2 = _series(records, "two_over_lr")
        if len(s2):
            axes[2].plot(s2, v2, "--", color="0.3", label=r"$2/\eta$")
        axes[2].set(xlabel="step", ylabel="sharpness", title=r"$\lambda_{\max}$ of the Hessian")
        axes[2].legend(frameon=False, fontsize="small")
    if path_stem is not None:
        save(fig, path_stem)
    return fig


def plot_landscape(landscape, ax=None, label: str | None = None, metric_label: str = "metric"):
    """A :class:`gradnoise.Landscape`: loss (and metric, on a twin axis) along a line or a
    1-D slice; filled contours for a 2-D slice."""
    fig, ax = _axes(ax)
    a = np.asarray(landscape.alphas)
    if landscape.betas is None:
        ax.plot(a, landscape.losses, color="C0", lw=2, label=label or "loss")
        xlabel = r"$\alpha$ in $(1-\alpha)\theta_a + \alpha\theta_b$" if landscape.kind == "line" else r"$\alpha$ along a filter-normalised direction"
        ax.set(xlabel=xlabel, ylabel="loss")
        if landscape.kind == "line":
            for x0, name in ((0, r"$\theta_a$"), (1, r"$\theta_b$")):
                ax.axvline(x0, color="0.7", lw=1, ls=":")
                ax.text(x0, ax.get_ylim()[1], name, ha="center", va="bottom", fontsize="small")
        if landscape.metric is not None:
            twin = ax.twinx()
            twin.plot(a, landscape.metric, color="C1", lw=1.5, ls="--", label=metric_label)
            twin.set_ylabel(metric_label, color="C1")
        ax.legend(frameon=False, fontsize="small", loc="upper center")
    else:
        b = np.asarray(landscape.betas)
        cs = ax.contourf(a, b, np.log10(np.asarray(landscape.losses).T), levels=20, cmap="viridis")
        ax.contour(a, b, np.log10(np.asarray(landscape.losses).T), levels=10, colors="white", linewidths=0.5)
        fig.colorbar(cs, ax=ax, label=r"$\log_{10}$ loss")
        ax.plot([0], [0], "w*", ms=10)
        ax.set(xlabel=r"$\alpha$ (direction 1)", ylabel=r"$\beta$ (direction 2)", title="filter-normalised slice")
    return fig
