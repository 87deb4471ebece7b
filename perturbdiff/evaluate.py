"""``perturbdiff evaluate``: the model's prediction scored beside the baselines, written to a directory.

    perturbdiff evaluate --dir PREDICT_OUT                        (pred.h5ad, real.h5ad[, train.h5ad])
    perturbdiff evaluate --pred pred.h5ad --real real.h5ad [--train train.h5ad] --out EVAL_OUT

Inputs are in the evaluation layout (``perturbdiff.predict``): log-normalised ``.X``, obs perturbation,
context, batch (the replicate), sample (population index, -1 for real cells), the same genes in the
same order, the same real control cells in pred and real. Methods scored, each on the same real
cells with the same metric suite (``perturbdiff.eval.suite``: cell-eval 0.6.6's metrics + R^2):

    model               the prediction
    control_mean        resampled real controls ("no effect"; needs nothing else)
    perturbation_mean   cell-eval's baseline, from the training cells (needs train)
    linear              Ahlmann-Eltze et al. 2024, per-context offset; an unseen context from its controls
                        (needs train)
    latent_shift        scGen-style latent arithmetic on a training-cell PCA (needs train)
    ceiling             split halves of the real cells (an upper bound: real vs real)

plus, per condition, MMD^2 and energy distance between predicted and real cells, and the replicate
calibration of the K sampled populations (``perturbdiff.eval.distribution``). Outputs (``--out``):

    metrics.csv         one row per (method, context, perturbation): every metric, mmd2, energy_distance_u
                        (unbiased) and energy_distance_v (V-statistic, cell-eval's helper)
    aggregated.csv      method, metric, count, mean, median, std, min, max (NaN skipped)
    per_context.csv     the same per (method, context, metric)
    scores.csv          cell-eval's normalised score of each method against perturbation_mean
                        (``cell-eval score``: best-1 metrics (u-b)/(1-b), best-0 metrics 1-u/b, NaN->0,
                        clipped at 0; avg_score = their mean)
    calibration.csv     per condition: coverage at 50/80/90% vs nominal, PIT mean / variance ratio
    summary.json        inputs, options, headline table (method x metric means), notes, timings

Everything is written under a temporary directory that replaces ``--out`` only when complete (an
earlier evaluation there only with --overwrite); ``--dir`` requires a complete prediction directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .data.schema import IMPLICIT_LABEL, DataError
from .eval.fidelity import FIDELITY_COLUMNS, LOG1P_MAX, fidelity, scale_problems
from .outputs import OutputLock, Staging, check_output, out_of_space, require_complete, space_error

#: metrics whose best value is 1 / 0 (cell-eval's registry; r_squared and the counts are not in it,
#: so, as in ``cell-eval score``, they are not part of the normalised score)
BEST_ONE = ("pearson_delta", "discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
            "pearson_edistance", "overlap_at_N", "overlap_at_50", "overlap_at_100", "overlap_at_200",
            "precision_at_N", "precision_at_50", "precision_at_100", "precision_at_200", "de_spearman_sig",
            "de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall", "pr_auc", "roc_auc")
BEST_ZERO = ("mse", "mae", "mse_delta", "mae_delta")
FIDELITY = FIDELITY_COLUMNS + ("de_nsig_counts_pred", "de_nsig_counts_real")
SCORING = {
    "cell_eval_metrics": "each sampled population scored on its own (as many cells as the real condition "
                         "for a store split), then the mean over populations; populations.csv has each one, "
                         "aggregated.csv's population_sd their spread",
    "fidelity": "per population, like the cell-eval metrics (perturbdiff.eval.fidelity)",
    "distances": "mmd2, energy_distance_u / _v: the sampled populations pooled (the model's distribution of cells)",
    "calibration": "the sampled populations against the real replicate batches",
    "baselines": "one population each, with the real cell counts; the ceiling: real half vs real half",
}
HEADLINE = ("pearson_delta", "mae", "mse_delta", "discrimination_score_l1", "overlap_at_N", "de_direction_match",
            "de_spearman_lfc_sig", "r_squared", "energy_distance_u", "energy_distance_v", "mmd2")
PROFILES = {
    "full": None,
    # the metrics the PerturbDiff paper's tables report
    "paper": ("pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "overlap_at_50",
              "overlap_at_100", "overlap_at_200", "precision_at_N", "de_direction_match", "de_spearman_lfc_sig",
              "de_spearman_sig", "roc_auc", "pr_auc", "r_squared"),
    "vcc": ("mae", "discrimination_score_l1", "overlap_at_N"),
    "minimal": ("pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "precision_at_N",
                "de_nsig_counts"),
}
METHODS = ("model", "control_mean", "perturbation_mean", "linear", "latent_shift", "ceiling")
NEEDS_TRAIN = ("perturbation_mean", "linear", "latent_shift")
SCORE_BASELINE = "perturbation_mean"
# each method's random stream; fixed as methods are added, so earlier methods keep their numbers
SEED_INDEX = {"model": 0, "control_mean": 1, "perturbation_mean": 2, "linear": 3, "ceiling": 4, "latent_shift": 5}


@dataclass
class EvaluateOptions:
    control_label: str = "control"
    profile: str = "full"  # full | paper | vcc | minimal
    de_fdr: float = 0.05
    methods: tuple[str, ...] = METHODS  # those needing train are skipped (noted) without one
    distances: bool = True
    calibration: bool = True
    cap: int = 2_000  # cells per side for the distances
    seed: int = 0
    # the user's obs columns (renamed to the evaluation layout on read); context_col None: one context
    pert_col: str = "perturbation"
    context_col: str | None = "context"
    batch_col: str | None = "batch"


@dataclass
class Evaluation:
    out: Path
    metrics: pd.DataFrame
    aggregated: pd.DataFrame
    scores: pd.DataFrame
    calibration: pd.DataFrame | None
    summary: dict = field(default_factory=dict)


def _layout(adata, path: Path, what: str, opts: EvaluateOptions):
    """The user's obs columns under the evaluation layout's names (perturbation, context, batch)."""
    obs = adata.obs
    for want, col in (("perturbation", opts.pert_col), ("context", opts.context_col), ("batch", opts.batch_col)):
        if col is None or col == want:
            continue
        if col not in obs.columns:
            if want == "batch":  # an absent batch column: one batch
                continue
            flag = {"perturbation": "--pert-col", "context": "--context-col"}[want]
            raise DataError(path, f"{what}: obs has no column {col!r} ({flag}; columns: {list(obs.columns)[:12]})")
        if want in obs.columns:
            obs = obs.rename(columns={want: f"{want}_orig"})
        obs = obs.rename(columns={col: want})
    if opts.context_col is None:
        if "context" in obs.columns:
            obs = obs.rename(columns={"context": "context_orig"})
        obs["context"] = IMPLICIT_LABEL
    adata.obs = obs
    return adata


def _read(path: str | Path, what: str, opts: EvaluateOptions):
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} AnnData not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for a damaged file
        raise DataError(path, f"cannot read {what} AnnData: {err}") from None
    adata = _layout(adata, path, what, opts)
    for col in ("perturbation", "context"):
        if col not in adata.obs.columns:
            raise DataError(path, f"{what}: obs has no column {col!r} (columns: {list(adata.obs.columns)[:12]}); "
                            "the evaluation layout needs perturbation and context")
    return adata


def _check_pair(real, pred, paths: dict, control: str) -> None:
    """The errors a user meets first, naming the file: genes, control label, conditions."""
    gr, gp = real.var_names.astype(str).to_numpy(), pred.var_names.astype(str).to_numpy()
    if len(gr) != len(gp) or not np.array_equal(gr, gp):
        in_r, in_p = set(gr), set(gp)
        only_p = [g for g in gp if g not in in_r][:5]
        only_r = [g for g in gr if g not in in_p][:5]
        how = ("the same genes in another order" if not only_p and not only_r and len(gr) == len(gp)
               else f"only in pred: {only_p}; only in real: {only_r}")
        raise DataError(paths["pred"], f"var_names differ from {paths['real']} ({len(gp)} vs {len(gr)} genes; "
                        f"{how}): predict and evaluate on one gene vocabulary")
    for adata, which in ((real, "real"), (pred, "pred")):
        labels = adata.obs["perturbation"].astype(str)
        if not (labels == control).any():
            seen = sorted(labels.unique())[:8]
            raise DataError(paths[which], f"no control cells: no obs['perturbation'] equals {control!r} "
                            f"(labels include {seen}); pass --control-label")
    key = lambda a: set(zip(a.obs["context"].astype(str), a.obs["perturbation"].astype(str)))  # noqa: E731
    missing = sorted(c for c in key(pred) - key(real) if c[1] != control)
    if missing:
        raise DataError(paths["pred"], f"condition(s) (context, perturbation) {missing[:5]} have no real cells in "
                        f"{paths['real']}")


def _real_only(adata):
    if "sample" not in adata.obs.columns:
        return adata
    return adata[adata.obs["sample"].to_numpy().astype(np.int64) < 0].copy()


def _conditions(real, pred, control: str) -> pd.DataFrame:
    """Held-out conditions with the real cell counts (baselines predict as many cells as real has)."""
    is_pert = pred.obs["perturbation"].astype(str).to_numpy() != control
    keys = set(zip(pred.obs["context"].astype(str)[is_pert], pred.obs["perturbation"].astype(str)[is_pert]))
    obs = real.obs[["context", "perturbation"]].astype(str)
    counts = obs.value_counts().rename("n_cells").reset_index()
    counts = counts[[(c, p) in keys for c, p in zip(counts["context"], counts["perturbation"])]]
    return counts.sort_values(["context", "perturbation"]).reset_index(drop=True)


def _baseline(name: str, train, conditions: pd.DataFrame, real, opts: EvaluateOptions):
    """(pred, truth) of one baseline; the truth is ``real`` except for the split-half ceiling."""
    from .eval import baselines as bl

    control = opts.control_label
    controls = real[(real.obs["perturbation"].astype(str) == control).to_numpy()].copy()
    rng = np.random.default_rng([opts.seed, SEED_INDEX[name]])
    if name == "control_mean":
        return bl.predict_control_mean(controls, conditions, controls, rng, control_label=control), real
    if name == "perturbation_mean":
        return bl.predict_perturbation_mean(train, conditions, controls, rng, control_label=control), real
    if name == "linear":
        return bl.predict_linear(train, conditions, controls, rng, control_label=control, context_offset=True,
                                 context_from_controls=True), real
    if name == "latent_shift":
        from .eval.latent import predict_latent_shift

        return predict_latent_shift(train, conditions, controls, rng, control_label=control), real
    if name == "ceiling":
        return bl.predict_ceiling(real, conditions, controls, rng, control_label=control)
    raise ValueError(f"unknown method {name!r}; known: {list(METHODS)}")


def _populations(pred, control: str):
    """[(k, AnnData)]: each sampled population k of ``pred`` (obs sample = k) with the control cells,
    as the prediction to score; one population (k = 0) when there is no sample column."""
    if "sample" not in pred.obs.columns:
        return [(0, pred)]
    sample = pred.obs["sample"].to_numpy().astype(np.int64)
    is_ctrl = pred.obs["perturbation"].astype(str).to_numpy() == control
    ks = sorted(set(sample[~is_ctrl & (sample >= 0)].tolist())) or [0]
    return [(k, pred[(sample == k) | is_ctrl].copy()) for k in ks]


def _mean_over_populations(per_pop: pd.DataFrame) -> pd.DataFrame:
    """One row per condition: the mean of each metric over its populations (NaN skipped), and how many."""
    keys = ["context", "perturbation"]
    values = [c for c in per_pop.columns if c not in (*keys, "sample") and pd.api.types.is_numeric_dtype(per_pop[c])]
    g = per_pop.groupby(keys, sort=True)
    return g[values].mean().join(g.size().rename("n_populations")).reset_index()


def _population_spread(per_pop: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """method, metric, population_sd: the SD of a metric across a condition's populations, averaged
    over conditions (NaN for one population)."""
    sd = per_pop.groupby(["method", "context", "perturbation"])[metrics].std(ddof=1).reset_index()
    long = sd.melt(id_vars=["method", "context", "perturbation"], value_vars=metrics, var_name="metric",
                   value_name="population_sd")
    return long.groupby(["method", "metric"], sort=False)["population_sd"].mean().reset_index()


def _check_scale(adata, path: str, log) -> list[str]:
    """NaN / infinite values are refused (naming the file and how many); negative values and values
    above cell-eval's log1p limit are flagged in the notes and printed (cell-eval refuses the latter)."""
    found = scale_problems(adata.X)
    if found["non_finite"]:
        raise DataError(path, f"{found['non_finite']:,} NaN or infinite value(s) in .X: not scorable")
    flags = []
    if found["negative"]:
        flags.append(f"{path}: {found['negative']:,} negative value(s) in .X (log1p expression is >= 0)")
    if found["above_log1p_max"]:
        flags.append(f"{path}: {found['above_log1p_max']:,} value(s) above {LOG1P_MAX:g} (max {found['max']:.2f}), "
                     "the log1p scale cell-eval accepts: not log1p(normalize_total) data, or a model out of range")
    for flag in flags:
        log(f"  warning: {flag}")
    return flags


def normalised_scores(aggregated: pd.DataFrame, baseline: str = SCORE_BASELINE) -> pd.DataFrame:
    """cell-eval's ``score`` of every method's mean metrics against ``baseline``'s (long table:
    method, metric, from_baseline; one ``avg_score`` row per method)."""
    from .eval.baselines import normalised_score

    mean = aggregated.pivot(index="method", columns="metric", values="mean")
    if baseline not in mean.index:
        return pd.DataFrame(columns=["method", "metric", "from_baseline"])
    rows = []
    for method in mean.index:
        vals = []
        for metric, best_one in [(m, False) for m in BEST_ZERO] + [(m, True) for m in BEST_ONE]:
            if metric in mean.columns:
                s = normalised_score(mean.at[method, metric], mean.at[baseline, metric], best_one)
                vals.append(s)
                rows.append({"method": method, "metric": metric, "from_baseline": s})
        rows.append({"method": method, "metric": "avg_score", "from_baseline": float(np.mean(vals)) if vals else np.nan})
    return pd.DataFrame(rows)


def _describe_long(per: pd.DataFrame, metrics: list[str], by: list[str]) -> pd.DataFrame:
    long = per.melt(id_vars=by, value_vars=metrics, var_name="metric", value_name="value")
    g = long.groupby(by + ["metric"], sort=False)["value"]
    out = pd.DataFrame({"count": g.count(), "mean": g.mean(), "median": g.median(), "std": g.std(ddof=1),
                        "min": g.min(), "max": g.max()}).reset_index()
    return out


def prediction_files(pred_dir: str | Path) -> dict[str, Path | None]:
    """pred / real / train of a ``perturbdiff predict`` output directory, which must be complete (its
    marker lists the files it wrote, with their sizes): an interrupted or partly deleted prediction
    is refused, never scored without some of its parts."""
    d = Path(pred_dir)
    if not d.is_dir():
        raise DataError(d, "no such prediction directory")
    marker = require_complete(d, "predict")
    files = marker.get("files") or {}
    for name in ("pred.h5ad", "real.h5ad"):
        if name not in files:
            raise DataError(d, f"the prediction has no {name} (predicted for user conditions, with no truth): "
                            "give the truth with --real")
    return {"pred": d / "pred.h5ad", "real": d / "real.h5ad",
            "train": d / "train.h5ad" if "train.h5ad" in files else None}


def evaluate_files(pred: str | Path, real: str | Path, out: str | Path, train: str | Path | None = None,
                   opts: EvaluateOptions | None = None, log=print, overwrite: bool = False) -> Evaluation:
    """Score ``pred`` and the baselines against ``real``; write the tables of the module docstring.
    An existing evaluation at ``out`` is replaced only with ``overwrite`` (perturbdiff.outputs)."""
    check_output(out, "eval", inputs=[pred, real, train], overwrite=overwrite)
    with OutputLock(out, "evaluation directory"):
        return _evaluate_files(pred, real, Path(out), train, opts or EvaluateOptions(), log)


def _evaluate_files(pred, real, out: Path, train, opts: EvaluateOptions, log) -> Evaluation:
    from .eval.distribution import condition_distances, replicate_calibration
    from .eval.suite import evaluate

    if opts.profile not in PROFILES:
        raise DataError(None, f"unknown profile {opts.profile!r}; known: {list(PROFILES)}")
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise DataError(None, f"unknown method(s) {unknown}; known: {list(METHODS)}")
    t0 = time.time()
    paths = {"pred": str(pred), "real": str(real), "train": str(train) if train else None}
    pred_ad, real_ad = _read(pred, "pred", opts), _read(real, "real", opts)
    _check_pair(real_ad, pred_ad, paths, opts.control_label)
    notes: dict[str, list[str]] = {"inputs": _check_scale(pred_ad, paths["pred"], log)
                                   + _check_scale(real_ad, paths["real"], log)}
    real_ad = _real_only(real_ad)
    train_ad = _read(train, "train", opts) if train else None
    if train_ad is not None:
        gt = train_ad.var_names.astype(str).to_numpy()
        if not np.array_equal(gt, real_ad.var_names.astype(str).to_numpy()):
            raise DataError(train, f"var_names differ from {real}: the training cells must be on the same genes")
    conditions = _conditions(real_ad, pred_ad, opts.control_label)
    per, timings = [], {}
    methods = [m for m in opts.methods if train_ad is not None or m not in NEEDS_TRAIN]
    skipped = [m for m in opts.methods if m not in methods]
    if skipped:
        notes["all"] = [f"baseline(s) {skipped} need the training cells (--train, or predict --train-cells): skipped"]
    score_baseline = SCORE_BASELINE if SCORE_BASELINE in methods else None
    if score_baseline is None:  # never a score against a baseline that was not scored
        notes.setdefault("all", []).append(f"no normalised score: its baseline {SCORE_BASELINE} was not scored")
    log(f"evaluating {len(conditions)} condition(s) in {conditions['context'].nunique()} context(s): "
        f"{', '.join(methods)}")
    pops = []
    for method in methods:
        t1 = time.time()
        if method == "model":
            p, r, extra = pred_ad, real_ad, []
        else:
            p, r = _baseline(method, train_ad, conditions, real_ad, opts)
            extra = [n for n in p.uns.get("baseline", {}).get("notes", []) if n != "none"]
        # cell-eval's metrics and the fidelity diagnostics: one sampled population at a time, each with
        # its own cells (as many as the real condition), so no method is scored on K times the cells
        tables, method_notes = [], list(extra)
        for k, pk in _populations(p, opts.control_label):
            try:
                res = evaluate(r, pk, control=opts.control_label, metrics=PROFILES[opts.profile], de_fdr=opts.de_fdr)
            except ValueError as err:
                raise DataError(paths["pred"] if method == "model" else None, f"{method}: {err}") from None
            tables.append(res.per_condition.merge(fidelity(r, pk, opts.control_label), on=["context", "perturbation"],
                                                  how="left").assign(sample=k))
            method_notes += [n for n in res.notes if n not in method_notes]
        one = pd.concat(tables, ignore_index=True)
        pops.append(one.assign(method=method))
        table = _mean_over_populations(one).assign(method=method)
        if opts.distances:  # the distances pool the K populations: the model's distribution of cells
            d = condition_distances(p, r, conditions[["context", "perturbation"]], cap=opts.cap, seed=opts.seed,
                                    control_label=opts.control_label)
            table = table.merge(d[["context", "perturbation", "mmd2", "energy_distance_u", "energy_distance_v"]],
                                on=["context", "perturbation"], how="left")
        per.append(table)
        notes[method] = method_notes
        timings[method] = round(time.time() - t1, 2)
        log(f"  {method:<18} pearson_delta {table['pearson_delta'].mean() if 'pearson_delta' in table else np.nan:.3f}"
            f"  ({len(tables)} population(s), {timings[method]:.1f}s)")
    metrics = pd.concat(per, ignore_index=True)
    front = ["method", "context", "perturbation", "n_cells_real", "n_cells_pred", "n_populations"]
    metrics = metrics[front + [c for c in metrics.columns if c not in front]]
    names = [c for c in metrics.columns if c not in front]
    populations = pd.concat(pops, ignore_index=True)
    pop_front = ["method", "sample", "context", "perturbation", "n_cells_real", "n_cells_pred"]
    populations = populations[pop_front + [c for c in populations.columns if c not in pop_front]]
    aggregated = _describe_long(metrics, names, ["method"]).merge(
        _population_spread(populations, [n for n in names if n in populations.columns]), on=["method", "metric"],
        how="left")
    per_context = _describe_long(metrics, names, ["method", "context"])
    scores = normalised_scores(aggregated) if score_baseline else pd.DataFrame(
        columns=["method", "metric", "from_baseline"])
    calib = None
    if opts.calibration and "model" in methods:
        t1 = time.time()
        calib = replicate_calibration(pred_ad, real_ad, conditions[["context", "perturbation"]], seed=opts.seed,
                                      control_label=opts.control_label)
        timings["calibration"] = round(time.time() - t1, 2)
    headline = aggregated[aggregated["metric"].isin(HEADLINE)].pivot(index="method", columns="metric", values="mean")
    headline = headline.reindex(index=[m for m in METHODS if m in headline.index],
                                columns=[m for m in HEADLINE if m in headline.columns])
    summary = {
        "inputs": paths, "options": asdict(opts), "n_conditions": int(len(conditions)),
        "contexts": sorted(conditions["context"].unique().tolist()), "methods": methods,
        "headline": json.loads(headline.to_json(orient="index")),
        "avg_score": {r.method: r.from_baseline for r in scores[scores["metric"] == "avg_score"].itertuples()},
        "score_baseline": score_baseline, "notes": notes, "seconds": timings,
        "n_samples": int(pred_ad.obs["sample"].max()) + 1 if "sample" in pred_ad.obs.columns else 1,
        "reference": "cell-eval 0.6.6 metric definitions (perturbdiff.eval.suite)",
        "scoring": SCORING,
        "fidelity": json.loads(aggregated[aggregated["metric"].isin(FIDELITY)].pivot(
            index="method", columns="metric", values="mean").to_json(orient="index")),
    }
    if calib is not None and len(calib):
        cov = [c for c in calib.columns if c.startswith("coverage_") or c.startswith("nominal_")]
        summary["calibration"] = {c: float(np.nanmean(calib[c])) if calib[c].notna().any() else None
                                  for c in cov + ["pit_mean", "pit_var_ratio"]}
    summary["seconds"]["total"] = round(time.time() - t0, 2)
    stage = Staging(out, "eval")
    tmp = stage.open()
    try:
        metrics.to_csv(tmp / "metrics.csv", index=False)
        aggregated.to_csv(tmp / "aggregated.csv", index=False)
        per_context.to_csv(tmp / "per_context.csv", index=False)
        scores.to_csv(tmp / "scores.csv", index=False)
        populations.to_csv(tmp / "populations.csv", index=False)
        files = ["metrics.csv", "aggregated.csv", "per_context.csv", "scores.csv", "populations.csv", "summary.json"]
        if calib is not None:
            calib.drop(columns=["pit_hist"]).assign(
                pit_hist=[json.dumps(list(map(int, h))) if h is not None else "" for h in calib["pit_hist"]]
            ).to_csv(tmp / "calibration.csv", index=False)
            files.append("calibration.csv")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
        stage.commit(files)
    except BaseException as err:
        stage.abort()
        if out_of_space(err):
            raise space_error(out, err) from None
        raise
    return Evaluation(out, metrics, aggregated, scores, calib, summary)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if np.isnan(o) else float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def format_table(ev: Evaluation, metrics=HEADLINE, fidelity_metrics=FIDELITY) -> str:
    """The headline metrics, one row per method, then the fidelity diagnostics, as aligned text."""
    avg = {r.method: r.from_baseline for r in ev.scores[ev.scores["metric"] == "avg_score"].itertuples()}
    lines = _table(ev, metrics, {"score": avg} if avg else {})
    fid = _table(ev, fidelity_metrics, {})
    return "\n".join(lines + (["", "cells like measured cells? (means over conditions; real values for reference)"]
                               + fid if len(fid) > 1 else []))


def _table(ev: Evaluation, metrics, extra: dict[str, dict]) -> list[str]:
    cols = [m for m in metrics if m in ev.aggregated["metric"].unique()]
    if not cols:
        return []
    mean = ev.aggregated.pivot(index="method", columns="metric", values="mean").reindex(columns=cols)
    mean = mean.reindex([m for m in METHODS if m in mean.index])
    lines = [f"{'method':<18}" + "".join(f"{c[:14]:>15}" for c in cols) + "".join(f"{k:>8}" for k in extra)]
    for method, row in mean.iterrows():
        lines.append(f"{method:<18}" + "".join(f"{v:>15.4f}" for v in row.to_numpy())
                     + "".join(f"{e.get(method, float('nan')):>8.3f}" for e in extra.values()))
    return lines
