"""Integrity of a cell store: cheap structural checks at every open and every read, and the full pass.

Three levels, from cheapest to complete:

1. At open (``CellStore.__init__``; every DataLoader worker re-opens the store, so these cost
   O(arrays + groups), never O(cells)):
   ``check_arrays``     each array's zarr.json exists and its shape and dtype match the manifest's
                        ``arrays`` entry and the counts (X/indptr N + 1, X/indices and X/data nnz,
                        obs arrays N, var arrays G);
   ``read_conditions``  conditions.parquet's sha256 matches the manifest (the file is small) and
                        its groups tile [0, N) contiguously with n == stop - start;
   ``check_indptr``     indptr[0] == 0, indptr[N] == nnz, and indptr at every group start is
                        non-decreasing and within [0, nnz] (uncompressed indptr: every group start,
                        a page each; compressed: the group starts of at most OPEN_DECODE_CHUNKS
                        chunks, so an open never decodes the whole indptr).
2. At every read (``CellStore.read_csr``, vectorised, a few reductions over what was read):
   ``check_indptr_slice``  the indptr slice read is non-decreasing and within [0, nnz];
   ``check_values``        gene indices within [0, G), values finite and non-negative.
   Together with the chunk readers' file checks (perturbdiff/data/chunks.py: truncated or
   undecodable chunk files) this stops a run on structural damage with one line naming the array
   and the row. A value changed to another valid count passes them all: that is what 3 is for.
3. The full pass (``verify``: ``perturbdiff verify STORE``, ``data.verify_on_open=true``, and the
   pipeline after sharding): every array re-read and re-hashed against the manifest's sha256, the
   CSR structure and the condition index re-derived. It reads the whole store (~20M nonzeros/s:
   hours at Tahoe scale), so it is opt-in for training.

Every failure is a ``DataError(store, message)``; the message names the array (or file) and, where
there is one, the row.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from .chunks import ChunkReader, ZarrRanges
from .schema import (
    CONDITIONS_FILE, GROUP_COLUMNS, MANIFEST_FILE, OBS_GROUP, VAR_GROUP, X_ARRAYS, X_DATA, X_INDICES, X_INDPTR,
    DataError, StoreManifest, file_sha256, hash_update, obs_categories, obs_codes,
)

# Compressed indptr: the open-time check decodes at most this many chunks (first, last, spread).
OPEN_DECODE_CHUNKS = 8
# The full pass streams arrays in pieces of this many elements (bounded memory).
STEP = 1 << 22

_TEXT_TYPES = ("string", "variable_length_utf8")


# ---------------------------------------------------------------------------------------------
# At open
# ---------------------------------------------------------------------------------------------


def expected_length(name: str, manifest: StoreManifest) -> int | None:
    """The length the store's counts give an array (None for category lists, free in length)."""
    if name == X_INDPTR:
        return manifest.num_cells + 1
    if name in (X_INDICES, X_DATA):
        return manifest.nnz
    if name.startswith(f"{OBS_GROUP}/") and not name.endswith("/categories"):
        return manifest.num_cells
    if name.startswith(f"{VAR_GROUP}/"):
        return manifest.num_genes
    return None


def _is_text(dtype: str) -> bool:
    """A manifest dtype (``str(zarr_array.dtype)``) that is a string type."""
    return dtype.startswith(("StringDType", "<U", "|U", ">U", "|O")) or dtype in ("str", "object", "O")


def _array_meta(store: Path, name: str) -> dict[str, Any]:
    """An array's Zarr v3 metadata, read as JSON (opening it with zarr costs ~1 ms an array)."""
    path = store / name / "zarr.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(store, f"array {name} is missing (no {name}/zarr.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(path, f"array metadata of {name} is unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "array" or not isinstance(meta.get("shape"), list):
        raise DataError(path, f"{name}/zarr.json is not the metadata of a Zarr v3 array")
    return meta


def check_arrays(store: str | Path, manifest: StoreManifest) -> None:
    """Every array of the manifest (and the three X arrays) exists with the recorded shape and dtype,
    and the shape agrees with num_cells / nnz / num_genes (checked integers by StoreManifest.read)."""
    store = Path(store)
    listed = {k: v for k, v in manifest.arrays.items() if k != CONDITIONS_FILE}
    for name in [a for a in X_ARRAYS if a not in listed] + list(listed):
        meta = _array_meta(store, name)
        shape, data_type = [int(s) for s in meta["shape"]], str(meta.get("data_type"))
        if len(shape) != 1:
            raise DataError(store, f"{name} has shape {shape}; store arrays are 1-D")
        info = listed.get(name, {})
        if "shape" in info and shape != list(info["shape"]):
            raise DataError(store, f"{name} has shape {shape}, the manifest says {info['shape']}")
        want = expected_length(name, manifest)
        if want is not None and shape[0] != want:
            raise DataError(store, f"{name} has {shape[0]} elements, the manifest's counts give {want}")
        recorded = X_ARRAYS[name] if name in X_ARRAYS else info.get("dtype")
        if recorded is not None:
            text = data_type in _TEXT_TYPES
            if text != _is_text(str(recorded)) or (not text and data_type != str(recorded)):
                raise DataError(store, f"{name} has dtype {data_type}, expected {recorded}")


def read_conditions(store: str | Path, manifest: StoreManifest) -> pd.DataFrame:
    """conditions.parquet, after checking its sha256 against the manifest and that its groups tile
    the cells: contiguous from row 0, the last stop == num_cells, n == stop - start."""
    store = Path(store)
    path = store / CONDITIONS_FILE
    if not path.is_file():
        raise DataError(store, f"{CONDITIONS_FILE} is missing")
    want = (manifest.arrays.get(CONDITIONS_FILE) or {}).get("sha256")
    if want and file_sha256(path) != want:
        raise DataError(store, f"{CONDITIONS_FILE} checksum mismatch: the file was modified or damaged")
    try:
        cond = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises its own exception types
        raise DataError(store, f"{CONDITIONS_FILE} is not readable parquet ({err})") from None
    check_tiling(store, cond, manifest.num_cells, manifest.num_groups)
    return cond


def check_tiling(store: str | Path, cond: pd.DataFrame, num_cells: int, num_groups: int | None = None) -> None:
    """The groups' [start, stop) ranges tile [0, num_cells) in table order, with n == stop - start."""
    missing = [c for c in ("start", "stop", "n") if c not in cond.columns]
    if missing:
        raise DataError(store, f"{CONDITIONS_FILE} lacks the column(s) {missing}")
    if num_groups is not None and len(cond) != num_groups:
        raise DataError(store, f"{CONDITIONS_FILE} has {len(cond)} groups, the manifest says {num_groups}")
    starts, stops, ns = (cond[c].to_numpy().astype(np.int64) for c in ("start", "stop", "n"))
    if len(cond) == 0:
        if num_cells:
            raise DataError(store, f"{CONDITIONS_FILE} has no groups but the store has {num_cells} cells")
        return
    if starts[0] != 0:
        raise DataError(store, f"{CONDITIONS_FILE}: the first group starts at row {starts[0]}, not 0")
    gap = np.flatnonzero(starts[1:] != stops[:-1])
    if len(gap):
        i = int(gap[0]) + 1
        raise DataError(store, f"{CONDITIONS_FILE}: group {i} starts at row {starts[i]} but group {i - 1} "
                        f"stops at row {stops[i - 1]} (groups must tile the cells contiguously)")
    bad = np.flatnonzero((ns != stops - starts) | (ns < 0))
    if len(bad):
        i = int(bad[0])
        raise DataError(store, f"{CONDITIONS_FILE}: group {i} has n = {ns[i]} but stop - start = "
                        f"{stops[i] - starts[i]}")
    if stops[-1] != num_cells:
        raise DataError(store, f"{CONDITIONS_FILE}: the last group stops at row {stops[-1]}, the store has "
                        f"{num_cells} cells")


def _bounded(positions: np.ndarray, chunk: int, budget: int) -> np.ndarray:
    """The positions that lie in at most ``budget`` chunks: the first, the last and evenly spread."""
    keys = positions // chunk
    uniq = np.unique(keys)
    if len(uniq) <= budget:
        return positions
    chosen = uniq[np.unique(np.linspace(0, len(uniq) - 1, budget).round().astype(np.int64))]
    return positions[np.isin(keys, chosen)]


def check_indptr(store: str | Path, manifest: StoreManifest, cond: pd.DataFrame, indptr) -> None:
    """indptr[0] == 0, indptr[N] == nnz, and indptr at the group starts non-decreasing in [0, nnz].

    ``indptr`` is the store's indptr reader (ChunkReader or ZarrRanges, with ``values_at``).
    """
    n, nnz = manifest.num_cells, manifest.nnz
    positions = np.unique(np.r_[np.int64(0), cond["start"].to_numpy().astype(np.int64), np.int64(n)])
    if not (isinstance(indptr, ChunkReader) and not indptr.compressed):
        positions = _bounded(positions, int(indptr.chunk), OPEN_DECODE_CHUNKS)
    values = np.asarray(indptr.values_at(positions), dtype=np.int64)
    if values[0] != 0:
        raise DataError(store, f"X/indptr[0] = {values[0]}, expected 0 (a broken row pointer)")
    if positions[-1] == n and values[-1] != nnz:
        raise DataError(store, f"X/indptr[{n}] = {values[-1]} but the manifest says nnz = {nnz} "
                        "(a broken row pointer)")
    out = np.flatnonzero((values < 0) | (values > nnz))
    if len(out):
        i = int(out[0])
        raise DataError(store, f"X/indptr[{positions[i]}] = {values[i]} is outside [0, {nnz}] "
                        f"(row {positions[i]}, a group start)")
    down = np.flatnonzero(np.diff(values) < 0)
    if len(down):
        i = int(down[0])
        raise DataError(store, f"X/indptr decreases between group starts at rows {positions[i]} and "
                        f"{positions[i + 1]} ({values[i]} > {values[i + 1]})")


# ---------------------------------------------------------------------------------------------
# At every read
# ---------------------------------------------------------------------------------------------


def check_indptr_slice(store: str | Path, first_row: int, ip: np.ndarray, nnz: int) -> None:
    """``ip`` = indptr[first_row : first_row + len(ip)] is non-decreasing and within [0, nnz]."""
    if len(ip) == 0:
        return
    steps = np.diff(ip)
    if ip[0] >= 0 and ip[-1] <= nnz and (len(steps) == 0 or steps.min() >= 0):
        return
    out = np.flatnonzero((ip < 0) | (ip > nnz))
    if len(out):
        i = int(out[0])
        raise DataError(store, f"X/indptr[{first_row + i}] = {ip[i]} is outside [0, {nnz}] "
                        f"(row {first_row + i}, a broken row pointer)")
    i = int(np.flatnonzero(steps < 0)[0])
    raise DataError(store, f"X/indptr decreases at row {first_row + i} ({ip[i]} -> {ip[i + 1]}, a broken "
                    "row pointer)")


def _where(rows: np.ndarray, starts: np.ndarray, out_ptr: np.ndarray, e: int) -> tuple[int, int]:
    """(store row, store element) of element ``e`` of a read_csr result."""
    r = int(np.searchsorted(out_ptr, e, side="right")) - 1
    return int(rows[r]), int(starts[r] + e - out_ptr[r])


def _indices_ok(indices: np.ndarray, num_genes: int) -> bool:
    """All in [0, num_genes): one reduction (int32 viewed as uint32 puts negatives above any G)."""
    if indices.dtype == np.int32:
        return int(indices.view(np.uint32).max()) < num_genes
    return bool(indices.min() >= 0 and indices.max() < num_genes)


_FLOAT32_INF_BITS = 0x7F800000  # non-negative finite float32 bit patterns lie below this


def _values_ok(data: np.ndarray) -> bool:
    """All finite and >= 0: one reduction over the float32 bits (sign set, inf or NaN -> too large).
    -0.0 fails the bit test but is a valid zero, so a failure is re-checked exactly."""
    if data.dtype == np.float32 and int(data.view(np.uint32).max()) < _FLOAT32_INF_BITS:
        return True
    return bool(((data >= 0) & np.isfinite(data)).all())


def check_values(store: str | Path, rows: np.ndarray, starts: np.ndarray, out_ptr: np.ndarray,
                 indices: np.ndarray, data: np.ndarray, num_genes: int) -> None:
    """Gene indices of the rows read are within [0, num_genes); values are finite and non-negative.

    ``starts`` are the rows' first elements in the store, ``out_ptr`` the CSR pointer of the result.
    One vectorised reduction per array on the hot path; the offending element is located only on
    failure.
    """
    if len(indices) and not _indices_ok(indices, num_genes):
        e = int(np.argmax((indices < 0) | (indices >= num_genes)))
        row, elem = _where(rows, starts, out_ptr, e)
        raise DataError(store, f"X/indices[{elem}] = {indices[e]} is outside [0, {num_genes}) "
                        f"(row {row}): a damaged gene index")
    if len(data) and not _values_ok(data):
        e = int(np.argmax(~((data >= 0) & np.isfinite(data))))
        row, elem = _where(rows, starts, out_ptr, e)
        raise DataError(store, f"X/data[{elem}] = {data[e]} in row {row}: values must be finite and "
                        "non-negative (a damaged value)")


# ---------------------------------------------------------------------------------------------
# The full pass
# ---------------------------------------------------------------------------------------------


def _reader(store: Path, root, name: str) -> ZarrRanges:
    """zarr-python over one array (independent of ChunkReader); damage is a DataError naming the file."""
    return ZarrRanges(root[name], store / name)


def _hash_array(reader: ZarrRanges, check: Callable[[np.ndarray, int], None] | None = None) -> str:
    """The sha256 of an array as the writer computes it (schema.hash_update), read piece by piece."""
    from .store import as_numpy  # store imports this module: import here, not at the top

    sha = hashlib.sha256()
    n = reader.array.shape[0]
    for a in range(0, n, STEP):
        values = as_numpy(reader[a:min(n, a + STEP)])
        hash_update(sha, values)
        if check is not None:
            check(values, a)
    return sha.hexdigest()


def verify(store: str | Path, sources: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Re-read a store and check it against its manifest (``perturbdiff verify``).

    The open-time metadata checks first, then every array streamed piece by piece (bounded memory) and its
    sha256 compared with the manifest, the CSR structure (indptr monotone, indices in range and
    strictly increasing within rows, values finite and non-negative) and the condition index
    (obs codes constant within each group) re-derived. With ``sources``, the source files are
    re-hashed and compared too. Raises DataError on the first inconsistency; returns a summary.
    """
    import zarr

    from .store import as_numpy  # store imports this module: import here, not at the top

    store = Path(store)
    manifest = StoreManifest.read(store)
    if not manifest.arrays:
        raise DataError(store, "the manifest records no array checksums: nothing to verify against")
    check_arrays(store, manifest)
    cond = read_conditions(store, manifest)
    log(f"  ok {CONDITIONS_FILE} checksum")
    try:
        root = zarr.open_group(str(store), mode="r")
    except Exception as err:  # noqa: BLE001
        raise DataError(store, f"cannot open the Zarr group: {err}") from None
    n, nnz, g = manifest.num_cells, manifest.nnz, manifest.num_genes

    # ---- checksums, with the per-piece CSR checks ------------------------------------------
    state = {"prev_last": 0}

    def check_indptr_piece(values: np.ndarray, start: int) -> None:
        if start == 0 and len(values) and values[0] != 0:
            raise DataError(store, f"X/indptr[0] = {values[0]}, expected 0")
        check_indptr_slice(store, start - 1 if start else 0,
                           np.concatenate([[state["prev_last"]], values]) if start else values, nnz)
        state["prev_last"] = values[-1]

    def check_indices_piece(values: np.ndarray, start: int) -> None:
        if len(values) and not _indices_ok(values, g):
            e = int(np.argmax((values < 0) | (values >= g)))
            raise DataError(store, f"X/indices[{start + e}] = {values[e]} is outside [0, {g})")

    def check_data_piece(values: np.ndarray, start: int) -> None:
        if len(values) and not _values_ok(values):
            e = int(np.argmax(~((values >= 0) & np.isfinite(values))))
            raise DataError(store, f"X/data[{start + e}] = {values[e]}: values must be finite and non-negative")

    checks = {X_INDPTR: check_indptr_piece, X_INDICES: check_indices_piece, X_DATA: check_data_piece}
    for name, info in manifest.arrays.items():
        if name == CONDITIONS_FILE:
            continue
        if _hash_array(_reader(store, root, name), checks.get(name)) != info["sha256"]:
            raise DataError(store, f"{name} checksum mismatch: the store was modified or damaged")
        log(f"  ok {name} {info['shape']}")
    indptr, indices = _reader(store, root, X_INDPTR), _reader(store, root, X_INDICES)
    last = int(indptr[n:n + 1][0])
    if last != nnz:
        raise DataError(store, f"X/indptr[{n}] = {last} but the manifest says nnz = {nnz}")

    # ---- sorted indices within rows (streamed by row blocks) --------------------------------
    rows_step = 1 << 16
    for a in range(0, n, rows_step):
        ip = indptr[a:min(n, a + rows_step) + 1]
        idx = indices[int(ip[0]):int(ip[-1])]
        bad = np.diff(idx) <= 0
        cross = (ip - ip[0])[1:-1] - 1  # pairs (i, i + 1) that straddle a row boundary may go down
        bad[cross[(cross >= 0) & (cross < len(bad))]] = False
        if bad.any():
            raise DataError(store, f"X/indices not strictly increasing within a row near row {a}")

    # ---- condition index -------------------------------------------------------------------
    starts = cond["start"].to_numpy()
    for col in GROUP_COLUMNS:
        cats = as_numpy(_reader(store, root, obs_categories(col))[:]).astype(str)
        group_codes = np.searchsorted(cats, cond[col].to_numpy().astype(str))
        codes = _reader(store, root, obs_codes(col))
        for a in range(0, n, STEP):  # windowed: memory O(STEP), not O(cells)
            rows = np.arange(a, min(n, a + STEP))
            expected = group_codes[np.searchsorted(starts, rows, side="right") - 1]
            if not np.array_equal(codes[a:min(n, a + STEP)], expected):
                raise DataError(store, f"obs/{col} codes do not match the condition index near row {a}")
    log(f"  ok {CONDITIONS_FILE}: {len(cond)} groups tile {n:,} cells")

    # ---- sources ---------------------------------------------------------------------------
    checked_sources = 0
    if sources is not None:
        src_dir = Path(sources)
        for src in manifest.sources:
            matches = [p for p in src_dir.rglob(src["path"]) if p.is_file()]
            if not matches:
                raise DataError(src_dir, f"source file {src['path']} not found")
            if src.get("sha256") and file_sha256(matches[0]) != src["sha256"]:
                raise DataError(matches[0], "source file checksum differs from the manifest")
            checked_sources += 1
        log(f"  ok {checked_sources} source file checksum(s)")
    return {"store": str(store), "num_cells": n, "nnz": nnz, "num_genes": g, "num_groups": len(cond),
            "arrays_checked": len(manifest.arrays), "sources_checked": checked_sources}


_VERIFIED: set[tuple[str, int]] = set()


def verify_once(store: str | Path, log: Callable[[str], None] = print) -> bool:
    """``verify`` a store unless this process already verified it (same path, same manifest file).

    ``data.verify_on_open`` builds several loaders over one store (train and validation); one
    pass is enough. Returns True when it ran the pass.
    """
    path = Path(store).resolve()
    try:
        key = (str(path), (path / MANIFEST_FILE).stat().st_mtime_ns)
    except OSError:
        key = (str(path), -1)
    if key in _VERIFIED:
        return False
    log(f"data.verify_on_open: full checksum pass over {store} (re-reads every array) before training")
    summary = verify(store, log=lambda _msg: None)
    log(f"data.verify_on_open: {store} ok ({summary['num_cells']:,} cells, {summary['nnz']:,} nonzeros, "
        f"{summary['arrays_checked']} arrays checked)")
    _VERIFIED.add(key)
    return True
