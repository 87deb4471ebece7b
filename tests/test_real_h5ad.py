"""Integration on the real development h5ad (Norman 2019 + McFaline-Figueroa 2023, log-normalised)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from data_sharding.convert import convert
from helpers import data_cfg, quiet, shard_cfg, store_csr
from perturbdiff.config import HoldoutRule, HVGConfig, PanelConfig, SplitConfig
from perturbdiff.data import schema
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.splits import CONTROL, TEST, TRAIN
from perturbdiff.data.store import CellStore

H5AD = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "perturbench_devel_norman19_mcfaline23.h5ad"

pytestmark = pytest.mark.skipif(not H5AD.is_file(), reason=f"../shared is absent: real development h5ad not found at {H5AD}")


@pytest.fixture(scope="module")
def adata():
    import anndata as ad

    return ad.read_h5ad(H5AD)


@pytest.fixture(scope="module")
def real_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "devel.zarr"
    cfg = shard_cfg(H5AD, out, source="h5ad", perturbation_col="condition", context_col="cell_type",
                    batch_col="dataset", control_label="control", extra_obs=["perturbation_type", "ncounts"],
                    cells_per_part=1500, num_workers=1, block_cells=2000, chunk_nnz=1 << 16, shard_nnz=1 << 18,
                    chunk_cells=1024, hvg=HVGConfig(num_top_genes=100))
    convert(cfg, log=quiet)
    return out


def test_store_shape_and_groups(real_store, adata):
    st = CellStore(real_store)
    m = st.manifest
    assert st.num_cells == 5961 and st.num_genes == 500
    assert m.value_kind == schema.VALUES_LOGNORM
    assert m.hvg["flavor"] == "dispersion"
    cond = st.conditions
    assert len(cond) == 64 == m.num_groups
    ctrl = cond[cond["is_control"]]
    assert len(ctrl) == 4 == m.num_control_groups
    assert sorted(ctrl["context"]) == ["A172", "T98G", "U87MG", "k562"]
    assert (ctrl["perturbation"] == "control").all() and (ctrl["n"] == 100).all()
    assert set(cond["batch"]) == {"norman19", "mcfaline23"}
    np.testing.assert_array_equal(st.gene_ids, adata.var_names.to_numpy().astype(str))
    # group sizes equal the h5ad's (cell_type, dataset, condition) counts
    counts = adata.obs.groupby(["cell_type", "dataset", "condition"], observed=True).size()
    for row in cond.itertuples():
        assert counts[(row.context, row.batch, row.perturbation)] == row.n
    assert cond["n"].sum() == 5961


def test_values_equal_h5ad_exactly(real_store, adata):
    X, ids = store_csr(real_store)
    pos = adata.obs_names.get_indexer(ids)
    assert (pos >= 0).all() and len(np.unique(pos)) == len(pos) == adata.n_obs
    src = sp.csr_matrix(adata.X)[pos]
    src.sort_indices()
    assert X.nnz == src.nnz
    np.testing.assert_array_equal(X.indptr, src.indptr)
    np.testing.assert_array_equal(X.indices, src.indices)
    # stored as float32: exactly the float32 rounding of the h5ad's float64 values
    np.testing.assert_array_equal(X.data.astype(np.float32), src.data.astype(np.float32))
    np.testing.assert_array_equal(X.data, src.data.astype(np.float32).astype(np.float64))
    st = CellStore(real_store)
    np.testing.assert_array_equal(st.obs("context"), adata.obs["cell_type"].astype(str).to_numpy()[pos])
    np.testing.assert_array_equal(st.obs("perturbation"), adata.obs["condition"].astype(str).to_numpy()[pos])
    np.testing.assert_array_equal(st.obs("ncounts"), adata.obs["ncounts"].to_numpy()[pos])
    np.testing.assert_array_equal(st.obs("perturbation_type"), adata.obs["perturbation_type"].astype(str).to_numpy()[pos])


def test_hold_out_mapk1_in_u87mg(real_store):
    split = SplitConfig(test=[HoldoutRule(contexts=["U87MG"], perturbations=["MAPK1"])])
    train = SetLoader(data_cfg(real_store, split=split, set_size=32, sets_per_batch=4,
                               panel=PanelConfig(kind="hvg", num_genes=100)), "train", rank=0, world=1, log=quiet)
    cond = train.store.conditions
    labels = train.split_labels
    held = np.flatnonzero(labels == TEST)
    assert len(held) == 1
    g = int(held[0])
    assert (cond.at[g, "context"], cond.at[g, "perturbation"]) == ("U87MG", "MAPK1")
    assert g not in set(train.sampler.groups.tolist())
    # MAPK1 in the other cell types stays in training
    others = cond[(cond["perturbation"] == "MAPK1") & (cond["context"] != "U87MG")].index
    assert len(others) == 3 and (labels[others] == TRAIN).all()
    assert (labels[cond["is_control"].to_numpy()] == CONTROL).all()
    lo, hi = int(cond.at[g, "start"]), int(cond.at[g, "stop"])
    seen = []
    for batch in train:
        rows = batch["rows"][batch["mask"]].numpy()
        assert not ((rows >= lo) & (rows < hi)).any()
        assert (batch["group"].numpy() != g).all()
        seen.append(rows)
    assert len(np.concatenate(seen)) > 4000
    # the test loader yields that group's cells only, every one of them, with U87MG controls
    test = SetLoader(data_cfg(real_store, split=split, set_size=32, sets_per_batch=2,
                              panel=PanelConfig(kind="hvg", num_genes=100)), "test", rank=0, world=1, log=quiet)
    rows, ctrl = [], []
    for batch in test:
        assert (batch["group"].numpy() == g).all()
        rows.append(batch["rows"][batch["mask"]].numpy())
        ctrl.append(batch["ctrl_rows"][batch["ctrl_mask"]].numpy())
    rows = np.concatenate(rows)
    np.testing.assert_array_equal(np.sort(rows), np.arange(lo, hi))
    assert hi - lo == 86
    st = CellStore(real_store)
    ctrl = np.concatenate(ctrl)
    assert (st.obs("context")[ctrl] == "U87MG").all() and (st.obs("perturbation")[ctrl] == "control").all()
    # a log-normalised store reads back as x / scale on the panel
    b = next(iter(test))
    r = b["rows"][0][b["mask"][0]].numpy()
    X, _ = store_csr(real_store)
    np.testing.assert_allclose(b["x"][0][b["mask"][0]].numpy(), X[r][:, test.panel].toarray() / 10.0, rtol=1e-6)
