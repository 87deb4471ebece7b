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
calibration of the K sampled populations (``perturbdiff.eval.distribution``). The directory it writes
(``--out``: metrics, aggregated, per-context, per-population and score tables, calibration, summary)
is ``perturbdiff.eval.schema.EvalDir``.

Everything is written under a temporary directory that replaces ``--out`` only when complete (an
earlier evaluation there only with --overwrite); ``--dir`` requires a complete prediction directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import EvaluateConfig
from ..data.schema import DataError
from ..outputs import OutputLock, Staging, check_output, out_of_space, require_complete, space_error
from .fidelity import fidelity
from .inputs import check_pair, check_scale, read_layout, real_only, require_same_genes
from .schema import (FIDELITY, HEADLINE, METHODS, NEEDS_TRAIN, PROFILES, REFERENCE, SCORE_BASELINE, SCORING,
                     SEED_INDEX, EvalDir, empty_scores)
from .score import normalised_scores

# the options of an evaluation: the ``evaluate`` config section (perturbdiff evaluate's flags, the pipeline)
EvaluateOptions = EvaluateConfig


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
    from . import baselines as bl

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
        from .latent import predict_latent_shift

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
                   opts: EvaluateOptions | None = None, log=print, overwrite: bool = False) -> EvalDir:
    """Score ``pred`` and the baselines against ``real``; write the tables of the module docstring.
    An existing evaluation at ``out`` is replaced only with ``overwrite`` (perturbdiff.outputs)."""
    check_output(out, "eval", inputs=[pred, real, train], overwrite=overwrite)
    with OutputLock(out, "evaluation directory"):
        return _evaluate_files(pred, real, Path(out), train, opts or EvaluateOptions(), log)


def _evaluate_files(pred, real, out: Path, train, opts: EvaluateOptions, log) -> EvalDir:
    from .distribution import condition_distances, replicate_calibration
    from .suite import evaluate

    if opts.profile not in PROFILES:
        raise DataError(None, f"unknown profile {opts.profile!r}; known: {list(PROFILES)}")
    unknown = [m for m in opts.methods if m not in METHODS]
    if unknown:
        raise DataError(None, f"unknown method(s) {unknown}; known: {list(METHODS)}")
    t0 = time.time()
    paths = {"pred": str(pred), "real": str(real), "train": str(train) if train else None}
    cols = {"perturbation": opts.pert_col, "context": opts.context_col, "batch": opts.batch_col}
    pred_ad, real_ad = read_layout(pred, "pred", cols), read_layout(real, "real", cols)
    check_pair(real_ad, pred_ad, paths, opts.control_label)
    notes: dict[str, list[str]] = {"inputs": check_scale(pred_ad, paths["pred"], log)
                                   + check_scale(real_ad, paths["real"], log)}
    real_ad = real_only(real_ad)
    train_ad = read_layout(train, "train", cols) if train else None
    if train_ad is not None:
        require_same_genes(train_ad, real_ad, "train", "real", train, "the training cells must be on the same genes")
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
    scores = normalised_scores(aggregated) if score_baseline else empty_scores()
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
        "reference": REFERENCE,
        "scoring": SCORING,
        "fidelity": json.loads(aggregated[aggregated["metric"].isin(FIDELITY)].pivot(
            index="method", columns="metric", values="mean").to_json(orient="index")),
    }
    if calib is not None and len(calib):
        cov = [c for c in calib.columns if c.startswith("coverage_") or c.startswith("nominal_")]
        summary["calibration"] = {c: float(np.nanmean(calib[c])) if calib[c].notna().any() else None
                                  for c in cov + ["pit_mean", "pit_var_ratio"]}
    summary["seconds"]["total"] = round(time.time() - t0, 2)
    result = EvalDir(out, summary, metrics, aggregated, scores, calib, per_context, populations)
    stage = Staging(out, "eval")
    tmp = stage.open()
    try:
        stage.commit(result.write(tmp))
    except BaseException as err:
        stage.abort()
        if out_of_space(err):
            raise space_error(out, err) from None
        raise
    return result


def format_table(ev: EvalDir, metrics=HEADLINE, fidelity_metrics=FIDELITY) -> str:
    """The headline metrics, one row per method, then the fidelity diagnostics, as aligned text."""
    avg = ev.avg_scores()
    lines = _table(ev, metrics, {"score": avg} if avg else {})
    fid = _table(ev, fidelity_metrics, {})
    return "\n".join(lines + (["", "cells like measured cells? (means over conditions; real values for reference)"]
                               + fid if len(fid) > 1 else []))


def _table(ev: EvalDir, metrics, extra: dict[str, dict]) -> list[str]:
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
