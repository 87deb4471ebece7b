"""The held-out protocol with the truth in a second h5ad (pipeline.test_h5ad): an unseen cell type
measured apart is predicted from its own controls and scored against its own cells, and a file that
cannot be predicted fails before any training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from helpers import h5ad_obs, make_counts, write_h5ad

ROOT = Path(__file__).resolve().parents[1]
GENES = np.array([f"G{i:03d}" for i in range(40)])
TINY = ("shard.source=h5ad", "shard.perturbation_col=perturbation", "shard.context_col=cell_type",
        "shard.batch_col=donor", "shard.control_label=control", "shard.num_workers=1", "shard.hvg.num_top_genes=32",
        "data.panel.kind=all", "data.set_size=8", "data.sets_per_batch=2", "data.num_workers=0",
        "model.size=tiny", "diffusion.kme_impl=torch", "train.progress=false", "train.val_every=0",
        "train.sample_every=0", "train.log_every=2", "pipeline.pretrain_steps=2", "pipeline.finetune_steps=3",
        "predict.n_samples=2", "predict.sample_steps=3", "predict.train_cells=16", "pipeline.report=false")


def _file(path: Path, seed: int, contexts, n: int, genes=GENES) -> Path:
    rng = np.random.default_rng(seed)
    obs = h5ad_obs(rng, n, contexts=contexts, perts=("control", "IL2", "TNF"), control_share=0.4)
    return write_h5ad(path, make_counts(rng, n, len(genes)).astype(np.float64), obs, genes)


def _pipeline(tmp_path: Path, train: Path, test: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perturbdiff.cli", "pipeline", f"out_dir={tmp_path / 'run'}",
                           f"shard.inputs=[{train}]", f"pipeline.test_h5ad={test}", *TINY, *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_an_unseen_cell_type_from_a_second_file(tmp_path):
    train = _file(tmp_path / "train.h5ad", 1, ("T_cell", "B_cell"), 360)
    test = _file(tmp_path / "nk.h5ad", 2, ("NK_cell",), 120, genes=GENES[::-1])  # other gene order
    res = _pipeline(tmp_path, train, test)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "held-out file" in res.stdout and "unseen in training: context(s) ['NK_cell']" in res.stdout
    assert "their context covariate is the null token" in res.stdout  # a label the checkpoint never saw
    out = tmp_path / "run"
    truth = ad.read_h5ad(test).obs
    real = ad.read_h5ad(out / "predict" / "real.h5ad")
    pred = ad.read_h5ad(out / "predict" / "pred.h5ad")
    # every perturbed group of the file, with its own cell count, in the truth and (x n_samples) the prediction
    want = truth[truth["perturbation"] != "control"].groupby(["perturbation", "donor"], observed=True).size()
    for obs, k in ((real.obs, 1), (pred.obs, 2)):
        got = obs[~obs["is_control"].astype(bool)].groupby(["perturbation", "batch"], observed=True).size()
        assert set(obs.loc[~obs["is_control"].astype(bool), "context"]) == {"NK_cell"}
        assert got.sort_index().tolist() == [k * v for v in want.sort_index().tolist()]
    # the truth's cells are the file's, on the checkpoint's genes: its row totals normalised like training
    file_x = ad.read_h5ad(test)
    nk = file_x[(file_x.obs["perturbation"] == "IL2").to_numpy()]
    counts = nk[:, list(real.var_names)].X.toarray()
    expect = np.log1p(counts / file_x[(file_x.obs["perturbation"] == "IL2").to_numpy()].X.sum(1).A * 1e4)
    got = real[(real.obs["perturbation"] == "IL2").to_numpy()].X.toarray()
    np.testing.assert_allclose(np.sort(got.sum(1)), np.sort(expect.sum(1)), rtol=1e-4)
    # the controls are the file's NK controls, the same in both files
    ctrl = real.obs["is_control"].astype(bool).to_numpy()
    assert set(real.obs.loc[ctrl, "context"]) == {"NK_cell"}
    np.testing.assert_array_equal(real.X[ctrl].toarray(), pred.X[pred.obs["is_control"].astype(bool).to_numpy()]
                                  .toarray())
    assert real.uns["perturbdiff"]["truth"] == str(test)
    metrics = pd.read_csv(out / "eval" / "metrics.csv")
    assert set(metrics.loc[metrics["method"] == "model", "context"]) == {"NK_cell"}
    assert {"linear", "latent_shift", "control_mean"} <= set(metrics["method"])


@pytest.mark.parametrize("CASE", ["same_file", "no_controls", "no_genes"])
def test_an_unpredictable_file_fails_before_training(tmp_path, CASE):
    train = _file(tmp_path / "train.h5ad", 1, ("T_cell", "B_cell"), 360)
    if CASE == "same_file":
        test, expect = train, "is also in shard.inputs"
    elif CASE == "no_controls":
        test = _file(tmp_path / "nk.h5ad", 2, ("NK_cell",), 120)
        a = ad.read_h5ad(test)
        a = a[(a.obs["perturbation"] != "control").to_numpy()].copy()
        a.write_h5ad(test)
        expect = "have no control cells in this file nor in the store"
    else:
        test = _file(tmp_path / "nk.h5ad", 2, ("NK_cell",), 120, genes=np.array([f"X{i}" for i in range(40)]))
        expect = "no gene (var_names) in common with the store"
    res = _pipeline(tmp_path, train, test)
    assert res.returncode == 2, res.stderr[-3000:]
    assert expect in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]
    assert not (tmp_path / "run" / "pretrain").exists() and not (tmp_path / "run" / "finetune").exists()
    assert ad.read_h5ad(train).n_obs == 360  # the inputs untouched
