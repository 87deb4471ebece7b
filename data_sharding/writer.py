"""Merge finished conversion parts into a store, in global group order, in bounded memory.

Destination order is (group, part, row within part), then each group's cells are shuffled in fixed
windows of SHUFFLE_WINDOW cells (seeded by group and window, so the store does not depend on
block size or worker count). Because each part is sorted by group in the same global order, the
rows a part contributes to any destination range are one contiguous range of that part: a merge
block of about ``block_cells`` rows (cut at window boundaries) is one read per contributing part,
then an in-memory gather and shuffle. Memory is O(block + segment table), never O(dataset).

The store is assembled under ``<out>.tmp`` and renamed to ``<out>`` after the manifest is written,
so a reader never sees a half-written store. Per-array sha256 checksums of the bytes written go in
the manifest for ``verify``.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from perturbdiff.config import ShardConfig
from perturbdiff.data.csr import ranges_index, take_rows
from perturbdiff.data.schema import (
    CELL_ID, CONDITION_COLUMNS, CONDITIONS_FILE, GROUP_COLUMNS, N_GENES, OBS_GROUP, SCHEMA_VERSION, STORE_ATTR,
    TOTAL_COUNTS, VAR_GENE_ID, VAR_GENE_SYMBOL, VAR_GROUP, VAR_HVG_RANK, VAR_HVG_SCORE, X_ARRAYS, X_DATA, X_GROUP,
    X_INDICES, X_INDPTR, StoreManifest, file_sha256, group_sort_key, hash_update, obs_categories, obs_codes,
    obs_values,
)
from perturbdiff.outputs import commit_directory, remove_output

from . import hvg
from .parts import PartReader

# Cells are shuffled within each group (in windows of this many cells) so that runs of
# store-adjacent cells are random samples of the group; the set sampler reads sets as a few runs.
SHUFFLE_WINDOW = 1 << 13
SHUFFLE_SEED = 20260220
MERGE_FAULT_ENV = "PERTURBDIFF_FAULT_MERGE"  # "<point>:<index>": the merge SIGKILLs itself there (fault tests)

# Byte-shuffled LZ4 decompresses at GB/s, which is what random set reads need; zstd is ~2.5x
# smaller on counts but ~3x slower to decode; none is the fastest to read.
COMPRESSORS = {
    "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "zstd": BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "none": None,
}


class Appender:
    """Sequential writer of a 1-D Zarr array: writes only whole (shard-)aligned pieces, hashes bytes."""

    def __init__(self, array: zarr.Array, unit: int):
        self.array, self.unit, self.pos = array, unit, 0
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.sha = hashlib.sha256()

    def append(self, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values, dtype=self.array.dtype)
        hash_update(self.sha, values)
        self.pending.append(values)
        self.pending_len += len(values)
        if self.pending_len >= self.unit:
            buf = np.concatenate(self.pending)
            cut = (len(buf) // self.unit) * self.unit
            self._write(buf[:cut])
            self.pending, self.pending_len = [buf[cut:]], len(buf) - cut

    def _write(self, values: np.ndarray) -> None:
        if len(values):
            self.array[self.pos:self.pos + len(values)] = values
            self.pos += len(values)

    def close(self) -> str:
        if self.pending_len:
            self._write(np.concatenate(self.pending))
        self.pending, self.pending_len = [], 0
        assert self.pos == self.array.shape[0], (self.array.name, self.pos, self.array.shape)
        return self.sha.hexdigest()


def _array(root: zarr.Group, path: str, n: int, dtype, chunk: int, shard: int | None = None,
           compressor: str = "lz4"):
    """The 1-D array at ``path`` (a schema path, e.g. X_INDPTR) under ``root``; its group must exist."""
    parent, _, name = path.rpartition("/")
    chunk = max(1, min(chunk, max(n, 1)))
    kwargs = dict(shape=(n,), dtype=dtype, chunks=(chunk,), fill_value=None)
    if dtype is str:
        kwargs["fill_value"] = ""
    else:
        kwargs["compressors"] = COMPRESSORS[compressor]
    if shard is not None and n > chunk:
        kwargs["shards"] = (max(chunk, (shard // chunk) * chunk),)
    return (root[parent] if parent else root).create_array(name, **kwargs)


def _write_small(root: zarr.Group, path: str, values: np.ndarray, checksums: dict) -> None:
    dtype = str if values.dtype.kind in "OUS" else values.dtype
    arr = _array(root, path, len(values), dtype, 1 << 16)
    app = Appender(arr, max(len(values), 1))
    app.append(values.astype(str) if dtype is str else values)
    checksums[path] = {"shape": [len(values)], "dtype": str(arr.dtype), "sha256": app.close()}


@dataclass
class _Segments:
    """The global groups and the (part, group) segment table, in destination order.

    Segments are runs of one group's rows in one part; kept as numpy arrays (a part's string list
    is dropped as soon as it is converted) so the table stays small even with millions of them.
    """

    keys: list[tuple[str, str, str]]  # the groups, in global order (schema.group_sort_key)
    group: np.ndarray  # int64 [S] group index of each segment
    part: np.ndarray  # int64 [S] part index
    count: np.ndarray  # int64 [S] cells
    nnz: np.ndarray  # int64 [S] nonzeros
    src: np.ndarray  # int64 [S] first row inside its part
    dst: np.ndarray  # int64 [S] first row in the store

    @property
    def end(self) -> np.ndarray:
        return self.dst + self.count

    def group_sizes(self) -> np.ndarray:
        return np.bincount(self.group, weights=self.count, minlength=len(self.keys)).astype(np.int64)


def _segments(readers: list[PartReader]) -> _Segments:
    key_index: dict[tuple[str, str, str], int] = {}
    group_parts, part_parts, count_parts, nnz_parts = [], [], [], []
    for p, r in enumerate(readers):
        segs = r.meta.pop("segments")
        group_parts.append(np.fromiter((key_index.setdefault(group_sort_key(c, b, q), len(key_index))
                                        for c, b, q, _, _ in segs), dtype=np.int64, count=len(segs)))
        count_parts.append(np.fromiter((k for _, _, _, k, _ in segs), dtype=np.int64, count=len(segs)))
        nnz_parts.append(np.fromiter((z for *_, z in segs), dtype=np.int64, count=len(segs)))
        part_parts.append(np.full(len(segs), p, dtype=np.int64))
        del segs
    keys = sorted(key_index)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[[key_index[k] for k in keys]] = np.arange(len(keys))
    del key_index

    def cat(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays) if arrays else np.zeros(0, np.int64)

    group, part, count, nnz = rank[cat(group_parts)], cat(part_parts), cat(count_parts), cat(nnz_parts)
    # rows of each segment inside its part (segments are in part order here, each part's in its own
    # group order)
    part_first = np.searchsorted(part, part, side="left")
    csum = np.cumsum(count) - count
    src = csum - csum[part_first]
    order = np.lexsort((part, group))
    group, part, count, src, nnz = (a[order] for a in (group, part, count, src, nnz))
    dst = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return _Segments(keys, group, part, count, nnz, src, dst)


@dataclass
class _ObsColumns:
    """The extra obs columns of the parts, their global categories and each part's code remap."""

    categorical: list[str]
    numeric: list[str]
    categories: dict[str, list[str]]  # categorical and group columns -> sorted labels
    remap: list[dict[str, np.ndarray]]  # per part: column -> part code -> global code
    group_codes: np.ndarray  # int32 [groups, 3] codes of each group's context / batch / perturbation


def _obs_columns(readers: list[PartReader], keys: list[tuple[str, str, str]]) -> _ObsColumns:
    cat_cols = sorted({c for r in readers for c in r.meta["categories"]})
    num_cols = sorted({c for r in readers for c in r.meta["numeric"]})
    for r in readers:
        if sorted(r.meta["categories"]) != cat_cols or sorted(r.meta["numeric"]) != num_cols:
            raise ValueError(f"part {r.dir} has different obs columns than the others")
    categories = {c: sorted({v for r in readers for v in r.meta["categories"][c]}) for c in cat_cols}
    remap = [{c: np.searchsorted(categories[c], r.meta["categories"][c]).astype(np.int32)
              for c in cat_cols} for r in readers]
    for i, c in enumerate(GROUP_COLUMNS):
        categories[c] = sorted({k[i] for k in keys})
    gcode = {c: {v: i for i, v in enumerate(categories[c])} for c in GROUP_COLUMNS}
    group_codes = np.array([[gcode[c][k[i]] for i, c in enumerate(GROUP_COLUMNS)] for k in keys],
                           dtype=np.int32).reshape(len(keys), 3)
    return _ObsColumns(cat_cols, num_cols, categories, remap, group_codes)


def _create_store(tmp: Path, cfg: ShardConfig, n_cells: int, nnz: int, obs: _ObsColumns
                  ) -> tuple[zarr.Group, dict[str, Appender]]:
    """The empty store under ``tmp`` and an Appender for every array the blocks fill."""
    remove_output(tmp, "store")  # a merge interrupted earlier (only ever our own)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    root.attrs[STORE_ATTR] = SCHEMA_VERSION
    for group in (X_GROUP, OBS_GROUP, VAR_GROUP):
        root.create_group(group)
    cc = cfg.chunk_cells

    def cells(path: str, dtype) -> Appender:  # one value per cell
        return Appender(_array(root, path, n_cells, dtype, cc), cc)

    app = {
        X_INDPTR: Appender(_array(root, X_INDPTR, n_cells + 1, X_ARRAYS[X_INDPTR], cc, compressor=cfg.compressor), cc),
        **{path: Appender(_array(root, path, nnz, X_ARRAYS[path], cfg.chunk_nnz, cfg.shard_nnz, cfg.compressor),
                          cfg.shard_nnz) for path in (X_INDICES, X_DATA)},
        obs_values(CELL_ID): cells(obs_values(CELL_ID), str),
        obs_values(TOTAL_COUNTS): cells(obs_values(TOTAL_COUNTS), "float64"),
        obs_values(N_GENES): cells(obs_values(N_GENES), "int32"),
    }
    for c in GROUP_COLUMNS + tuple(obs.categorical):
        root[OBS_GROUP].create_group(c)
        app[obs_codes(c)] = cells(obs_codes(c), "int32")
    for c in obs.numeric:
        app[obs_values(c)] = cells(obs_values(c), "float64")
    app[X_INDPTR].append(np.zeros(1, dtype=np.int64))
    return root, app


@dataclass
class _Units:
    """Shuffle units: each group's rows in windows of SHUFFLE_WINDOW cells from its start."""

    group: np.ndarray  # int64 [U]
    window: np.ndarray  # int64 [U] window index within its group
    start: np.ndarray  # int64 [U] first store row
    stop: np.ndarray  # int64 [U]


def _shuffle_units(seg: _Segments) -> _Units:
    g_n = seg.group_sizes()
    g_start = np.concatenate([[0], np.cumsum(g_n)[:-1]]).astype(np.int64)
    per_group = (g_n + SHUFFLE_WINDOW - 1) // SHUFFLE_WINDOW
    group = np.repeat(np.arange(len(seg.keys)), per_group)
    window = np.arange(len(group)) - np.repeat(np.cumsum(per_group) - per_group, per_group)
    start = g_start[group] + window * SHUFFLE_WINDOW
    stop = np.minimum(start + SHUFFLE_WINDOW, g_start[group] + g_n[group])
    return _Units(group, window, start, stop)


def _block_bounds(seg: _Segments, units: _Units, n_cells: int, cfg: ShardConfig) -> list[int]:
    """Block ends: the last shuffle-unit boundary within block_cells cells and block_nnz nonzeros of
    the block start (at least one unit). Blocks end on unit boundaries, so the within-unit shuffle
    does not depend on block_cells. Nonzeros before a unit start are exact when the unit starts a
    group (groups are whole segments) and interpolated within a segment otherwise."""
    nnz_start = np.cumsum(seg.nnz) - seg.nnz
    s_of = np.maximum(np.searchsorted(seg.dst, units.start, side="right") - 1, 0)
    unit_nnz = nnz_start[s_of] + (units.start - seg.dst[s_of]) * seg.nnz[s_of] / np.maximum(seg.count[s_of], 1)
    unit_nnz = np.append(unit_nnz, float(seg.nnz.sum()))
    unit_edges = np.append(units.start, n_cells)
    bounds, u = [0], 0
    while bounds[-1] < n_cells:
        by_nnz = int(np.searchsorted(unit_nnz, unit_nnz[u] + max(1, cfg.block_nnz), side="right")) - 1
        by_cells = int(np.searchsorted(unit_edges, unit_edges[u] + max(1, cfg.block_cells), side="right")) - 1
        u = max(u + 1, min(by_nnz, by_cells))
        bounds.append(int(unit_edges[u]))
    return bounds


class _GroupNumeric:
    """Per-group sum, min and max of each numeric obs column, accumulated block by block."""

    def __init__(self, columns: list[str], num_groups: int):
        self.sums = {c: np.zeros(num_groups) for c in columns}
        self.min = {c: np.full(num_groups, np.inf) for c in columns}
        self.max = {c: np.full(num_groups, -np.inf) for c in columns}

    def update(self, col: str, grp: np.ndarray, values: np.ndarray) -> None:
        self.sums[col] += np.bincount(grp, weights=values, minlength=len(self.sums[col]))
        if len(grp):  # rows are in group order: one reduceat per group run
            runs = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]])
            np.minimum.at(self.min[col], grp[runs], np.minimum.reduceat(values, runs))
            np.maximum.at(self.max[col], grp[runs], np.maximum.reduceat(values, runs))

    def values(self, col: str, g_n: np.ndarray) -> np.ndarray:
        """Each group's value: its cells' value if they share one, else the mean."""
        mean = self.sums[col] / np.maximum(g_n, 1)
        return np.where(self.min[col] == self.max[col], self.min[col], mean)


def _merge_block(a: int, b: int, seg: _Segments, units: _Units, readers: list[PartReader], obs: _ObsColumns,
                 app: dict[str, Appender], numeric: _GroupNumeric, clipped, nnz_done: int) -> int:
    """Store rows [a, b): one contiguous read per contributing part, the gather and the
    within-unit shuffle, appended to every array. Returns the nonzeros written so far."""
    s0 = int(np.searchsorted(seg.end, a, side="right"))
    s1 = int(np.searchsorted(seg.dst, b, side="left"))
    sl = slice(s0, s1)
    lo = np.maximum(seg.dst[sl], a)
    hi = np.minimum(seg.end[sl], b)
    src_lo = seg.src[sl] + (lo - seg.dst[sl])
    parts_here = seg.part[sl]
    bufs, base, row_base = {}, {}, 0
    for p in np.unique(parts_here):
        m = parts_here == p
        r0, r1 = int(src_lo[m].min()), int((src_lo[m] + (hi[m] - lo[m])).max())
        bufs[p] = readers[p].rows(r0, r1)
        base[p] = (r0, row_base)
        row_base += r1 - r0
    plist = list(bufs)
    cat_indptr = np.zeros(row_base + 1, dtype=np.int64)
    off_rows, off_nnz = 0, 0
    for p in plist:
        ip = bufs[p]["indptr"]
        cat_indptr[off_rows + 1:off_rows + len(ip)] = ip[1:] + off_nnz
        off_rows += len(ip) - 1
        off_nnz += int(ip[-1])
    cat_indices = np.concatenate([bufs[p]["indices"] for p in plist])
    cat_data = np.concatenate([bufs[p]["data"] for p in plist])
    starts = np.array([base[p][1] + (s - base[p][0]) for p, s in zip(parts_here, src_lo)], dtype=np.int64)
    rows = ranges_index(starts, hi - lo)
    u0, u1 = np.searchsorted(units.start, [a, b], side="left")
    for u in range(u0, u1):
        piece = slice(int(units.start[u]) - a, int(units.stop[u]) - a)
        perm = np.random.default_rng([SHUFFLE_SEED, int(units.group[u]), int(units.window[u])]).permutation(
            piece.stop - piece.start)
        rows[piece] = rows[piece][perm]
    indptr, gather = take_rows(cat_indptr, rows)
    indices, data = cat_indices[gather], cat_data[gather]

    app[X_INDPTR].append(indptr[1:] + nnz_done)
    app[X_INDICES].append(indices)
    app[X_DATA].append(data)
    row_nnz = np.diff(indptr)
    app[obs_values(N_GENES)].append(row_nnz.astype(np.int32))
    tot = np.zeros(len(rows))
    nz = row_nnz > 0
    if len(data):
        tot[nz] = np.add.reduceat(data.astype(np.float64), indptr[:-1][nz])
    app[obs_values(TOTAL_COUNTS)].append(tot)
    app[obs_values(CELL_ID)].append(np.concatenate([bufs[p]["cell_id"] for p in plist])[rows].astype(str))
    for c in obs.categorical:
        codes = np.concatenate([obs.remap[p][c][bufs[p]["categorical"][c]] for p in plist])
        app[obs_codes(c)].append(codes[rows])
    grp = np.repeat(seg.group[sl], hi - lo)
    for c in obs.numeric:
        values = np.concatenate([bufs[p]["numeric"][c] for p in plist])[rows]
        app[obs_values(c)].append(values)
        numeric.update(c, grp, values)
    for i, c in enumerate(GROUP_COLUMNS):
        app[obs_codes(c)].append(obs.group_codes[grp, i])
    if clipped is not None:
        clipped.update(indices, data)
    return nnz_done + int(indptr[-1])


def _conditions(seg: _Segments, numeric: _GroupNumeric, control_perts: set[str]) -> pd.DataFrame:
    """conditions.parquet: one row per group, its row range and its numeric covariates."""
    keys = seg.keys
    g_n = seg.group_sizes()
    g_start = np.zeros(len(keys), dtype=np.int64)
    g_start[1:] = np.cumsum(g_n)[:-1]
    conditions = pd.DataFrame({
        "group_id": np.arange(len(keys), dtype=np.int64),
        "context": [k[0] for k in keys],
        "batch": [k[1] for k in keys],
        "perturbation": [k[2] for k in keys],
        "is_control": np.array([k[2] in control_perts for k in keys], dtype=bool),
        "start": g_start,
        "stop": g_start + g_n,
        "n": g_n,
    })[list(CONDITION_COLUMNS)]
    for c in numeric.sums:
        conditions[c] = numeric.values(c, g_n)
    return conditions


def merge_parts(part_dirs: list[Path], out: Path, *, gene_ids: np.ndarray, gene_symbols: np.ndarray,
                cfg: ShardConfig, sources: list[dict], value_kind: str, flavor: str, extra: dict | None = None,
                log: Callable[[str], None] = print) -> StoreManifest:
    """Write the store at ``out`` from finished parts; returns its manifest."""
    t0 = time.time()
    extra = dict(extra or {})
    readers = [PartReader(p) for p in part_dirs]
    num_genes = len(gene_ids)

    # ---- global groups, categories and the segment table ---------------------------------
    seg = _segments(readers)
    n_cells = int(seg.count.sum())
    nnz_total = sum(r.meta["nnz"] for r in readers)
    obs = _obs_columns(readers, seg.keys)

    # ---- HVG statistics (first pass came with the parts) ----------------------------------
    stats = hvg.combine_stats([r.stats() for r in readers])
    clipped = hvg.ClippedMoments(stats) if flavor == "seurat_v3" else None

    # ---- create the store under a temporary name ------------------------------------------
    tmp = out.with_name(out.name + ".tmp")
    root, app = _create_store(tmp, cfg, n_cells, nnz_total, obs)

    # ---- stream blocks ----------------------------------------------------------------------
    units = _shuffle_units(seg)
    bounds = _block_bounds(seg, units, n_cells, cfg)
    numeric = _GroupNumeric(obs.numeric, len(seg.keys))
    nnz_done = 0
    for bi in range(len(bounds) - 1):
        nnz_done = _merge_block(bounds[bi], bounds[bi + 1], seg, units, readers, obs, app, numeric, clipped,
                                nnz_done)
        _fault_point("merge_block", bi)
        log(f"  merged block {bi + 1}/{len(bounds) - 1} ({bounds[bi + 1]:,}/{n_cells:,} cells)")
    checksums = {name: {"shape": list(a.array.shape), "dtype": str(a.array.dtype), "sha256": a.close()}
                 for name, a in app.items()}
    for c in GROUP_COLUMNS + tuple(obs.categorical):
        _write_small(root, obs_categories(c), np.array(obs.categories[c], dtype=str), checksums)

    # ---- var, HVG, conditions ---------------------------------------------------------------
    scores, ranking = hvg.select(flavor, stats, clipped, cfg.hvg.num_bins)
    rank = np.empty(num_genes, dtype=np.int32)
    rank[ranking] = np.arange(num_genes, dtype=np.int32)
    for key, values in ((VAR_GENE_ID, np.asarray(gene_ids).astype(str)),
                        (VAR_GENE_SYMBOL, np.asarray(gene_symbols).astype(str)),
                        (VAR_HVG_RANK, rank),
                        (VAR_HVG_SCORE, np.nan_to_num(scores, nan=-np.inf).astype(np.float64))):
        _write_small(root, key, values, checksums)

    control_perts = set(extra.get("control_perturbations", []))
    conditions = _conditions(seg, numeric, control_perts)
    conditions.to_parquet(tmp / CONDITIONS_FILE, index=False)
    checksums[CONDITIONS_FILE] = {"sha256": file_sha256(tmp / CONDITIONS_FILE)}

    # ---- manifest, then the store is renamed into place ------------------------------------
    num_top = min(cfg.hvg.num_top_genes, num_genes)
    manifest = StoreManifest(
        dataset=cfg.dataset, value_kind=value_kind, num_cells=n_cells, num_genes=num_genes, nnz=nnz_total,
        num_groups=len(seg.keys), num_control_groups=int(conditions["is_control"].sum()),
        categorical_obs=list(GROUP_COLUMNS) + obs.categorical,
        numeric_obs=[TOTAL_COUNTS, N_GENES] + obs.numeric,
        control_perturbations=sorted(control_perts),
        hvg={"flavor": flavor, "num_top_genes": num_top, "genes": [str(gene_ids[i]) for i in ranking[:num_top]]},
        gene_panel={"num_genes": num_genes, "id_kind": extra.get("gene_id_kind", "symbol")},
        sources=sources, arrays=checksums,
        layout={"chunk_nnz": cfg.chunk_nnz, "shard_nnz": cfg.shard_nnz, "chunk_cells": cfg.chunk_cells,
                "compressor": cfg.compressor},
        extra=extra,
    )
    manifest.write(tmp)
    commit_directory(tmp, out, "store")  # replaces only an earlier store (--overwrite)
    log(f"wrote {out} ({n_cells:,} cells, {len(seg.keys):,} groups, {nnz_total:,} nonzeros) "
        f"in {time.time() - t0:.1f}s")
    return manifest


def _fault_point(name: str, index: int) -> None:
    """Test hook: ``PERTURBDIFF_FAULT_MERGE=merge_block:1`` kills the process after that block."""
    spec = os.environ.get(MERGE_FAULT_ENV)
    if spec and spec == f"{name}:{index}":
        os._exit(17)
