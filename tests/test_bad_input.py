"""Bad inputs: each is a DataError naming the file (or store) and the problem, and no store is left at <out>."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_sharding.convert import convert
from helpers import build_h5ad, h5ad_cfg, quiet, shard_cfg, write_h5ad
from perturbdiff.config import PanelConfig
from perturbdiff.data import schema
from perturbdiff.data.schema import DataError
from perturbdiff.data.store import CellStore

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def copy_source(src, tmp_path: Path) -> Path:
    root = tmp_path / "src"
    shutil.copytree(src.root, root)
    return root


def edit_rows(path: Path, fn) -> None:
    """Rewrite a parquet data file after ``fn(genes, expressions)`` edits the python lists in place."""
    t = pq.read_table(path)
    genes, expr = t.column("genes").to_pylist(), t.column("expressions").to_pylist()
    fn(genes, expr)
    t = t.set_column(t.column_names.index("genes"), "genes", pa.array(genes, pa.list_(pa.int64())))
    t = t.set_column(t.column_names.index("expressions"), "expressions", pa.array(expr, pa.list_(pa.float32())))
    pq.write_table(t, path, row_group_size=37)


def expect_error(cfg, *fragments, path: Path | None = None, name_in_message: str | None = None) -> DataError:
    with pytest.raises(DataError) as err:
        convert(cfg, log=quiet)
    msg = str(err.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    if path is not None:
        assert err.value.path is not None and Path(err.value.path).name == path.name, msg
        assert path.name in msg
    if name_in_message is not None:
        assert name_in_message in msg, msg
    out = Path(cfg.out)
    assert not (out / schema.MANIFEST_FILE).exists(), "a store was left behind"
    return err.value


DATA_FILE = "train-00001-of-00003.parquet"

# ---------------------------------------------------------------------------------------------
# Tahoe parquet
# ---------------------------------------------------------------------------------------------


def test_missing_column(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    pq.write_table(pq.read_table(f).drop(["moa-fine"]), f)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "missing column", "moa-fine", path=f)


@pytest.mark.parametrize("workers", [1, 2])
def test_row_without_marker(tahoe_src, tmp_path, workers):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE

    def drop_marker(genes, expr):
        del genes[5][0]
        del expr[5][0]

    edit_rows(f, drop_marker)
    expect_error(shard_cfg(root, tmp_path / "o.zarr", num_workers=workers), "row 5", "marker", path=f)


@pytest.mark.parametrize("workers", [1, 2])
def test_token_not_in_gene_metadata(tahoe_src, tmp_path, workers):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    unknown = int(tahoe_src.token_ids.max()) + 1000

    def bad_token(genes, expr):
        genes[40][2] = unknown

    edit_rows(f, bad_token)
    expect_error(shard_cfg(root, tmp_path / "o.zarr", num_workers=workers), str(unknown), "vocabulary mismatch",
                 "row 40", path=f)


def test_token_between_known_tokens_not_in_gene_metadata(tahoe_src, tmp_path):
    """A token id inside the known range but absent from gene_metadata (ids are not contiguous)."""
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    known = set(tahoe_src.token_ids.tolist())
    hole = next(t for t in range(4, int(tahoe_src.token_ids.max())) if t not in known)

    def bad_token(genes, expr):
        genes[3][1] = hole

    edit_rows(f, bad_token)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), str(hole), "vocabulary mismatch", path=f)


@pytest.mark.parametrize("value,what", [(float("nan"), "NaN"), (-3.0, "negative"), (2.5, "non-integer"),
                                        (float("inf"), "infinite")])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_count_values(tahoe_src, tmp_path, value, what, workers):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE

    def bad_value(genes, expr):
        expr[12][1] = value

    edit_rows(f, bad_value)
    expect_error(shard_cfg(root, tmp_path / "o.zarr", num_workers=workers), what, "row 12", path=f)


def test_genes_and_expressions_lengths_differ(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE

    def drop_value(genes, expr):
        expr[9].pop()

    edit_rows(f, drop_value)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "row 9", "different lengths", path=f)


def test_same_gene_twice_in_a_row(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE

    def dup(genes, expr):
        r = next(i for i, g in enumerate(genes) if len(g) > 4)
        genes[r][3] = genes[r][2]
        dup.row = r

    edit_rows(f, dup)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), f"row {dup.row}", "same gene twice", path=f)


def test_null_in_group_column(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    t = pq.read_table(f)
    plates = t.column("plate").to_pylist()
    plates[4] = None
    t = t.set_column(t.column_names.index("plate"), "plate", pa.array(plates, pa.string()))
    pq.write_table(t, f, row_group_size=37)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "'plate'", "null", path=f)


def test_empty_parquet_file(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    f.write_bytes(b"")
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "cannot read parquet", path=f)


def test_parquet_with_no_rows(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    pq.write_table(pq.read_table(f).slice(0, 0), f)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "no cells", path=f)


def test_truncated_parquet(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    f = root / "data" / DATA_FILE
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "truncated", path=f)


@pytest.mark.parametrize("workers", [1, 2])
def test_sample_missing_from_sample_metadata(tahoe_src, tmp_path, workers):
    root = copy_source(tahoe_src, tmp_path)
    meta = root / "metadata" / schema.SAMPLE_METADATA_FILE
    t = pq.read_table(meta).to_pandas()
    # drop a treated sample present in the middle file (a control must remain)
    present = set(pq.read_table(root / "data" / DATA_FILE).column("sample").to_pylist())
    victim = next(s for s, d in zip(t["sample"], t["drug"]) if s in present and d != "DMSO_TF")
    pq.write_table(pa.Table.from_pandas(t[t["sample"] != victim], preserve_index=False), meta)
    err = expect_error(shard_cfg(root, tmp_path / "o.zarr", num_workers=workers), victim,
                       schema.SAMPLE_METADATA_FILE)
    assert err.path is not None and Path(err.path).suffix == ".parquet"


def test_gene_metadata_missing_column_and_duplicates(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    gm = root / "metadata" / schema.GENE_METADATA_FILE
    t = pq.read_table(gm)
    pq.write_table(t.drop(["token_id"]), gm)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "token_id", path=gm)
    dup = t.to_pandas()
    dup.loc[1, "token_id"] = dup.loc[0, "token_id"]
    pq.write_table(pa.Table.from_pandas(dup, preserve_index=False), gm)
    expect_error(shard_cfg(root, tmp_path / "o.zarr"), "duplicate token_id", path=gm)


def test_missing_metadata_dir(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    shutil.rmtree(root / "metadata")
    expect_error(shard_cfg(root / "data", tmp_path / "o.zarr"), "metadata")


def test_no_control_samples(tahoe_src, tmp_path):
    root = copy_source(tahoe_src, tmp_path)
    expect_error(shard_cfg(root, tmp_path / "o.zarr", control_drug="NotADrug"), "NotADrug")


def test_missing_input(tmp_path):
    expect_error(shard_cfg(tmp_path / "nowhere", tmp_path / "o.zarr"), "does not exist")


# ---------------------------------------------------------------------------------------------
# h5ad
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_h5ad(tmp_path):
    return build_h5ad(tmp_path / "in.h5ad", n_cells=120, n_genes=20, seed=21)


@pytest.mark.parametrize("col,field", [("perturbation_col", "pert_typo"), ("context_col", "celltype"),
                                       ("batch_col", "donor_id")])
def test_h5ad_missing_obs_column(small_h5ad, tmp_path, col, field):
    cfg = h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", **{col: field})
    expect_error(cfg, repr(field), f"shard.{col}", path=small_h5ad.path)


def test_h5ad_missing_extra_obs_column(small_h5ad, tmp_path):
    cfg = h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", extra_obs=["n_counts_raw", "phase"])
    expect_error(cfg, "'phase'", path=small_h5ad.path)


def test_h5ad_unknown_control_label(small_h5ad, tmp_path):
    cfg = h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", control_label="ctrl")
    expect_error(cfg, "'ctrl'", "'perturbation'", path=small_h5ad.path)


def test_h5ad_vocabulary_mismatch(small_h5ad, tmp_path):
    other = tmp_path / "other.h5ad"
    names = small_h5ad.var_names.copy()
    names[7] = "SOMETHING_ELSE"
    obs = small_h5ad.obs.copy()
    obs.index = [f"o-{i}" for i in range(len(obs))]
    write_h5ad(other, small_h5ad.X, obs, names)
    cfg = h5ad_cfg([small_h5ad.path, other], tmp_path / "o.zarr")
    err = expect_error(cfg, "vocabulary", "position 7", path=other)
    assert small_h5ad.path.name in str(err)
    # a different number of genes too
    write_h5ad(other, small_h5ad.X[:, :15], obs, small_h5ad.var_names[:15])
    expect_error(h5ad_cfg([small_h5ad.path, other], tmp_path / "o.zarr"), "vocabulary", path=other)


@pytest.mark.parametrize("value,what", [(np.nan, "NaN"), (-1.0, "negative")])
@pytest.mark.parametrize("dense", [False, True])
def test_h5ad_bad_values(tmp_path, value, what, dense):
    src = build_h5ad(tmp_path / "v.h5ad", n_cells=100, n_genes=12, seed=22)
    X = src.X.copy()
    X[37, 4] = value
    write_h5ad(src.path, X, src.obs, src.var_names, dense=dense)
    expect_error(h5ad_cfg(src.path, tmp_path / "o.zarr"), what, "row 37", path=src.path)


@pytest.mark.parametrize("workers", [1, 2])
def test_h5ad_bad_value_beyond_the_probe(tmp_path, workers):
    """A bad value far from the rows probed at planning time is caught while converting its part."""
    src = build_h5ad(tmp_path / "big.h5ad", n_cells=4200, n_genes=6, seed=23, planted=())
    X = src.X.copy()
    X[4150, 2] = -5.0
    write_h5ad(src.path, X, src.obs, src.var_names)
    cfg = h5ad_cfg(src.path, tmp_path / "o.zarr", cells_per_part=1000, num_workers=workers)
    expect_error(cfg, "negative", "row 4150", path=src.path)


def test_h5ad_csc_matrix(small_h5ad, tmp_path):
    import anndata as ad
    import scipy.sparse as sp

    a = ad.AnnData(X=sp.csc_matrix(small_h5ad.X.astype(np.float32)), obs=small_h5ad.obs.copy(),
                   var=__import__("pandas").DataFrame(index=list(small_h5ad.var_names)))
    a.write_h5ad(small_h5ad.path)
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr"), "csc_matrix", path=small_h5ad.path)


def test_h5ad_truncated(small_h5ad, tmp_path):
    raw = small_h5ad.path.read_bytes()
    small_h5ad.path.write_bytes(raw[: len(raw) // 2])
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr"), path=small_h5ad.path)


def test_h5ad_empty_file(small_h5ad, tmp_path):
    small_h5ad.path.write_bytes(b"")
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr"), path=small_h5ad.path)


def test_h5ad_neither_counts_nor_lognorm(small_h5ad, tmp_path):
    X = small_h5ad.X * 37.25  # non-integer and far above any log1p value
    write_h5ad(small_h5ad.path, X, small_h5ad.obs, small_h5ad.var_names)
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr"), "neither raw counts nor", path=small_h5ad.path)


def test_h5ad_forced_counts_on_non_integer(small_h5ad, tmp_path):
    X = small_h5ad.X + 0.5 * (small_h5ad.X > 0)
    write_h5ad(small_h5ad.path, X, small_h5ad.obs, small_h5ad.var_names)
    expect_error(h5ad_cfg(small_h5ad.path, tmp_path / "o.zarr", values="counts"), "non-integer",
                 path=small_h5ad.path)


def test_h5ad_mixed_value_kinds(tmp_path):
    a = build_h5ad(tmp_path / "a.h5ad", n_cells=60, n_genes=10, seed=24, kind="counts", planted=())
    b = build_h5ad(tmp_path / "b.h5ad", n_cells=60, n_genes=10, seed=25, kind="lognorm", planted=())
    b.obs.index = [f"b{i}" for i in range(60)]
    write_h5ad(b.path, b.X, b.obs, b.var_names)
    expect_error(h5ad_cfg([a.path, b.path], tmp_path / "o.zarr"), "mix")


# ---------------------------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------------------------


def test_store_with_unknown_schema_version(tahoe_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tahoe_store, store)
    m = json.loads((store / schema.MANIFEST_FILE).read_text())
    m["schema_version"] = 999
    (store / schema.MANIFEST_FILE).write_text(json.dumps(m))
    with pytest.raises(DataError, match="999") as err:
        CellStore(store)
    assert str(store) in str(err.value) and "schema version" in str(err.value)


def test_store_without_manifest(tahoe_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tahoe_store, store)
    (store / schema.MANIFEST_FILE).unlink()
    with pytest.raises(DataError, match="manifest") as err:
        CellStore(store)
    assert str(store) in str(err.value)
    with pytest.raises(DataError, match="manifest"):
        CellStore(tmp_path / "not_there.zarr")


def test_store_with_corrupt_manifest(tahoe_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tahoe_store, store)
    (store / schema.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DataError, match="JSON"):
        CellStore(store)


def test_store_without_conditions(tahoe_store, tmp_path):
    store = tmp_path / "s.zarr"
    shutil.copytree(tahoe_store, store)
    (store / schema.CONDITIONS_FILE).unlink()
    with pytest.raises(DataError, match=schema.CONDITIONS_FILE):
        CellStore(store)


def test_panel_file_with_unknown_genes(tahoe_store, tmp_path):
    f = tmp_path / "panel.txt"
    st = CellStore(tahoe_store)
    f.write_text(f"{st.gene_symbols[0]}\nNOT_A_GENE\n{st.gene_ids[3]}\nALSO_MISSING\n")
    with pytest.raises(DataError) as err:
        st.panel(PanelConfig(kind="file", genes_file=str(f)))
    msg = str(err.value)
    assert str(f) in msg and "NOT_A_GENE" in msg and "ALSO_MISSING" in msg and "2 panel gene" in msg
    with pytest.raises(DataError, match="does not exist"):
        st.panel(PanelConfig(kind="file", genes_file=str(tmp_path / "none.txt")))
    with pytest.raises(DataError, match="only"):
        st.panel(PanelConfig(kind="hvg", num_genes=st.num_genes + 1))
    with pytest.raises(DataError, match="panel.kind"):
        st.panel(PanelConfig(kind="random"))
