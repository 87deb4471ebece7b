"""Re-read a store and check it against its manifest: shapes, checksums, CSR and group invariants.

    perturbdiff verify runs/demo/store.zarr [--sources DIR]

Every array is streamed chunk by chunk (bounded memory) and its sha256 compared with the manifest;
the CSR structure (indptr monotone, indices in range and sorted within rows) and the condition
index (contiguous, covering every cell, obs codes constant within each group) are re-derived.
With ``sources``, the source files are re-hashed and compared too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import zarr

from perturbdiff.data.schema import CONDITIONS_FILE, DTYPES, GROUP_COLUMNS, DataError, file_sha256, read_manifest
from perturbdiff.data.store import as_numpy

from .writer import hash_update

STEP = 1 << 22


def _hash_array(arr: zarr.Array, check: Callable[[np.ndarray, int], None] | None = None) -> str:
    sha = hashlib.sha256()
    n = arr.shape[0]
    for a in range(0, n, STEP):
        values = as_numpy(arr[a:min(n, a + STEP)])
        hash_update(sha, values)
        if check is not None:
            check(values, a)
    return sha.hexdigest()


def verify(store: str | Path, sources: str | Path | None = None, log: Callable[[str], None] = print) -> dict:
    """Raise DataError on the first inconsistency; return a summary dict when all checks pass."""
    store = Path(store)
    manifest = read_manifest(store)
    root = zarr.open_group(str(store), mode="r")
    n, nnz, g = manifest["num_cells"], manifest["nnz"], manifest["num_genes"]

    # ---- checksums and shapes --------------------------------------------------------------
    state = {"prev_last": 0}

    def check_indptr(values: np.ndarray, start: int) -> None:
        if start == 0 and values[0] != 0:
            raise DataError(store, "X/indptr does not start at 0")
        full = np.concatenate([[state["prev_last"]], values]) if start else values
        if (np.diff(full) < 0).any():
            raise DataError(store, f"X/indptr decreases near row {start}")
        state["prev_last"] = values[-1]

    def check_indices(values: np.ndarray, start: int) -> None:
        if len(values) and (values.min() < 0 or values.max() >= g):
            raise DataError(store, f"X/indices out of range [0, {g}) near element {start}")

    checks = {"X/indptr": check_indptr, "X/indices": check_indices}
    for name, info in manifest["arrays"].items():
        if name == CONDITIONS_FILE:
            if file_sha256(store / CONDITIONS_FILE) != info["sha256"]:
                raise DataError(store, f"{CONDITIONS_FILE} checksum mismatch")
            continue
        if name not in root:
            raise DataError(store, f"array {name} listed in the manifest is missing")
        arr = root[name]
        if list(arr.shape) != info["shape"]:
            raise DataError(store, f"{name} has shape {list(arr.shape)}, manifest says {info['shape']}")
        if _hash_array(arr, checks.get(name)) != info["sha256"]:
            raise DataError(store, f"{name} checksum mismatch: the store was modified or damaged")
        log(f"  ok {name} {info['shape']}")
    for name, dtype in DTYPES.items():
        if str(root[f"X/{name}"].dtype) != dtype:
            raise DataError(store, f"X/{name} has dtype {root[f'X/{name}'].dtype}, expected {dtype}")
    if root["X/indptr"].shape[0] != n + 1 or int(root["X/indptr"][n]) != nnz:
        raise DataError(store, "X/indptr does not match num_cells / nnz of the manifest")

    # ---- sorted indices within rows (streamed by row blocks) --------------------------------
    indptr_arr, indices_arr = root["X/indptr"], root["X/indices"]
    rows_step = 1 << 16
    for a in range(0, n, rows_step):
        ip = np.asarray(indptr_arr[a:min(n, a + rows_step) + 1])
        idx = np.asarray(indices_arr[int(ip[0]):int(ip[-1])])
        rel = ip - ip[0]
        bad = np.diff(idx) <= 0
        bad[rel[1:-1] - 1] = False  # row boundaries may go down
        if bad.any():
            raise DataError(store, f"X/indices not strictly increasing within a row near row {a}")

    # ---- condition index -------------------------------------------------------------------
    cond = pd.read_parquet(store / CONDITIONS_FILE)
    if len(cond) != manifest["num_groups"]:
        raise DataError(store, f"{CONDITIONS_FILE} has {len(cond)} groups, manifest says {manifest['num_groups']}")
    starts, stops = cond["start"].to_numpy(), cond["stop"].to_numpy()
    if len(cond) and (starts[0] != 0 or stops[-1] != n or (starts[1:] != stops[:-1]).any()
                      or ((stops - starts) != cond["n"].to_numpy()).any()):
        raise DataError(store, f"{CONDITIONS_FILE} does not tile the cells contiguously")
    for col in GROUP_COLUMNS:
        cats = as_numpy(root[f"obs/{col}/categories"][:]).astype(str)
        group_codes = np.searchsorted(cats, cond[col].to_numpy().astype(str))
        codes = root[f"obs/{col}/codes"]
        for a in range(0, n, STEP):  # windowed: memory O(STEP), not O(cells)
            rows = np.arange(a, min(n, a + STEP))
            expected = group_codes[np.searchsorted(starts, rows, side="right") - 1]
            if not np.array_equal(np.asarray(codes[a:a + STEP]), expected):
                raise DataError(store, f"obs/{col} codes do not match the condition index near row {a}")
    log(f"  ok {CONDITIONS_FILE}: {len(cond)} groups tile {n:,} cells")

    # ---- sources ---------------------------------------------------------------------------
    checked_sources = 0
    if sources is not None:
        src_dir = Path(sources)
        for src in manifest["sources"]:
            matches = [p for p in src_dir.rglob(src["path"]) if p.is_file()]
            if not matches:
                raise DataError(src_dir, f"source file {src['path']} not found")
            if src.get("sha256") and file_sha256(matches[0]) != src["sha256"]:
                raise DataError(matches[0], "source file checksum differs from the manifest")
            checked_sources += 1
        log(f"  ok {checked_sources} source file checksum(s)")
    return {"store": str(store), "num_cells": n, "nnz": nnz, "num_genes": g, "num_groups": len(cond),
            "arrays_checked": len(manifest["arrays"]), "sources_checked": checked_sources}
