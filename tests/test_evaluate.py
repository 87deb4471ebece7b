"""``perturbdiff evaluate`` (perturbdiff/eval/evaluate.py): the model and the baselines scored side by side,
the normalised score, the files it writes, and the errors a user meets with bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from eval_inputs import HELD_OUT, K, build_inputs
from perturbdiff.data.schema import DataError
from perturbdiff.eval.evaluate import EvaluateOptions, evaluate_files, format_table, prediction_files
from perturbdiff.eval.schema import BEST_ONE, BEST_ZERO, METHODS, EvalDir
from perturbdiff.eval.score import normalised_score
from perturbdiff.eval.suite import evaluate
from perturbdiff.outputs import Staging

ROOT = Path(__file__).resolve().parents[1]
N_COND = sum(len(v) for v in HELD_OUT.values())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return build_inputs(tmp_path_factory.mktemp("eval_inputs"))


@pytest.fixture(scope="module")
def result(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval"
    return evaluate_files(inputs["pred"], inputs["real"], out, inputs["train"], log=lambda s: None)


def test_every_method_scored_on_every_condition(result):
    m = result.metrics
    assert set(m["method"]) == set(METHODS)
    for method, sub in m.groupby("method"):
        keys = set(zip(sub["context"], sub["perturbation"]))
        assert keys == {(c, p) for c, ps in HELD_OUT.items() for p in ps}, method
    for f in ("metrics.csv", "aggregated.csv", "per_context.csv", "scores.csv", "calibration.csv", "populations.csv",
              "summary.json"):
        assert (result.path / f).is_file(), f
    assert not list(result.path.parent.glob(".*partial*"))
    # the files hold the same numbers as the returned tables
    back = pd.read_csv(result.path / "metrics.csv")
    np.testing.assert_allclose(back["pearson_delta"], result.metrics["pearson_delta"], rtol=1e-12)


def test_the_directory_reads_back_as_written(result):
    """One class writes and reads the evaluation directory: every table round-trips (floats to the
    CSV's precision, labels as strings), and the summary's fields."""
    back = EvalDir.load(result.path)
    for key in ("methods", "n_conditions", "contexts", "score_baseline", "n_samples", "notes"):
        assert back.summary[key] == result.summary[key], key
    assert back.summary["avg_score"] == pytest.approx(result.summary["avg_score"])
    for name in ("metrics", "aggregated", "per_context", "scores", "populations"):
        mine, read = getattr(result, name), getattr(back, name)
        assert list(read.columns) == list(mine.columns), name
        assert len(read) == len(mine), name
        for col in mine.columns:
            if pd.api.types.is_numeric_dtype(mine[col]):
                np.testing.assert_allclose(read[col].to_numpy(float), mine[col].to_numpy(float), rtol=1e-12, atol=1e-15,
                                           equal_nan=True, err_msg=f"{name}.{col}")
            else:
                assert (read[col].astype(str).to_numpy() == mine[col].astype(str).to_numpy()).all(), f"{name}.{col}"
    assert back.calibration is not None and len(back.calibration) == len(result.calibration)
    assert back.methods() == [m for m in METHODS if m in back.methods()]
    assert back.conditions() == sorted({(c, p) for c, ps in HELD_OUT.items() for p in ps})
    assert back.avg_scores() == pytest.approx(result.avg_scores())


def test_model_row_is_the_suite_on_each_population_averaged(inputs, result):
    """The model's rows are the metric suite run on each sampled population alone (with the control
    cells), averaged over the K populations: each population has the real cell count, unlike the K
    populations pooled, which would give the model K times the cells of the truth and the baselines."""
    pred = ad.read_h5ad(inputs["pred"])
    sample, ctrl = pred.obs["sample"].to_numpy(), (pred.obs["perturbation"] == "control").to_numpy()
    direct = pd.concat([evaluate(str(inputs["real"]), pred[(sample == k) | ctrl].copy()).per_condition
                        for k in range(K)]).groupby(["context", "perturbation"]).mean(numeric_only=True).reset_index()
    model = result.metrics[result.metrics["method"] == "model"].reset_index(drop=True)
    merged = model.merge(direct, on=["context", "perturbation"], suffixes=("", "_direct"))
    assert len(merged) == N_COND
    for col in ("pearson_delta", "mae", "discrimination_score_l1", "overlap_at_N", "de_spearman_sig", "r_squared",
                "de_nsig_counts_pred"):
        np.testing.assert_allclose(merged[col], merged[f"{col}_direct"], rtol=0, atol=1e-12, equal_nan=True)
    assert (model["n_cells_pred"] == 30).all() and (model["n_populations"] == K).all()
    pops = pd.read_csv(result.path / "populations.csv")
    assert sorted(pops.loc[pops["method"] == "model", "sample"].unique()) == list(range(K))
    assert (pops.loc[pops["method"] != "model", "sample"] == 0).all()
    agg = result.aggregated.set_index(["method", "metric"])
    assert agg.at[("model", "pearson_delta"), "population_sd"] > 0
    assert np.isnan(agg.at[("linear", "pearson_delta"), "population_sd"])
    assert "each sampled population" in result.summary["scoring"]["cell_eval_metrics"]


def test_known_ordering_of_methods(result):
    """The synthetic prediction has the right effect shrunk to 70%: it beats "no effect" on the delta
    correlation; the split-half ceiling (real vs real) has the best correlation of all."""
    mean = result.aggregated.pivot(index="method", columns="metric", values="mean")
    # (one population of 30 cells per condition is scored at a time: noisier than the K pooled)
    assert mean.at["model", "pearson_delta"] > 0.7 > mean.at["control_mean", "pearson_delta"] + 0.5
    # (the split-half ceiling holds half the real cells: the denoised latent_shift baseline can pass it)
    assert mean.at["ceiling", "pearson_delta"] >= mean["pearson_delta"].drop(["ceiling", "latent_shift"]).max() - 0.05
    assert mean.at["latent_shift", "pearson_delta"] > 0.7
    # no-effect predicts ~zero deltas: the model's deltas are much closer to the truth
    assert mean.at["model", "mse_delta"] < mean.at["control_mean", "mse_delta"]
    assert (result.metrics["energy_distance_v"] > 0).all() and (result.metrics["mmd2"] > -1e-6).all()


def test_normalised_scores_follow_cell_eval(result):
    """scores.csv = cell-eval ``score`` of each method's mean row against perturbation_mean's:
    (u - b) / (1 - b) for best-1 metrics, 1 - u / b for best-0, NaN -> 0, clipped at 0; avg_score is
    their mean; r_squared and the DE counts are not scored (not in cell-eval's registry)."""
    mean = result.aggregated.pivot(index="method", columns="metric", values="mean")
    s = result.scores
    for method in METHODS:
        rows = s[s["method"] == method].set_index("metric")["from_baseline"]
        expect = {m: normalised_score(mean.at[method, m], mean.at["perturbation_mean", m], m in BEST_ONE)
                  for m in (*BEST_ZERO, *BEST_ONE) if m in mean.columns}
        assert set(rows.index) == set(expect) | {"avg_score"}
        for m, v in expect.items():
            assert rows[m] == pytest.approx(v, abs=1e-12), (method, m)
        assert rows["avg_score"] == pytest.approx(np.mean(list(expect.values())), abs=1e-12)
        assert "r_squared" not in rows.index and "de_nsig_counts_real" not in rows.index
    base = s[s["method"] == "perturbation_mean"]
    assert (base["from_baseline"] == 0).all()  # a method scored against itself


def test_summary_and_calibration(result):
    summary = json.loads((result.path / "summary.json").read_text())
    assert summary["n_conditions"] == N_COND and summary["n_samples"] == K
    assert summary["contexts"] == sorted(HELD_OUT)
    assert set(summary["headline"]) == set(METHODS)
    assert summary["headline"]["model"]["pearson_delta"] == pytest.approx(
        result.aggregated.query("method == 'model' and metric == 'pearson_delta'")["mean"].item())
    cal = pd.read_csv(result.path / "calibration.csv")
    assert len(cal) == N_COND and (cal["n_samples"] == K).all() and (cal["n_replicates"] == 2).all()
    assert cal["nominal_50"].notna().all()
    assert all(len(json.loads(h)) == K + 1 for h in cal["pit_hist"])


def test_without_train_the_trained_baselines_are_skipped(inputs, tmp_path):
    ev = evaluate_files(inputs["pred"], inputs["real"], tmp_path / "e", None,
                        EvaluateOptions(profile="vcc", distances=False, calibration=False), log=lambda s: None)
    assert set(ev.metrics["method"]) == {"model", "control_mean", "ceiling"}
    assert any("need the training cells" in n for n in ev.summary["notes"]["all"])
    assert {"mae", "discrimination_score_l1", "overlap_at_N"} <= set(ev.metrics.columns)
    assert "pearson_delta" not in ev.metrics.columns and "energy_distance_u" not in ev.metrics.columns
    assert ev.scores.empty  # no perturbation_mean to score against


# ---- bad input: clear errors naming the file, nothing written -------------------------------------


def _rewrite(src: Path, dst: Path, fn) -> Path:
    a = ad.read_h5ad(src)
    a = fn(a)
    a.write_h5ad(dst)
    return dst


def _fails(inputs, tmp_path, match: str, **paths):
    p = {**inputs, **paths}
    out = tmp_path / "out"
    with pytest.raises(DataError, match=match):
        evaluate_files(p["pred"], p["real"], out, p.get("train"), log=lambda s: None)
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_different_var_names_name_the_file(inputs, tmp_path):
    def rename(a):
        a.var_names = [f"X{i}" if i == 5 else g for i, g in enumerate(a.var_names)]
        return a

    bad = _rewrite(inputs["pred"], tmp_path / "pred_genes.h5ad", rename)
    _fails(inputs, tmp_path, r"pred_genes\.h5ad.*var_names differ.*only in pred: \['X5'\]", pred=bad)

    def reorder(a):
        return a[:, a.var_names[::-1]].copy()

    bad = _rewrite(inputs["pred"], tmp_path / "pred_order.h5ad", reorder)
    _fails(inputs, tmp_path, "same genes in another order", pred=bad)
    bad = _rewrite(inputs["train"], tmp_path / "train_genes.h5ad", rename)
    _fails(inputs, tmp_path, r"train_genes\.h5ad.*var_names differ", train=bad)


def test_missing_control_label_names_the_file(inputs, tmp_path):
    def relabel(a):
        a.obs["perturbation"] = a.obs["perturbation"].astype(str).replace({"control": "DMSO"})
        return a

    bad = _rewrite(inputs["real"], tmp_path / "real_noctrl.h5ad", relabel)
    _fails(inputs, tmp_path, r"real_noctrl\.h5ad.*no control cells.*'control'.*--control-label", real=bad)


def test_condition_without_truth_and_unreadable_files(inputs, tmp_path):
    def drop(a):
        return a[a.obs["perturbation"].astype(str) != "p3"].copy()

    bad = _rewrite(inputs["real"], tmp_path / "real_nop3.h5ad", drop)
    _fails(inputs, tmp_path, r"\('c1', 'p3'\).*no real cells", real=bad)
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"not an hdf5 file")
    _fails(inputs, tmp_path, r"broken\.h5ad.*cannot read pred", pred=broken)
    _fails(inputs, tmp_path, r"nope\.h5ad.*not found", real=tmp_path / "nope.h5ad")

    def no_context(a):
        del a.obs["context"]
        return a

    bad = _rewrite(inputs["pred"], tmp_path / "pred_noctx.h5ad", no_context)
    _fails(inputs, tmp_path, r"pred_noctx\.h5ad.*no column 'context'", pred=bad)


def _prediction_dir(inputs, d: Path) -> Path:
    """A complete prediction directory, as ``perturbdiff predict`` leaves it (files + marker)."""
    stage = Staging(d, "predict")
    stage.open()
    for name in ("pred", "real", "train"):
        (stage.path / f"{name}.h5ad").write_bytes(inputs[name].read_bytes())
    return stage.commit(["pred.h5ad", "real.h5ad", "train.h5ad"])


def test_command_line(inputs, tmp_path):
    d = _prediction_dir(inputs, tmp_path / "predict")
    run = lambda *a: subprocess.run([sys.executable, "-m", "perturbdiff.cli", "evaluate", *a], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    res = run("--dir", str(d), "--profile", "minimal", "--no-distances")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "perturbation_mean" in res.stdout and (d / "eval" / "summary.json").is_file()
    res = run("--dir", str(d), "--profile", "minimal", "--no-distances")  # an earlier evaluation is kept ...
    assert res.returncode == 2 and "pass --overwrite" in res.stderr
    res = run("--dir", str(d), "--profile", "minimal", "--no-distances", "--overwrite")  # ... unless asked
    assert res.returncode == 0, res.stderr[-2000:]
    res = run("--pred", str(d / "pred.h5ad"), "--real", str(d / "pred.h5ad"), "--control-label", "ctrl",
              "--out", str(tmp_path / "eval2"))
    assert res.returncode == 2
    assert "no control cells" in res.stderr and "pred.h5ad" in res.stderr and "Traceback" not in res.stderr


def test_an_incomplete_prediction_is_refused_and_no_score_without_its_baseline(inputs, tmp_path):
    """evaluate --dir scores a prediction only when every file it wrote is there, as written; without
    the training cells the perturbation-mean baseline is skipped and no score is reported against it."""
    d = _prediction_dir(inputs, tmp_path / "predict")
    (d / "train.h5ad").unlink()  # e.g. a disk that filled up, or a user's cleanup
    with pytest.raises(DataError, match="incomplete predict output: train.h5ad is missing"):
        prediction_files(d)
    (d / "train.h5ad").write_bytes(inputs["train"].read_bytes()[:1000])
    with pytest.raises(DataError, match="train.h5ad: size 1000 differs"):
        prediction_files(d)
    half = Staging(tmp_path / "half", "predict")
    half.open()
    os.replace(half.path, tmp_path / "half")  # a staging directory renamed by hand: still incomplete
    with pytest.raises(DataError, match="incomplete predict output"):
        prediction_files(tmp_path / "half")
    with pytest.raises(DataError, match="not a complete perturbdiff predict output"):
        prediction_files(tmp_path)
    ev = evaluate_files(inputs["pred"], inputs["real"], tmp_path / "ev", None,
                        EvaluateOptions(profile="minimal", distances=False), log=lambda *a: None)
    assert ev.summary["score_baseline"] is None and ev.summary["avg_score"] == {} and ev.scores.empty
    assert any("no normalised score" in n for n in ev.summary["notes"]["all"])
    assert "score" not in format_table(ev).splitlines()[0]


def test_files_in_the_users_own_layout_score_the_same(inputs, result, tmp_path):
    """--pert-col / --context-col / --batch-col / --control-label: the same cells under the user's obs
    names and control label give the same metrics as the evaluation layout."""
    paths = {}
    for name in ("pred", "real", "train"):
        a = ad.read_h5ad(inputs[name])
        a.obs = a.obs.rename(columns={"perturbation": "condition", "context": "cell_type", "batch": "donor"})
        a.obs["condition"] = a.obs["condition"].astype(str).replace({"control": "NT"})
        a.obs["perturbation"] = "decoy"  # a column that happens to have a layout name is set aside
        paths[name] = tmp_path / f"{name}.h5ad"
        a.write_h5ad(paths[name])
    opts = EvaluateOptions(pert_col="condition", context_col="cell_type", batch_col="donor", control_label="NT")
    ev = evaluate_files(paths["pred"], paths["real"], tmp_path / "eval", paths["train"], opts, log=lambda s: None)
    key = ["method", "context", "perturbation"]
    a = result.metrics.sort_values(key).reset_index(drop=True)
    b = ev.metrics.sort_values(key).reset_index(drop=True)
    b["perturbation"] = b["perturbation"].astype(str)
    pd.testing.assert_frame_equal(a[["pearson_delta", "mae"]], b[["pearson_delta", "mae"]])
    assert list(a["perturbation"]) == list(b["perturbation"])
    with pytest.raises(DataError, match="no column 'cell_line'.*--context-col"):
        evaluate_files(paths["pred"], paths["real"], tmp_path / "e2", None,
                       EvaluateOptions(pert_col="condition", context_col="cell_line", control_label="NT"),
                       log=lambda s: None)


def test_one_implicit_context(inputs, tmp_path):
    """--context-col '' (data of one cell type): every cell is in one context, 'all'."""
    opts = EvaluateOptions(context_col=None, methods=("model", "control_mean"), distances=False, calibration=False)
    ev = evaluate_files(inputs["pred"], inputs["real"], tmp_path / "eval", None, opts, log=lambda s: None)
    assert set(ev.metrics["context"]) == {"all"}
    assert set(ev.metrics["method"]) == {"model", "control_mean"}
