"""Source -> store -> cells: exact values, contiguous groups, marker stripping, token mapping,
h5ad counts / log-normalised input, identical stores across layouts, on-read normalisation."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from data_sharding.convert import convert
from helpers import (
    assert_stores_identical, build_h5ad, gene_positions, tahoe_in_store_order, h5ad_cfg, manifest, quiet,
    shard_cfg, source_in_store_order, store_csr,
)
from perturbdiff.config import NormalizeConfig, PanelConfig
from perturbdiff.data import schema
from perturbdiff.data.schema import DataError
from perturbdiff.data.store import CellStore, as_numpy

CONTROL_LABEL = schema.format_drugconc("DMSO_TF", 0.0)


# ---------------------------------------------------------------------------------------------
# Tahoe: values
# ---------------------------------------------------------------------------------------------


def test_tahoe_cells_equal_source_exactly(tahoe_src, tahoe_store):
    X, cell_ids = store_csr(tahoe_store)
    st = CellStore(tahoe_store)
    assert st.value_kind == schema.VALUES_COUNTS
    assert X.shape == tahoe_src.counts.shape == (st.num_cells, st.num_genes)
    assert sorted(cell_ids.tolist()) == sorted(tahoe_src.obs["cell_id"].tolist())  # every cell once
    expected = tahoe_in_store_order(tahoe_src, tahoe_store)
    np.testing.assert_array_equal(X.toarray(), expected.astype(np.float64))
    # CSR invariants: indices sorted and unique within each row, no explicit zeros
    for i in range(X.shape[0]):
        idx = X.indices[X.indptr[i]:X.indptr[i + 1]]
        assert np.all(np.diff(idx) > 0)
    assert np.all(X.data > 0)


def test_tahoe_marker_stripped_and_nnz(tahoe_src, tahoe_store):
    st = CellStore(tahoe_store)
    data = np.asarray(st.data_arr[:])
    indptr = np.asarray(st.indptr_arr[:])
    assert not np.any(data == schema.TAHOE_MARKER_VALUE)
    assert np.all(data > 0) and np.all(data == np.round(data))
    assert len(data) == tahoe_src.nnz == st.manifest.nnz == int(indptr[-1])
    # per-cell gene count and total: the marker is not a gene and not a count
    src = tahoe_in_store_order(tahoe_src, tahoe_store)
    np.testing.assert_array_equal(st.obs(schema.N_GENES), (src > 0).sum(axis=1))
    np.testing.assert_array_equal(st.obs(schema.TOTAL_COUNTS), src.sum(axis=1).astype(np.float64))
    # the hand-planted all-zero cell is kept as an empty row
    assert (np.diff(indptr) == 0).sum() == int((tahoe_src.counts.sum(axis=1) == 0).sum()) == 1


def test_tahoe_token_mapping_uses_gene_metadata(tahoe_src, tahoe_store):
    st = CellStore(tahoe_store)
    gm = pq.read_table(tahoe_src.meta_dir / schema.GENE_METADATA_FILE).to_pandas()
    assert not np.array_equal(gm["token_id"].to_numpy(), np.arange(len(gm)) + 3)
    assert not np.all(np.diff(gm["token_id"].to_numpy()) > 0)
    # the vocabulary is gene_metadata's genes, each id kept with its own symbol
    assert sorted(st.gene_ids) == sorted(gm["ensembl_id"])
    symbol_of = dict(zip(gm["ensembl_id"], gm["gene_symbol"]))
    assert [symbol_of[g] for g in st.gene_ids] == list(st.gene_symbols)
    # straight from the raw parquet: a (token, value) entry lands at the var position of that token's gene
    var_of_id = {g: i for i, g in enumerate(st.gene_ids)}
    pos_of_token = {int(t): var_of_id[e] for t, e in zip(gm["token_id"], gm["ensembl_id"])}
    table = pq.read_table(tahoe_src.files[1])
    X, cell_ids = store_csr(tahoe_store)
    row_of_cell = {c: i for i, c in enumerate(cell_ids)}
    checked = 0
    for cid, genes, expr in zip(table.column("BARCODE_SUB_LIB_ID").to_pylist()[:25],
                                table.column("genes").to_pylist()[:25], table.column("expressions").to_pylist()[:25]):
        assert genes[0] == schema.TAHOE_MARKER_TOKEN
        dense = np.zeros(st.num_genes)
        for t, v in zip(genes[1:], expr[1:]):
            dense[pos_of_token[t]] = v
            checked += 1
        np.testing.assert_array_equal(X[row_of_cell[cid]].toarray()[0], dense)
    assert checked > 100
    # one named gene: the highest token id; its column holds exactly that gene's counts
    j = int(np.argmax(tahoe_src.token_ids))
    p = pos_of_token[int(tahoe_src.token_ids[j])]
    assert st.gene_ids[p] == tahoe_src.gene_ids[j] and st.gene_symbols[p] == tahoe_src.gene_symbols[j]
    expected = source_in_store_order(cell_ids, tahoe_src.obs["cell_id"], tahoe_src.counts)[:, j]
    assert expected.sum() > 0
    np.testing.assert_array_equal(X[:, p].toarray()[:, 0], expected)


def test_tahoe_extra_obs(tahoe_src, tahoe_store):
    st = CellStore(tahoe_store)
    ids = st.obs("cell_id")
    src = tahoe_src.obs.set_index("cell_id").loc[ids]
    np.testing.assert_array_equal(st.obs("drug"), src["drug"].to_numpy())
    np.testing.assert_array_equal(st.obs("sample"), src["sample"].to_numpy())
    np.testing.assert_array_equal(st.obs("moa_fine"), src["moa-fine"].to_numpy())
    np.testing.assert_array_equal(st.obs("dose"), src["dose"].to_numpy())
    np.testing.assert_array_equal(st.obs("context"), src["cell_line_id"].to_numpy())
    np.testing.assert_array_equal(st.obs("batch"), src["plate"].to_numpy())
    np.testing.assert_array_equal(st.obs("perturbation"), src["perturbation"].to_numpy())
    m = st.manifest
    assert m.control_perturbations == [CONTROL_LABEL]
    assert [s["cells"] for s in m.sources] == [pq.ParquetFile(f).metadata.num_rows for f in tahoe_src.files]
    assert all(s["sha256"] and len(s["sha256"]) == 64 for s in m.sources)


# ---------------------------------------------------------------------------------------------
# Tahoe: groups
# ---------------------------------------------------------------------------------------------


def test_groups_contiguous_and_conditions_match_obs_codes(tahoe_src, tahoe_store):
    st = CellStore(tahoe_store)
    cond = st.conditions
    fixed = len(schema.CONDITION_COLUMNS)
    assert list(cond.columns[:fixed]) == list(schema.CONDITION_COLUMNS)
    # then one column per numeric obs of the source (the Tahoe dose), never the per-cell stats
    numeric = [c for c in st.manifest.numeric_obs if c not in (schema.TOTAL_COUNTS, schema.N_GENES)]
    assert list(cond.columns[fixed:]) == numeric == ["dose"]
    np.testing.assert_array_equal(cond["group_id"], np.arange(len(cond)))
    # the row ranges tile [0, N) in table order
    assert cond["start"].iloc[0] == 0 and cond["stop"].iloc[-1] == st.num_cells
    np.testing.assert_array_equal(cond["start"].to_numpy()[1:], cond["stop"].to_numpy()[:-1])
    np.testing.assert_array_equal(cond["n"], cond["stop"] - cond["start"])
    assert (cond["n"] > 0).all()
    keys = list(zip(cond["context"], cond["batch"], cond["perturbation"]))
    assert keys == sorted(keys, key=lambda k: schema.group_sort_key(*k)) and len(set(keys)) == len(keys)
    # obs codes (read raw from zarr) agree with every row range
    root = zarr.open_group(str(tahoe_store), mode="r")
    for c in schema.GROUP_COLUMNS:
        cats = as_numpy(root[f"obs/{c}/categories"][:]).astype(str)
        codes = np.asarray(root[f"obs/{c}/codes"][:])
        assert list(cats) == sorted(cats)
        labels = cats[codes]
        for row in cond.itertuples():
            seg = labels[row.start:row.stop]
            assert (seg == getattr(row, c)).all(), (c, row)
    # every source group became exactly one condition row with the right size and control flag
    src = tahoe_src.obs.groupby(["cell_line_id", "plate", "perturbation"]).size()
    assert len(src) == len(cond) == st.manifest.num_groups
    for row in cond.itertuples():
        assert src[(row.context, row.batch, row.perturbation)] == row.n
        assert row.is_control == (row.perturbation == CONTROL_LABEL)
    assert int(cond["is_control"].sum()) == st.manifest.num_control_groups == len(tahoe_src.obs.groupby(
        ["cell_line_id", "plate"]))
    # perturbation labels carry the dose from sample_metadata
    for p in cond["perturbation"]:
        (drug, dose, unit), = schema.parse_drugconc(p)
        assert unit == "uM" and (dose == 0.0) == (drug == "DMSO_TF")


def test_group_members_are_the_source_groups(tahoe_src, tahoe_store):
    """Each group's row range holds exactly the source cells of that (cell line, plate, drug+dose)."""
    st = CellStore(tahoe_store)
    ids = st.obs("cell_id")
    src = tahoe_src.obs
    for row in st.conditions.itertuples():
        sel = (src["cell_line_id"] == row.context) & (src["plate"] == row.batch) & (src["perturbation"] == row.perturbation)
        assert sorted(ids[row.start:row.stop].tolist()) == sorted(src.loc[sel, "cell_id"].tolist())


# ---------------------------------------------------------------------------------------------
# Identical stores for any worker count / part size / block size
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    dict(num_workers=2),
    dict(block_cells=7),
    dict(block_cells=100_000),
    dict(cells_per_part=10_000, num_workers=2),
    dict(cells_per_part=1, block_cells=33),
])
def test_identical_store_for_workers_parts_and_blocks(tahoe_src, tahoe_store, tmp_path, kw):
    out = tmp_path / "other.zarr"
    convert(shard_cfg(tahoe_src.root, out, **kw), log=quiet)
    assert_stores_identical(tahoe_store, out)


def test_store_layout_chunks_do_not_change_values(tahoe_src, tahoe_store, tmp_path):
    out = tmp_path / "chunks.zarr"
    convert(shard_cfg(tahoe_src.root, out, chunk_nnz=64, shard_nnz=64 * 7, chunk_cells=16), log=quiet)
    assert_stores_identical(tahoe_store, out)
    assert manifest(out)["layout"]["chunk_nnz"] == 64


# ---------------------------------------------------------------------------------------------
# Reads
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cache_mb", [64, 0])
def test_read_csr_any_rows(tahoe_store, cache_mb):
    """The store's fast chunk reader returns exactly what zarr-python reads, for any row pattern."""
    from perturbdiff.data.chunks import ChunkReader

    X, _ = store_csr(tahoe_store)
    st = CellStore(tahoe_store, cache_mb=cache_mb)
    assert isinstance(st.indices_fast, ChunkReader) and isinstance(st.data_fast, ChunkReader)
    rng = np.random.default_rng(3)
    patterns = [np.array([0]), np.array([st.num_cells - 1]), np.arange(st.num_cells), np.array([0, st.num_cells - 1]),
                np.arange(100, 140), np.arange(0, st.num_cells, 97)]
    patterns += [np.sort(rng.choice(st.num_cells, size=k, replace=False)) for k in (2, 17, 300, 700)]
    for _ in range(2):  # a second pass hits the chunk cache
        for rows in patterns:
            ip, ix, dt = st.read_csr(rows)
            assert ip.dtype == np.int64 and len(ip) == len(rows) + 1
            sub = X[rows]
            np.testing.assert_array_equal(ip, sub.indptr)
            np.testing.assert_array_equal(ix, sub.indices)
            np.testing.assert_array_equal(dt, sub.data.astype(np.float32))
    ip, ix, dt = st.read_csr(np.zeros(0, dtype=np.int64))
    assert len(ip) == 1 and len(ix) == len(dt) == 0


@pytest.mark.parametrize("layout", [dict(chunk_nnz=1 << 20, shard_nnz=1 << 22, chunk_cells=1 << 16),
                                    dict(chunk_nnz=100, shard_nnz=100, chunk_cells=50),
                                    dict(chunk_nnz=300, shard_nnz=300 * 5, chunk_cells=64),
                                    dict(compressor="zstd"), dict(compressor="none")])
def test_read_csr_other_layouts(tahoe_src, tahoe_store, tmp_path, layout):
    """Unsharded, one-chunk-per-shard, partly filled last shard and other compressors read back exactly."""
    out = tmp_path / "layout.zarr"
    convert(shard_cfg(tahoe_src.root, out, **layout), log=quiet)
    X, _ = store_csr(out)
    ref, _ = store_csr(tahoe_store)
    assert (X != ref).nnz == 0  # the layout does not change the values
    st = CellStore(out)
    rng = np.random.default_rng(4)
    for k in (1, 50, st.num_cells):
        rows = np.sort(rng.choice(st.num_cells, size=k, replace=False))
        ip, ix, dt = st.read_csr(rows)
        sub = X[rows]
        np.testing.assert_array_equal(ip, sub.indptr)
        np.testing.assert_array_equal(ix, sub.indices)
        np.testing.assert_array_equal(dt, sub.data.astype(np.float32))


def _reference_norm(counts: np.ndarray, norm: NormalizeConfig) -> np.ndarray:
    c = counts.astype(np.float64)
    total = c.sum(axis=1, keepdims=True)  # over ALL genes
    x = np.divide(c * norm.target_sum, total, out=np.zeros_like(c), where=total > 0)
    if norm.log1p:
        x = np.log1p(x)
    return x / norm.scale


@pytest.mark.parametrize("norm", [NormalizeConfig(), NormalizeConfig(target_sum=1e6, log1p=True, scale=1.0),
                                  NormalizeConfig(target_sum=1e4, log1p=False, scale=2.0)])
def test_read_dense_normalisation_matches_reference(tahoe_src, tahoe_store, norm):
    st = CellStore(tahoe_store)
    src = tahoe_in_store_order(tahoe_src, tahoe_store)
    zero_row = int(np.flatnonzero(src.sum(axis=1) == 0)[0])
    rng = np.random.default_rng(0)
    rows = np.unique(np.concatenate([rng.choice(st.num_cells, 60, replace=False), [zero_row]]))
    panel = st.panel(PanelConfig(kind="hvg", num_genes=12))  # a subset: the total must still be over all genes
    assert len(panel) == 12
    got = st.read_dense(rows, panel, norm)
    assert got.dtype == np.float32 and got.shape == (len(rows), 12)
    ref = _reference_norm(src[rows], norm)[:, panel]
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=1e-6)
    assert np.all(got[rows == zero_row] == 0)
    full = st.read_dense(rows, st.panel(PanelConfig(kind="all")), norm)
    np.testing.assert_allclose(full, _reference_norm(src[rows], norm), rtol=2e-6, atol=1e-6)


def test_panel_file_by_symbol_and_id(tahoe_src, tahoe_store, tmp_path):
    st = CellStore(tahoe_store)
    f = tmp_path / "genes.txt"
    pos = gene_positions(tahoe_store, tahoe_src.gene_ids)
    f.write_text(f"{tahoe_src.gene_symbols[7]}\n{tahoe_src.gene_ids[2]}\n\n{tahoe_src.gene_symbols[30]}\n")
    np.testing.assert_array_equal(st.panel(PanelConfig(kind="file", genes_file=str(f))), pos[[7, 2, 30]])


# ---------------------------------------------------------------------------------------------
# h5ad input
# ---------------------------------------------------------------------------------------------


def _check_h5ad_store(src, out, batch_col="donor"):
    st = CellStore(out)
    X, ids = store_csr(out)
    assert sorted(ids) == sorted(src.obs.index)
    expected = source_in_store_order(ids, src.obs.index, src.X)
    np.testing.assert_array_equal(X.toarray(), expected.astype(np.float32).astype(np.float64))
    assert st.manifest.nnz == int(np.count_nonzero(src.X))
    obs = src.obs.loc[ids]
    np.testing.assert_array_equal(st.obs("context"), obs["cell_type"].astype(str).to_numpy())
    np.testing.assert_array_equal(st.obs("perturbation"), obs["perturbation"].astype(str).to_numpy())
    batch = obs[batch_col].astype(str).to_numpy() if batch_col else np.full(len(obs), "all")
    np.testing.assert_array_equal(st.obs("batch"), batch)
    np.testing.assert_array_equal(st.obs("n_counts_raw"), obs["n_counts_raw"].to_numpy().astype(np.float64))
    np.testing.assert_array_equal(st.gene_ids, src.var_names)
    cond = st.conditions
    for row in cond.itertuples():
        assert (st.obs("context", row.start, row.stop) == row.context).all()
        assert (st.obs("batch", row.start, row.stop) == row.batch).all()
        assert (st.obs("perturbation", row.start, row.stop) == row.perturbation).all()
        assert row.is_control == (row.perturbation == "control")
    assert cond["n"].sum() == len(src.obs)
    return st


def test_h5ad_counts_roundtrip(h5ad_counts_src, tmp_path):
    out = tmp_path / "h5.zarr"
    m = convert(h5ad_cfg(h5ad_counts_src.path, out, cells_per_part=70, block_cells=45), log=quiet)
    assert m.value_kind == schema.VALUES_COUNTS
    st = _check_h5ad_store(h5ad_counts_src, out)
    assert st.manifest.hvg["flavor"] == "seurat_v3"
    assert st.manifest.num_control_groups == 4  # 2 cell types x 2 donors


def test_h5ad_dense_x_and_no_batch_col(tmp_path):
    src = build_h5ad(tmp_path / "dense.h5ad", dense=True, n_cells=150, n_genes=20, seed=5)
    out = tmp_path / "dense.zarr"
    m = convert(h5ad_cfg(src.path, out, batch_col=None, cells_per_part=40), log=quiet)
    assert m.value_kind == schema.VALUES_COUNTS
    st = _check_h5ad_store(src, out, batch_col=None)
    assert set(st.conditions["batch"]) == {"all"}


def test_h5ad_lognorm_roundtrip(h5ad_lognorm_src, tmp_path):
    out = tmp_path / "ln.zarr"
    m = convert(h5ad_cfg(h5ad_lognorm_src.path, out, cells_per_part=90), log=quiet)
    assert m.value_kind == schema.VALUES_LOGNORM
    assert m.hvg["flavor"] == "dispersion"  # seurat_v3 needs counts
    st = _check_h5ad_store(h5ad_lognorm_src, out)
    # a log-normalised store is not renormalised on read: x / scale only
    rows = np.arange(0, st.num_cells, 3)
    X, ids = store_csr(out)
    got = st.read_dense(rows, np.arange(st.num_genes), NormalizeConfig(scale=10.0))
    np.testing.assert_allclose(got, X[rows].toarray() / 10.0, rtol=1e-7)


def test_h5ad_two_files_one_store(tmp_path):
    a = build_h5ad(tmp_path / "a.h5ad", n_cells=120, n_genes=30, seed=11)
    b = build_h5ad(tmp_path / "b.h5ad", n_cells=90, n_genes=30, seed=12,
                   obs_kw=dict(batches=("donor3",)))
    b.obs.index = [f"b-{i}" for i in range(len(b.obs))]
    from helpers import write_h5ad
    write_h5ad(b.path, b.X, b.obs, b.var_names)
    out = tmp_path / "ab.zarr"
    m = convert(h5ad_cfg([a.path, b.path], out, cells_per_part=50), log=quiet)
    assert m.num_cells == 210 and [s["cells"] for s in m.sources] == [120, 90]
    X, ids = store_csr(out)
    allX = np.concatenate([a.X, b.X])
    allids = list(a.obs.index) + list(b.obs.index)
    np.testing.assert_array_equal(X.toarray(), source_in_store_order(ids, allids, allX))
    assert "donor3" in set(CellStore(out).conditions["batch"])


def test_manifest_checksums_of_numeric_arrays(tahoe_store):
    """The manifest's sha256 of a numeric array is the hash of its little-endian bytes, whole."""
    import hashlib

    from helpers import zarr_arrays

    arrays = zarr_arrays(tahoe_store)
    m = manifest(tahoe_store)["arrays"]
    numeric = [k for k, v in arrays.items() if v.dtype.kind in "biuf"]
    assert {"X/indptr", "X/indices", "X/data", "obs/total_counts", "var/hvg_rank"} <= set(numeric)
    for k in numeric:
        v = arrays[k]
        assert m[k]["shape"] == list(v.shape)
        assert m[k]["sha256"] == hashlib.sha256(v.astype(v.dtype.newbyteorder("<")).tobytes()).hexdigest(), k


def test_manifest_class_round_trip_and_array_paths(tahoe_store, tmp_path):
    """StoreManifest reads back exactly what the writer wrote (the source's keys in ``extra``), and
    the store holds exactly the arrays the schema's path helpers name and the manifest lists."""
    import json
    import shutil

    from helpers import zarr_arrays

    raw = manifest(tahoe_store)
    m = schema.StoreManifest.read(tahoe_store)
    assert m.to_dict() == raw
    assert m.extra["source_format"] == "tahoe-100m-parquet" and "timings" in m.extra
    expected = set(schema.X_ARRAYS) | {schema.VAR_GENE_ID, schema.VAR_GENE_SYMBOL, schema.VAR_HVG_RANK,
                                       schema.VAR_HVG_SCORE, schema.obs_values(schema.CELL_ID)}
    expected |= {f(c) for c in m.categorical_obs for f in (schema.obs_codes, schema.obs_categories)}
    expected |= {schema.obs_values(c) for c in m.numeric_obs}
    assert set(zarr_arrays(tahoe_store)) == expected == set(m.arrays) - {schema.CONDITIONS_FILE}

    store = tmp_path / "s.zarr"
    shutil.copytree(tahoe_store, store)
    for edit, message in ((lambda d: d.pop("num_groups"), r"lacks \['num_groups'\]"),
                          (lambda d: d.update(nnz=-1), "manifest nnz is -1, not a non-negative integer"),
                          (lambda d: d.update(num_cells="12"), "manifest num_cells is '12'")):
        broken = dict(raw)
        edit(broken)
        (store / schema.MANIFEST_FILE).write_text(json.dumps(broken))
        with pytest.raises(DataError, match=message) as err:
            CellStore(store)
        assert err.value.path == str(store)

