"""Fidelity diagnostics (perturbdiff.eval.fidelity) on predictions whose shape is known by
construction, and evaluate's checks of implausible input values."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from helpers import lognorm
from perturbdiff.data.schema import DataError
from perturbdiff.eval.fidelity import fidelity
from perturbdiff.eval.inputs import LOG1P_MAX, scale_problems
from perturbdiff.eval.evaluate import EvaluateOptions, evaluate_files


def _adata(blocks: list[tuple[np.ndarray, str, int]], context: str = "c0") -> ad.AnnData:
    """Cells in the evaluation layout from (X, perturbation, sample) blocks."""
    X = np.concatenate([b[0] for b in blocks]).astype(np.float32)
    obs = pd.DataFrame({"perturbation": np.concatenate([[p] * len(x) for x, p, _ in blocks]),
                        "context": context, "batch": "b0",
                        "sample": np.concatenate([[s] * len(x) for x, _, s in blocks]).astype(np.int64)})
    obs["is_control"] = obs["perturbation"] == "control"
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(X=sp.csr_matrix(X), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(X.shape[1])]))


@pytest.fixture(scope="module")
def cells():
    """Real counts turned into log1p(normalize_total) values: controls and one perturbation that
    raises the first 10 genes 4-fold."""
    rng = np.random.default_rng(0)
    mu = rng.gamma(0.6, 2.0, size=40)
    ctrl = lognorm(rng.poisson(mu, size=(200, 40)).astype(float))
    up = mu.copy()
    up[:10] *= 4
    pert = lognorm(rng.poisson(up, size=(150, 40)).astype(float))
    return ctrl, pert


def _one(real, pred):
    row = fidelity(real, pred).iloc[0]
    return {k: float(v) for k, v in row.items() if k not in ("context", "perturbation")}


def test_real_cells_score_as_real_cells(cells):
    ctrl, pert = cells
    real = _adata([(pert, "P", -1), (ctrl, "control", -1)])
    f = _one(real, _adata([(pert, "P", 0), (ctrl, "control", -1)]))
    assert f["zero_frac_pred"] == f["zero_frac_real"] > 0.3
    assert f["subcount_frac_pred"] == 0 and f["sd_ratio"] == 1 and f["delta_norm_ratio"] == pytest.approx(1)
    assert f["max_pred"] == f["max_real"] < np.log1p(1e4)


def test_a_shift_of_the_controls_moves_every_zero(cells):
    """A mean-shift prediction (controls + a small constant): no exact zeros, and its former zeros
    hold values no measured cell can (below one count)."""
    ctrl, pert = cells
    real = _adata([(pert, "P", -1), (ctrl, "control", -1)])
    shifted = ctrl[:150] + 0.05
    f = _one(real, _adata([(shifted, "P", 0), (ctrl, "control", -1)]))
    zeros = float((ctrl[:150] == 0).mean())
    assert f["zero_frac_pred"] == 0 and f["subcount_frac_pred"] == pytest.approx(zeros, abs=1e-9)


def test_collapse_and_overshoot_are_measured(cells):
    ctrl, pert = cells
    real = _adata([(pert, "P", -1), (ctrl, "control", -1)])
    d = pert.mean(0) - ctrl.mean(0)
    collapsed = np.repeat(pert.mean(0)[None], 150, axis=0)  # every cell the mean: no spread
    f = _one(real, _adata([(collapsed, "P", 0), (ctrl, "control", -1)]))
    assert f["sd_ratio"] == pytest.approx(0, abs=1e-6) and f["delta_norm_ratio"] == pytest.approx(1, rel=1e-5)
    doubled = ctrl[:150] - ctrl[:150].mean(0) + ctrl.mean(0) + 2 * d  # the controls moved by twice the change
    f = _one(real, _adata([(doubled, "P", 0), (ctrl, "control", -1)]))
    assert f["delta_norm_ratio"] == pytest.approx(2, rel=1e-5)
    half_spread = pert.mean(0) + 0.5 * (pert - pert.mean(0))
    assert _one(real, _adata([(half_spread, "P", 0), (ctrl, "control", -1)]))["sd_ratio"] == pytest.approx(0.5)


def test_scale_problems_are_counted():
    x = np.array([[0.0, 1.0, np.nan], [-0.5, 16.0, 20.0]])
    assert scale_problems(x) == {"non_finite": 1, "negative": 1, "above_log1p_max": 2, "max": 20.0}
    assert scale_problems(sp.csr_matrix(np.array([[0.0, 2.0]]))) == {"non_finite": 0, "negative": 0,
                                                                       "above_log1p_max": 0, "max": 2.0}


def test_evaluate_refuses_nan_and_flags_values_out_of_scale(cells, tmp_path):
    ctrl, pert = cells
    real = tmp_path / "real.h5ad"
    _adata([(pert, "P", -1), (ctrl, "control", -1)]).write_h5ad(real)
    wild = pert.copy()
    wild[0, :3] = [LOG1P_MAX + 5, 21.0, -1.0]
    pred = tmp_path / "pred.h5ad"
    _adata([(wild, "P", 0), (ctrl, "control", -1)]).write_h5ad(pred)
    lines: list[str] = []
    ev = evaluate_files(pred, real, tmp_path / "ev", opts=EvaluateOptions(profile="minimal", distances=False),
                        log=lines.append)
    flags = ev.summary["notes"]["inputs"]
    assert any("2 value(s) above 15" in f and "pred.h5ad" in f for f in flags)
    assert any("1 negative value(s)" in f for f in flags)
    assert any("warning" in line and "above 15" in line for line in lines)
    assert "max_pred" in ev.metrics.columns and ev.metrics.loc[ev.metrics["method"] == "model", "max_pred"].iloc[0] == 21
    nan = pert.copy()
    nan[3, 3] = np.nan
    _adata([(nan, "P", 0), (ctrl, "control", -1)]).write_h5ad(pred)
    with pytest.raises(DataError, match=r"pred.h5ad: 1 NaN or infinite value"):
        evaluate_files(pred, real, tmp_path / "ev2", opts=EvaluateOptions(profile="minimal", distances=False))
