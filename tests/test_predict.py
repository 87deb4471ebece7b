"""``perturbdiff predict``: the cell-eval layout, the same controls in prediction and truth, streamed
writing, gene alignment of users' files, and clear errors for conditions the checkpoint cannot take."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers import PERTS, build_train_store, write_h5ad
from perturbdiff.config import DiffusionConfig, ModelConfig, NormalizeConfig, SplitConfig, HoldoutRule
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.schema import DataError
from perturbdiff.models import build_model
from perturbdiff.conditions import read_conditions
from perturbdiff.data.h5ad_writer import StreamingH5ad
from perturbdiff.predict import PredictOptions, controls_from_h5ad, predict, predict_split
from perturbdiff.foundation import load_foundation, save_foundation
from helpers import data_cfg

SPLIT = SplitConfig(test=[HoldoutRule(contexts=["B_cell"], perturbations=["IL2"])])
OPTS = PredictOptions(n_samples=2, sets_per_batch=3, sample_steps=3, seed=0, train_cells=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_train_store(tmp_path_factory.mktemp("predict"), genes=24, cells=500)


@pytest.fixture(scope="module")
def foundation(store, tmp_path_factory):
    """An untrained model saved as a foundation (prediction does not care how good it is)."""
    loader = SetLoader(data_cfg(store, split=SPLIT), "train", log=lambda *a: None)
    vocabs = loader.vocabularies
    cfg = ModelConfig(size="tiny")
    model = build_model(cfg, len(loader.gene_ids), {k: len(v) for k, v in vocabs.items()})
    extra = {"set_size": 8, "normalize": dataclasses.asdict(NormalizeConfig()),
             "diffusion": dataclasses.asdict(DiffusionConfig(kme_impl="torch", steps=50)),
             "numeric_in_data": sorted(loader.group_numeric)}  # as the trainer records it
    path = tmp_path_factory.mktemp("found") / "foundation"
    save_foundation(path, model.state_dict(), model_cfg=cfg, genes=list(loader.gene_ids), vocabularies=vocabs,
                    extra=extra)
    return load_foundation(path)


def test_predict_split_writes_the_cell_eval_layout_with_shared_controls(store, foundation, tmp_path):
    pred_path, real_path = predict_split(foundation, str(store), SPLIT, "test", tmp_path, OPTS, log=lambda *a: None)
    pred, real = ad.read_h5ad(pred_path), ad.read_h5ad(real_path)
    assert list(pred.var_names) == list(real.var_names) == foundation.genes
    for a in (pred, real):
        assert {"perturbation", "context", "batch", "sample", "is_control"} <= set(a.obs.columns)
        assert sp.issparse(a.X) and a.X.min() >= 0
    real_pert = real[~real.obs["is_control"].values]
    assert set(zip(real_pert.obs["context"], real_pert.obs["perturbation"])) == {("B_cell", "IL2")}
    # every population has as many cells as the real condition
    counts = pred.obs[~pred.obs["is_control"]].groupby(["batch", "sample"], observed=True).size()
    want = real_pert.obs.groupby("batch", observed=True).size()
    for (batch, sample), n in counts.items():
        assert n == want[batch] and sample in (0, 1)
    pc, rc = pred[pred.obs["is_control"].values], real[real.obs["is_control"].values]
    assert pc.n_obs > 0 and (pc.obs["sample"] == -1).all()
    np.testing.assert_array_equal(pc.X.toarray(), rc.X.toarray())  # the SAME control cells in both
    assert set(pc.obs["context"]) == {"B_cell"}
    assert not list(tmp_path.glob("*.partial"))


def test_streaming_writer_round_trips_exactly(tmp_path):
    rng = np.random.default_rng(0)
    w = StreamingH5ad(tmp_path / "x.h5ad", [f"g{i}" for i in range(7)])
    blocks = [np.where(rng.random((n, 7)) < 0.5, 0, rng.random((n, 7))).astype(np.float32) for n in (3, 5, 1)]
    blocks.insert(1, np.zeros((2, 7), np.float32))  # a block without a nonzero
    for i, b in enumerate(blocks):
        w.append(sp.csr_matrix(b) if i == 2 else b, f"p{i}", "ctx", "b0", i, False)  # dense or sparse rows
    w.close()
    back = ad.read_h5ad(tmp_path / "x.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), np.concatenate(blocks))
    assert list(back.obs["perturbation"]) == ["p0"] * 3 + ["p1"] * 2 + ["p2"] * 5 + ["p3"]
    assert list(back.obs["sample"]) == [0] * 3 + [1] * 2 + [2] * 5 + [3]
    backed = ad.read_h5ad(tmp_path / "x.h5ad", backed="r")  # row slices of the file, as the join reads them
    np.testing.assert_array_equal(backed.X[4:9].toarray(), np.concatenate(blocks)[4:9])
    backed.file.close()


def user_h5ad(tmp_path, foundation, *, drop=0, counts=True, control="control"):
    rng = np.random.default_rng(1)
    genes = foundation.genes[drop:][::-1] + ["EXTRA1"]  # another order, one extra gene
    n = 60
    X = rng.poisson(3.0, size=(n, len(genes))).astype(np.float64)
    if not counts:
        X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    obs = pd.DataFrame({"perturbation": [control] * 40 + ["IL2"] * 20, "context": ["T_cell"] * 30 + ["B_cell"] * 30},
                       index=[f"c{i}" for i in range(n)])
    return write_h5ad(tmp_path / "user.h5ad", X, obs, genes), X, genes


def test_user_h5ad_controls_are_aligned_and_normalised(tmp_path, foundation):
    path, X, genes = user_h5ad(tmp_path, foundation)
    norm = NormalizeConfig()
    pool = controls_from_h5ad(str(path), foundation.genes, norm, ["T_cell"], OPTS, batch_col=None)
    assert any("raw counts" in n for n in pool.notes)
    rows = np.flatnonzero(np.arange(60) < 30)
    want = np.log1p(X[rows] / X[rows].sum(1, keepdims=True) * 1e4) / norm.scale
    order = [genes.index(g) for g in foundation.genes]
    np.testing.assert_allclose(pool.x, want[:, order], rtol=1e-5)
    # log-normalised input is detected and used as is
    path, X, genes = user_h5ad(tmp_path, foundation, counts=False)
    pool = controls_from_h5ad(str(path), foundation.genes, norm, ["T_cell"], OPTS, batch_col=None)
    assert any("log-normalised" in n for n in pool.notes)
    np.testing.assert_allclose(pool.x, X[:30][:, order] / norm.scale, rtol=1e-5)


def test_missing_genes_error_or_zero(tmp_path, foundation):
    path, _, _ = user_h5ad(tmp_path, foundation, drop=3)
    with pytest.raises(DataError, match="3 of the checkpoint's 24 genes are missing"):
        controls_from_h5ad(str(path), foundation.genes, NormalizeConfig(), ["T_cell"], OPTS, batch_col=None)
    opts = dataclasses.replace(OPTS, missing_genes="zero")
    pool = controls_from_h5ad(str(path), foundation.genes, NormalizeConfig(), ["T_cell"], opts, batch_col=None)
    assert (pool.x[:, :3] == 0).all() and any("3 missing genes filled with zeros" in n for n in pool.notes)


def test_conditions_file_predicts_and_bad_conditions_are_named(tmp_path, foundation):
    path, _, _ = user_h5ad(tmp_path, foundation)
    conds = tmp_path / "conds.csv"
    pd.DataFrame({"perturbation": ["IL2", "TNF"], "context": ["T_cell", "B_cell"], "n_cells": [5, 11]}).to_csv(conds, index=False)
    table = read_conditions(str(conds), OPTS)
    pool = controls_from_h5ad(str(path), foundation.genes, NormalizeConfig(), ["B_cell", "T_cell"], OPTS, batch_col=None)
    out = ad.read_h5ad(predict(foundation, table, pool, tmp_path / "p.h5ad", OPTS, log=lambda *a: None))
    cells = out.obs[~out.obs["is_control"]].groupby(["perturbation", "sample"], observed=True).size()
    assert cells.to_dict() == {("IL2", 0): 5, ("IL2", 1): 5, ("TNF", 0): 11, ("TNF", 1): 11}

    for bad, match in (({"perturbation": ["NOPE"], "context": ["T_cell"]}, "perturbation 'NOPE' is neither"),
                       ({"perturbation": ["IL2"], "context": ["Neuron"]}, "'Neuron'.*empty control pool")):
        pd.DataFrame(bad).to_csv(conds, index=False)
        with pytest.raises(DataError, match=match):
            predict(foundation, read_conditions(str(conds), OPTS), pool, tmp_path / "bad.h5ad", OPTS)
        assert not (tmp_path / "bad.h5ad").exists() and not (tmp_path / "bad.h5ad.partial").exists()
    # a context the checkpoint never saw, with control cells: its null token, said; the cells predicted
    unseen = dataclasses.replace(pool, context=np.where(pool.context == "T_cell", "Neuron", pool.context))
    pd.DataFrame({"perturbation": ["IL2"], "context": ["Neuron"], "n_cells": [6]}).to_csv(conds, index=False)
    said = []
    out = ad.read_h5ad(predict(foundation, read_conditions(str(conds), OPTS), unseen, tmp_path / "n.h5ad", OPTS,
                               log=said.append))
    assert (out.obs.loc[~out.obs["is_control"].astype(bool), "context"] == "Neuron").sum() == 6 * OPTS.n_samples
    assert any("['Neuron'] not in the checkpoint's context vocabulary" in s and "null token" in s for s in said)
    with pytest.raises(DataError, match="no control cells for context 'Neuron'"):
        controls_from_h5ad(str(path), foundation.genes, NormalizeConfig(), ["Neuron"], OPTS, batch_col=None)
    assert set(PERTS) >= {"IL2", "TNF"}


def test_a_population_does_not_depend_on_its_batch(store, tmp_path):
    """Each set has its own seed (control draw and x_T): predicting with 1 or 4 sets per forward
    gives the same cells (DDIM is deterministic given x_T), and the predictions are not trivial."""
    from helpers import random_foundation

    found = load_foundation(random_foundation(store, tmp_path / "found", SPLIT))
    outs = []
    for b in (1, 4):
        opts = dataclasses.replace(OPTS, sets_per_batch=b, train_cells=0, decode="continuous")
        pred, _ = predict_split(found, str(store), SPLIT, "test", tmp_path / f"b{b}", opts, log=lambda *a: None)
        outs.append(ad.read_h5ad(pred))
    a, b = outs
    pd.testing.assert_frame_equal(a.obs, b.obs)
    # float32 rounding differs with the batch composition (~1e-4 here); another seed differs by O(10)
    np.testing.assert_allclose(a.X.toarray(), b.X.toarray(), rtol=1e-3, atol=2e-3)
    gen = a[~a.obs["is_control"].values].X.toarray()
    assert gen.std() > 0.05 and not np.allclose(gen[0], gen[1])


def test_predicted_values_stay_within_what_the_data_can_hold(store, tmp_path):
    """A model far from trained (large random weights) still writes no value above log1p(target_sum),
    what one gene holding every count of its cell gives: the bound is in the sampler."""
    from helpers import random_foundation
    from perturbdiff.predict import attainable_max

    found = load_foundation(random_foundation(store, tmp_path / "found", SPLIT, noise=3.0))
    pred, _ = predict_split(found, str(store), SPLIT, "test", tmp_path / "p", dataclasses.replace(OPTS, train_cells=0),
                            log=lambda *a: None)
    x = ad.read_h5ad(pred).X
    bound = np.log1p(NormalizeConfig().target_sum)
    assert attainable_max(DiffusionConfig(), NormalizeConfig()) * NormalizeConfig().scale == pytest.approx(bound)
    assert x.max() <= bound + 1e-4 and x.min() >= 0
    assert attainable_max(DiffusionConfig(x0_max=0.3), NormalizeConfig()) == 0.3


def test_one_implicit_context_needs_no_context_column(tmp_path, foundation):
    """A checkpoint with one context: controls and conditions may leave the context column out."""
    path, X, genes = user_h5ad(tmp_path, foundation)
    a = ad.read_h5ad(path)
    keep = (a.obs["context"] == "T_cell").to_numpy()
    a = a[keep].copy()
    del a.obs["context"]
    a.write_h5ad(tmp_path / "noctx.h5ad")
    norm = NormalizeConfig()
    pool = controls_from_h5ad(str(tmp_path / "noctx.h5ad"), foundation.genes, norm, ["T_cell"], OPTS,
                              batch_col=None, only_context="T_cell")
    assert set(pool.context) == {"T_cell"} and len(pool.x) == int((a.obs["perturbation"] == "control").sum())
    with pytest.raises(DataError, match="obs has no column 'context'"):
        controls_from_h5ad(str(tmp_path / "noctx.h5ad"), foundation.genes, norm, ["T_cell"], OPTS, batch_col=None)
    (tmp_path / "c.csv").write_text("perturbation,n_cells\nIL2,5\n")
    conds = read_conditions(str(tmp_path / "c.csv"), OPTS, only_context="T_cell")
    assert conds["context"].tolist() == ["T_cell"]
    with pytest.raises(DataError, match="conditions need columns \\['context'\\]"):
        read_conditions(str(tmp_path / "c.csv"), OPTS)
