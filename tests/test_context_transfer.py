"""The linear baseline on an unseen context, represented by its own controls (perturbdiff.eval.transfer):
known answers on data built as an exact mixture of training contexts."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from perturbdiff.eval.baselines import predict_linear
from perturbdiff.eval.transfer import simplex_weights

G = 30
PERTS = ["p0", "p1", "p2", "p3"]
N = 12  # cells per group, all identical: group means are exact


def _adata(blocks):
    x = np.concatenate([np.tile(m, (N, 1)) for _, _, m in blocks]).astype(np.float32)
    obs = pd.DataFrame({"context": np.repeat([c for c, _, _ in blocks], N),
                        "perturbation": np.repeat([p for _, p, _ in blocks], N)})
    obs["batch"], obs["sample"] = "b", -1
    obs["is_control"] = obs["perturbation"] == "control"
    obs.index = [f"c{i}" for i in range(len(obs))]
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))


def test_simplex_weights_recover_a_mixture_and_stay_on_the_simplex():
    rng = np.random.default_rng(0)
    basis = rng.random((4, 50))
    w = np.array([0.3, 0.0, 0.7, 0.0])
    np.testing.assert_allclose(simplex_weights(basis, w @ basis), w, atol=1e-6)
    far = simplex_weights(basis, 10 * basis[1])  # outside the hull: the nearest point of the simplex
    assert far.min() >= 0 and far.sum() == pytest.approx(1.0) and far.argmax() == 1
    assert simplex_weights(basis[:1], basis[0] * 3).tolist() == [1.0]


def test_an_unseen_context_gets_the_mixture_of_the_training_contexts_responses():
    """Context T's controls are 0.3 A + 0.7 B and its true responses the same mixture of A's and B's
    (context-specific) responses: the transferred prediction recovers them; without the transfer
    the linear model gives every context one change and misses them."""
    rng = np.random.default_rng(1)
    ctrl = {c: 1.0 + rng.random(G) for c in "AB"}
    delta = {(c, p): rng.normal(0, 0.3, G) for c in "AB" for p in PERTS}
    w = {"A": 0.3, "B": 0.7}
    train = _adata([(c, "control", ctrl[c]) for c in "AB"] + [(c, p, ctrl[c] + delta[c, p]) for c in "AB" for p in PERTS])
    t_ctrl = sum(w[c] * ctrl[c] for c in "AB")
    controls = _adata([("T", "control", t_ctrl)])
    conds = pd.DataFrame({"context": "T", "perturbation": PERTS, "n_cells": N})
    pred = predict_linear(train, conds, controls, rng=0, context_offset=True, context_from_controls=True)
    plain = predict_linear(train, conds, controls, rng=0, context_offset=True)
    x, xp = np.asarray(pred.X.toarray() if hasattr(pred.X, "toarray") else pred.X), np.asarray(plain.X)
    for p in PERTS:
        want = sum(w[c] * delta[c, p] for c in "AB")
        sel = (pred.obs["perturbation"] == p).to_numpy()
        np.testing.assert_allclose(x[sel].mean(0) - t_ctrl, want, atol=1e-4)
        assert np.abs(xp[sel].mean(0) - t_ctrl - want).max() > 0.05
    assert pred.uns["baseline"]["context_from_controls"]
    assert any("0.30 x A, 0.70 x B" in n for n in pred.uns["baseline"]["notes"])


def test_a_training_context_is_not_transferred():
    """A held-out perturbation in a context WITH training conditions keeps the context-offset fit."""
    rng = np.random.default_rng(2)
    ctrl = {c: 1.0 + rng.random(G) for c in "AB"}
    delta = {p: rng.normal(0, 0.3, G) for p in PERTS}
    blocks = [(c, "control", ctrl[c]) for c in "AB"]
    blocks += [(c, p, ctrl[c] + delta[p] + 0.2 * (c == "B")) for c in "AB" for p in PERTS if (c, p) != ("B", "p0")]
    train = _adata(blocks)
    controls = _adata([("B", "control", ctrl["B"])])
    conds = pd.DataFrame({"context": ["B"], "perturbation": ["p0"], "n_cells": [N]})
    a = predict_linear(train, conds, controls, rng=0, context_offset=True, context_from_controls=True)
    b = predict_linear(train, conds, controls, rng=0, context_offset=True)
    np.testing.assert_array_equal(np.asarray(a.X), np.asarray(b.X))
