"""The scGen-style latent-shift baseline (perturbdiff.eval.latent): known answers on synthetic data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbdiff.eval.latent import predict_latent_shift

G, K = 30, 4


def _data(seed=0):
    """Cells on a rank-K affine manifold, far from 0 (no clipping); perturbation p1 adds the same
    in-manifold shift in every context; context C is unseen (controls only)."""
    r = np.random.default_rng(seed)
    basis = np.linalg.qr(r.normal(size=(G, K)))[0]          # [G, K]
    base = 10.0 + r.normal(size=G)
    ctx_off = {c: basis @ r.normal(0, 1.0, K) for c in "ABC"}
    shift = {"p1": basis @ np.array([2.0, -1.0, 0.5, 0.0]), "p2": basis @ np.array([0.0, 1.0, 0.0, -1.5])}
    xs, obs = [], []
    for c in "ABC":
        for p in ["control", "p1", "p2"] if c != "C" else ["control"]:
            n = 400
            z = r.normal(0, 0.3, (n, K))
            x = base + ctx_off[c] + z @ basis.T + (shift[p] if p != "control" else 0.0)
            xs.append(x)
            obs += [(p, c)] * n
    X = np.concatenate(xs).astype(np.float64)
    o = pd.DataFrame(obs, columns=["perturbation", "context"], index=[f"c{i}" for i in range(len(obs))])
    a = ad.AnnData(X, obs=o, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    return a, base, ctx_off, shift


def test_unseen_context_gets_its_controls_plus_the_perturbation_shift():
    a, base, ctx_off, shift = _data()
    is_c = (a.obs["context"] == "C").to_numpy()
    train, controls = a[~is_c].copy(), a[is_c].copy()
    conds = pd.DataFrame({"context": ["C", "C"], "perturbation": ["p1", "p2"], "n_cells": [300, 300]})
    pred = predict_latent_shift(train, conds, controls, rng=0, n_components=K)
    ctrl_mean = controls.X.mean(0)
    for p in ("p1", "p2"):
        got = pred.X[(pred.obs["perturbation"] == p).to_numpy()].mean(0)
        # the shift is exact; the controls' mean is resampled (300 of 400 cells)
        np.testing.assert_allclose(got - ctrl_mean, shift[p], atol=0.06)
    assert (pred.obs["sample"][pred.obs["is_control"].to_numpy()] == -1).all()
    assert pred.n_obs == 600 + controls.n_obs
    assert pred.uns["baseline"]["name"] == "latent_shift" and pred.uns["baseline"]["n_components"] == K


def test_decoding_projects_onto_the_training_manifold_and_residual_keeps_the_cell():
    a, *_ = _data(1)
    is_c = (a.obs["context"] == "C").to_numpy()
    train, controls = a[~is_c].copy(), a[is_c].copy().copy()
    rng = np.random.default_rng(3)
    controls.X = controls.X + rng.normal(0, 0.5, controls.X.shape)   # off-manifold noise
    conds = pd.DataFrame({"context": ["C"], "perturbation": ["p1"], "n_cells": [400]})
    dec = predict_latent_shift(train, conds, controls, rng=0, n_components=K)
    res = predict_latent_shift(train, conds, controls, rng=0, n_components=K, residual=True)
    x_dec = dec.X[:400] - dec.X[:400].mean(0)
    x_res = res.X[:400] - res.X[:400].mean(0)
    # decoded cells lie in a K-dimensional affine space; residual ones keep the G-dimensional noise
    sv = np.linalg.svd(x_dec.astype(np.float64), compute_uv=False)
    assert sv[K] < 1e-4 * sv[0]  # float32 output
    assert np.linalg.svd(x_res, compute_uv=False)[K] > 1.0
    # same drawn control cells, same shift: they differ only by the off-manifold part
    np.testing.assert_allclose(res.X[:400].mean(0), dec.X[:400].mean(0), atol=0.1)


def test_unknown_perturbation_falls_back_to_the_pooled_shift_with_a_note():
    a, *_ = _data(2)
    is_c = (a.obs["context"] == "C").to_numpy()
    conds = pd.DataFrame({"context": ["C"], "perturbation": ["never_seen"], "n_cells": [50]})
    pred = predict_latent_shift(a[~is_c].copy(), conds, a[is_c].copy(), rng=0)
    assert any("never_seen" in n and "no training cells" in n for n in pred.uns["baseline"]["notes"])
    assert np.all(pred.X >= 0)
    with pytest.raises(ValueError, match="n_components"):
        predict_latent_shift(a[~is_c].copy(), conds, a[is_c].copy(), n_components=0)
