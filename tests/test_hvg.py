"""Streaming HVG selection in the store equals a plain dense float64 reference; loess accuracy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from data_sharding import hvg
from data_sharding.convert import convert
from helpers import gene_positions, h5ad_cfg, quiet, shard_cfg, tahoe_in_store_order, zarr_arrays
from perturbdiff.config import HVGConfig, PanelConfig
from perturbdiff.data.store import CellStore

# ---------------------------------------------------------------------------------------------
# Dense references (written from the definitions, not from the library code)
# ---------------------------------------------------------------------------------------------


def ref_seurat_v3(counts: np.ndarray) -> np.ndarray:
    """scanpy 'seurat_v3': loess of log10 var on log10 mean, clipped standardised variance."""
    X = np.asarray(counts, dtype=np.float64)
    n = X.shape[0]
    mean = X.mean(axis=0)
    var = X.var(axis=0, ddof=1)
    ok = var > 0
    fitted = np.zeros(X.shape[1])
    fitted[ok] = hvg.loess(np.log10(mean[ok]), np.log10(var[ok]))
    sd = np.sqrt(10.0 ** fitted)
    clip = mean + np.sqrt(n) * sd
    Z = np.minimum(X, clip[None, :])
    score = np.zeros(X.shape[1])
    score[ok] = ((Z[:, ok] - mean[ok]) ** 2).sum(axis=0) / ((n - 1) * sd[ok] ** 2)
    return score


def ref_dispersion(norm_counts: np.ndarray, num_bins: int) -> np.ndarray:
    """scanpy 'seurat' flavor on normalised (not logged) counts: z-scored log dispersion per mean bin."""
    X = np.asarray(norm_counts, dtype=np.float64)
    mean = X.mean(axis=0)
    var = X.var(axis=0, ddof=1)
    mean[mean == 0] = 1e-12
    disp = var / mean
    disp[disp == 0] = np.nan
    disp = np.log(disp)
    mean = np.log1p(mean)
    df = pd.DataFrame({"disp": disp, "bin": pd.cut(mean, bins=num_bins)})
    grouped = df.groupby("bin", observed=True)["disp"]
    mu = grouped.transform("mean")
    sd = grouped.transform("std")  # ddof=1; NaN for a bin with one finite value
    one = sd.isna() & df["disp"].notna()
    sd = sd.where(~one, df["disp"])
    mu = mu.where(~one, 0.0)
    return ((df["disp"] - mu) / sd).to_numpy()


def normalize_total(counts: np.ndarray, target: float = 1e4) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(axis=1, keepdims=True)
    return np.divide(c * target, tot, out=np.zeros_like(c), where=tot > 0)


def ranking_of(scores: np.ndarray) -> np.ndarray:
    s = np.where(np.isnan(scores), -np.inf, scores)
    return np.lexsort((np.arange(len(s)), -s))


def check_store_hvg(store, ref_scores: np.ndarray, flavor: str) -> np.ndarray:
    st = CellStore(store)
    arrays = zarr_arrays(store)
    m = st.manifest.hvg
    assert m["flavor"] == flavor
    got = arrays["var/hvg_score"]
    ref = np.where(np.isnan(ref_scores), -np.inf, ref_scores)
    assert np.array_equal(np.isinf(got), np.isinf(ref)), (np.flatnonzero(np.isinf(got)), np.flatnonzero(np.isinf(ref)))
    fin = np.isfinite(ref)
    np.testing.assert_allclose(got[fin], ref[fin], rtol=1e-7, atol=1e-9)
    rank = arrays["var/hvg_rank"]
    assert sorted(rank.tolist()) == list(range(len(rank)))  # a permutation
    order = np.argsort(rank)
    np.testing.assert_array_equal(st.hvg_ranking(), order)
    # the ranking sorts the reference scores (NaN last); only near-exact ties may come in any order
    s = np.where(np.isnan(ref_scores), -np.inf, ref_scores)[order]
    fin = np.isfinite(s)
    assert fin[:fin.sum()].all(), "a NaN/-inf score is ranked before a finite one"
    assert np.all(np.diff(s[fin]) <= 1e-9 * np.maximum(1, np.abs(s[fin][1:]))), s
    assert np.all(np.diff(order[~fin]) > 0)  # NaN ties by gene index
    expected = ranking_of(ref_scores)
    if not np.array_equal(order, expected):  # then the differences are near-ties only
        np.testing.assert_allclose(np.sort(s[fin]), np.sort(np.where(np.isnan(ref_scores), -np.inf,
                                                                     ref_scores)[expected][fin]))
    expected = order
    assert m["genes"] == [str(g) for g in st.gene_ids[expected[: m["num_top_genes"]]]]
    np.testing.assert_array_equal(st.panel(PanelConfig(kind="hvg", num_genes=10)), np.sort(expected[:10]))
    return expected


def store_counts(src, store) -> np.ndarray:
    """Source counts in the store's cell and gene order."""
    return tahoe_in_store_order(src, store)


# ---------------------------------------------------------------------------------------------
# Store HVG == reference
# ---------------------------------------------------------------------------------------------


def test_seurat_v3_equals_dense_reference(tahoe_src, tahoe_store):
    ref = ref_seurat_v3(store_counts(tahoe_src, tahoe_store))
    order = check_store_hvg(tahoe_store, ref, "seurat_v3")
    assert CellStore(tahoe_store).manifest.hvg["num_top_genes"] == 20
    # never-expressed genes score 0 and rank after every expressed gene
    for g in gene_positions(tahoe_store, tahoe_src.gene_ids[list(tahoe_src.zero_genes)]):
        assert ref[g] == 0 and list(order).index(g) >= len(order) - len(tahoe_src.zero_genes)


@pytest.mark.parametrize("num_bins", [20, 4])
def test_dispersion_equals_dense_reference(tahoe_src, tmp_path, num_bins):
    out = tmp_path / "disp.zarr"
    convert(shard_cfg(tahoe_src.root, out, hvg=HVGConfig(flavor="dispersion", num_top_genes=15, num_bins=num_bins)),
            log=quiet)
    ref = ref_dispersion(normalize_total(store_counts(tahoe_src, out)), num_bins)
    if num_bins == 20:
        assert np.nansum(ref == 1.0) >= 1  # some bins hold a single gene
    check_store_hvg(out, ref, "dispersion")


def test_h5ad_counts_seurat_v3(h5ad_counts_src, tmp_path):
    out = tmp_path / "h.zarr"
    convert(h5ad_cfg(h5ad_counts_src.path, out, cells_per_part=50, block_cells=64), log=quiet)
    check_store_hvg(out, ref_seurat_v3(h5ad_counts_src.X), "seurat_v3")


def test_lognorm_input_uses_dispersion_on_expm1(h5ad_lognorm_src, tmp_path):
    out = tmp_path / "ln.zarr"
    convert(h5ad_cfg(h5ad_lognorm_src.path, out, cells_per_part=64, hvg=HVGConfig(flavor="seurat_v3",
                                                                                   num_top_genes=10)), log=quiet)
    ref = ref_dispersion(np.expm1(h5ad_lognorm_src.X.astype(np.float32).astype(np.float64)), 20)
    check_store_hvg(out, ref, "dispersion")


@pytest.mark.parametrize("flavor", ["seurat_v3", "dispersion"])
def test_planted_high_variance_genes_are_top(tahoe_src, tahoe_store, tmp_path, flavor):
    if flavor == "seurat_v3":
        store = tahoe_store
    else:
        store = tmp_path / "d.zarr"
        convert(shard_cfg(tahoe_src.root, store, hvg=HVGConfig(flavor=flavor, num_top_genes=5, num_bins=5)), log=quiet)
    top = set(CellStore(store).hvg_ranking()[:5].tolist())
    planted = set(gene_positions(store, tahoe_src.gene_ids[list(tahoe_src.planted)]).tolist())
    assert planted <= top, (flavor, sorted(top), planted)
    top_ids = CellStore(store).manifest.hvg["genes"][:5]
    assert {str(tahoe_src.gene_ids[g]) for g in tahoe_src.planted} <= set(top_ids)


def test_hvg_independent_of_parts_and_blocks(tahoe_src, tahoe_store, tmp_path):
    out = tmp_path / "p.zarr"
    convert(shard_cfg(tahoe_src.root, out, cells_per_part=1, block_cells=9), log=quiet)
    a, b = zarr_arrays(tahoe_store), zarr_arrays(out)
    np.testing.assert_array_equal(a["var/hvg_rank"], b["var/hvg_rank"])
    np.testing.assert_allclose(a["var/hvg_score"], b["var/hvg_score"], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# loess
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [50, 700, 5000])  # 5000 > max_points: the interpolated surface
def test_loess_recovers_exact_quadratic(n):
    rng = np.random.default_rng(n)
    x = rng.uniform(-2, 3, size=n)
    y = 1.5 - 2.0 * x + 0.75 * x * x
    fit = hvg.loess(x, y)
    tol = 1e-8 if n <= 2000 else 2e-5
    np.testing.assert_allclose(fit, y, atol=tol)


def test_loess_smooth_function_and_noise():
    rng = np.random.default_rng(0)
    x = np.sort(rng.uniform(0, 3, size=600))
    y = np.sin(2 * x)
    fit = hvg.loess(x, y)
    inner = (x > 0.3) & (x < 2.7)
    assert np.abs(fit - y)[inner].max() < 0.02
    assert np.abs(fit - y).max() < 0.08
    noisy = y + rng.normal(0, 0.3, size=len(x))
    fit_noisy = hvg.loess(x, noisy)
    assert np.sqrt(np.mean((fit_noisy - y)[inner] ** 2)) < 0.1  # smooths the noise away
    assert np.sqrt(np.mean((noisy - y)[inner] ** 2)) > 0.25


def test_loess_order_invariant_and_small_n():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, size=200)
    y = np.exp(x) + rng.normal(0, 0.05, size=200)
    perm = rng.permutation(200)
    np.testing.assert_allclose(hvg.loess(x[perm], y[perm]), hvg.loess(x, y)[perm], rtol=1e-12)
    np.testing.assert_array_equal(hvg.loess(np.array([1.0, 2.0]), np.array([3.0, 5.0])), [3.0, 5.0])
