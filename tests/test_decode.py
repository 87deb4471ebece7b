"""Generated cells decoded to counts (perturbdiff.decode): library sizes of real cells, exact round
trips of real cells, unbiased rounding, attainable values only, and predict's default output."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from helpers import lognorm, make_counts
from perturbdiff.config import NormalizeConfig
from perturbdiff.data.schema import VALUES_COUNTS, VALUES_LOGNORM
from perturbdiff.decode import decode_counts, library_sizes

NORM = NormalizeConfig()


def _cells(seed=0, n=60, genes=40):
    counts = make_counts(np.random.default_rng(seed), n, genes)
    counts[:, 0] += 1  # every cell has a count (and most a gene with exactly one)
    return counts


@pytest.mark.parametrize("kind", [VALUES_COUNTS, VALUES_LOGNORM])
def test_library_sizes_of_counts_and_of_log_normalised_cells(kind):
    counts = _cells()
    counts[:, 1] = 1  # a gene with one count in every cell: the log-normalised library is then exact
    values = counts if kind == VALUES_COUNTS else lognorm(counts)
    m = sp.csr_matrix(values)
    lib = library_sizes(m.indptr, m.data, kind, NORM)
    np.testing.assert_allclose(lib, counts.sum(1), rtol=1e-9)
    empty = sp.csr_matrix((2, 5))
    assert np.isnan(library_sizes(empty.indptr, empty.data, kind, NORM)).all()
    assert library_sizes(m.indptr, m.data, VALUES_LOGNORM, NormalizeConfig(log1p=False)) is None


def test_a_real_cell_decodes_to_itself_exactly():
    counts = _cells(1)
    x = (lognorm(counts) / NORM.scale).astype(np.float32)
    out = decode_counts(x, counts.sum(1), NORM, np.random.default_rng(0))
    np.testing.assert_allclose(out, x, rtol=0, atol=1e-6)
    assert ((out == 0) == (counts == 0)).all()


def test_rounding_is_unbiased_and_every_value_is_attainable():
    """Expected counts 0.3 and 2.6 at library 1,000: counts 0/1 and 2/3 with the right frequencies
    (mean kept), and every output is log1p(k * target_sum / L) for an integer k."""
    lib = 1_000.0
    mu = np.array([0.3, 2.6, 0.0, 7.0])
    x = np.log1p(mu * NORM.target_sum / lib) / NORM.scale
    n = 20_000
    out = decode_counts(np.tile(x, (n, 1)), np.full(n, lib), NORM, np.random.default_rng(3)).astype(np.float64)
    k = np.expm1(out * NORM.scale) * lib / NORM.target_sum
    np.testing.assert_allclose(k, np.rint(k), atol=1e-3)
    k = np.rint(k)
    assert set(np.unique(k[:, 0])) == {0, 1} and set(np.unique(k[:, 1])) == {2, 3}
    assert (k[:, 2] == 0).all() and (k[:, 3] == 7).all()
    se = np.sqrt(mu * (1 - mu % 1) / n + 1e-12)
    assert (np.abs(k.mean(0) - mu) < 5 * se + 1e-12).all()
    assert abs((k[:, 0] == 0).mean() - 0.7) < 0.02


def test_unknown_library_leaves_the_cell_unchanged():
    x = np.array([[0.05, 0.3], [0.1, 0.0]], np.float32)
    out = decode_counts(x, np.array([np.nan, 500.0]), NORM, np.random.default_rng(0))
    np.testing.assert_allclose(out[0], x[0], rtol=1e-6)
    assert out[1, 1] == 0


def test_predict_writes_counts_by_default_and_continuous_on_request(tmp_path):
    """predict's default output: each generated cell holds only values of its context's libraries
    (0 or log1p(k * 1e4 / L) for an integer k and an L of a control cell), with exact zeros; the
    paper's continuous output on request has values no measured cell holds."""
    from helpers import build_train_store, random_foundation
    from perturbdiff.config import HoldoutRule, SplitConfig
    from perturbdiff.data.store import CellStore
    from perturbdiff.predict import PredictOptions, predict_split
    from perturbdiff.foundation import load_foundation

    store = build_train_store(tmp_path, genes=24, cells=500)
    split = SplitConfig(test=[HoldoutRule(contexts=["B_cell"], perturbations=["IL2"])])
    found = load_foundation(random_foundation(store, tmp_path / "found", split))
    opts = PredictOptions(n_samples=2, sets_per_batch=3, sample_steps=3, seed=0, train_cells=0)
    cs = CellStore(str(store))
    ctrl = cs.conditions[cs.conditions["is_control"] & (cs.conditions["context"] == "B_cell")]
    rows = np.concatenate([np.arange(s, s + n) for s, n in zip(ctrl["start"], ctrl["n"])])
    indptr, _, data = cs.read_csr(rows)
    libs = np.unique(library_sizes(indptr, data, cs.value_kind, NORM))
    outs = {}
    for decode in ("counts", "continuous"):
        pred, _ = predict_split(found, str(store), split, "test", tmp_path / decode,
                                dataclasses.replace(opts, decode=decode), log=lambda *a: None)
        a = ad.read_h5ad(pred)
        gen = a[~a.obs["is_control"].to_numpy()].X.toarray().astype(np.float64)
        outs[decode] = gen
        assert a.uns["perturbdiff"]["decode"] == decode
    gen = outs["counts"]
    for cell in gen:
        k_over_l = np.expm1(cell) / NORM.target_sum  # k / L
        ok = [np.allclose(k_over_l * L, np.rint(k_over_l * L), atol=2e-3) for L in libs]
        assert any(ok)
    assert (gen == 0).mean() > (outs["continuous"] == 0).mean() + 0.05
    # a continuous cell holds some value that no count at any control library gives
    k = np.expm1(outs["continuous"]) / NORM.target_sum
    assert not all(np.allclose(k[i] * L, np.rint(k[i] * L), atol=2e-3) for i in range(len(k)) for L in libs[:1])
