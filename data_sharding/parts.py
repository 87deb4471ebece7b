"""Conversion parts: the on-disk intermediate between a source file and the store, and the source protocol.

A source format (``tahoe.py``, ``h5ad.py``; listed in ``convert.SOURCES``) is a module with
``plan(cfg, log) -> Plan`` (read the metadata, check the files, cut them into tasks) and
``convert_task(task, shared) -> PartData`` (one task's cells in memory), which checks its values
with ``check_values``. Both types live here, beside the part format they produce.

A conversion is split into parts (a parquet file or a few row groups of one; a row range of an
h5ad). Each part is converted independently, in parallel, into a directory of raw binary columns
with its cells sorted by group key, and renamed into place only when complete, so a killed
conversion resumes by skipping finished parts. The merge (``writer.py``) then streams the parts
into the store in global group order with one contiguous read per part and merge block.

Layout of a part directory (all little-endian raw arrays, dtypes fixed in ``schema.DTYPES``):
    meta.json       n, nnz, segments [[context, batch, perturbation, cells, nnz], ...], categories,
                    cell_id itemsize, source (file, rows)
    indptr.bin      int64 [n + 1]
    indices.bin     int32 [nnz]
    data.bin        float32 [nnz]
    cat_<col>.bin   int32 [n]     codes into meta.categories[col]
    num_<col>.bin   float64 [n]
    cell_id.bin     fixed-width UTF-32 [n]
    stats.npz       per-gene sums for highly-variable-gene selection
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perturbdiff.data.csr import take_rows
from perturbdiff.data.schema import DTYPES, GROUP_COLUMNS, VALUES_COUNTS, DataError


@dataclass
class PartData:
    """One part in memory, before sorting. Rows are cells; indices are gene positions."""

    indptr: np.ndarray  # int64 [n + 1]
    indices: np.ndarray  # int32 [nnz], sorted within each row
    data: np.ndarray  # float32 [nnz]
    groups: dict[str, np.ndarray]  # context / batch / perturbation -> str [n]
    cell_id: np.ndarray  # str [n]
    categorical: dict[str, np.ndarray] = field(default_factory=dict)  # extra obs, str [n]
    numeric: dict[str, np.ndarray] = field(default_factory=dict)  # extra obs, float [n]
    source: dict = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.indptr) - 1


@dataclass
class Plan:
    """What a source module's ``plan(cfg, log)`` tells the driver (data_sharding.convert); each task
    becomes one part through the module's ``convert_task(task, shared) -> PartData``."""

    source: str  # "tahoe" | "h5ad"
    files: list[Path]
    tasks: list[dict[str, Any]]  # one per part; each has "file" and "hash" (hash the file in this task)
    gene_ids: np.ndarray
    gene_symbols: np.ndarray
    value_kind: str
    shared: dict[str, Any] = field(default_factory=dict)  # passed to every task
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest


def check_values(path: Path, data: np.ndarray, indptr: np.ndarray, row0: int, require_integer: bool,
                 max_count: float | None = None) -> None:
    """The one value check of every converter; names the first bad cell row.

    Values must be finite and non-negative. Raw counts (``require_integer``) must also be integers
    and, when ``max_count`` is given, at most ``shard.max_count``: one gene in one cell with, say,
    1e30 UMIs is a corrupt or mis-scaled file, not biology, and float32 (how X/data is stored)
    holds integers exactly only up to 2**24. Check the values before casting them to float32, so a
    float64 value too large for float32 is reported as such rather than as infinite.
    """
    bad = ~np.isfinite(data)
    what = "NaN or infinite"
    if not bad.any():
        bad = data < 0
        what = "negative"
    if not bad.any() and require_integer:
        bad = data != np.round(data)
        what = "non-integer"
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(indptr, pos, side="right") - 1) + row0
        raise DataError(path, f"{what} value {float(data[pos])!r} in cell row {row}; raw counts are expected "
                        "(finite, non-negative integers)")
    if require_integer and max_count is not None and data.size:
        over = data > max_count
        if over.any():
            pos = int(np.flatnonzero(over)[0])
            row = int(np.searchsorted(indptr, pos, side="right") - 1) + row0
            raise DataError(path, f"implausible count {float(data[pos]):.6g} in cell row {row}: above "
                            f"shard.max_count={max_count:.6g} (raise shard.max_count if such counts are genuine)")


def gene_stats(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, num_genes: int,
               value_kind: str, flavor: str, target_sum: float = 1e4) -> dict[str, np.ndarray]:
    """Per-gene sums for HVG selection, over the rows of one part (float64).

    seurat_v3: sum/sumsq of the raw counts. dispersion: norm_sum/norm_sumsq of normalize_total
    counts (for log-normalised input, of expm1(x), which are the normalised counts).
    """
    row_nnz = np.diff(indptr)
    x = data.astype(np.float64)
    n = np.array(len(row_nnz), dtype=np.int64)
    if flavor == "seurat_v3":
        return {"n": n, "sum": np.bincount(indices, weights=x, minlength=num_genes),
                "sumsq": np.bincount(indices, weights=x * x, minlength=num_genes)}
    if value_kind == VALUES_COUNTS:
        totals = np.add.reduceat(x, indptr[:-1][row_nnz > 0]) if len(x) else np.zeros(0)
        tot = np.zeros(len(row_nnz))
        tot[row_nnz > 0] = totals
        scale = np.repeat(np.divide(target_sum, tot, out=np.zeros_like(tot), where=tot > 0), row_nnz)
        norm = x * scale
    else:
        norm = np.expm1(x)
    return {
        "n": n,
        "norm_sum": np.bincount(indices, weights=norm, minlength=num_genes),
        "norm_sumsq": np.bincount(indices, weights=norm * norm, minlength=num_genes),
    }


def write_part(part_dir: Path, part: PartData, num_genes: int, value_kind: str, flavor: str) -> dict:
    """Sort a part by group key and write it atomically to ``part_dir``; returns its meta."""
    part_dir = Path(part_dir)
    tmp = part_dir.with_name(part_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    # Stable sort by (context, batch, perturbation); numpy orders str by code point like Python.
    keys = [np.asarray(part.groups[c]).astype(str) for c in GROUP_COLUMNS]
    order = np.lexsort(keys[::-1]) if part.n else np.zeros(0, dtype=np.int64)
    indptr, gather = take_rows(part.indptr, order)
    _dump(tmp / "indptr.bin", indptr, DTYPES["indptr"])
    _dump(tmp / "indices.bin", part.indices[gather], DTYPES["indices"])
    _dump(tmp / "data.bin", part.data[gather], DTYPES["data"])

    sorted_keys = [k[order] for k in keys]
    segments = []
    if part.n:
        change = np.zeros(part.n, dtype=bool)
        change[0] = True
        for k in sorted_keys:
            change[1:] |= k[1:] != k[:-1]
        starts = np.flatnonzero(change)
        counts = np.diff(np.append(starts, part.n))
        seg_nnz = indptr[starts + counts] - indptr[starts]
        segments = [[str(sorted_keys[0][s]), str(sorted_keys[1][s]), str(sorted_keys[2][s]), int(c), int(z)]
                    for s, c, z in zip(starts, counts, seg_nnz)]

    categories = {}
    for col, values in part.categorical.items():
        cats, codes = np.unique(np.asarray(values).astype(str)[order], return_inverse=True)
        categories[col] = cats.tolist()
        _dump(tmp / f"cat_{col}.bin", codes, "int32")
    for col, values in part.numeric.items():
        _dump(tmp / f"num_{col}.bin", np.asarray(values, dtype=np.float64)[order], "float64")
    cell_id = np.asarray(part.cell_id).astype(str)[order]
    if cell_id.dtype.itemsize == 0:
        cell_id = cell_id.astype("<U1")
    cell_id.astype(cell_id.dtype.newbyteorder("<")).tofile(tmp / "cell_id.bin")

    stats = gene_stats(indptr, part.indices[gather], part.data[gather], num_genes, value_kind, flavor)
    np.savez(tmp / "stats.npz", **stats)
    meta = {
        "n": int(part.n),
        "nnz": int(indptr[-1]),
        "segments": segments,
        "categories": categories,
        "numeric": sorted(part.numeric),
        "cell_id_chars": int(cell_id.dtype.itemsize // 4),
        "value_kind": value_kind,
        "source": part.source,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    _fsync_dir(tmp)
    if part_dir.exists():
        shutil.rmtree(part_dir)
    os.replace(tmp, part_dir)
    return meta


def _dump(path: Path, array: np.ndarray, dtype: str) -> None:
    np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tofile(path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


class PartReader:
    """Reads row ranges of a finished part without memory-mapping (keeps RSS honest)."""

    def __init__(self, part_dir: Path):
        self.dir = Path(part_dir)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.n = self.meta["n"]

    def _read(self, name: str, dtype: str, start: int, stop: int, itemsize: int | None = None):
        dt = np.dtype(dtype).newbyteorder("<")
        size = itemsize or dt.itemsize
        return np.fromfile(self.dir / name, dtype=dt, count=stop - start, offset=start * size)

    def rows(self, start: int, stop: int) -> dict:
        """Rows [start, stop): CSR (indptr rebased to 0) plus obs columns."""
        indptr = self._read("indptr.bin", DTYPES["indptr"], start, stop + 1)
        lo, hi = int(indptr[0]), int(indptr[-1])
        out = {
            "indptr": indptr - lo,
            "indices": self._read("indices.bin", DTYPES["indices"], lo, hi),
            "data": self._read("data.bin", DTYPES["data"], lo, hi),
            "categorical": {c: self._read(f"cat_{c}.bin", "int32", start, stop)
                            for c in self.meta["categories"]},
            "numeric": {c: self._read(f"num_{c}.bin", "float64", start, stop)
                        for c in self.meta["numeric"]},
        }
        chars = self.meta["cell_id_chars"]
        out["cell_id"] = self._read("cell_id.bin", f"<U{chars}", start, stop, itemsize=4 * chars)
        return out

    def stats(self) -> dict[str, np.ndarray]:
        with np.load(self.dir / "stats.npz") as z:
            return {k: z[k] for k in z.files}
