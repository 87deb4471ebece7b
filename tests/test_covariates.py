"""Numeric group covariates (the Tahoe dose) travel from the source to conditions, batches and WebDataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from helpers import data_cfg, quiet

from data_sharding.wds_export import export_wds
from perturbdiff.config import PanelConfig, WdsConfig
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.wds import wds_loader


def test_conditions_carry_the_source_dose(tahoe_src, tahoe_store):
    cond = pd.read_parquet(tahoe_store / "conditions.parquet")
    assert "dose" in cond.columns
    src = tahoe_src.obs
    for row in cond.itertuples():
        sel = (src["cell_line_id"] == row.context) & (src["plate"] == row.batch) & (src["perturbation"] == row.perturbation)
        assert np.unique(src.loc[sel, "dose"]).tolist() == [row.dose]
    assert (cond.loc[cond["is_control"], "dose"] == 0.0).all()


def test_batches_and_webdataset_carry_the_dose(tahoe_store, tmp_path):
    cond = pd.read_parquet(tahoe_store / "conditions.parquet")
    cfg = data_cfg(tahoe_store)
    seen = 0
    for batch in SetLoader(cfg, log=quiet):
        expected = cond["dose"].to_numpy()[batch["group"].numpy()]
        np.testing.assert_array_equal(batch["num_dose"].numpy(), expected.astype(np.float32))
        seen += len(expected)
    assert seen > 0
    export_wds(cfg, WdsConfig(out=str(tmp_path / "wds"), epochs=1, sets_per_shard=4), log=quiet)
    loader, _ = wds_loader(tmp_path / "wds", sets_per_batch=3, shuffle_buffer=0)
    for batch in loader:
        expected = cond["dose"].to_numpy()[batch["group"].numpy()]
        np.testing.assert_array_equal(batch["num_dose"].numpy(), expected.astype(np.float32))
        assert batch["num_dose"].dtype.is_floating_point


def test_webdataset_sets_equal_loader_sets(tahoe_store, tmp_path):
    """An exported set decodes to exactly the tensors the store loader gives for the same set."""
    cfg = data_cfg(tahoe_store, panel=PanelConfig(kind="hvg", num_genes=20))  # panel < vocabulary
    by_key = {}
    for batch in SetLoader(cfg, log=quiet):
        for i in range(len(batch["index"])):
            by_key[int(batch["index"][i])] = (batch["x"][i], batch["ctrl"][i], batch["mask"][i], batch["ctrl_mask"][i])
    export_wds(cfg, WdsConfig(out=str(tmp_path / "wds"), epochs=1, sets_per_shard=4), log=quiet)
    loader, _ = wds_loader(tmp_path / "wds", sets_per_batch=1, shuffle_buffer=0)
    n = 0
    for batch in loader:
        x, ctrl, mask, ctrl_mask = by_key[int(batch["index"][0])]
        assert torch.equal(batch["x"][0], x) and torch.equal(batch["ctrl"][0], ctrl)
        assert torch.equal(batch["mask"][0], mask) and torch.equal(batch["ctrl_mask"][0], ctrl_mask)
        n += 1
    assert n == len(by_key) > 0
