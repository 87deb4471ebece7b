"""More bad inputs: inputs `perturbdiff shard` used to accept silently.

Each case writes the bad source first, then expects a one-line DataError naming the file and the
column / row / sample, and no store at <out> (``expect_error`` of test_bad_input.py). The rules
that are notes rather than errors (repeated gene symbols, exact duplicate sample_metadata rows,
the string "nan" as a label, NaN in a numeric extra column) are checked to convert.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_sharding.convert import convert
from helpers import (
    LogCapture, assert_stores_identical, build_h5ad, h5ad_cfg, manifest, quiet, shard_cfg, store_csr, write_h5ad, zarr_arrays,
)
from perturbdiff.data import schema
from perturbdiff.data.store import CellStore
from test_bad_input import DATA_FILE, copy_source, edit_rows, expect_error

# ---------------------------------------------------------------------------------------------
# h5ad: missing labels
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_h5ad(tmp_path):
    return build_h5ad(tmp_path / "in.h5ad", n_cells=120, n_genes=20, seed=31)


def with_missing(obs: pd.DataFrame, col: str, rows: list[int]) -> pd.DataFrame:
    """``obs`` with NaN in ``col`` at ``rows`` (anndata writes it as categorical code -1)."""
    obs = obs.copy()
    values = obs[col].astype(object).to_numpy()
    values[rows] = np.nan
    obs[col] = values
    return obs


@pytest.mark.parametrize("col,key", [("perturbation", "shard.perturbation_col"), ("cell_type", "shard.context_col"),
                                     ("donor", "shard.batch_col"), ("phase", "shard.extra_obs")])
def test_h5ad_missing_label(small_h5ad, tmp_path, col, key):
    obs = small_h5ad.obs.copy()
    obs["phase"] = np.array(["G1", "S", "G2M"])[np.arange(len(obs)) % 3]
    obs = with_missing(obs, col, [7, 30, 31])
    write_h5ad(small_h5ad.path, small_h5ad.X, obs, small_h5ad.var_names)
    cfg = h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", extra_obs=["n_counts_raw", "phase"])
    expect_error(cfg, f"obs column {col!r}", key, "missing value", "3 cell(s)", "row 7", path=small_h5ad.path)


def test_h5ad_missing_label_in_a_nullable_string_column(small_h5ad, tmp_path):
    """pandas' string dtype with <NA>, written as anndata's nullable-string-array (not a categorical)."""
    import anndata as ad
    import h5py

    obs = small_h5ad.obs.copy()
    pert = pd.array(obs["perturbation"].astype(str), dtype="string")
    pert[12] = pd.NA
    obs["perturbation"] = pert
    adata = ad.AnnData(X=small_h5ad.X.astype(np.float32), obs=obs,
                       var=pd.DataFrame(index=pd.Index(small_h5ad.var_names)))
    with ad.settings.override(allow_write_nullable_strings=True):
        adata.write_h5ad(small_h5ad.path, convert_strings_to_categoricals=False)
    with h5py.File(small_h5ad.path) as f:
        assert f["obs/perturbation"].attrs["encoding-type"] == "nullable-string-array"
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr"), "'perturbation'", "missing value", "1 cell(s)",
                 "row 12", path=small_h5ad.path)


def test_h5ad_missing_cell_id(small_h5ad, tmp_path):
    obs = small_h5ad.obs.copy()
    obs["barcode"] = [f"bc{i}" for i in range(len(obs))]
    obs = with_missing(obs, "barcode", [44])
    write_h5ad(small_h5ad.path, small_h5ad.X, obs, small_h5ad.var_names)
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", cell_id_col="barcode"), "'barcode'",
                 "shard.cell_id_col", "missing value", "row 44", path=small_h5ad.path)


def test_h5ad_string_nan_is_a_label_and_numeric_nan_is_kept(small_h5ad, tmp_path):
    """The string "nan" written by a user is an ordinary perturbation; NaN in a numeric extra column
    is a missing number and is stored as NaN."""
    obs = small_h5ad.obs.copy()
    pert = obs["perturbation"].astype(str).to_numpy()
    pert[[3, 4, 5]] = "nan"
    obs["perturbation"] = pd.Categorical(pert)
    obs["n_counts_raw"] = obs["n_counts_raw"].astype(np.float64)
    obs.iloc[9, obs.columns.get_loc("n_counts_raw")] = np.nan
    write_h5ad(small_h5ad.path, small_h5ad.X, obs, small_h5ad.var_names)
    out = tmp_path / "o.zarr"
    convert(h5ad_cfg(small_h5ad.path, out), log=quiet)
    cond = CellStore(out).conditions
    assert cond.loc[cond["perturbation"] == "nan", "n"].sum() == 3
    arrays = zarr_arrays(out)
    ids = arrays["obs/cell_id"].astype(str)
    counts = pd.Series(arrays["obs/n_counts_raw"], index=ids)
    assert np.isnan(counts[obs.index[9]])
    assert np.isnan(counts.to_numpy()).sum() == 1
    np.testing.assert_array_equal(counts.drop(obs.index[9]).sort_index(),
                                  obs["n_counts_raw"].drop(obs.index[9]).sort_index().to_numpy())


# ---------------------------------------------------------------------------------------------
# h5ad: duplicated ids
# ---------------------------------------------------------------------------------------------


def test_h5ad_duplicated_var_names(small_h5ad, tmp_path):
    names = small_h5ad.var_names.copy()
    names[4] = names[9]
    write_h5ad(small_h5ad.path, small_h5ad.X, small_h5ad.obs, names)
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr"), "var_names", "not unique", repr(str(names[9])),
                 "row 9", path=small_h5ad.path)


def test_h5ad_repeated_gene_symbols_are_a_note(small_h5ad, tmp_path):
    """Symbols may repeat (references do); genes are identified by var_names, which stay unique."""
    symbols = [f"SYM{i}" for i in range(len(small_h5ad.var_names))]
    symbols[6] = symbols[2]
    var = pd.DataFrame({"symbol": symbols}, index=pd.Index(small_h5ad.var_names))
    write_h5ad(small_h5ad.path, small_h5ad.X, small_h5ad.obs, small_h5ad.var_names, var=var)
    out = tmp_path / "o.zarr"
    log = LogCapture()
    convert(h5ad_cfg(small_h5ad.path, out, gene_symbol_col="symbol"), log=log)
    printed = log.text()
    assert "note:" in printed and "'symbol'" in printed and "'SYM2'" in printed, printed
    assert manifest(out)["duplicate_gene_symbols"] == 1
    st = CellStore(out)
    assert list(st.gene_symbols) == symbols and len(set(st.gene_ids)) == len(symbols)


def test_h5ad_duplicated_obs_names(small_h5ad, tmp_path):
    obs = small_h5ad.obs.copy()
    index = obs.index.to_numpy().copy()
    index[50] = index[10]
    obs.index = index
    write_h5ad(small_h5ad.path, small_h5ad.X, obs, small_h5ad.var_names)
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr"), "obs_names", "not unique", repr(index[10]),
                 "row 50", path=small_h5ad.path)


def test_h5ad_duplicated_cell_id_column(small_h5ad, tmp_path):
    obs = small_h5ad.obs.copy()
    barcodes = np.array([f"bc{i}" for i in range(len(obs))], dtype=object)
    barcodes[[70, 71]] = barcodes[5]
    obs["barcode"] = barcodes
    write_h5ad(small_h5ad.path, small_h5ad.X, obs, small_h5ad.var_names)
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", cell_id_col="barcode"), "'barcode'",
                 "shard.cell_id_col", "not unique", "2 repeated value(s)", "'bc5'", "row 70", path=small_h5ad.path)


def test_h5ad_cell_ids_repeated_across_files(tmp_path):
    a = build_h5ad(tmp_path / "a.h5ad", n_cells=80, n_genes=12, seed=32)
    b = build_h5ad(tmp_path / "b.h5ad", n_cells=60, n_genes=12, seed=33)
    index = np.array([f"b-{i}" for i in range(60)], dtype=object)
    index[17] = a.obs.index[3]
    b.obs.index = index
    write_h5ad(b.path, b.X, b.obs, b.var_names)
    err = expect_error(h5ad_cfg([a.path, b.path], tmp_path / "o.zarr"), "obs_names", "1 shared",
                       repr(a.obs.index[3]), path=b.path)
    assert a.path.name in str(err)


def test_h5ad_cell_id_hash_collisions_are_confirmed(tmp_path, monkeypatch):
    """Ids are compared across files by 64-bit hash; a hash match of different ids is not an error."""
    from data_sharding import h5ad

    a = build_h5ad(tmp_path / "a.h5ad", n_cells=50, n_genes=12, seed=34)
    b = build_h5ad(tmp_path / "b.h5ad", n_cells=40, n_genes=12, seed=35)
    b.obs.index = [f"b-{i}" for i in range(40)]
    write_h5ad(b.path, b.X, b.obs, b.var_names)
    monkeypatch.setattr(h5ad, "_hash_ids", lambda ids: np.zeros(len(ids), dtype=np.uint64))  # all collide
    m = convert(h5ad_cfg([a.path, b.path], tmp_path / "o.zarr"), log=quiet)
    assert m.num_cells == 90


# ---------------------------------------------------------------------------------------------
# h5ad: implausible counts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dense", [False, True])
def test_h5ad_implausible_count(tmp_path, dense):
    src = build_h5ad(tmp_path / "v.h5ad", n_cells=100, n_genes=12, seed=36)
    X = src.X.copy()
    X[37, 4] = 1e30
    write_h5ad(src.path, X, src.obs, src.var_names, dense=dense)
    expect_error(h5ad_cfg(src.path, tmp_path / "o.zarr"), "implausible count 1e+30", "row 37", "shard.max_count",
                 path=src.path)
    # forced counts hold the same bound
    expect_error(h5ad_cfg(src.path, tmp_path / "o.zarr", values="counts"), "shard.max_count", path=src.path)


@pytest.mark.parametrize("value,what", [(5e7, "shard.max_count"), (2.5, "non-integer")])
@pytest.mark.parametrize("workers", [1, 2])
def test_h5ad_bad_count_beyond_the_probe(tmp_path, value, what, workers):
    """A count file is held to the count rules on every row, not only the rows probed at plan time."""
    src = build_h5ad(tmp_path / "big.h5ad", n_cells=4200, n_genes=6, seed=37, planted=())
    X = src.X.copy()
    X[4150, 2] = value
    write_h5ad(src.path, X, src.obs, src.var_names)
    cfg = h5ad_cfg(src.path, tmp_path / "o.zarr", cells_per_part=1000, num_workers=workers)
    expect_error(cfg, what, "row 4150", path=src.path)


def test_h5ad_raising_max_count_admits_large_counts(tmp_path):
    src = build_h5ad(tmp_path / "v.h5ad", n_cells=100, n_genes=12, seed=38)
    X = src.X.copy()
    X[37, 4] = 5e7  # exactly representable in float32
    write_h5ad(src.path, X, src.obs, src.var_names)
    out = tmp_path / "o.zarr"
    convert(h5ad_cfg(src.path, out, max_count=1e8), log=quiet)
    stored, _ = store_csr(out)
    assert stored.max() == 5e7


def test_h5ad_lognorm_keeps_its_bound_not_max_count(h5ad_lognorm_src, tmp_path):
    """Log-normalised input is bounded by LOGNORM_MAX (a log1p value), not by shard.max_count."""
    m = convert(h5ad_cfg(h5ad_lognorm_src.path, tmp_path / "o.zarr", max_count=1.0), log=quiet)
    assert m.value_kind == schema.VALUES_LOGNORM


def test_max_count_must_be_positive(small_h5ad, tahoe_src, tmp_path):
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", max_count=0.0), "shard.max_count")
    expect_error(shard_cfg(tahoe_src.root, tmp_path / "o.zarr", max_count=-1.0), "shard.max_count")


# ---------------------------------------------------------------------------------------------
# Tahoe: counts, metadata, arrow types
# ---------------------------------------------------------------------------------------------


def test_tahoe_implausible_count(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE

    def huge(genes, expr):
        expr[12][1] = 1e30

    edit_rows(f, huge)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "implausible count 1e+30", "row 12", "shard.max_count", path=f)


def test_tahoe_max_count_is_configurable(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE

    def large(genes, expr):
        expr[12][1] = 5e7

    edit_rows(f, large)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "5e+07", "row 12", "shard.max_count", path=f)
    out = tmp_path / "big.zarr"
    convert(shard_cfg(root, out, max_count=1e8), log=quiet)
    stored, _ = store_csr(out)
    assert stored.max() == 5e7


def sample_metadata(root) -> tuple:
    path = root / "metadata" / schema.SAMPLE_METADATA_FILE
    return path, pq.read_table(path).to_pandas()


def test_tahoe_sample_listed_twice_with_different_doses(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    path, t = sample_metadata(root)
    row = t[t["drug"] == "Dinaciclib"].iloc[0].copy()
    first = row["drugname_drugconc"]
    row["drugname_drugconc"] = schema.format_drugconc("Dinaciclib", 50.0)
    pq.write_table(pa.Table.from_pandas(pd.concat([t, row.to_frame().T]), preserve_index=False), path)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), f"sample {row['sample']!r}", "different drugname_drugconc",
                 first, row["drugname_drugconc"], path=path)


def test_tahoe_sample_listed_twice_with_different_drugs(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    path, t = sample_metadata(root)
    row = t[t["drug"] == "Belinostat"].iloc[0].copy()
    row["drug"] = "Dinaciclib"
    pq.write_table(pa.Table.from_pandas(pd.concat([row.to_frame().T, t]), preserve_index=False), path)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), f"sample {row['sample']!r}", "different drug",
                 "'Belinostat'", path=path)


def test_tahoe_exact_duplicate_sample_rows_are_dropped(tahoe_src, tahoe_store, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    path, t = sample_metadata(root)
    pq.write_table(pa.Table.from_pandas(pd.concat([t, t.iloc[[1, 4]]]), preserve_index=False), path)
    out = tmp_path / "o.zarr"
    log = LogCapture()
    convert(shard_cfg(root, out), log=log)
    printed = log.text()
    assert "note:" in printed and "2 duplicate row(s)" in printed, printed
    assert_stores_identical(out, tahoe_store)


def set_drug(path, rows: list[int], drug: str) -> None:
    t = pq.read_table(path)
    drugs = t.column("drug").to_pylist()
    for r in rows:
        drugs[r] = drug
    t = t.set_column(t.column_names.index("drug"), "drug", pa.array(drugs, pa.string()))
    pq.write_table(t, path, row_group_size=37)


@pytest.mark.parametrize("workers", [1, 2])
def test_tahoe_row_drug_differs_from_its_sample(tahoe_src, tmp_path, workers):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    t = pq.read_table(f)
    r = next(i for i, d in enumerate(t.column("drug").to_pylist()) if i > 40 and d != "Belinostat")
    sample, drug = t.column("sample")[r].as_py(), t.column("drug")[r].as_py()
    set_drug(f, [r, r + 5], "Belinostat")
    expect_error(shard_cfg(root, tmp_path / "o.zarr", num_workers=workers), f"row {r} ", f"sample {sample!r}",
                 "'Belinostat'", repr(drug), schema.SAMPLE_METADATA_FILE, path=f)


def test_tahoe_without_sample_drug_column_rows_are_not_cross_checked(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    path, t = sample_metadata(root)
    pq.write_table(pa.Table.from_pandas(t.drop(columns=["drug"]), preserve_index=False), path)
    set_drug(root / "data" / DATA_FILE, [3], "Belinostat")
    m = convert(shard_cfg(root, tmp_path / "o.zarr"), log=quiet)
    assert m.num_cells == len(tahoe_src.obs)


@pytest.mark.parametrize("column", ["genes", "expressions"])
def test_tahoe_list_of_strings(tahoe_src, tmp_path, column):
    """Token ids (or counts) written as strings: named by arrow type, not as a missing marker."""
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    t = pq.read_table(f)
    as_text = [[str(v) for v in row] for row in t.column(column).to_pylist()]
    t = t.set_column(t.column_names.index(column), column, pa.array(as_text, pa.list_(pa.string())))
    pq.write_table(t, f, row_group_size=37)
    err = expect_error(shard_cfg(root, tmp_path / "o.zarr"), f"column {column!r}", "arrow type list<", "string",
                       path=f)
    assert "marker" not in str(err)


def test_tahoe_null_entry_in_genes(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE

    def null_token(genes, expr):
        genes[20][2] = None

    edit_rows(f, null_token)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "'genes'", "null value(s)", "row 20", path=f)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_cli_shard_reports_one_line(small_h5ad, tmp_path, capsys):
    from perturbdiff.cli import main

    write_h5ad(small_h5ad.path, small_h5ad.X, with_missing(small_h5ad.obs, "perturbation", [2]),
               small_h5ad.var_names)
    out = tmp_path / "o.zarr"
    rc = main(["shard", "shard.source=h5ad", f"shard.inputs=[{small_h5ad.path}]", f"shard.out={out}",
               "shard.perturbation_col=perturbation", "shard.context_col=cell_type", "shard.batch_col=donor",
               "shard.control_label=control", "shard.num_workers=1", f"out_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1, err
    assert err[0].startswith("perturbdiff shard: error:") and str(small_h5ad.path) in err[0]
    assert "'perturbation'" in err[0] and "row 2" in err[0]
    assert not (out / schema.MANIFEST_FILE).exists()
