"""The page of ``perturbdiff report``: sections assembled from an evaluation directory
(``perturbdiff.eval.schema.EvalDir``), its cells and training runs (``.inputs``) and the figures
(``.plots``), built in a temporary directory that replaces ``out`` only when complete."""


from __future__ import annotations

import base64
import html
import importlib.metadata
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ...outputs import OutputLock, Staging, check_output
from ..schema import HEADLINE, LOWER_IS_BETTER, NOT_RANKED, EvalDir
from .inputs import Cells, Run, load_cells, load_runs, numeric_series, resolve_conditions
from .plots import (MAX_CELLS, direction, fit_pca, format_value, plot_calibration, plot_deltas, plot_metrics, plot_pca,
                    plot_populations, plot_training, png)


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_STYLE = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;max-width:1280px;margin:1.5em auto;padding:0 1.2em;
 color:#222;line-height:1.45;font-size:15px}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;border-bottom:2px solid #ddd;padding-bottom:.2em;
 margin-top:1.8em} h3{font-size:1.05em}
table{border-collapse:collapse;font-size:13px;font-variant-numeric:tabular-nums;margin:.5em 0}
th,td{padding:4px 9px;border-bottom:1px solid #e2e2e2;text-align:right;vertical-align:bottom}
th{background:#f4f4f4;font-weight:600;max-width:9em} th:first-child,td:first-child{text-align:left}
td.best{font-weight:700;background:#dff0e3} tr.ceiling td{color:#777;font-style:italic}
.kv td{text-align:left;border:none;padding:2px 10px 2px 0} .scroll{overflow-x:auto}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption,.note{color:#555;font-size:13px} details{margin:.8em 0} summary{cursor:pointer;font-weight:600}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:12px} footer{margin-top:3em;color:#666;font-size:12px}
"""


def _esc(x) -> str:
    """``x`` as escaped HTML text."""
    return html.escape(str(x))


def _head(name: str) -> str:
    """A column header that may wrap after its underscores."""
    return "_<wbr>".join(_esc(p) for p in str(name).split("_"))


def best_methods(mean: pd.DataFrame) -> dict[str, set[str]]:
    """Per metric column of ``mean`` (method x metric), the non-ceiling method(s) with the best value."""
    best = {}
    for metric in mean.columns:
        if metric in NOT_RANKED:
            continue
        v = mean[metric].drop(index="ceiling", errors="ignore").astype(float).dropna()
        if len(v):
            target = v.min() if metric in LOWER_IS_BETTER else v.max()
            best[metric] = set(v.index[np.isclose(v.to_numpy(), target, rtol=1e-12, atol=0)])
    return best


def _method_table(mean: pd.DataFrame, tips: pd.DataFrame | None = None, by_metric: bool = False) -> str:
    """``mean`` (method x metric) as a table, the best non-ceiling value per metric marked; rows are
    the methods, or the metrics with ``by_metric``. ``tips`` (same shape) become hover titles."""
    best = best_methods(mean)

    def cell(method, metric) -> str:
        mark = " class='best'" if method in best.get(metric, ()) else ""
        tip = f" title='{_esc(tips.at[method, metric])}'" if tips is not None and metric in tips.columns else ""
        return f"<td{mark}{tip}>{format_value(mean.at[method, metric])}</td>"

    if by_metric:
        head = "<th>metric</th>" + "".join(f"<th>{_head(m)}</th>" for m in mean.index)
        rows = [f"<tr><td>{_esc(metric)}{direction(metric)}</td>" + "".join(cell(m, metric) for m in mean.index)
                + "</tr>" for metric in mean.columns]
    else:
        head = "<th>method</th>" + "".join(f"<th title='{_esc(c)}'>{_head(c)}{direction(c)}</th>"
                                           for c in mean.columns)
        rows = [f"<tr{' class=ceiling' if m == 'ceiling' else ''}><td>{_esc(m)}</td>"
                + "".join(cell(m, metric) for metric in mean.columns) + "</tr>" for m in mean.index]
    return f"<div class='scroll'><table><tr>{head}</tr>\n" + "\n".join(rows) + "</table></div>"


# (column, what it is, the real value it is read against: a column, a number, or None)
_FIDELITY_SHOWN = (("zero_frac_pred", "exact zeros", "zero_frac_real"),
                   ("subcount_frac_pred", "nonzero values below one count", 0.0),
                   ("sd_ratio", "per-gene SD / real (median)", 1.0),
                   ("delta_norm_ratio", "|mean change| / real", 1.0),
                   ("max_pred", "largest value", "max_real"),
                   ("de_nsig_counts_pred", "DE genes", "de_nsig_counts_real"))


def _fidelity_table(ev: EvalDir) -> str:
    """The fidelity diagnostics (perturbdiff.eval.fidelity), means over conditions, with the real
    cells' value in the last row: no method is marked best, each is read against the real row."""
    mean = ev.aggregated.pivot(index="method", columns="metric", values="mean").reindex(index=ev.methods())
    shown = [row for row in _FIDELITY_SHOWN if row[0] in mean.columns]
    if not shown or "model" not in mean.index:
        return ""
    head = "<th>method</th>" + "".join(f"<th title='{_esc(c)}'>{_esc(what)}</th>" for c, what, _ in shown)
    rows = [f"<tr{' class=ceiling' if m == 'ceiling' else ''}><td>{_esc(m)}</td>"
            + "".join(f"<td>{format_value(mean.at[m, c])}</td>" for c, _, _ in shown) + "</tr>" for m in mean.index]
    real = [mean.at["model", ref] if isinstance(ref, str) and ref in mean.columns else ref for _, _, ref in shown]
    rows.append("<tr class='real'><td><b>real cells</b></td>" + "".join(f"<td><b>{format_value(v)}</b></td>"
                                                                      for v in real) + "</tr>")
    return ("<p class='note'>Means over the conditions, each sampled population scored on its own. Real expression "
            "is counts: a measured value is 0 or at least one count's worth; the real row gives what to read each "
            "column against.</p>" + f"<div class='scroll'><table><tr>{head}</tr>\n" + "\n".join(rows)
            + "</table></div>")


def _metric_tables(ev: EvalDir) -> str:
    agg = ev.aggregated
    methods = ev.methods()
    mean = agg.pivot(index="method", columns="metric", values="mean").reindex(index=methods)
    head = mean[[m for m in HEADLINE if m in mean.columns]].copy()
    avg = ev.scores[ev.scores["metric"] == "avg_score"].set_index("method")["from_baseline"]
    if len(avg):
        head["avg_score"] = avg.reindex(methods).astype(float)
    tips = agg.assign(tip=[f"median {format_value(r['median'])}, std {format_value(r['std'])}, min "
                           f"{format_value(r['min'])}, max {format_value(r['max'])}, n = {r['count']}"
                           for r in agg.to_dict("records")]).pivot(index="method", columns="metric", values="tip")
    full = mean[list(dict.fromkeys(agg["metric"]))]
    baseline = ev.summary.get("score_baseline")
    about_score = (f"avg_score = cell-eval's normalised score against {_esc(baseline)} (0 = no better, 1 = perfect)."
                   if baseline and len(avg) else "No normalised score: its baseline was not scored.")
    return (f"<p class='note'>Means over the {ev.summary.get('n_conditions', '?')} conditions; "
            f"\u2191 higher / \u2193 lower is better; the best non-ceiling value of each column is marked "
            f"(ceiling = real vs real split halves, an upper bound). {about_score}</p>" + _method_table(head)
            + "<details><summary>All metrics (hover a value for median, std, min, max)</summary>"
            + _method_table(full, tips.reindex(index=methods), by_metric=True) + "</details>")


def _calibration_table(calib: pd.DataFrame) -> str:
    """calibration.csv as a table (first 200 conditions): coverage / nominal per level, PIT summaries."""
    levels = sorted(c.split("_", 1)[1] for c in calib.columns if c.startswith("coverage_"))
    cols = ["context", "perturbation", "K", "J", "cells", "genes"] + [f"{lv}%: coverage / nominal" for lv in levels] \
        + ["PIT mean", "PIT var ratio", "reason"]
    rows = []
    for r in calib.head(200).to_dict("records"):
        vals = [r.get("context"), r.get("perturbation"), r.get("n_samples"), r.get("n_replicates"), r.get("n_cells"),
                r.get("n_genes")] + [f"{format_value(r.get(f'coverage_{lv}'))} / {format_value(r.get(f'nominal_{lv}'))}"
                                     for lv in levels] + [r.get("pit_mean"), r.get("pit_var_ratio"), r.get("reason")]
        rows.append("<tr>" + "".join(f"<td>{_esc(format_value(v) if isinstance(v, float) else v)}</td>"
                                     for v in vals) + "</tr>")
    more = f"<p class='note'>first 200 of {len(calib)} conditions</p>" if len(calib) > 200 else ""
    return ("<div class='scroll'><table><tr>" + "".join(f"<th>{_esc(c)}</th>" for c in cols) + "</tr>"
            + "".join(rows) + "</table></div>" + more)


class _Page:
    """Sections of the page; figures go to ``out`` as PNGs and into the page as data URIs."""

    def __init__(self, out: Path):
        self.out, self.parts, self.figures = out, [], []

    def add(self, text: str) -> None:
        """Append an HTML fragment."""
        self.parts.append(text)

    def figure(self, fig: Figure, name: str, caption: str) -> None:
        """Write ``fig`` as ``<name>.png`` and embed it with its caption."""
        data = png(fig)
        (self.out / f"{name}.png").write_bytes(data)
        self.figures.append(f"{name}.png")
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        self.add(f"<figure><img src='{uri}' alt='{_esc(name)}'><figcaption>{_esc(caption)}</figcaption></figure>")


def _header(ev: EvalDir, shown, note: str) -> str:
    """The inputs and settings of the evaluation, its notes, and the conditions plotted."""
    s = ev.summary
    contexts = s.get("contexts", [])
    kv = [("evaluation", ev.path.resolve()), *(((f"{k} h5ad", v) for k, v in (s.get("inputs") or {}).items() if v)),
          ("conditions", s.get("n_conditions")),
          ("contexts", f"{len(contexts)}: {', '.join(map(str, contexts[:8]))}{', ...' if len(contexts) > 8 else ''}"),
          ("sampled populations per condition (K)", s.get("n_samples")), ("methods", ", ".join(s.get("methods", []))),
          ("profile", (s.get("options") or {}).get("profile")), ("control label", ev.control),
          ("evaluation time", f"{(s.get('seconds') or {}).get('total', '?')} s")]
    out = ["<table class='kv'>" + "".join(f"<tr><td><b>{_esc(k)}</b></td><td>{_esc(v)}</td></tr>" for k, v in kv)
           + "</table>"]
    notes = [(m, n) for m, ns in (s.get("notes") or {}).items() for n in ns if n and n != "none"]
    if notes:
        out.append("<details><summary>Notes from the evaluation (" + str(len(notes)) + ")</summary><ul>"
                   + "".join(f"<li><b>{_esc(m)}</b>: {_esc(n)}</li>" for m, n in notes) + "</ul></details>")
    if shown:
        out.append("<p>Conditions in the cell-level plots: "
                   + "; ".join(f"<code>{_esc(c)}/{_esc(p)}</code>" for c, p in shown) + "</p>")
    if note:
        out.append(f"<p class='note'><b>{_esc(note)}</b></p>")
    return "\n".join(out)


def _versions() -> str:
    """Versions of perturbdiff and the libraries that made the report, for the footer."""
    import matplotlib

    import perturbdiff

    def dist(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"
    return (f"perturbdiff {getattr(perturbdiff, '__version__', '?')}, anndata {dist('anndata')}, "
            f"numpy {np.__version__}, pandas {pd.__version__}, matplotlib {matplotlib.__version__}")


def _cell_sections(page: _Page, cells: Cells, shown) -> None:
    """Deltas, PCA and the populations beside the replicate batches of the shown conditions."""
    rng = np.random.default_rng(0)
    genes = cells.real.var_names.astype(str).to_numpy()
    page.add("<h2>Predicted vs real log-fold-changes</h2>")
    page.figure(plot_deltas(cells, shown, genes), "deltas",
                "Pseudobulk delta per gene (mean log1p expression of the perturbed cells minus that of the "
                "context's real controls); model: all sampled populations pooled. Dashed: y = x; genes with the "
                "largest real effect are named.")
    pcas = {c: fit_pca(cells, c, rng) for c in dict.fromkeys(c for c, _ in shown)}
    page.add("<h2>Cells: real vs predicted</h2>")
    page.figure(plot_pca(cells, shown, pcas, rng), "pca",
                f"PCA fitted on the real cells of each context (controls and held-out conditions; at most "
                f"{MAX_CELLS:,} per group); crosses: group means. Legend counts are cells before subsampling.")
    page.add("<h3>Sampled populations beside the real replicate batches</h3>")
    for i, key in enumerate(shown, 1):
        fig, extra = plot_populations(cells, key, pcas[key[0]], rng)
        page.figure(fig, f"populations_{i}", f"{key[0]} / {key[1]}: each panel in the PCA coordinates above, "
                    f"real controls grey; last panel: the means of the panels (orange circles: sampled "
                    f"populations, blue squares: real batches, grey diamond: controls). {extra}".strip())


def _calibration_section(page: _Page, calib: pd.DataFrame) -> None:
    """Explanation, coverage and rank-histogram figure, and the per-condition table."""
    page.add("<h2>Calibration of the sampled populations</h2><p class='note'>Per condition, do the real "
             "replicate batches' pseudobulks fall inside the spread of the K sampled populations' pseudobulks? "
             "Coverage should match nominal (with K populations the widest interval has nominal (K-1)/(K+1)); "
             "a calibrated model gives a flat rank histogram, PIT mean 0.5 and variance ratio 1 (> 1: samples "
             "too alike; < 1: too spread). Definitions: perturbdiff.eval.distribution.</p>")
    fig = plot_calibration(calib)
    if fig is not None:
        page.figure(fig, "calibration", "Left: coverage per condition and level; dashed y = x. Right: ranks "
                    "of every (replicate, gene) pseudobulk among the K populations, summed over conditions.")
    page.add(_calibration_table(calib))


def _training_section(page: _Page, runs: list[Run]) -> None:
    """Training curves of the runs and their config.yaml files."""
    page.add("<h2>Training</h2>")
    about = []
    for r in runs:
        steps = numeric_series(r.records, "step")[1]
        about.append(f"{r.label}: {len(r.records)} records" + (f" to step {steps.max():g}" if len(steps) else "")
                     + (f", {r.n_bad} unreadable line(s) skipped" if r.n_bad else ""))
    page.figure(plot_training(runs), "training", "metrics.jsonl of " + "; ".join(about) + ".")
    for r in runs:
        if r.config:
            page.add(f"<details><summary>config.yaml of {_esc(r.label)}</summary><pre>{_esc(r.config)}</pre></details>")


def _build(ev: EvalDir, runs: list[Run], requested, page: _Page, log, t0: float) -> str:
    """The whole page (figures written on the way); returns the HTML."""
    cells, shown, note = load_cells(ev, requested, log)
    page.add(f"<h1>PerturbDiff evaluation report</h1><p class='note'>{_esc(ev.path.name)} \u00b7 generated "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>" + _header(ev, shown, note))
    page.add("<h2>Metrics against the baselines</h2>" + _metric_tables(ev))
    fidelity = _fidelity_table(ev)
    if fidelity:
        page.add("<h2>Cells like measured cells?</h2>" + fidelity)
    names = [m for m in HEADLINE if m in ev.metrics.columns and ev.metrics[m].notna().any()]
    if names:
        page.figure(plot_metrics(ev.metrics, ev.methods(), names), "metrics",
                    "Per-condition values (dots), their mean (black bar) and, with >= 5 conditions, a box.")
    if cells is not None and shown:
        _cell_sections(page, cells, shown)
    if ev.calibration is not None and len(ev.calibration):
        _calibration_section(page, ev.calibration)
    if runs:
        _training_section(page, runs)
    page.add(f"<footer>{_esc(_versions())}<br>metrics: {_esc(ev.summary.get('reference', ''))}<br>"
             f"report written in {time.time() - t0:.1f} s</footer>")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>PerturbDiff report: {_esc(ev.path.name)}</title><style>{_STYLE}</style></head>\n<body>\n"
            + "\n".join(page.parts) + "\n</body></html>\n")


def write_report(eval_dir, out=None, run_dir=None, conditions=None, log=print, overwrite: bool = False) -> Path:
    """Write the report of the evaluation directory ``eval_dir``; return the path of its index.html.

    Args:
        eval_dir: a ``perturbdiff evaluate`` output directory.
        out: output directory (default ``<eval_dir>/report``). An earlier report there is replaced
            only with ``overwrite``; any other existing directory is refused (perturbdiff.outputs).
        run_dir: None, a training run directory (with metrics.jsonl), or a list of them (e.g. the
            pretraining and the fine-tuning run), plotted together, labelled by directory name.
        conditions: "context/perturbation" strings (or perturbation names unique across contexts)
            for the cell-level plots; default: the ``N_DEFAULT`` conditions with the largest real
            effect (L2 norm of the real pseudobulk delta).
        overwrite: replace an earlier report at ``out``.
    """
    t0 = time.time()
    out = Path(out) if out is not None else Path(eval_dir) / "report"
    runs_in = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir or [])
    check_output(out, "report", inputs=[eval_dir, *runs_in], overwrite=overwrite)
    ev = EvalDir.load(eval_dir)
    if conditions:
        resolve_conditions(conditions, ev.conditions())  # fail before any work
    runs = load_runs(run_dir)
    with OutputLock(out, "report directory"):
        stage = Staging(out, "report")
        tmp = stage.open()
        try:
            page = _Page(tmp)
            (tmp / "index.html").write_text(_build(ev, runs, conditions, page, log, t0), encoding="utf-8")
            stage.commit(["index.html"])
        except BaseException:
            stage.abort()
            raise
    log(f"report: {len(page.figures)} figures written in {time.time() - t0:.1f}s")
    return out / "index.html"
