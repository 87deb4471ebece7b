"""The evaluation suite (perturbdiff.eval.suite) and its DE (perturbdiff.eval.de).

- Wilcoxon rank-sum and Benjamini-Hochberg against scipy in float64 (ties, sparse input, the exact
  small-sample path, constant genes), fold-change clipping.
- Known answers on synthetic data with planted effects (pred == real is perfect everywhere), cell
  permutation invariance, dense == sparse, contexts scored independently, NaN + notes for metrics
  that are undefined, clear errors.
- Parity with cell-eval 0.6.6 (skipped when cell_eval is not installed):
  ``pip install cell-eval==0.6.6 pdex==0.1.26 polars==1.35.2``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy.stats import false_discovery_control, mannwhitneyu

from perturbdiff.eval.de import (benjamini_hochberg, differential_expression, fold_change,
                                 wilcoxon_ranksum)
from perturbdiff.eval.suite import evaluate, metric_names

G = 64
GENES = [f"g{i}" for i in range(G)]
# "g5" is also a gene name (a CRISPR-style target: discrimination leaves that gene out);
# "tiny" has 6 cells (the exact Mann-Whitney path on tie-free genes); "null" has no effect.
PERTS = ("p0", "p1", "g5", "tiny", "null")
N_CELLS = {"p0": 30, "p1": 24, "g5": 28, "tiny": 6, "null": 20}
N_CTRL = 36
N_CONT = 8  # the last genes are continuous (no ties)


def _effects(ctx_seed: int) -> dict[str, np.ndarray]:
    """Multiplicative effects per perturbation on the Poisson rates (1 = none)."""
    r = np.random.default_rng(100 + ctx_seed)
    eff = {}
    for j, p in enumerate(PERTS):
        e = np.ones(G)
        if p != "null":
            up = r.choice(G - N_CONT, 6 + 2 * j, replace=False)
            e[up[: len(up) // 2]] = 3.0 + j
            e[up[len(up) // 2:]] = 0.2
        eff[p] = e
    return eff


def _cells(r, rate: np.ndarray, n: int, cont_shift: float = 0.0) -> np.ndarray:
    x = np.log1p(r.poisson(rate, (n, G)).astype(np.float64))
    x[:, G - N_CONT:] = np.log1p(r.gamma(2.0, 1.0 + cont_shift, (n, N_CONT)))
    return x


def make_pair(seed: int = 0, contexts=("A", "B"), pred_scale: float = 0.8, sparse: bool = False,
              dtype=np.float64, perts=PERTS):
    """real, pred AnnData with the same real control cells; pred redraws cells with shrunken effects."""
    xs_r, xs_p, obs_r, obs_p = [], [], [], []
    for ci, ctx in enumerate(contexts):
        r = np.random.default_rng(seed * 1000 + ci)
        base = np.exp(r.normal(-0.3, 0.8, G))
        base[:4] = 0.0            # never expressed
        base[4] = 0.0             # expressed only under some perturbations (fold change clipped)
        eff = _effects(ci)
        ctrl = _cells(r, base, N_CTRL)
        xs_r.append(ctrl)
        xs_p.append(ctrl)
        obs_r += [("control", ctx)] * N_CTRL
        obs_p += [("control", ctx)] * N_CTRL
        for p in perts:
            rate = base * eff[p]
            if p in ("p0", "g5"):
                rate[4] = 1.5
            xs_r.append(_cells(r, rate, N_CELLS[p], cont_shift=0.4 * (p == "p1")))
            obs_r += [(p, ctx)] * N_CELLS[p]
            # pred's "tiny" carries p1's effect (a deliberate mistake: imperfect discrimination / overlap)
            rate_p = base * (1 + pred_scale * (eff["p1" if p == "tiny" else p] - 1))
            if p in ("p0", "g5"):
                rate_p[4] = 1.0
            xs_p.append(_cells(r, rate_p, N_CELLS[p] + 2, cont_shift=0.3 * (p == "p1")))
            obs_p += [(p, ctx)] * (N_CELLS[p] + 2)

    def build(xs, obs, tag):
        x = np.vstack(xs).astype(dtype)
        o = pd.DataFrame(obs, columns=["perturbation", "context"], index=[f"{tag}{i}" for i in range(len(obs))])
        return ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=o, var=pd.DataFrame(index=GENES))

    return build(xs_r, obs_r, "r"), build(xs_p, obs_p, "p")


def _subset(a, mask):
    b = a[np.asarray(mask)].copy()
    return b


# ------------------------------------------------------------------------------------------------
# DE against scipy


def _mwu_reference(groups, ref, **kw):
    ref = ref.toarray() if sp.issparse(ref) else ref
    u = np.zeros((len(groups), ref.shape[1]))
    p = np.zeros_like(u)
    for k, x in enumerate(groups):
        x = x.toarray() if sp.issparse(x) else x
        for g in range(ref.shape[1]):
            res = mannwhitneyu(x[:, g], ref[:, g], use_continuity=True, **kw)
            u[k, g], p[k, g] = res.statistic, res.pvalue
    return u, p


def test_wilcoxon_matches_scipy_with_ties_and_sparse():
    r = np.random.default_rng(0)
    g = 30
    ref = np.round(r.exponential(1.0, (25, g)) * (r.random((25, g)) < 0.5), 1)
    ref[:, 0] = 0.0                      # constant over both groups -> p = 1
    groups = [np.round(r.exponential(1.3, (n, g)) * (r.random((n, g)) < 0.5), 1) for n in (12, 40, 1, 9)]
    for x in groups:
        x[:, 0] = 0.0
    u_ref, p_ref = _mwu_reference(groups, ref, method="asymptotic")
    for sparse in (False, True):
        gs = [sp.csr_matrix(x) for x in groups] if sparse else groups
        rf = sp.csr_matrix(ref) if sparse else ref
        # a small max_elems forces several gene blocks
        res = wilcoxon_ranksum(gs, rf, method="asymptotic", max_elems=150)
        np.testing.assert_allclose(res.statistic, u_ref, rtol=0, atol=1e-9)
        np.testing.assert_allclose(res.pvalue, p_ref, rtol=1e-12, atol=1e-15)
    assert np.all(res.pvalue[:, 0] == 1.0)


def test_wilcoxon_negative_values_explicit_zeros_float32_and_float64():
    """Zeros are counted apart from the sorted nonzeros: negative values sort below them. Float32 values
    sort by their bits, other float64 values by their ranks; both must match scipy."""
    r = np.random.default_rng(3)
    g = 16

    def draw(n):
        x = np.round(r.normal(0.0, 1.0, (n, g)), 1) * (r.random((n, g)) < 0.6)  # zeros, negatives, ties
        x[:, 0] = -1.5                                  # constant and negative over both groups -> p = 1
        x[:, 1] = -np.abs(x[:, 1])                      # zeros above every other value
        x[:, -3:] = r.normal(0.0, 1.0, (n, 3))          # no ties, not float32 numbers
        return x

    ref = draw(30)
    groups = [draw(n) for n in (15, 4, 40)]
    groups[2][:, 2] = 0.0                               # a group with only zeros in a gene
    for dtype in (np.float64, np.float32):
        rf, gs = ref.astype(dtype), [x.astype(dtype) for x in groups]
        u_ref, p_ref = _mwu_reference([x.astype(np.float64) for x in gs], rf.astype(np.float64))
        for sparse in (False, True):
            if sparse:  # every entry stored, the zeros as explicit zeros
                def explicit(x):
                    i, j = np.indices(x.shape)
                    return sp.csr_matrix((x.ravel(), (i.ravel(), j.ravel())), shape=x.shape)
                rf_in, gs_in = explicit(rf), [explicit(x) for x in gs]
                assert np.any(rf_in.data == 0)
            else:
                rf_in, gs_in = rf, gs
            res = wilcoxon_ranksum(gs_in, rf_in, max_elems=100, precision=np.float64)
            np.testing.assert_allclose(res.statistic, u_ref, rtol=0, atol=1e-9, err_msg=f"{dtype} sparse={sparse}")
            np.testing.assert_allclose(res.pvalue, p_ref, rtol=1e-10, atol=1e-15, err_msg=f"{dtype} sparse={sparse}")
            # by default the tail is rounded to the data's dtype, as scipy computes it
            dflt = wilcoxon_ranksum(gs_in, rf_in, max_elems=100)
            tol = 5e-7 if dtype == np.float32 else 0.0  # ndtr in float32: a few ulp
            np.testing.assert_allclose(dflt.pvalue, res.pvalue, rtol=tol, atol=0, err_msg=f"{dtype} sparse={sparse}")
            if dtype == np.float32:
                assert np.array_equal(dflt.pvalue, dflt.pvalue.astype(np.float32).astype(np.float64))
        assert np.all(res.pvalue[:, 0] == 1.0)


def test_float32_p_value_tails_underflow_as_scipy():
    """Strong effects in large float32 groups: scipy's p-value is exactly 0 where float64 gives ~1e-60;
    the default precision follows the data's dtype and reproduces that zero set exactly."""
    r = np.random.default_rng(5)
    ref = np.round(r.gamma(1.0, 1.0, (1500, 6)), 1).astype(np.float32)
    grp = (np.round(r.gamma(1.0, 1.0, (1500, 6)), 1) + np.array([0, 0.1, 0.3, 0.5, 0.8, 2.0])).astype(np.float32)
    ours32 = wilcoxon_ranksum([grp], ref).pvalue[0]
    ours64 = wilcoxon_ranksum([grp], ref, precision=np.float64).pvalue[0]
    sc32 = np.array([mannwhitneyu(grp[:, j], ref[:, j]).pvalue for j in range(6)], dtype=np.float64)
    sc64 = np.array([mannwhitneyu(grp[:, j].astype(float), ref[:, j].astype(float)).pvalue for j in range(6)])
    assert (sc32 == 0).sum() > (sc64 == 0).sum()
    np.testing.assert_array_equal(ours32 == 0, sc32 == 0)
    np.testing.assert_allclose(ours32, sc32, rtol=5e-5, atol=0)
    np.testing.assert_array_equal(ours64 == 0, sc64 == 0)
    np.testing.assert_allclose(ours64, sc64, rtol=1e-9, atol=0)
    with pytest.raises(ValueError, match="precision"):
        wilcoxon_ranksum([grp], ref, precision=np.int32)


def test_wilcoxon_auto_uses_exact_for_small_tie_free_groups():
    r = np.random.default_rng(1)
    g = 12
    ref = r.random((20, g))
    ref[:, -1] = np.round(ref[:, -1], 1)          # ties in the last gene -> asymptotic
    groups = [r.random((n, g)) for n in (3, 8, 9)]
    groups[0][:, -1] = np.round(groups[0][:, -1], 1)
    u_ref, p_ref = _mwu_reference(groups, ref)    # method="auto", as pdex calls it
    res = wilcoxon_ranksum(groups, ref)
    np.testing.assert_allclose(res.statistic, u_ref, atol=1e-9)
    np.testing.assert_allclose(res.pvalue, p_ref, rtol=1e-10, atol=1e-15)
    # both groups small
    x, y = r.random((5, 1)), r.random((7, 1))
    np.testing.assert_allclose(wilcoxon_ranksum([x], y).pvalue[0, 0], mannwhitneyu(x[:, 0], y[:, 0]).pvalue, rtol=1e-12)


def test_benjamini_hochberg_matches_scipy_and_a_plain_loop():
    r = np.random.default_rng(2)
    p = r.random((6, 17)) ** 3
    p[0, :3] = p[0, 3]                      # ties
    p[1, 0] = 1.0
    ours = benjamini_hochberg(p)
    assert ours.shape == p.shape
    np.testing.assert_allclose(ours.ravel(), false_discovery_control(p.ravel(), method="bh"), rtol=1e-14)
    flat = p.ravel()
    m = flat.size
    plain = np.empty(m)
    for i in range(m):  # q_i = min over p_j >= p_i of p_j * m / rank_j
        ranks = np.array([np.sum(flat <= flat[j]) for j in range(m)])
        plain[i] = min(1.0, min(flat[j] * m / ranks[j] for j in range(m) if flat[j] >= flat[i]))
    np.testing.assert_allclose(ours.ravel(), plain, rtol=1e-12)
    with pytest.raises(ValueError):
        benjamini_hochberg(np.array([0.1, np.nan]))


def test_fold_change_expm1_of_log_means_and_clipping():
    mt = np.log1p(np.array([2.0, 0.0, 3.0, 0.0]))
    mr = np.log1p(np.array([1.0, 4.0, 0.0, 0.0]))
    np.testing.assert_allclose(fold_change(mt, mr), [2.0, 1 / 20, 20.0, 1.0])
    de = differential_expression([np.log1p(np.array([[1.0, 0.0], [3.0, 0.0]]))], np.log1p(np.array([[1.0, 2.0]] * 3)))
    # mean in log space first, then expm1: expm1(mean(log1p([1, 3]))) = sqrt(2 * 4) - 1
    np.testing.assert_allclose(de.mean_target[0, 0], np.sqrt(8.0) - 1.0)
    np.testing.assert_allclose(de.log2_fold_change[0], [np.log2(np.sqrt(8.0) - 1.0), np.log2(1 / 20)])


# ------------------------------------------------------------------------------------------------
# known answers and invariances


@pytest.fixture(scope="module")
def pair():
    return make_pair(0)


@pytest.fixture(scope="module")
def base_result(pair):
    return evaluate(*pair)


def test_pred_equal_real_is_perfect(pair):
    real, _ = pair
    res = evaluate(real, real.copy())
    df = res.per_condition.set_index(["context", "perturbation"])
    assert len(df) == 2 * len(PERTS)
    for m in ("pearson_delta", "r_squared", "discrimination_score_l1", "discrimination_score_l2",
              "discrimination_score_cosine", "pearson_edistance", "de_spearman_sig"):
        np.testing.assert_allclose(df[m], 1.0, atol=1e-12, err_msg=m)
    for m in ("mse", "mae", "mse_delta", "mae_delta"):
        np.testing.assert_allclose(df[m], 0.0, atol=1e-15, err_msg=m)
    has_de = df["de_nsig_counts_real"] > 0
    assert has_de.sum() >= 6
    np.testing.assert_array_equal(df["de_nsig_counts_real"], df["de_nsig_counts_pred"])
    for m in [c for c in df.columns if c.startswith(("overlap_at", "precision_at"))] + [
            "de_direction_match", "de_sig_genes_recall", "roc_auc", "pr_auc"]:
        np.testing.assert_allclose(df.loc[has_de, m], 1.0, atol=1e-12, err_msg=m)
    several = df["de_nsig_counts_real"] >= 2
    np.testing.assert_allclose(df.loc[several, "de_spearman_lfc_sig"], 1.0, atol=1e-12)
    # "null" has no real DE genes: overlap 0 by cell-eval's convention, the rest undefined
    null = df.xs("null", level="perturbation")
    if (null["de_nsig_counts_real"] == 0).all():
        assert (null["overlap_at_N"] == 0).all() and null["de_direction_match"].isna().all()
        assert null["roc_auc"].isna().all()
    agg = res.aggregated
    assert agg.loc["pearson_delta", "mean"] == pytest.approx(1.0)
    assert set(res.per_context.index.get_level_values("context")) == {"A", "B"}


def test_planted_effects_rank_a_good_prediction_above_a_bad_one(pair, base_result):
    real, pred = pair
    # bad: every perturbed cell of pred replaced by shuffled-label cells (effects land on the wrong condition)
    bad = pred.copy()
    obs = bad.obs.copy()
    pert = obs["perturbation"].to_numpy().copy()
    for ctx in ("A", "B"):
        m = (obs["context"].to_numpy() == ctx) & (pert != "control")
        pert[m] = np.roll(pert[m], int(m.sum()) // 2)
    obs["perturbation"] = pert
    bad.obs = obs
    good = base_result.aggregated["mean"]
    worse = evaluate(real, bad).aggregated["mean"]
    assert good["pearson_delta"] > 0.6
    assert good["pearson_delta"] > worse["pearson_delta"] + 0.3
    assert good["overlap_at_N"] > worse["overlap_at_N"]
    assert good["discrimination_score_l1"] > worse["discrimination_score_l1"]
    assert good["mse"] < worse["mse"]


def test_cell_order_dense_sparse_and_context_independence(pair, base_result):
    real, pred = pair
    cols = base_result.metrics
    ref = base_result.per_condition.set_index(["context", "perturbation"])[cols]
    r = np.random.default_rng(5)
    perm_r, perm_p = r.permutation(real.n_obs), r.permutation(pred.n_obs)
    real_s, pred_s = real[perm_r].copy(), pred[perm_p].copy()
    real_s.X, pred_s.X = sp.csr_matrix(real_s.X), sp.csr_matrix(pred_s.X)
    shuf = evaluate(real_s, pred_s).per_condition.set_index(["context", "perturbation"])[cols]
    pd.testing.assert_frame_equal(shuf.loc[ref.index], ref, rtol=1e-9, atol=1e-12)
    # each context alone gives the same rows: contexts are scored independently
    for ctx in ("A", "B"):
        one = evaluate(_subset(real, real.obs["context"] == ctx), _subset(pred, pred.obs["context"] == ctx))
        got = one.per_condition.set_index(["context", "perturbation"])[cols]
        pd.testing.assert_frame_equal(got, ref.loc[[ctx]], rtol=1e-12, atol=1e-12)
    # context_col=None on one context == that context
    a_r, a_p = _subset(real, real.obs["context"] == "A"), _subset(pred, pred.obs["context"] == "A")
    nocol = evaluate(a_r, a_p, context_col=None).per_condition.set_index("perturbation")[cols]
    np.testing.assert_allclose(nocol.loc[ref.loc["A"].index].to_numpy(), ref.loc["A"].to_numpy(), atol=1e-12)


def test_single_perturbation_gives_nan_with_notes_not_a_crash(pair):
    real, pred = pair
    keep_r = real.obs["perturbation"].isin(["control", "p0"]).to_numpy() & (real.obs["context"] == "A").to_numpy()
    keep_p = pred.obs["perturbation"].isin(["control", "p0"]).to_numpy() & (pred.obs["context"] == "A").to_numpy()
    res = evaluate(_subset(real, keep_r), _subset(pred, keep_p))
    row = res.per_condition.iloc[0]
    assert len(res.per_condition) == 1
    assert np.isnan(row["pearson_edistance"]) and np.isnan(row["de_spearman_sig"])
    assert row["discrimination_score_l1"] == 1.0
    notes = " | ".join(res.notes)
    assert "pearson_edistance" in notes and "de_spearman_sig" in notes
    assert np.isfinite(row["pearson_delta"]) and np.isfinite(row["overlap_at_N"])


def test_conditions_identical_to_controls_are_nan_or_conventional_not_a_crash():
    r = np.random.default_rng(7)
    ctrl = np.log1p(r.poisson(1.0, (20, 10)).astype(float))
    x = np.vstack([ctrl, ctrl, ctrl])  # both "perturbations" are copies of the control cells
    obs = pd.DataFrame({"perturbation": ["control"] * 20 + ["a"] * 20 + ["b"] * 20, "context": "c"},
                       index=[str(i) for i in range(60)])
    a = ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(10)]))
    res = evaluate(a, a.copy())
    df = res.per_condition
    assert (df["de_nsig_counts_real"] == 0).all() and (df["overlap_at_N"] == 0).all()
    assert df["de_spearman_sig"].isna().all() and df["pearson_delta"].isna().all()
    assert df["de_direction_match"].isna().all() and df["roc_auc"].isna().all()
    # all deltas are 0: every distance ties; ties count half -> 1 - 0.5 / 2
    np.testing.assert_allclose(df["discrimination_score_l1"], 0.75)
    notes = " | ".join(res.notes)
    assert "no condition has a real DE gene" in notes and "pearson_delta: NaN for 2 of 2" in notes
    assert res.aggregated.loc["pearson_delta", "count"] == 0


def test_auc_helpers_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    from perturbdiff.eval.suite import _average_precision

    r = np.random.default_rng(4)
    for _ in range(5):
        y = r.random(200) < 0.2
        s = np.round(r.random(200) * 5 + 2 * y, 1).astype(np.float32)  # many tied scores
        assert _average_precision(y, s) == pytest.approx(skm.average_precision_score(y, s), abs=1e-12)


def test_small_max_elems_blocks_give_the_same_numbers(pair, base_result):
    # control blocks, blocks of a few cells and stepped within-group distances (energy terms); DE passes
    # of a few hundred entries
    real, pred = pair
    cols = base_result.metrics
    small = evaluate(real, pred, max_elems=300).per_condition
    pd.testing.assert_frame_equal(small[cols], base_result.per_condition[cols], rtol=1e-10, atol=1e-12)


def test_metric_selection_and_top_n(pair):
    real, pred = pair
    res = evaluate(real, pred, metrics=["mae", "overlap_at_N", "de_nsig_counts", "precision_at_7"], top_n=(7,))
    assert res.metrics == ["mae", "overlap_at_N", "precision_at_7", "de_nsig_counts_real", "de_nsig_counts_pred"]
    assert list(res.per_condition.columns[4:]) == res.metrics
    assert (res.per_condition["precision_at_7"] <= 1).all()
    assert metric_names()[:2] == ["pearson_delta", "mse"]
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(real, pred, metrics=["nope"])


# ------------------------------------------------------------------------------------------------
# errors


def test_clear_errors(pair, tmp_path):
    real, pred = pair
    p2 = pred.copy()
    names = list(p2.var_names)
    names[7] = "XYZ"
    p2.var_names = names
    with pytest.raises(ValueError, match=r"position 7.*'g7'.*'XYZ'"):
        evaluate(real, p2)
    with pytest.raises(ValueError, match=r"real has 64 genes, pred has 63"):
        evaluate(real, pred[:, :63].copy())
    p3 = pred.copy()
    p3.obs = p3.obs.rename(columns={"context": "cell_line"})
    with pytest.raises(ValueError, match=r"pred: obs has no column 'context'"):
        evaluate(real, p3)
    with pytest.raises(ValueError, match=r"no control cells \(obs\['perturbation'\] == 'DMSO'\)"):
        evaluate(real, pred, control="DMSO")
    no_ctrl_b = (real.obs["context"] != "B").to_numpy() | (real.obs["perturbation"] != "control").to_numpy()
    with pytest.raises(ValueError, match=r"real: context 'B' has no control cells"):
        evaluate(_subset(real, no_ctrl_b), pred)
    no_p1 = ~((real.obs["perturbation"] == "p1") & (real.obs["context"] == "A")).to_numpy()
    with pytest.raises(ValueError, match=r"missing from real: context 'A', perturbation\(s\) \['p1'\]"):
        evaluate(_subset(real, no_p1), pred)
    # a real condition absent from pred is dropped with a note
    no_p1_pred = ~((pred.obs["perturbation"] == "p1") & (pred.obs["context"] == "A")).to_numpy()
    res = evaluate(real, _subset(pred, no_p1_pred), metrics=["mae"])
    assert len(res.per_condition) == 2 * len(PERTS) - 1 and any("absent from pred" in n for n in res.notes)
    bad = pred.copy()
    bad.X[3, 3] = np.nan
    with pytest.raises(ValueError, match="pred: .X contains NaN"):
        evaluate(real, bad)
    path = tmp_path / "real.h5ad"
    real.write_h5ad(path)
    with pytest.raises(ValueError, match=r"real \(.*real.h5ad\): obs has no column 'donor'"):
        evaluate(path, pred, context_col="donor")


# ------------------------------------------------------------------------------------------------
# parity with cell-eval 0.6.6

# Shared metrics that are allowed to differ, with the reason. None are exercised by this data.
INTENDED_DIFFERENCES = {
    "clustering_agreement": "not implemented here (Leiden on centroids; scanpy/igraph dependency)",
    "de_spearman_sig": "NaN here, 1.0 in cell-eval, when no condition has a real DE gene (not the case below)",
    "discrimination_score_*": "exact distance ties count half here; cell-eval's argsort breaks them arbitrarily "
                              "(no ties below)",
    "pearson_edistance": "NaN here where cell-eval raises and drops the metric (one condition; not below)",
}


def _cell_eval_results(real, pred, outdir):
    cell_eval = pytest.importorskip("cell_eval")
    logging.getLogger("cell_eval").setLevel(logging.WARNING)
    logging.getLogger("pdex").setLevel(logging.WARNING)
    ev = cell_eval.MetricsEvaluator(adata_pred=pred, adata_real=real, control_pert="control",
                                    pert_col="perturbation", num_threads=1, outdir=str(outdir))
    res, _ = ev.compute(profile="full", skip_metrics=["clustering_agreement"], write_csv=False,
                        break_on_error=True)
    return res.to_pandas().set_index("perturbation"), ev


@pytest.mark.parametrize("sparse,dtype", [(False, np.float64), (True, np.float32)])
def test_parity_with_cell_eval_0_6_6(tmp_path, sparse, dtype):
    pytest.importorskip("cell_eval")
    real, pred = make_pair(3, sparse=sparse, dtype=dtype)
    ours = evaluate(real, pred, top_n=(50, 100, 200, 500), return_de=True)
    per = ours.per_condition.set_index(["context", "perturbation"])
    checked = set()
    for ctx in ("A", "B"):
        r_ctx = _subset(real, real.obs["context"] == ctx)
        p_ctx = _subset(pred, pred.obs["context"] == ctx)
        ce, ev = _cell_eval_results(r_ctx, p_ctx, tmp_path / ctx)
        mine = per.loc[ctx]
        assert sorted(ce.index) == sorted(mine.index)
        for col in ce.columns:
            assert col in mine.columns, f"cell-eval metric {col} missing here"
            a = ce[col].astype(float).to_numpy()
            b = mine.loc[ce.index, col].to_numpy()
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-6, equal_nan=True, err_msg=f"{ctx}: {col}")
            checked.add(col)
        # the DE tables themselves (cell-eval stores them in float32)
        for which, table in (("real", ours.de_real), ("pred", ours.de_pred)):
            theirs = getattr(ev.de_comparison, which).data.to_pandas()
            theirs = theirs.astype({"target": str, "feature": str})
            m = theirs.merge(table[table["context"] == ctx], on=["target", "feature"], suffixes=("_ce", ""))
            assert len(m) == len(PERTS) * G
            for c in ("p_value", "fdr", "fold_change", "log2_fold_change"):
                theirs_c, ours_c = m[c + "_ce"].to_numpy(np.float32), m[c].to_numpy().astype(np.float32)
                if dtype == np.float64:
                    np.testing.assert_array_equal(theirs_c, ours_c, err_msg=f"{ctx} {which} {c}")
                else:  # pdex ranks and averages float32 .X in float32; here it is float64
                    np.testing.assert_allclose(ours_c, theirs_c, rtol=2e-5, atol=1e-6, err_msg=f"{ctx} {which} {c}")
    from cell_eval.metrics import metrics_registry

    for name in metrics_registry.list_metrics():   # every cell-eval metric: checked, or listed with a reason
        assert (name in checked or f"{name}_real" in checked or name in INTENDED_DIFFERENCES), name
    ours_only = set(ours.metrics) - checked
    assert ours_only == {"r_squared"}, ours_only          # CellFlow's metric, not in cell-eval
    # every metric shared with cell-eval is either checked above or listed with its reason
    assert {"pearson_delta", "overlap_at_N", "precision_at_N", "discrimination_score_l1", "pearson_edistance",
            "de_spearman_sig", "roc_auc", "pr_auc"} <= checked


DEVEL_H5AD = (Path(__file__).resolve().parents[1].parent / "shared" / "data"
              / "perturbench_devel_norman19_mcfaline23.h5ad")


def _ties_in_gene_order(table: pd.DataFrame, target: str, k: int | None, de_fdr: float = 0.05) -> list[str]:
    """Significant genes of ``target`` by |log2 FC| descending, exact ties in gene (table) order."""
    t = table[(table["target"].astype(str) == target) & (table["fdr"] < de_fdr)]
    genes = t.sort_values("abs_log2_fold_change", ascending=False, kind="stable")["feature"].astype(str).tolist()
    return genes if k is None else genes[:k]


@pytest.mark.skipif(not DEVEL_H5AD.is_file(), reason=f"../shared is absent: {DEVEL_H5AD} not found")
def test_parity_with_cell_eval_on_real_data_with_zeros_ties_and_p_at_zero(tmp_path):
    """Real K562 cells (83% zeros, many tied values), every cell repeated 12 times so that strong effects
    give float32 p-values of exactly 0 (the case that moved roc_auc / pr_auc by up to 0.05 before
    the p-value tails were rounded as scipy rounds them), and a prediction with sub-count noise."""
    pytest.importorskip("cell_eval")
    a = ad.read_h5ad(DEVEL_H5AD)
    a = a[a.obs["cell_type"] == "k562"]
    keep = a.obs["condition"].astype(str).isin(["control", "KLF1", "SLC38A2", "IER5L", "CEBPE+RUNX1T1", "MIDN"])
    a = a[keep.to_numpy()]
    reps = 12
    X = np.tile(a.X.toarray().astype(np.float32), (reps, 1))
    pert = np.tile(a.obs["condition"].astype(str).to_numpy(), reps)
    obs = pd.DataFrame({"perturbation": pert, "context": "k562"}, index=[f"c{i}" for i in range(len(pert))])
    var = pd.DataFrame(index=a.var_names.astype(str))
    rng = np.random.default_rng(0)
    noisy = rng.random(X.shape) < 0.15
    P = np.where(noisy & (pert != "control")[:, None], X + np.float32(0.05), X)
    real = ad.AnnData(sp.csr_matrix(X), obs=obs.copy(), var=var.copy())
    pred = ad.AnnData(sp.csr_matrix(P), obs=obs.copy(), var=var.copy())
    ours = evaluate(real, pred, return_de=True)
    mine = ours.per_condition.set_index("perturbation")
    ce, ev = _cell_eval_results(real, pred, tmp_path / "ce")
    tables = {}
    for which, table in (("real", ours.de_real), ("pred", ours.de_pred)):
        theirs = getattr(ev.de_comparison, which).data.to_pandas().astype({"target": str, "feature": str})
        tables[which] = theirs
        m = theirs.merge(table, on=["target", "feature"], suffixes=("_ce", ""))
        assert len(m) == len(theirs) == len(table)
        p_ce, p = m["p_value_ce"].to_numpy(np.float32), m["p_value"].to_numpy().astype(np.float32)
        assert (p_ce == 0).sum() > (50 if which == "pred" else 0), "the input must produce p-values of exactly 0"
        np.testing.assert_array_equal(p_ce == 0, p == 0, err_msg=f"{which}: p-values at 0")
        # z is exact here and float32 in scipy: relative 1e-5 at most, never across 0
        np.testing.assert_allclose(p, p_ce, rtol=5e-5, atol=1e-44, err_msg=f"{which} p_value")  # subnormals: few bits
        f_ce, f = m["fdr_ce"].to_numpy(np.float32), m["fdr"].to_numpy().astype(np.float32)
        np.testing.assert_array_equal(f_ce == 0, f == 0, err_msg=f"{which}: FDR at 0")
        np.testing.assert_allclose(f, f_ce, rtol=5e-5, atol=1e-44, err_msg=f"{which} fdr")
        np.testing.assert_array_equal((f_ce < 0.05), (f < 0.05), err_msg=f"{which}: significance")
        for c in ("fold_change", "log2_fold_change"):  # float32 means, as pdex takes them: identical
            np.testing.assert_array_equal(m[c + "_ce"].to_numpy(np.float32), m[c].to_numpy().astype(np.float32),
                                          err_msg=f"{which} {c}")
    ranked = {"overlap_at_N", "overlap_at_50", "overlap_at_100", "overlap_at_200", "overlap_at_500",
              "precision_at_N", "precision_at_50", "precision_at_100", "precision_at_200", "precision_at_500"}
    for col in ce.columns:
        if col in ranked:
            continue
        np.testing.assert_allclose(mine.loc[ce.index, col].to_numpy(float), ce[col].astype(float).to_numpy(),
                                   rtol=0, atol=1e-6, equal_nan=True, err_msg=col)
    # top-N sets: exact |log2 FC| ties (fc clipped at 20 or 1/20) are common here; polars' ordinal rank
    # over a window does not keep their order, so cell-eval breaks them arbitrarily. Ours breaks them
    # in gene order: equal to the overlap computed from cell-eval's own tables with that tie order.
    for t in ce.index:
        r_all = _ties_in_gene_order(tables["real"], t, None)
        p_all = _ties_in_gene_order(tables["pred"], t, None)
        for n, col_o, col_p in ((None, "overlap_at_N", "precision_at_N"), (50, "overlap_at_50", "precision_at_50")):
            k_o = len(r_all) if n is None else min(n, len(r_all))
            k_p = len(p_all) if n is None else min(n, len(p_all))
            exp_o = len(set(r_all[:k_o]) & set(p_all[:k_o])) / k_o if k_o else 0.0
            exp_p = len(set(r_all[:k_p]) & set(p_all[:k_p])) / k_p if k_p else 0.0
            assert mine.loc[t, col_o] == pytest.approx(exp_o, abs=1e-12), (t, col_o)
            assert mine.loc[t, col_p] == pytest.approx(exp_p, abs=1e-12), (t, col_p)
