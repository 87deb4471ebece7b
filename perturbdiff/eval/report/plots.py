"""Figures of ``perturbdiff report``, each a matplotlib ``Figure``: its public plotting API.

The ``_plot_*`` functions draw on matplotlib's Agg canvas directly (``Figure`` + ``FigureCanvasAgg``,
no pyplot), so importing this module changes no global matplotlib state; ``png`` renders a figure
to PNG bytes. Cells are subsampled (at most ``MAX_CELLS`` per plotted group, with the caller's seeded
generator) and projected on two principal axes found by a small numpy subspace iteration, which
keeps large inputs fast. The metric conventions shared with the report's tables (which direction
is better, how a value is printed) are defined here too.
"""

from __future__ import annotations

import io
import json
import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..inputs import dense_rows, obs_str
from ..schema import LOWER_IS_BETTER, NOT_RANKED
from .inputs import Cells, Run, numeric_series

MAX_CELLS = 2_000  # cells per plotted group (and per perturbation in the PCA fit)
MAX_FIT_CELLS = 12_000  # cells in one context's PCA fit
MAX_PCA_GENES = 2_000  # most variable genes kept for the PCA
MAX_PANELS = 6  # sampled populations / real batches drawn per condition
DPI = 110
COLORS = {"control": "#b5b5b5", "real": "#1f77b4", "pred": "#ff7f0e"}
METHOD_COLORS = {"model": "#ff7f0e", "control_mean": "#7f7f7f", "perturbation_mean": "#2ca02c",
                 "linear": "#9467bd", "ceiling": "#1f77b4"}
SHORT = {"control_mean": "control\nmean", "perturbation_mean": "pert.\nmean"}  # plot tick labels


def format_value(v) -> str:
    """A metric value as the tables and plot titles show it (4 significant digits; a dash when missing)."""
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "\u2013"
    return f"{float(v):.4g}"


def direction(metric: str) -> str:
    """The arrow after a metric's name: which direction is better (none for unranked metrics)."""
    return "" if metric in NOT_RANKED else (" \u2193" if metric in LOWER_IS_BETTER else " \u2191")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def _subsample(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``rows`` itself when at most ``n``, else a sorted draw of ``n`` of them without replacement."""
    return rows if len(rows) <= n else np.sort(rng.choice(rows, size=n, replace=False))


def _figure(width: float, height: float) -> Figure:
    """A constrained-layout figure on its own Agg canvas (no pyplot)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """``fig`` rendered as PNG bytes at ``DPI``."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def _grid(fig: Figure, n: int, ncols: int):
    """``n`` axes in rows of ``ncols``; the unused cells of the last row hidden."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _label(key: tuple[str, str], width: int = 50) -> str:
    """A condition as a panel title, wrapped."""
    return textwrap.fill(f"{key[0]} / {key[1]}", width)


def _annotate(ax, xy: np.ndarray, names) -> None:
    """Name points (limits already set), skipping a name that would overlap one already placed."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed = []
    for (x, y), name in zip(xy, names):
        fx, fy = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)
        if all(abs(fy - py) > 0.05 or abs(fx - px) > 0.3 for px, py in placed):
            ax.annotate(str(name), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            placed.append((fx, fy))


# ---------------------------------------------------------------------------------------------
# Metrics and pseudobulk deltas
# ---------------------------------------------------------------------------------------------


def plot_metrics(metrics: pd.DataFrame, methods: list[str], names: list[str]) -> Figure:
    """Per-condition value of each metric per method (strip plot, box when >= 5 conditions)."""
    ncols = 5 if len(names) > 8 else 4
    fig = _figure(3.1 * min(ncols, len(names)), 2.9 * -(-len(names) // ncols))
    rng = np.random.default_rng(0)
    for ax, metric in zip(_grid(fig, len(names), ncols), names):
        for i, method in enumerate(methods):
            v = metrics.loc[metrics["method"] == method, metric].to_numpy(dtype=float)
            v = v[np.isfinite(v)]
            if not len(v):
                continue
            color = METHOD_COLORS.get(method, "#444444")
            if len(v) >= 5:
                ax.boxplot(v, positions=[i], widths=0.6, showfliers=False, medianprops={"color": color},
                           boxprops={"color": "#999999"}, whiskerprops={"color": "#999999"},
                           capprops={"color": "#999999"})
            ax.scatter(i + rng.uniform(-0.18, 0.18, len(v)), v, s=12, color=color, alpha=0.7, linewidths=0)
            ax.plot([i - 0.3, i + 0.3], [v.mean()] * 2, color="black", lw=1.4)
        ax.set_xticks(range(len(methods)), [SHORT.get(m, m) for m in methods], fontsize=7.5)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_title(metric + direction(metric), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return fig


def plot_deltas(cells: Cells, shown, genes: np.ndarray) -> Figure:
    """Model vs real pseudobulk delta per gene, one panel per condition."""
    fig = _figure(4.2 * min(3, len(shown)), 4.1 * -(-len(shown) // 3))
    for ax, key in zip(_grid(fig, len(shown), 3), shown):
        real, pred = cells.delta("real", key), cells.delta("pred", key)
        ok = np.isfinite(real) & np.isfinite(pred)
        r = np.corrcoef(real[ok], pred[ok])[0, 1] if ok.sum() > 2 and real[ok].std() and pred[ok].std() else np.nan
        ax.scatter(real, pred, s=7, color=COLORS["pred"], alpha=0.55, linewidths=0)
        lo, hi = np.nanmin([real.min(), pred.min()]), np.nanmax([real.max(), pred.max()])
        pad = 0.05 * (hi - lo or 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], ls="--", color="#555555", lw=1)
        ax.axhline(0, color="#dddddd", lw=0.8, zorder=0)
        ax.axvline(0, color="#dddddd", lw=0.8, zorder=0)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        top = np.argsort(-np.abs(np.nan_to_num(real)))[:5]  # the strongest real effects, named
        _annotate(ax, np.c_[real[top], pred[top]], genes[top])
        ax.set_title(f"{_label(key)}\nPearson r = {format_value(r)}", fontsize=9)
        ax.set_xlabel("real \u0394 (mean log1p, perturbed \u2212 control)", fontsize=8)
        ax.set_ylabel("model \u0394", fontsize=8)
        ax.tick_params(labelsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Cells in PCA coordinates
# ---------------------------------------------------------------------------------------------


@dataclass
class Projection:
    """A context's PCA (fitted on its real cells, controls included) and the projected cells."""

    genes: np.ndarray
    mean: np.ndarray
    axes: np.ndarray  # (2, genes)
    ratio: np.ndarray  # explained variance ratio of the two PCs

    def __call__(self, adata, rows: np.ndarray) -> np.ndarray:
        """The ``rows`` of ``adata`` in the two PC coordinates, shape (len(rows), 2)."""
        if not len(rows):
            return np.zeros((0, 2))
        return (dense_rows(adata.X, rows, cols=self.genes) - self.mean) @ self.axes.T

    def labels(self, ax) -> None:
        """Axis labels with the share of variance each PC explains."""
        ax.set_xlabel(f"PC1 ({self.ratio[0]:.0%})", fontsize=8)
        ax.set_ylabel(f"PC2 ({self.ratio[1]:.0%})", fontsize=8)


def fit_pca(cells: Cells, context: str, rng: np.random.Generator) -> Projection:
    """Two principal axes by subspace iteration (a few thin matmuls; exact enough for a plot)."""
    rows = [_subsample(v, MAX_CELLS, rng) for k, v in cells.real_groups.items() if k[0] == context]
    rows = _subsample(np.sort(np.concatenate(rows)), MAX_FIT_CELLS, rng)
    x = dense_rows(cells.real.X, rows)
    genes = np.arange(x.shape[1])
    if x.shape[1] > MAX_PCA_GENES:
        genes = np.sort(np.argsort(-x.var(axis=0))[:MAX_PCA_GENES])
        x = x[:, genes]
    mean = x.mean(axis=0)
    xc = x - mean
    q = np.linalg.qr(xc @ rng.normal(size=(xc.shape[1], min(10, *xc.shape))))[0]
    for _ in range(6):
        q = np.linalg.qr(xc @ (xc.T @ q))[0]
    _, s, vt = np.linalg.svd(q.T @ xc, full_matrices=False)
    vt = vt[:2] * np.sign(vt[:2, [0]] + 1e-300)  # a fixed sign per axis
    return Projection(genes, mean, vt, s[:2] ** 2 / max((xc ** 2).sum(), 1e-300))


def _limits(points: list[np.ndarray]):
    """x and y limits around all the (non-empty) point sets, padded by 5%."""
    xy = np.concatenate([p for p in points if len(p)])
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    pad = 0.05 * np.where(hi > lo, hi - lo, 1.0)
    return (lo[0] - pad[0], hi[0] + pad[0]), (lo[1] - pad[1], hi[1] + pad[1])


def plot_pca(cells: Cells, shown, pcas: dict, rng) -> Figure:
    """Controls, real perturbed and predicted perturbed cells of each condition in its context's PCA."""
    fig = _figure(4.2 * min(3, len(shown)), 4.0 * -(-len(shown) // 3))
    for ax, key in zip(_grid(fig, len(shown), 3), shown):
        proj = pcas[key[0]]
        groups = [("control", cells.real, cells.control_rows(key[0])),
                  ("real", cells.real, cells.real_groups[key]), ("pred", cells.pred, cells.pred_groups[key])]
        names = {"control": "control (real)", "real": "real perturbed", "pred": "predicted"}
        for name, adata, rows in groups:
            xy = proj(adata, _subsample(rows, MAX_CELLS, rng))
            ax.scatter(xy[:, 0], xy[:, 1], s=5, color=COLORS[name], alpha=0.45 if name == "control" else 0.6,
                       linewidths=0, label=f"{names[name]} ({len(rows)})")
            if len(xy):
                ax.scatter(*xy.mean(axis=0), s=110, marker="X", color=COLORS[name], edgecolors="black", zorder=5)
        ax.set_title(_label(key), fontsize=9)
        proj.labels(ax)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7, markerscale=2, loc="best", framealpha=0.8)
    return fig


def plot_populations(cells: Cells, key, proj: Projection, rng) -> tuple[Figure, str]:
    """One panel per sampled population and per real replicate batch (same PCA coordinates), and
    one of their pseudobulks."""
    prow, rrow = cells.pred_groups[key], cells.real_groups[key]
    samples = cells.pred.obs["sample"].to_numpy().astype(np.int64)[prow] if "sample" in cells.pred.obs.columns \
        else np.zeros(len(prow), dtype=np.int64)
    batches = obs_str(cells.real, "batch", default="all")[rrow]
    pops = {f"sample {k}": prow[samples == k] for k in np.unique(samples)}
    reps = {f"real {b}": rrow[batches == b] for b in np.unique(batches)}
    note = ""
    if len(pops) > MAX_PANELS or len(reps) > MAX_PANELS:
        note = f"showing {min(len(pops), MAX_PANELS)} of {len(pops)} populations, {min(len(reps), MAX_PANELS)} " \
               f"of {len(reps)} real batches"
    pops, reps = dict(list(pops.items())[:MAX_PANELS]), dict(list(reps.items())[:MAX_PANELS])
    ctrl = proj(cells.real, _subsample(cells.control_rows(key[0]), MAX_CELLS // 2, rng))
    xy = {**{k: proj(cells.pred, _subsample(v, MAX_CELLS, rng)) for k, v in pops.items()},
          **{k: proj(cells.real, _subsample(v, MAX_CELLS, rng)) for k, v in reps.items()}}
    xlim, ylim = _limits([ctrl, *xy.values()])
    ncols = max(len(pops), len(reps) + 1)
    fig = _figure(2.5 * ncols, 5.3)
    axes = fig.subplots(2, ncols, squeeze=False, sharex=True, sharey=True)
    for row, group, color in ((0, pops, COLORS["pred"]), (1, reps, COLORS["real"])):
        for j, (name, rows) in enumerate(group.items()):
            ax = axes[row, j]
            ax.scatter(ctrl[:, 0], ctrl[:, 1], s=3, color=COLORS["control"], alpha=0.35, linewidths=0)
            ax.scatter(xy[name][:, 0], xy[name][:, 1], s=5, color=color, alpha=0.65, linewidths=0)
            ax.set_title(f"{name} ({len(rows)} cells)", fontsize=8.5)
    pb = axes[1, len(reps)]
    means = {"control": ctrl.mean(axis=0)} if len(ctrl) else {}
    means.update((name, pts.mean(axis=0)) for name, pts in xy.items())
    for name, m in means.items():
        color, marker = ((COLORS["control"], "D") if name == "control" else
                         (COLORS["pred"], "o") if name in pops else (COLORS["real"], "s"))
        pb.scatter(*m, s=50, color=color, marker=marker, edgecolors="black", linewidths=0.6)
    pb.set_title("pseudobulks (cell means)", fontsize=8.5)
    pb.set(xlim=xlim, ylim=ylim)  # shared by every panel
    for ax in axes.ravel():
        ax.set_visible(ax.has_data())
        ax.tick_params(labelsize=6.5, labelbottom=True)
    _annotate(pb, np.array(list(means.values())), [n.split(" ", 1)[-1] for n in means])
    proj.labels(axes[1, 0])
    fig.suptitle(f"{key[0]} / {key[1]}: sampled populations (top) and real replicate batches (bottom)", fontsize=10)
    return fig, note


# ---------------------------------------------------------------------------------------------
# Calibration and training
# ---------------------------------------------------------------------------------------------


def plot_calibration(calib: pd.DataFrame) -> Figure | None:
    """Coverage vs nominal per level, and the summed rank histogram of the most common K."""
    levels = sorted(c.split("_", 1)[1] for c in calib.columns if c.startswith("coverage_"))
    hists = [json.loads(h) for h in calib.get("pit_hist", pd.Series(dtype=str)).fillna("") if h]
    if not levels and not hists:
        return None
    fig = _figure(9.0, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    for level, marker in zip(levels, "os^vD<>"):
        nom, cov = calib[f"nominal_{level}"].to_numpy(float), calib[f"coverage_{level}"].to_numpy(float)
        ax1.scatter(nom, cov, marker=marker, s=28, alpha=0.7, label=f"{level}% interval")
    ax1.plot([0, 1], [0, 1], ls="--", color="#555555", lw=1)
    ax1.set(xlim=(0, 1), ylim=(0, 1), xlabel="nominal coverage", ylabel="coverage of real replicates",
            title="replicate pseudobulks inside the sampled spread")
    ax1.title.set_fontsize(9.5)
    ax1.legend(fontsize=8)
    if hists:
        lengths = pd.Series([len(h) for h in hists])
        k1 = int(lengths.mode().iloc[0])
        total = np.sum([h for h in hists if len(h) == k1], axis=0).astype(float)
        ax2.bar(np.arange(k1), total / total.sum(), color=COLORS["pred"], alpha=0.8)
        ax2.axhline(1 / k1, ls="--", color="#555555", lw=1, label="calibrated (uniform)")
        ax2.set(xlabel="rank of the real replicate among the K populations", ylabel="fraction of (replicate, gene)",
                title=f"rank histogram, K = {k1 - 1} ({sum(lengths == k1)} condition(s))", xticks=np.arange(k1))
        ax2.title.set_fontsize(9.5)
        ax2.legend(fontsize=8)
    else:
        ax2.set_visible(False)
    return fig


def _curve_keys(runs: list[Run]) -> list[str]:
    """Logged metrics other than the loss panel's: train/*, val/*, sample/*, eval/*, the rest, the
    learning rate and perf/* last (at most 15)."""
    prefixes = ("train/", "val/", "sample/", "eval/")

    def rank(key: str):
        group = 3 if key.startswith("perf/") else 2 if key.split("/")[-1] == "lr" else 0 if key.startswith(
            prefixes) else 1
        return group, next((i for i, p in enumerate(prefixes) if key.startswith(p)), len(prefixes)), key

    keys = dict.fromkeys(k for r in runs for rec in r.records for k in rec)
    keys = [k for k in keys if k not in ("step", "train/loss", "val/loss")
            and any(len(numeric_series(r.records, k)[0]) for r in runs)]
    return sorted(keys, key=rank)[:15]


def _ema(v: np.ndarray, window: int) -> np.ndarray:
    """Exponential moving average of ``v`` with the span of ``window`` points."""
    alpha, out, acc = 2.0 / (window + 1), np.empty_like(v), v[0]
    for i, x in enumerate(v):
        acc = alpha * x + (1 - alpha) * acc
        out[i] = acc
    return out


def plot_training(runs: list[Run]) -> Figure:
    """The loss (raw, smoothed, validation) and every other logged metric, one colour per run."""
    keys = _curve_keys(runs)
    n = 1 + len(keys)
    fig = _figure(4.0 * min(3, n), 2.8 * -(-n // 3))
    axes = _grid(fig, n, 3)
    colors = [f"C{i}" for i in range(10)]
    for i, run in enumerate(runs):
        c, tag = colors[i % 10], run.label if len(runs) > 1 else ""
        s, v = numeric_series(run.records, "train/loss")
        if len(v):
            window = max(1, len(v) // 20)
            if window > 1:
                axes[0].plot(s, v, color=c, alpha=0.25, lw=0.8)
            axes[0].plot(s, _ema(v, window), color=c, lw=1.6, label=f"{tag} train".strip())
        s, v = numeric_series(run.records, "val/loss")
        if len(v):
            axes[0].plot(s, v, color=c, ls="--", marker="o", ms=3.5, lw=1.2, label=f"{tag} val".strip())
        for ax, key in zip(axes[1:], keys):
            s, v = numeric_series(run.records, key)
            if len(v):
                ax.plot(s, v, color=c, lw=1.3, marker="o" if len(v) <= 30 else None, ms=2.5, label=run.label)
    axes[0].set_title("loss (train smoothed, raw faint; val dashed)", fontsize=9)
    steps = np.concatenate([numeric_series(r.records, "step")[1] for r in runs])
    for ax in axes:
        if len(steps) and np.ptp(steps) > 0:  # one step axis for every panel
            ax.set_xlim(steps.min() - 0.03 * np.ptp(steps), steps.max() + 0.03 * np.ptp(steps))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.yaxis.get_offset_text().set_fontsize(7)
        ax.tick_params(labelsize=7.5)
        ax.grid(alpha=0.3)
        ax.set_xlabel("step", fontsize=8)
    for ax, key in zip(axes[1:], keys):
        ax.set_title(key, fontsize=9)
    if axes[0].has_data():
        axes[0].legend(fontsize=7.5)
    return fig
