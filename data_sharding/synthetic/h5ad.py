"""``write_h5ad``: the cells of a Tahoe-format parquet dataset as an AnnData h5ad file, streamed.

``data_sharding.synthetic.generate`` calls it when ``SynthConfig.write_h5ad`` is set, so that the same cells exist
in both input formats; it reads any dataset in the Tahoe release's layout (``data/*.parquet`` plus the
``metadata/`` tables, ``perturbdiff/data/schema.py``). It is written through the project's streaming writer
(``perturbdiff.data.h5ad_writer``), one parquet batch at a time: X is never whole in memory (obs, a
few values per cell, is written at the end).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp

from perturbdiff.data import schema
from perturbdiff.data.h5ad_writer import StreamingH5ad
from perturbdiff.data.schema import DataError

OBS_COLUMNS = ("drug", "drugname_drugconc", "cell_line", "plate", "sample", "dose")


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
    src = Path(source_dir)
    out_path = Path(out_path)
    files = sorted((src / schema.TAHOE_DATA_DIR).glob(schema.TAHOE_DATA_GLOB))
    if not files:
        raise DataError(src, f"no {schema.TAHOE_DATA_DIR}/{schema.TAHOE_DATA_GLOB} files")
    meta = src / schema.TAHOE_METADATA_DIR
    genes = pq.read_table(meta / schema.GENE_METADATA_FILE).to_pandas()
    samples = pq.read_table(meta / schema.SAMPLE_METADATA_FILE).to_pandas()
    drugs = pq.read_table(meta / schema.DRUG_METADATA_FILE).to_pandas()
    lines = pq.read_table(meta / schema.CELL_LINE_METADATA_FILE).to_pandas()
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
    drug_cats = drugs["drug"].tolist()
    line_cats = lines["cell_line_id"].tolist()
    plate_cats = sorted(set(samples["plate"]), key=lambda s: (len(s), s))
    pa_cats = {c: pa.array(v, pa.string()) for c, v in
               (("sample", sample_cats), ("drug", drug_cats), ("cell_line", line_cats), ("plate", plate_cats))}
    s_conc = np.asarray(s_conc, dtype=object)

    var = pd.DataFrame({"ensembl_id": genes["ensembl_id"].astype(str).to_numpy(), "token_id": tok},
                       index=pd.Index(genes["gene_symbol"].astype(str).to_numpy()))
    cats = {"drug": drug_cats, "drugname_drugconc": conc_cats, "cell_line": line_cats, "plate": plate_cats,
            "sample": sample_cats}
    writer = StreamingH5ad(out_path, var, OBS_COLUMNS, dtypes={"dose": np.float64}, categories=cats)
    cols = ["genes", "expressions", "drug", "sample", "BARCODE_SUB_LIB_ID", "cell_line_id", "plate"]
    row = 0
    try:
        for path in files:
            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=int(chunk_cells), columns=cols):
                writer.append(_batch_counts(batch, lut, G, path), *_batch_obs(batch, path, s_conc, s_dose, pa_cats),
                              index=batch.column("BARCODE_SUB_LIB_ID").to_pylist())
                row += batch.num_rows
        if row != n_cells:  # pragma: no cover (the footers said otherwise)
            raise DataError(src, f"read {row} cells, the parquet footers say {n_cells}")
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def _batch_counts(batch: pa.RecordBatch, lut: np.ndarray, G: int, path) -> sp.csr_matrix:
    """The raw counts of a parquet batch as CSR [n, G] (the marker stripped, columns sorted per row)."""
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
    indptr = np.concatenate([[0], np.cumsum(rows_nnz)])
    return sp.csr_matrix((ev[order], col[order].astype(np.int32), indptr), shape=(n, G))


def _batch_obs(batch: pa.RecordBatch, path, s_conc: np.ndarray, s_dose: np.ndarray, pa_cats: dict) -> list:
    """The obs values (``OBS_COLUMNS`` order) of a parquet batch, each checked against the metadata."""
    s_code = _codes(batch.column("sample"), pa_cats["sample"], "sample", path)
    values = {"drug": _codes(batch.column("drug"), pa_cats["drug"], "drug", path),
              "cell_line": _codes(batch.column("cell_line_id"), pa_cats["cell_line"], "cell_line_id", path),
              "plate": _codes(batch.column("plate"), pa_cats["plate"], "plate", path)}
    out = {c: np.asarray(pa_cats[c].to_pylist(), dtype=object)[v] for c, v in values.items()}
    out["sample"] = np.asarray(pa_cats["sample"].to_pylist(), dtype=object)[s_code]
    out["drugname_drugconc"] = s_conc[s_code]
    out["dose"] = s_dose[s_code]
    return [out[c] for c in OBS_COLUMNS]
