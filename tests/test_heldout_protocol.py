"""Data in the user's layout: one implicit context, one batch, no doses."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from data_sharding.convert import convert
from helpers import build_h5ad, h5ad_cfg, quiet
from perturbdiff.conditions import covariates
from perturbdiff.config import load_config
from perturbdiff.data.store import CellStore


def test_shard_without_a_context_column(tmp_path):
    """shard.context_col: null (a file of one cell type) is a valid config and gives one context."""
    src = build_h5ad(tmp_path / "one.h5ad")
    cfg = load_config([], [f"shard.inputs=[{src.path}]", "shard.source=h5ad", "shard.context_col=null",
                           "shard.perturbation_col=perturbation", f"shard.out={tmp_path / 's.zarr'}"])
    assert cfg.shard.context_col is None
    convert(h5ad_cfg(src.path, tmp_path / "one.zarr", context_col=None, batch_col=None), log=quiet)
    cond = CellStore(str(tmp_path / "one.zarr")).conditions
    assert set(cond["context"]) == {"all"} and cond["n"].sum() == len(src.obs)


def _model(branches, numeric=()):
    return SimpleNamespace(cov_encoder=SimpleNamespace(branch_names=list(branches)),
                           cfg=SimpleNamespace(numeric_covariates=list(numeric)))


def test_an_absent_batch_is_the_checkpoints_only_batch():
    conds = pd.DataFrame({"context": ["all"], "perturbation": ["IL2"], "batch": [None]})
    notes = []
    cov = covariates(conds, {"context": ["all"], "perturbation": ["IL2"], "batch": ["plate1"]},
                     _model(["context", "perturbation", "batch"]), notes)
    assert cov["batch"].tolist() == [0] and "only batch 'plate1'" in notes[0]
    notes = []  # two batches: an absent one stays unknown (the null token), said
    cov = covariates(conds, {"context": ["all"], "perturbation": ["IL2"], "batch": ["p1", "p2"]},
                     _model(["context", "perturbation", "batch"]), notes)
    assert "batch" not in cov and "no known batch" in notes[0]


def test_no_dose_branch_for_data_without_doses(tmp_path):
    """model.numeric_covariates names dose by default; data without a numeric dose get no dose branch."""
    from helpers import build_train_store
    from perturbdiff.config import resolve_paths
    from perturbdiff import distributed as pdist
    from perturbdiff.train.run import apply_mode, build_trainer

    store = build_train_store(tmp_path, genes=16, cells=300)
    cfg = resolve_paths(load_config([], [f"out_dir={tmp_path / 'run'}", f"data.store={store}", "data.set_size=8",
                                         "data.sets_per_batch=2", "data.panel.kind=all", "model.size=tiny",
                                         "diffusion.kme_impl=torch", "train.max_steps=1", "train.progress=false"]))
    assert cfg.model.numeric_covariates == ["dose"]
    said = []
    info = pdist.init_distributed()
    apply_mode(cfg, "finetune", quiet)
    t = build_trainer(cfg, "finetune", None, info, said.append)
    try:
        assert cfg.model.numeric_covariates == []
        assert not any(k.startswith("num_") or "numeric" in k for k in t.engine.module.state_dict())
        assert any("['dose'] not in the data" in s for s in said)
    finally:
        t.close()


@pytest.mark.parametrize("FLAVOR", ["seurat_v3", "dispersion"])
def test_the_pipeline_panel_is_chosen_on_training_cells_only(tmp_path, FLAVOR):
    """A gene that varies only in the held-out cells tops the store-wide HVG ranking but is not in the
    panel the pipeline trains on (chosen on the training and control cells)."""
    import numpy as np

    from helpers import h5ad_obs, make_counts, write_h5ad
    from perturbdiff.config import HoldoutRule, RunConfig
    from perturbdiff.pipeline import training_panel

    rng = np.random.default_rng(4)
    obs = h5ad_obs(rng, 600, perts=("control", "IL2", "TNF"), control_share=0.4)
    counts = make_counts(rng, 600, 40)
    test = ((obs["cell_type"] == "B_cell") & (obs["perturbation"] == "IL2")).to_numpy()
    counts[:, 7] = rng.poisson(2.0, size=600)
    counts[test, 7] = rng.choice([0, 40], size=int(test.sum()))  # a burst gene, only in the test cells
    src = write_h5ad(tmp_path / "x.h5ad", counts.astype(np.float64), obs, [f"G{i:03d}" for i in range(40)])
    store = tmp_path / "x.zarr"
    from perturbdiff.config import HVGConfig

    convert(h5ad_cfg(src, store, hvg=HVGConfig(num_top_genes=40, flavor=FLAVOR)), log=quiet)
    cs = CellStore(str(store))
    if FLAVOR == "dispersion":  # seurat_v3 clips the bursts at mean + sqrt(N) sigma: the gene is not on top
        assert 7 in cs.hvg_ranking()[:10]
    cfg = RunConfig()
    cfg.shard.hvg.flavor = FLAVOR
    cfg.data.store = str(store)
    cfg.data.panel.num_genes = 10
    cfg.data.split.test = [HoldoutRule(contexts=["B_cell"], perturbations=["IL2"])]
    said = []
    from perturbdiff.data.splits import assign_splits

    training_panel(cfg, tmp_path, cs, assign_splits(cs.conditions, cfg.data.split, log=quiet), log=said.append)
    genes = (tmp_path / "panel_genes.txt").read_text().split()
    assert len(genes) == 10 and "G007" not in genes and genes == sorted(genes)
    assert genes != sorted(f"G{i:03d}" for i in cs.hvg_ranking()[:10])
    assert cfg.data.panel.kind == "file" and cfg.data.panel.genes_file == str(tmp_path / "panel_genes.txt")
    assert FLAVOR in said[0]
    assert list(cs.panel(cfg.data.panel)) == sorted(cs.panel(cfg.data.panel))
