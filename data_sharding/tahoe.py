"""Tahoe-100M parquet release -> store.

Quirks handled (see perturbdiff/data/schema.py):
- every row starts with a marker entry (gene token 1, value -2): checked and dropped;
- gene token ids map to genes through ``gene_metadata.token_id``, never by offset arithmetic;
- the dose is not in the expression rows: ``sample`` joins ``sample_metadata.drugname_drugconc``,
  so a perturbation is the (drug, dose) label, e.g. ``[('Dinaciclib', 0.5, 'uM')]``.
Groups: context = cell_line_id, batch = plate, perturbation = drugname_drugconc.

Rules (each broken one is a one-line DataError naming the file and the row / sample / column):
- ``genes`` is a list of integers and ``expressions`` a list of numbers (checked on the arrow
  schema at plan time, so strings are named as such, not reported as a missing marker);
- a sample listed more than once in sample_metadata must agree on drugname_drugconc (and drug);
  exact duplicate rows are harmless and dropped with a printed note;
- when sample_metadata has a ``drug`` column, a data row's drug must be its sample's drug;
- counts are integers in [0, shard.max_count].
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perturbdiff.config import ShardConfig
from perturbdiff.data.schema import (
    GENE_METADATA_COLUMNS, GENE_METADATA_FILE, SAMPLE_METADATA_FILE, TAHOE_COLUMNS, TAHOE_DATA_DIR, TAHOE_DATA_GLOB,
    TAHOE_MARKER_TOKEN, TAHOE_MARKER_VALUE, TAHOE_METADATA_DIR, TAHOE_READ_COLUMNS, VALUES_COUNTS, DataError,
    parse_drugconc,
)

from .parts import PartData, Plan, check_values

def _data_files(inputs: list[str]) -> tuple[list[Path], Path | None]:
    files: list[Path] = []
    meta_guess = None
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            sub = p / TAHOE_DATA_DIR if (p / TAHOE_DATA_DIR).is_dir() else p
            found = sorted(sub.glob(TAHOE_DATA_GLOB))
            if not found:
                raise DataError(p, "no *.parquet files found")
            files.extend(found)
            for cand in (p / TAHOE_METADATA_DIR, sub.parent / TAHOE_METADATA_DIR):
                if meta_guess is None and cand.is_dir():
                    meta_guess = cand
        elif p.is_file():
            files.append(p)
            if meta_guess is None and (p.parent.parent / TAHOE_METADATA_DIR).is_dir():
                meta_guess = p.parent.parent / TAHOE_METADATA_DIR
        else:
            raise DataError(p, "input does not exist")
    if not files:
        raise DataError(None, "shard.inputs lists no parquet files")
    return files, meta_guess


def _read_table(path: Path, required: tuple[str, ...]) -> pa.Table:
    if not path.is_file():
        raise DataError(path, "metadata file not found (set shard.metadata_dir)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(path, f"cannot read parquet (empty or truncated?): {err}") from None
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {table.column_names}")
    return table


def _list_type_ok(t: pa.DataType, value_ok: Callable[[pa.DataType], bool]) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and \
        value_ok(t.value_type)


def _check_row_types(path: Path, schema: pa.Schema) -> None:
    """genes must hold integer token ids and expressions numbers; anything else (e.g. list<string>
    from a re-export) is named here by its arrow type, before any part is converted."""
    expected = {"genes": ("a list of integer gene token ids (list<int64>)", pa.types.is_integer),
                "expressions": ("a list of numbers (list<float>)",
                                lambda t: pa.types.is_integer(t) or pa.types.is_floating(t))}
    for name, (want, value_ok) in expected.items():
        t = schema.field(name).type
        if not _list_type_ok(t, value_ok):
            raise DataError(path, f"column {name!r} has arrow type {t}; expected {want}")


def _samples(path: Path, table: pa.Table, control_drug: str,
             log: Callable[[str], None]) -> tuple[dict[str, dict | None], set[str]]:
    """The per-sample maps of the tasks (sample_label, sample_dose, sample_drug) from
    sample_metadata, and the control labels.

    The dose of a cell comes only from its sample's row, so a sample listed twice with different
    labels (or drugs) has no one right answer: an error naming the sample. Exact duplicate rows
    (in the columns used here) carry no conflict and are dropped. ``drug`` is optional; without it
    data rows are not cross-checked.
    """
    cols = ["sample", "drugname_drugconc"] + (["drug"] if "drug" in table.column_names else [])
    df = table.select(cols).to_pandas()
    unique = df.drop_duplicates()
    clash = unique["sample"].duplicated(keep=False)
    if clash.any():
        s = unique.loc[clash, "sample"].iloc[0]
        rows = unique[unique["sample"] == s]
        labels = rows["drugname_drugconc"].unique().tolist()
        what = (f"drugname_drugconc {labels}" if len(labels) > 1
                else f"drug {rows['drug'].unique().tolist()}")
        n = int(unique.loc[clash, "sample"].nunique())
        raise DataError(path, f"sample {s!r} is listed with different {what} ({n:,} sample(s) conflict); each "
                        "sample (well) must have one treatment")
    if len(unique) < len(df):
        log(f"note: {path}: {len(df) - len(unique):,} duplicate row(s) of the same sample and treatment ignored")
    label, dose, drug, controls = {}, {}, {}, set()
    has_drug = "drug" in unique.columns
    for rec in unique.itertuples(index=False):
        s, text = rec.sample, rec.drugname_drugconc
        try:
            parsed = parse_drugconc(text)
        except ValueError as err:
            raise DataError(path, f"sample {s!r}: {err}") from None
        label[s] = text
        dose[s] = sum(c for _, c, _ in parsed)
        if has_drug and isinstance(rec.drug, str):
            drug[s] = rec.drug
        if all(name == control_drug for name, _, _ in parsed):
            controls.add(text)
    return {"sample_label": label, "sample_dose": dose, "sample_drug": drug if has_drug else None}, controls


def plan(cfg: ShardConfig, log: Callable[[str], None] = print) -> Plan:
    """Read the metadata, check each data file's schema and cut the files into parts of whole row
    groups; ``log`` prints the notes of the rules that are not errors."""
    if not cfg.max_count > 0:
        raise DataError(None, f"shard.max_count must be positive, not {cfg.max_count!r}")
    files, meta_guess = _data_files(cfg.inputs)
    meta_dir = Path(cfg.metadata_dir) if cfg.metadata_dir else meta_guess
    if meta_dir is None:
        raise DataError(None, "cannot find the Tahoe metadata directory; set shard.metadata_dir")

    genes = _read_table(meta_dir / GENE_METADATA_FILE, GENE_METADATA_COLUMNS)
    token_ids = genes.column("token_id").to_numpy().astype(np.int64)
    if len(np.unique(token_ids)) != len(token_ids):
        raise DataError(meta_dir / GENE_METADATA_FILE, "duplicate token_id values")
    if token_ids.min() < 0:
        raise DataError(meta_dir / GENE_METADATA_FILE, "negative token_id values")
    # The store vocabulary is gene_metadata ordered by token id, so rows that list tokens in
    # ascending order (as the release does) map to sorted gene indices without a sort.
    vocab_order = np.argsort(token_ids, kind="stable")
    lookup = np.full(int(token_ids.max()) + 1, -1, dtype=np.int32)
    lookup[token_ids[vocab_order]] = np.arange(len(token_ids), dtype=np.int32)

    sample_path = meta_dir / SAMPLE_METADATA_FILE
    samples, controls = _samples(sample_path, _read_table(sample_path, ("sample", "drugname_drugconc")),
                                 cfg.control_drug, log)
    if not controls:
        raise DataError(meta_dir / SAMPLE_METADATA_FILE,
                        f"no sample has the control drug {cfg.control_drug!r} (shard.control_drug)")

    tasks = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f, f"cannot read parquet (empty or truncated?): {err}") from None
        names = pf.schema_arrow.names
        missing = [c for c in TAHOE_COLUMNS if c not in names]
        if missing:
            raise DataError(f, f"missing column(s) {missing}; expected the Tahoe-100M schema {list(TAHOE_COLUMNS)}")
        _check_row_types(f, pf.schema_arrow)
        md = pf.metadata
        if md.num_rows == 0:
            raise DataError(f, "contains no cells")
        genes_col = [i for i in range(md.num_columns)
                     if md.row_group(0).column(i).path_in_schema.split(".")[0] == "genes"][0]
        rg_rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        rg_nnz = [md.row_group(i).column(genes_col).num_values for i in range(md.num_row_groups)]
        rg, first = 0, True
        while rg < md.num_row_groups:
            stop, n, nnz = rg, 0, 0
            while stop < md.num_row_groups and (n == 0 or (n + rg_rows[stop] <= cfg.cells_per_part
                                                           and nnz + rg_nnz[stop] <= cfg.part_nnz)):
                n += rg_rows[stop]
                nnz += rg_nnz[stop]
                stop += 1
            tasks.append({"file": str(f), "row_groups": [rg, stop], "hash": first})
            rg, first = stop, False

    return Plan(
        source="tahoe", files=files, tasks=tasks,
        gene_ids=genes.column("ensembl_id").to_numpy(zero_copy_only=False).astype(str)[vocab_order],
        gene_symbols=genes.column("gene_symbol").to_numpy(zero_copy_only=False).astype(str)[vocab_order],
        value_kind=VALUES_COUNTS,
        shared={"lookup": lookup, **samples, "metadata": str(meta_dir), "max_count": cfg.max_count},
        extra={"control_perturbations": sorted(controls), "gene_id_kind": "ensembl",
               "source_format": "tahoe-100m-parquet",
               "columns": {"context": "cell_line_id", "batch": "plate", "perturbation": "drugname_drugconc"}},
    )


def _flatten(col: pa.ChunkedArray, path: Path, name: str, row0: int) -> tuple[np.ndarray, np.ndarray]:
    """(row lengths, concatenated values) of a list column; null rows or null entries are errors."""
    arr = col.combine_chunks()
    if arr.null_count:
        r = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(path, f"column {name!r} has {arr.null_count} null rows, the first is row {row0 + r}")
    lengths = pc.list_value_length(arr).to_numpy().astype(np.int64)
    flat = pc.list_flatten(arr)
    if flat.null_count:
        pos = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
        r = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
        raise DataError(path, f"column {name!r} has {flat.null_count} null value(s) inside its lists, the first "
                        f"in row {row0 + r}")
    return lengths, flat.to_numpy(zero_copy_only=False)


def convert_task(task: dict, shared: dict) -> PartData:
    """Row groups [rg0, rg1) of one file as a part; rows, values and the sample join are checked here."""
    path = Path(task["file"])
    rg0, rg1 = task["row_groups"]
    try:
        pf = pq.ParquetFile(path)
        table = pf.read_row_groups(list(range(rg0, rg1)), columns=list(TAHOE_READ_COLUMNS))
    except (pa.ArrowException, OSError) as err:
        raise DataError(path, f"cannot read row groups {rg0}..{rg1 - 1} (truncated file?): {err}") from None
    row0 = sum(pf.metadata.row_group(i).num_rows for i in range(rg0))
    g_len, tokens = _flatten(table.column("genes"), path, "genes", row0)
    e_len, values = _flatten(table.column("expressions"), path, "expressions", row0)
    if not np.array_equal(g_len, e_len):
        r = int(np.flatnonzero(g_len != e_len)[0])
        raise DataError(path, f"row {row0 + r}: genes and expressions have different lengths")
    n = len(g_len)
    starts = np.concatenate([[0], np.cumsum(g_len)[:-1]]).astype(np.int64)
    if (g_len == 0).any():
        r = int(np.flatnonzero(g_len == 0)[0])
        raise DataError(path, f"row {row0 + r} is empty: expected the marker entry (token 1, value -2) first")
    marker_ok = (tokens[starts] == TAHOE_MARKER_TOKEN) & (values[starts] == TAHOE_MARKER_VALUE)
    if not marker_ok.all():
        r = int(np.flatnonzero(~marker_ok)[0])
        raise DataError(path, f"row {row0 + r} does not start with the marker entry (token "
                        f"{TAHOE_MARKER_TOKEN}, value {TAHOE_MARKER_VALUE}): got ({tokens[starts[r]]}, "
                        f"{values[starts[r]]})")
    keep = np.ones(len(tokens), dtype=bool)
    keep[starts] = False
    tokens, values = tokens[keep].astype(np.int64), values[keep]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(g_len - 1, out=indptr[1:])

    lookup = shared["lookup"]
    in_range = len(tokens) == 0 or (tokens.min() >= 0 and tokens.max() < len(lookup))
    idx = lookup[tokens] if in_range else np.where((tokens < 0) | (tokens >= len(lookup)), -1,
                                                   lookup[np.clip(tokens, 0, len(lookup) - 1)])
    if (idx < 0).any():
        pos = int(np.flatnonzero(idx < 0)[0])
        r = int(np.searchsorted(indptr, pos, side="right") - 1)
        raise DataError(path, f"gene token id {tokens[pos]} in row {row0 + r} is not in "
                        f"{GENE_METADATA_FILE} token_id (gene vocabulary mismatch)")
    check_values(path, values, indptr, row0, require_integer=True, max_count=shared["max_count"])
    values = values.astype(np.float32)  # exact: integers up to max_count (1e7 < 2**24 by default)

    unsorted = idx[1:] <= idx[:-1]
    boundary = indptr[1:-1] - 1
    unsorted[boundary[(boundary >= 0) & (boundary < len(unsorted))]] = False
    if unsorted.any():  # rows not in ascending token order: sort within rows
        row_of = np.repeat(np.arange(n), np.diff(indptr))
        same_row = row_of[1:] == row_of[:-1]
        order = np.lexsort((idx, row_of))
        idx, values = idx[order], values[order]
        dup = same_row & (idx[1:] == idx[:-1])
        if dup.any():
            r = int(row_of[1:][dup][0])
            raise DataError(path, f"row {row0 + r} lists the same gene twice")

    samples = table.column("sample").to_numpy(zero_copy_only=False).astype(str)
    labels = shared["sample_label"]
    unknown = sorted({s for s in np.unique(samples) if s not in labels})
    if unknown:
        raise DataError(path, f"sample(s) {unknown[:5]} not found in {SAMPLE_METADATA_FILE} "
                        f"({shared['metadata']}); cannot join the dose")
    uniq, inv = np.unique(samples, return_inverse=True)
    pert = np.array([labels[s] for s in uniq], dtype=object)[inv].astype(str)
    dose = np.array([shared["sample_dose"][s] for s in uniq], dtype=np.float64)[inv]

    def col(name: str) -> np.ndarray:
        c = table.column(name)
        if c.null_count:
            raise DataError(path, f"column {name!r} has {c.null_count} null values")
        return c.to_numpy(zero_copy_only=False).astype(str)

    drug = col("drug")
    sample_drug = shared.get("sample_drug")
    if sample_drug is not None:  # the data row's drug must be its sample's (one comparison per cell)
        known = np.array([s in sample_drug for s in uniq], dtype=bool)[inv]
        expected = np.array([sample_drug.get(s, "") for s in uniq], dtype=str)[inv]
        wrong = known & (expected != drug)
        if wrong.any():
            r, more = int(np.flatnonzero(wrong)[0]), int(wrong.sum()) - 1
            rows = f"row {row0 + r}" + (f" (and {more:,} more)" if more else "")
            raise DataError(path, f"{rows} has drug {str(drug[r])!r} but its sample {str(samples[r])!r} has drug "
                            f"{str(expected[r])!r} in {SAMPLE_METADATA_FILE}")

    return PartData(
        indptr=indptr, indices=idx.astype(np.int32), data=values,
        groups={"context": col("cell_line_id"), "batch": col("plate"), "perturbation": pert},
        cell_id=col("BARCODE_SUB_LIB_ID"),
        categorical={"drug": drug, "sample": samples, "moa_fine": col("moa-fine")},
        numeric={"dose": dose},
        source={"file": str(path), "rows": [row0, row0 + n]},
    )
