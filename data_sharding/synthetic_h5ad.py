"""``write_h5ad``: the cells of a Tahoe-format parquet dataset as an AnnData h5ad file, streamed.

``data_sharding.synthetic.generate`` calls it when ``SynthConfig.write_h5ad`` is set, so that the same cells exist
in both input formats; it reads any dataset with the layout below (``data/train-*.parquet`` plus the
``metadata/`` tables). The file is written by hand with h5py following the AnnData on-disk spec (``X`` as a
csr_matrix, ``obs``/``var`` as dataframes with categorical columns), one parquet batch at a time, so memory is
bounded whatever the number of cells. anndata itself is not needed.

This module also defines the dataset's directory layout (``DATA_DIR``, ``METADATA_DIR``,
``CELL_LINE_METADATA_FILE``), which ``data_sharding.synthetic`` writes and re-exports.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perturbdiff.data import schema
from perturbdiff.data.schema import DataError

# The layout of a dataset written by data_sharding.synthetic.generate.
DATA_DIR = "data"
METADATA_DIR = "metadata"
CELL_LINE_METADATA_FILE = "cell_line_metadata.parquet"
CELL_LINE_METADATA_COLUMNS = ("cell_line_id", "cell_name")


def _h5_attrs(obj, encoding_type: str, version: str, **extra) -> None:
    obj.attrs["encoding-type"] = encoding_type
    obj.attrs["encoding-version"] = version
    for k, v in extra.items():
        obj.attrs[k] = v


def _h5_string_array(group, name: str, values, n_cells: int | None = None):
    """A string-array dataset holding ``values``, or an empty one of n_cells entries to fill later."""
    import h5py

    dt = h5py.string_dtype("utf-8")
    if n_cells is not None:
        ds = group.create_dataset(name, shape=(n_cells,), dtype=dt, chunks=(min(max(n_cells, 1), 16_384),))
    else:
        ds = group.create_dataset(name, data=np.asarray(list(values), dtype=object), dtype=dt)
    _h5_attrs(ds, "string-array", "0.2.0")
    return ds


def _h5_categorical(group, name: str, categories: list[str], n_cells: int):
    cat = group.create_group(name)
    _h5_attrs(cat, "categorical", "0.2.0", ordered=False)
    _h5_string_array(cat, "categories", categories)
    codes = cat.create_dataset("codes", shape=(n_cells,), dtype=np.int32, chunks=(min(max(n_cells, 1), 65_536),))
    _h5_attrs(codes, "array", "0.2.0")
    return codes


def _grow_append(ds, values: np.ndarray, at: int) -> int:
    end = at + values.shape[0]
    if end > ds.shape[0]:
        ds.resize((max(end, int(ds.shape[0] * 1.5)),))
    ds[at:end] = values
    return end


def _codes(values: pa.Array, categories: pa.Array, what: str, path) -> np.ndarray:
    idx = pc.index_in(values, value_set=categories)
    if idx.null_count:
        bad = pc.filter(values, pc.is_null(idx)).to_pylist()[:3]
        raise DataError(path, f"{what} values not in the metadata: {bad}")
    return idx.to_numpy(zero_copy_only=False).astype(np.int32)


def write_h5ad(source_dir, out_path, chunk_cells: int = 50_000) -> Path:
    """Write the cells of ``source_dir/data/*.parquet`` as an AnnData h5ad, streaming (bounded memory).

    X: csr_matrix of raw counts (float32), columns = gene_metadata rows (mapped by token_id, marker stripped).
    obs (index BARCODE_SUB_LIB_ID): drug, drugname_drugconc, cell_line, plate, sample (categoricals), dose.
    var (index gene_symbol): ensembl_id, token_id. Written to a temporary name, renamed at the end.

    Raises:
        DataError: a missing marker, an unknown gene token, or a cell whose sample/drug/line/plate is not in
            the metadata.
    """
    import h5py

    src = Path(source_dir)
    out_path = Path(out_path)
    files = sorted((src / DATA_DIR).glob("train-*.parquet"))
    if not files:
        raise DataError(src, f"no {DATA_DIR}/train-*.parquet files")
    meta = src / METADATA_DIR
    genes = pq.read_table(meta / schema.GENE_METADATA_FILE).to_pandas()
    samples = pq.read_table(meta / schema.SAMPLE_METADATA_FILE).to_pandas()
    drugs = pq.read_table(meta / schema.DRUG_METADATA_FILE).to_pandas()
    lines = pq.read_table(meta / CELL_LINE_METADATA_FILE).to_pandas()
    G = len(genes)
    tok = genes["token_id"].to_numpy(np.int64)
    if tok.min() < 0 or len(np.unique(tok)) != G:
        raise DataError(meta / schema.GENE_METADATA_FILE, "token_id is negative or not unique")
    lut = np.full(int(tok.max()) + 1, -1, np.int64)
    lut[tok] = np.arange(G)
    n_cells = sum(pq.ParquetFile(f).metadata.num_rows for f in files)

    sample_cats = samples["sample"].tolist()
    s_conc = samples["drugname_drugconc"].tolist()
    s_dose = np.asarray([schema.parse_drugconc(t)[0][1] for t in s_conc], dtype=np.float64)
    conc_cats = sorted(set(s_conc))
    s_conc_code = np.asarray([conc_cats.index(t) for t in s_conc], dtype=np.int32)
    drug_cats = drugs["drug"].tolist()
    line_cats = lines["cell_line_id"].tolist()
    plate_cats = sorted(set(samples["plate"]), key=lambda s: (len(s), s))
    pa_samples, pa_drugs = pa.array(sample_cats, pa.string()), pa.array(drug_cats, pa.string())
    pa_lines, pa_plates = pa.array(line_cats, pa.string()), pa.array(plate_cats, pa.string())

    tmp = out_path.with_name(out_path.name + ".tmp")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["genes", "expressions", "drug", "sample", "BARCODE_SUB_LIB_ID", "cell_line_id", "plate"]
    with h5py.File(tmp, "w") as h5:
        _h5_attrs(h5, "anndata", "0.1.0")
        X = h5.create_group("X")
        _h5_attrs(X, "csr_matrix", "0.1.0", shape=np.array([n_cells, G], dtype=np.int64))
        data_ds = X.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 18,))
        ind_ds = X.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 18,))
        indptr_ds = X.create_dataset("indptr", shape=(n_cells + 1,), dtype=np.int64)

        obs = h5.create_group("obs")
        obs_cols = ["drug", "drugname_drugconc", "cell_line", "plate", "sample", "dose"]
        _h5_attrs(obs, "dataframe", "0.2.0", _index="_index", **{"column-order": np.array(obs_cols, dtype=object)})
        idx_ds = _h5_string_array(obs, "_index", [], n_cells=n_cells)
        codes = {
            "drug": _h5_categorical(obs, "drug", drug_cats, n_cells),
            "drugname_drugconc": _h5_categorical(obs, "drugname_drugconc", conc_cats, n_cells),
            "cell_line": _h5_categorical(obs, "cell_line", line_cats, n_cells),
            "plate": _h5_categorical(obs, "plate", plate_cats, n_cells),
            "sample": _h5_categorical(obs, "sample", sample_cats, n_cells),
        }
        dose_ds = obs.create_dataset("dose", shape=(n_cells,), dtype=np.float64,
                                     chunks=(min(max(n_cells, 1), 65_536),))
        _h5_attrs(dose_ds, "array", "0.2.0")

        row = 0
        nnz = 0
        indptr_ds[0] = 0
        for path in files:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=int(chunk_cells), columns=cols):
                n = batch.num_rows
                g_arr, e_arr = batch.column("genes"), batch.column("expressions")
                off = g_arr.offsets.to_numpy().astype(np.int64)
                off -= off[0]
                gv = g_arr.flatten().to_numpy()
                ev = e_arr.flatten().to_numpy()
                eoff = e_arr.offsets.to_numpy().astype(np.int64)
                if not np.array_equal(eoff - eoff[0], off):
                    raise DataError(path, "genes and expressions have different lengths")
                lens = np.diff(off)
                if np.any(lens < 1) or np.any(gv[off[:-1]] != schema.TAHOE_MARKER_TOKEN) or \
                        np.any(ev[off[:-1]] != schema.TAHOE_MARKER_VALUE):
                    raise DataError(path, "a row does not start with the marker (token 1, value -2)")
                keep = np.ones(gv.size, bool)
                keep[off[:-1]] = False
                gv, ev = gv[keep], ev[keep].astype(np.float32)
                if gv.size and (gv.max() >= lut.size or gv.min() < 0 or np.any(lut[gv] < 0)):
                    raise DataError(path, "a gene token is not in gene_metadata.token_id")
                col = lut[gv]
                rows_nnz = lens - 1
                row_of = np.repeat(np.arange(n, dtype=np.int64), rows_nnz)
                order = np.argsort(row_of * G + col, kind="stable")  # sort columns within each row
                col, ev = col[order], ev[order]
                ptr = nnz + np.cumsum(rows_nnz)
                nnz = _grow_append(data_ds, ev, nnz)
                _grow_append(ind_ds, col.astype(np.int32), nnz - ev.size)
                indptr_ds[row + 1: row + n + 1] = ptr

                s_code = _codes(batch.column("sample"), pa_samples, "sample", path)
                codes["sample"][row:row + n] = s_code
                codes["drug"][row:row + n] = _codes(batch.column("drug"), pa_drugs, "drug", path)
                codes["cell_line"][row:row + n] = _codes(batch.column("cell_line_id"), pa_lines, "cell_line_id", path)
                codes["plate"][row:row + n] = _codes(batch.column("plate"), pa_plates, "plate", path)
                codes["drugname_drugconc"][row:row + n] = s_conc_code[s_code]
                dose_ds[row:row + n] = s_dose[s_code]
                idx_ds[row:row + n] = np.asarray(batch.column("BARCODE_SUB_LIB_ID").to_pylist(), dtype=object)
                row += n
        if row != n_cells:  # pragma: no cover (the footers said otherwise)
            raise DataError(src, f"read {row} cells, the parquet footers say {n_cells}")
        data_ds.resize((nnz,))
        ind_ds.resize((nnz,))

        var = h5.create_group("var")
        _h5_attrs(var, "dataframe", "0.2.0", _index="_index",
                  **{"column-order": np.array(["ensembl_id", "token_id"], dtype=object)})
        _h5_string_array(var, "_index", genes["gene_symbol"].astype(str).tolist())
        _h5_string_array(var, "ensembl_id", genes["ensembl_id"].astype(str).tolist())
        tds = var.create_dataset("token_id", data=tok)
        _h5_attrs(tds, "array", "0.2.0")
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            _h5_attrs(h5.create_group(name), "dict", "0.1.0")
    os.replace(tmp, out_path)
    return out_path

