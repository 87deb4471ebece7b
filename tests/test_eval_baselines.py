"""Baselines (control mean, cell-eval perturbation mean, Ahlmann-Eltze linear, split-half ceiling), the
cell-eval normalised score, per-condition MMD / energy distance and replicate calibration: known answers
on small synthetic AnnData with planted effects."""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial.distance import cdist

from perturbdiff.data.schema import DataError
from perturbdiff.eval import distribution as D
from perturbdiff.eval.score import normalised_score
from perturbdiff.eval.baselines import (predict_ceiling, predict_control_mean, predict_linear,
                                        predict_perturbation_mean)
from perturbdiff.ops.kme import mmd2

CTRL = "control"
G, R = 40, 3  # genes, rank of the planted effects
CONTEXTS = ["c0", "c1", "c2"]
PERTS = [f"p{i}" for i in range(8)]
N_CTRL = 20
HELD = [("c2", "p1"), ("c2", "p4")]


def _adata(blocks, genes=G, sparse=False):
    x = np.concatenate([b[0] for b in blocks]).astype(np.float32)
    obs = pd.concat([pd.DataFrame({"perturbation": p, "context": c, "batch": bt}, index=range(len(b[0])))
                     for b in blocks for (p, c, bt) in [b[1:]]], ignore_index=True)
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(X=sp.csr_matrix(x) if sparse else x, obs=obs,
                      var=pd.DataFrame(index=[f"g{i}" for i in range(genes)]))


def _planted(context_effect: float = 0.0):
    """Effects exactly linear in a perturbation embedding: the cells of (c, p) are the context's control
    cells shifted by A e_p (+ a per-context change o_c when ``context_effect``); everything stays positive."""
    rng = np.random.default_rng(0)
    A = rng.normal(0, 0.5, (G, R))
    E = {p: rng.normal(0, 1, R) for p in [*PERTS, "pX"]}
    ctrl = {c: 10.0 + i + rng.normal(0, 1, (N_CTRL, G)) for i, c in enumerate(CONTEXTS)}
    offset = {c: context_effect * rng.normal(0, 1, G) for c in CONTEXTS}
    delta = {p: A @ E[p] for p in E}
    blocks = [(ctrl[c], CTRL, c, "b0") for c in CONTEXTS]
    blocks += [(ctrl[c] + delta[p] + offset[c], p, c, "b0") for c in CONTEXTS for p in PERTS if (c, p) not in HELD]
    train = _adata(blocks)
    controls = train[train.obs["perturbation"] == CTRL].copy()
    conds = pd.DataFrame([(c, p, N_CTRL) for c, p in HELD], columns=["context", "perturbation", "n_cells"])
    return dict(train=train, controls=controls, conds=conds, ctrl=ctrl, delta=delta, E=E, A=A, offset=offset)


@pytest.fixture(scope="module")
def planted():
    return _planted()


def _pb_delta(pred, context, perturbation):
    """Pseudobulk of the predicted cells minus the pseudobulk of the appended control cells of the context."""
    obs = pred.obs
    x = pred.X.toarray() if sp.issparse(pred.X) else np.asarray(pred.X)
    sel = (obs["context"] == context) & (obs["perturbation"] == perturbation) & (obs["sample"] >= 0)
    ctl = (obs["context"] == context) & obs["is_control"]
    return x[sel.to_numpy()].astype(np.float64).mean(0) - x[ctl.to_numpy()].astype(np.float64).mean(0)


def _check_layout(pred, controls, conds, n_samples=1):
    assert list(pred.obs.columns[:5]) == ["perturbation", "context", "batch", "sample", "is_control"]
    assert list(pred.var_names) == list(controls.var_names)
    tail = pred[pred.obs["is_control"].to_numpy()]
    assert list(tail.obs_names) == list(controls.obs_names)  # the same real control cells, unchanged
    assert (tail.obs["sample"] == -1).all() and (tail.obs["perturbation"] == CTRL).all()
    tx = tail.X.toarray() if sp.issparse(tail.X) else tail.X
    cx = controls.X.toarray() if sp.issparse(controls.X) else controls.X
    np.testing.assert_array_equal(tx, cx)
    for _, r in conds.iterrows():
        sel = (pred.obs["context"] == r["context"]) & (pred.obs["perturbation"] == r["perturbation"])
        assert sel.sum() == r["n_cells"] * n_samples
        assert sorted(pred.obs.loc[sel, "sample"].unique()) == list(range(n_samples))


# ---------------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------------


def test_control_mean_predicts_no_change(planted, tmp_path):
    pred = predict_control_mean(planted["train"], planted["conds"], planted["controls"], rng=1, n_samples=3)
    _check_layout(pred, planted["controls"], planted["conds"], n_samples=3)
    for c, p in HELD:  # n_cells = all controls, drawn without replacement: the same cells, permuted
        np.testing.assert_allclose(_pb_delta(pred, c, p), 0.0, atol=1e-5)
    assert pred.uns["baseline"]["name"] == "control_mean"
    pred.write_h5ad(tmp_path / "pred.h5ad")  # the layout survives an h5ad round trip
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert back.obs["sample"].dtype == np.int64 and back.obs["is_control"].dtype == bool
    assert back.uns["baseline"]["name"] == "control_mean"


def test_perturbation_mean_cell_eval_constant(planted):
    train = planted["train"]
    pred = predict_perturbation_mean(train, planted["conds"], planted["controls"], rng=0)
    _check_layout(pred, planted["controls"], planted["conds"])
    # by hand: the mean of the context's group means, control included, each group weighted equally
    x, obs = train.X, train.obs
    groups = [CTRL] + [p for p in PERTS if ("c2", p) not in HELD]
    means = [x[((obs["context"] == "c2") & (obs["perturbation"] == g)).to_numpy()].astype(np.float64).mean(0)
             for g in groups]
    want = np.mean(means, axis=0)
    got = pred.X[(pred.obs["perturbation"] == "p1").to_numpy()]
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5)
    assert any("TRAINING" in n for n in pred.uns["baseline"]["notes"])


def test_perturbation_mean_shift_and_fallback_context(planted):
    train, controls = planted["train"], planted["controls"]
    rng = np.random.default_rng(3)
    new_ctrl = 10.0 + rng.normal(0, 1, (15, G))
    extra = _adata([(new_ctrl, CTRL, "c9", "b0")])
    extra.obs_names = [f"new{i}" for i in range(extra.n_obs)]
    controls2 = ad.concat([controls, extra])
    conds = pd.DataFrame([("c2", "p1", N_CTRL), ("c9", "p1", 15)], columns=["context", "perturbation", "n_cells"])
    pred = predict_perturbation_mean(train, conds, controls2, rng=0, mode="shift")
    _check_layout(pred, controls2, conds)
    d = planted["delta"]
    want_c2 = np.mean([d[p] for p in PERTS if ("c2", p) not in HELD], axis=0)  # this context's perturbations
    np.testing.assert_allclose(_pb_delta(pred, "c2", "p1"), want_c2, atol=1e-4)
    pooled = np.mean([d[p] for c in CONTEXTS for p in PERTS if (c, p) not in HELD], axis=0)
    np.testing.assert_allclose(_pb_delta(pred, "c9", "p1"), pooled, atol=1e-4)  # fully held-out context
    assert any("c9" in n and "pooled" in n for n in pred.uns["baseline"]["notes"])
    glob = predict_perturbation_mean(train, conds, controls2, rng=0, mode="shift", scope="global")
    np.testing.assert_allclose(_pb_delta(glob, "c2", "p1"), pooled, atol=1e-4)


def test_perturbation_mean_sparse_equals_dense(planted):
    train, controls = planted["train"], planted["controls"]
    strain, sctrl = train.copy(), controls.copy()
    strain.X, sctrl.X = sp.csr_matrix(strain.X), sp.csr_matrix(sctrl.X)
    for mode in ("cell_eval", "shift"):
        a = predict_perturbation_mean(train, planted["conds"], controls, rng=5, mode=mode)
        b = predict_perturbation_mean(strain, planted["conds"], sctrl, rng=5, mode=mode)
        assert sp.issparse(b.X) and not sp.issparse(a.X)
        np.testing.assert_allclose(b.X.toarray(), a.X, rtol=1e-6)


def test_linear_recovers_planted_delta(planted):
    pred = predict_linear(planted["train"], planted["conds"], planted["controls"], rng=0, n_components=R, ridge=1e-9)
    _check_layout(pred, planted["controls"], planted["conds"])
    for c, p in HELD:  # seen in other contexts: its embedding from those recovers the change exactly
        np.testing.assert_allclose(_pb_delta(pred, c, p), planted["delta"][p], atol=1e-4)
    # more components than the rank and the default ridge: still essentially the planted change
    pred = predict_linear(planted["train"], planted["conds"], planted["controls"], rng=0)
    for c, p in HELD:
        assert np.corrcoef(_pb_delta(pred, c, p), planted["delta"][p])[0, 1] > 0.99


def test_linear_context_offset_recovers_context_effects():
    d = _planted(context_effect=1.0)
    want = {p: d["delta"][p] + d["offset"][c] for c, p in HELD}
    plain = predict_linear(d["train"], d["conds"], d["controls"], rng=0, n_components=R, ridge=1e-9)
    ctx = predict_linear(d["train"], d["conds"], d["controls"], rng=0, n_components=R, ridge=1e-9, context_offset=True)
    for c, p in HELD:
        np.testing.assert_allclose(_pb_delta(ctx, c, p), want[p], atol=1e-4)
        assert np.abs(_pb_delta(plain, c, p) - want[p]).max() > 0.1  # no context term: misses o_c
    assert ctx.uns["baseline"]["context_offset"]


def test_linear_unseen_perturbation_falls_back_or_uses_embedding(planted):
    train, controls, d = planted["train"], planted["controls"], planted["delta"]
    conds = pd.DataFrame([("c2", "pX", N_CTRL), ("c2", "p1", N_CTRL)], columns=["context", "perturbation", "n_cells"])
    pred = predict_linear(train, conds, controls, rng=0, n_components=R, ridge=1e-9)
    mean_effect = np.mean([d[p] for c in CONTEXTS for p in PERTS if (c, p) not in HELD], axis=0)
    np.testing.assert_allclose(_pb_delta(pred, "c2", "pX"), mean_effect, atol=1e-4)
    assert any("pX" in n and "mean effect" in n for n in pred.uns["baseline"]["notes"])
    emb = pd.DataFrame({p: planted["E"][p] for p in [*PERTS, "pX"]}).T  # a given perturbation embedding
    pred = predict_linear(train, conds, controls, rng=0, n_components=R, ridge=1e-9, perturbation_embedding=emb)
    np.testing.assert_allclose(_pb_delta(pred, "c2", "pX"), d["pX"], atol=1e-4)
    np.testing.assert_allclose(_pb_delta(pred, "c2", "p1"), d["p1"], atol=1e-4)


def test_ceiling_halves_partition_the_cells():
    rng = np.random.default_rng(1)
    blocks = [(rng.normal(5, 1, (11, 6)), "pa", "c0", "b0"), (rng.normal(5, 1, (10, 6)), "pb", "c0", "b1"),
              (rng.normal(5, 1, (9, 6)), CTRL, "c0", "b0")]
    real = _adata(blocks, genes=6)
    pred, half = predict_ceiling(real, rng=0)
    ctrl = real[real.obs["perturbation"] == CTRL]
    for out in (pred, half):
        assert list(out.obs_names[out.obs["is_control"].to_numpy()]) == list(ctrl.obs_names)
    for p, n in (("pa", 11), ("pb", 10)):
        a = pred.obs_names[(pred.obs["perturbation"] == p).to_numpy()]
        b = half.obs_names[(half.obs["perturbation"] == p).to_numpy()]
        assert (len(a), len(b)) == (n // 2, n - n // 2)
        assert not set(a) & set(b)
        assert set(a) | set(b) == set(real.obs_names[(real.obs["perturbation"] == p).to_numpy()])
        np.testing.assert_array_equal(pred[a].X, real[a].X)  # real cells, unchanged
    assert (pred.obs.loc[~pred.obs["is_control"], "sample"] == 0).all()
    assert (half.obs["sample"] == -1).all()
    real.obs["sample"] = -1
    dist = D.condition_distances(pred, real)  # the outputs feed the distribution metrics as they are
    assert list(dist["perturbation"]) == ["pa", "pb"] and (dist["energy_distance_v"] > 0).all()
    # a chosen condition only
    pred, half = predict_ceiling(real, [("c0", "pb")], rng=0)
    assert set(pred.obs.loc[~pred.obs["is_control"], "perturbation"]) == {"pb"}


def test_normalised_score_matches_cell_eval():
    assert normalised_score(0.8, 0.6, higher_is_better=True) == pytest.approx(0.5)
    assert normalised_score(0.1, 0.2, higher_is_better=False) == pytest.approx(0.5)
    assert normalised_score(0.5, 0.6, higher_is_better=True) == 0.0  # worse than baseline: clipped at 0
    assert normalised_score(0.3, 0.2, higher_is_better=False) == 0.0
    assert normalised_score(float("nan"), 0.2) == 0.0
    assert normalised_score(0.0, 0.0, higher_is_better=False) == 0.0  # 0/0 -> NaN -> 0
    np.testing.assert_allclose(normalised_score(np.array([1.0, 0.7]), np.array([0.5, 0.4])), [1.0, 0.5])


def test_errors_name_what_is_missing(planted):
    train, controls, conds = planted["train"], planted["controls"], planted["conds"]
    bad = train.copy()
    del bad.obs["context"]
    with pytest.raises(DataError, match="context"):
        predict_linear(bad, conds, controls)
    with pytest.raises(DataError, match="n_cells"):
        predict_control_mean(train, conds.drop(columns="n_cells"), controls)
    with pytest.raises(DataError, match="c7"):
        predict_perturbation_mean(train, [("c7", "p1", 5)], controls)
    with pytest.raises(DataError, match="same genes"):
        predict_control_mean(train, conds, controls[:, :5].copy())
    with pytest.raises(DataError, match="are controls"):
        predict_linear(train, [("c2", CTRL, 5)], controls)
    with pytest.raises(DataError, match=r"c2', 'pZ"):
        predict_ceiling(train, [("c2", "pZ")])


# ---------------------------------------------------------------------------------------------
# Distances
# ---------------------------------------------------------------------------------------------


def _pred_real(rng, n_pred=(30, 25), n_real=(28, 50), genes=16, k=1):
    pred_blocks, real_blocks = [], []
    for i, (npr, nre) in enumerate(zip(n_pred, n_real)):
        for s in range(k):
            pred_blocks.append((rng.normal(i, 1, (npr, genes)), f"p{i}", "c0", "pred", s))
        real_blocks.append((rng.normal(i + 0.3, 1.2, (nre, genes)), f"p{i}", "c0", "b0", -1))
    ctrl = rng.normal(0, 1, (10, genes))

    def mk(blocks):
        a = _adata([b[:4] for b in blocks] + [(ctrl, CTRL, "c0", "b0")], genes=genes)
        a.obs["sample"] = np.concatenate([np.full(len(b[0]), b[4]) for b in blocks] + [np.full(10, -1)])
        return a
    return mk(pred_blocks), mk(real_blocks)


def test_energy_distance_matches_cdist_and_mmd_matches_op():
    rng = np.random.default_rng(0)
    pred, real = _pred_real(rng)
    out = D.condition_distances(pred, real, cap=None)
    assert list(out["perturbation"]) == ["p0", "p1"]
    for _, r in out.iterrows():
        x = np.asarray(pred.X[((pred.obs["perturbation"] == r["perturbation"]) & (pred.obs["sample"] >= 0)).to_numpy()],
                       dtype=np.float64)
        y = np.asarray(real.X[(real.obs["perturbation"] == r["perturbation"]).to_numpy()], dtype=np.float64)
        brute = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
        assert r["energy_distance_v"] == pytest.approx(brute, rel=1e-10, abs=1e-12)
        n, m = len(x), len(y)  # unbiased: the within-set means over distinct pairs only
        brute_u = 2 * cdist(x, y).mean() - cdist(x, x).sum() / (n * (n - 1)) - cdist(y, y).sum() / (m * (m - 1))
        assert r["energy_distance_u"] == pytest.approx(brute_u, rel=1e-10, abs=1e-12)
        assert r["energy_distance_u"] < r["energy_distance_v"]
        s = 1.0 / math.sqrt(x.shape[1])
        op = mmd2(torch.tensor(x * s, dtype=torch.float32)[None], torch.tensor(y * s, dtype=torch.float32)[None],
                  kernel="energy", impl="torch")
        assert r["mmd2"] == pytest.approx(float(op[0]), rel=1e-6)
        assert r["mmd2"] == pytest.approx(brute * s, rel=1e-4)  # energy kernel: MMD^2 = energy / sqrt(G)
        assert (r["n_pred"], r["n_real"]) == (r["n_pred_used"], r["n_real_used"])
    # blocked accumulation equals one block
    x, y = rng.normal(size=(37, 5)), rng.normal(size=(23, 5))
    xt, yt = torch.tensor(x), torch.tensor(y)
    assert D._sum_dist(xt, yt, False, block=50) == pytest.approx(cdist(x, y).sum(), rel=1e-12)
    assert D._sum_dist(xt, xt, True, block=50) == pytest.approx(cdist(x, x).sum(), rel=1e-12)


def test_distances_cap_is_seeded_per_condition_and_per_sample():
    rng = np.random.default_rng(1)
    pred, real = _pred_real(rng, n_pred=(40, 12), n_real=(60, 8), k=2)
    a = D.condition_distances(pred, real, cap=20, seed=3)
    assert list(a["n_pred_used"]) == [20, 20] and list(a["n_real_used"]) == [20, 8]
    alone = D.condition_distances(pred, real, [("c0", "p0")], cap=20, seed=3)
    assert alone["energy_distance_u"].iloc[0] == a["energy_distance_u"].iloc[0]  # independent of the others
    assert D.condition_distances(pred, real, cap=20, seed=4)["energy_distance_u"].iloc[0] != \
        a["energy_distance_u"].iloc[0]
    per = D.condition_distances(pred, real, cap=None, per_sample=True)
    assert list(zip(per["perturbation"], per["sample"])) == [("p0", 0), ("p0", 1), ("p1", 0), ("p1", 1)]
    assert list(per["n_pred"]) == [40, 40, 12, 12]
    with pytest.raises(DataError, match="pQ"):
        D.condition_distances(pred, real, [("c0", "pQ")])


# ---------------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------------


def _populations(rng, K, J, genes=300, cells=30, tau=0.5, sigma=1.0, sample_tau=None, sample_sigma=None):
    """Replicates and sampled populations: a per-gene mean, a per-population shift (tau) and cell noise."""
    mu = rng.normal(2, 1, genes)
    st = tau if sample_tau is None else sample_tau
    ss = sigma if sample_sigma is None else sample_sigma
    pred_blocks = [(mu + rng.normal(0, st, genes) + rng.normal(0, ss, (cells, genes)), "p0", "c0", "pred", k)
                   for k in range(K)]
    real_blocks = [(mu + rng.normal(0, tau, genes) + rng.normal(0, sigma, (cells, genes)), "p0", "c0", f"r{j}", -1)
                   for j in range(J)]
    ctrl = rng.normal(0, 1, (5, genes))

    def mk(blocks):
        a = _adata([b[:4] for b in blocks] + [(ctrl, CTRL, "c0", "b0")], genes=genes)
        a.obs["sample"] = np.concatenate([np.full(cells, b[4]) for b in blocks] + [np.full(5, -1)])
        return a
    return mk(pred_blocks), mk(real_blocks)


def test_calibration_same_distribution_covers_at_nominal():
    pred, real = _populations(np.random.default_rng(0), K=19, J=4)
    out = D.replicate_calibration(pred, real, levels=(0.5, 0.8, 0.9))
    r = out.iloc[0]
    assert (r["n_samples"], r["n_replicates"], r["n_cells"], r["reason"]) == (19, 4, 30, "")
    for lv, nominal in (("50", 0.5), ("80", 0.8), ("90", 0.9)):
        assert r[f"nominal_{lv}"] == pytest.approx(nominal)
        assert abs(r[f"coverage_{lv}"] - nominal) < 0.06, (lv, r[f"coverage_{lv}"])
    assert abs(r["pit_mean"] - 0.5) < 0.04
    assert abs(r["pit_var_ratio"] - 1.0) < 0.15
    assert r["pit_hist"].sum() == 4 * r["n_genes"] and len(r["pit_hist"]) == 20


def test_calibration_tiny_spread_undercovers():
    pred, real = _populations(np.random.default_rng(1), K=19, J=4, sample_tau=0.0, sample_sigma=0.01)
    r = D.replicate_calibration(pred, real).iloc[0]
    assert r["coverage_90"] < 0.2 and r["coverage_50"] < 0.1
    assert r["pit_var_ratio"] > 2.0  # U-shaped rank histogram


def test_calibration_nan_with_reason_and_interval_index():
    pred, real = _populations(np.random.default_rng(2), K=1, J=2, genes=20)
    r = D.replicate_calibration(pred, real).iloc[0]
    assert np.isnan(r["coverage_90"]) and "need >= 2" in r["reason"]
    pred, real = _populations(np.random.default_rng(2), K=5, J=2, genes=20)
    r = D.replicate_calibration(pred, real, min_cells=31).iloc[0]  # 30 cells each: nothing qualifies
    assert np.isnan(r["pit_mean"]) and "no real replicate" in r["reason"]
    r = D.replicate_calibration(pred, real).iloc[0]
    assert r["nominal_90"] == pytest.approx(4 / 6)  # K=5: the widest interval, [min, max]
    assert D.interval_index(39, 0.9) == (2, pytest.approx(0.9))
    no_batch = real.copy()
    del no_batch.obs["batch"]
    with pytest.raises(DataError, match="batch"):
        D.replicate_calibration(pred, no_batch)


def test_the_unbiased_energy_distance_is_near_zero_for_one_distribution():
    """Two samples of one distribution: the U-statistic is 0 in expectation, the V-statistic is not
    (its self-pairs add about E|X-X'| (1/n + 1/m)), which matters on small sets."""
    rng = np.random.default_rng(5)
    us, vs, within = [], [], []
    for _ in range(40):
        x, y = rng.normal(size=(15, 8)), rng.normal(size=(15, 8))
        u, v = D.energy_distances(x, y)
        us.append(u)
        vs.append(v)
        within.append(cdist(x, x).sum() / (15 * 14))
    assert abs(np.mean(us)) < 3 * np.std(us) / np.sqrt(len(us))
    assert np.mean(vs) == pytest.approx(np.mean(us) + 2 * np.mean(within) / 15, rel=0.05)
    assert np.isnan(D.energy_distances(x[:1], y)[0]) and D.energy_distance(x, y) == pytest.approx(vs[-1])
