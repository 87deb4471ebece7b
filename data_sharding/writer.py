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
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import BloscCodec

from perturbdiff.config import ShardConfig
from perturbdiff.data.schema import (
    CELL_ID, CONDITION_COLUMNS, CONDITIONS_FILE, DTYPES, GROUP_COLUMNS, MANIFEST_FILE, N_GENES,
    OBS_GROUP, SCHEMA_VERSION, STORE_ATTR, TOTAL_COUNTS, VAR_GROUP, X_GROUP, file_sha256, hash_update,
)

from perturbdiff.outputs import commit_directory, remove_output

from . import hvg
from perturbdiff.data.csr import ranges_index, take_rows

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


def _array(group: zarr.Group, name: str, n: int, dtype, chunk: int, shard: int | None = None,
           compressor: str = "lz4"):
    chunk = max(1, min(chunk, max(n, 1)))
    kwargs = dict(shape=(n,), dtype=dtype, chunks=(chunk,), fill_value=None)
    if dtype is str:
        kwargs["fill_value"] = ""
    else:
        kwargs["compressors"] = COMPRESSORS[compressor]
    if shard is not None and n > chunk:
        kwargs["shards"] = (max(chunk, (shard // chunk) * chunk),)
    return group.create_array(name, **kwargs)


def _write_small(group: zarr.Group, name: str, values: np.ndarray, checksums: dict, key: str) -> None:
    dtype = str if values.dtype.kind in "OUS" else values.dtype
    arr = _array(group, name, len(values), dtype, 1 << 16)
    app = Appender(arr, max(len(values), 1))
    app.append(values.astype(str) if dtype is str else values)
    checksums[key] = {"shape": [len(values)], "dtype": str(arr.dtype), "sha256": app.close()}


def merge_parts(part_dirs: list[Path], out: Path, *, gene_ids: np.ndarray, gene_symbols: np.ndarray,
                cfg: ShardConfig, sources: list[dict], value_kind: str, flavor: str, extra: dict | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Write the store at ``out`` from finished parts; returns the manifest."""
    t0 = time.time()
    readers = [PartReader(p) for p in part_dirs]
    num_genes = len(gene_ids)

    # ---- global groups, categories and the segment table ---------------------------------
    # Segments are (part, group) runs; kept as numpy arrays (a part's string list is dropped as
    # soon as it is converted) so the table stays small even with millions of segments.
    key_index: dict[tuple[str, str, str], int] = {}
    seg_group_parts, seg_part_parts, seg_count_parts, seg_nnz_parts = [], [], [], []
    for p, r in enumerate(readers):
        segs = r.meta.pop("segments")
        seg_group_parts.append(np.fromiter((key_index.setdefault((c, b, q), len(key_index)) for c, b, q, _, _ in segs),
                                           dtype=np.int64, count=len(segs)))
        seg_count_parts.append(np.fromiter((k for _, _, _, k, _ in segs), dtype=np.int64, count=len(segs)))
        seg_nnz_parts.append(np.fromiter((z for *_, z in segs), dtype=np.int64, count=len(segs)))
        seg_part_parts.append(np.full(len(segs), p, dtype=np.int64))
        del segs
    keys = sorted(key_index)
    rank = np.empty(len(keys), dtype=np.int64)
    rank[[key_index[k] for k in keys]] = np.arange(len(keys))
    del key_index
    seg_group = rank[np.concatenate(seg_group_parts)] if seg_group_parts else np.zeros(0, np.int64)
    seg_part = np.concatenate(seg_part_parts) if seg_part_parts else np.zeros(0, np.int64)
    seg_count = np.concatenate(seg_count_parts) if seg_count_parts else np.zeros(0, np.int64)
    seg_nnz = np.concatenate(seg_nnz_parts) if seg_nnz_parts else np.zeros(0, np.int64)
    del seg_group_parts, seg_part_parts, seg_count_parts, seg_nnz_parts
    # rows of each segment inside its part
    # (segments are in part order here, each part's in its own group order)
    part_first = np.searchsorted(seg_part, seg_part, side="left")
    csum = np.cumsum(seg_count) - seg_count
    seg_src = csum - csum[part_first]
    order = np.lexsort((seg_part, seg_group))
    seg_group, seg_part, seg_count, seg_src, seg_nnz = (a[order] for a in (seg_group, seg_part, seg_count, seg_src,
                                                                            seg_nnz))
    seg_dst = np.concatenate([[0], np.cumsum(seg_count)[:-1]]).astype(np.int64)
    n_cells = int(seg_count.sum())
    nnz_total = sum(r.meta["nnz"] for r in readers)

    cat_cols = sorted({c for r in readers for c in r.meta["categories"]})
    num_cols = sorted({c for r in readers for c in r.meta["numeric"]})
    for r in readers:
        if sorted(r.meta["categories"]) != cat_cols or sorted(r.meta["numeric"]) != num_cols:
            raise ValueError(f"part {r.dir} has different obs columns than the others")
    categories = {c: sorted({v for r in readers for v in r.meta["categories"][c]}) for c in cat_cols}
    remap = [{c: np.searchsorted(categories[c], r.meta["categories"][c]).astype(np.int32)
              for c in cat_cols} for r in readers]
    group_cats = {c: sorted({k[i] for k in keys}) for i, c in enumerate(GROUP_COLUMNS)}
    gcode = {c: {v: i for i, v in enumerate(group_cats[c])} for c in GROUP_COLUMNS}
    group_code_table = np.array([[gcode[c][k[i]] for i, c in enumerate(GROUP_COLUMNS)] for k in keys],
                                dtype=np.int32).reshape(len(keys), 3)

    # ---- HVG statistics (first pass came with the parts) ----------------------------------
    stats = hvg.combine_stats([r.stats() for r in readers])
    clipped = hvg.ClippedMoments(stats) if flavor == "seurat_v3" else None

    # ---- create the store under a temporary name ------------------------------------------
    tmp = out.with_name(out.name + ".tmp")
    remove_output(tmp, "store")  # a merge interrupted earlier (only ever our own)
    root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    root.attrs[STORE_ATTR] = SCHEMA_VERSION
    xg, og, vg = root.create_group(X_GROUP), root.create_group(OBS_GROUP), root.create_group(VAR_GROUP)
    cc = cfg.chunk_cells
    app = {
        "X/indptr": Appender(_array(xg, "indptr", n_cells + 1, DTYPES["indptr"], cc,
                                    compressor=cfg.compressor), cc),
        "X/indices": Appender(_array(xg, "indices", nnz_total, DTYPES["indices"], cfg.chunk_nnz, cfg.shard_nnz,
                                     cfg.compressor), cfg.shard_nnz),
        "X/data": Appender(_array(xg, "data", nnz_total, DTYPES["data"], cfg.chunk_nnz, cfg.shard_nnz,
                                  cfg.compressor), cfg.shard_nnz),
        f"obs/{CELL_ID}": Appender(_array(og, CELL_ID, n_cells, str, cc), cc),
        f"obs/{TOTAL_COUNTS}": Appender(_array(og, TOTAL_COUNTS, n_cells, "float64", cc), cc),
        f"obs/{N_GENES}": Appender(_array(og, N_GENES, n_cells, "int32", cc), cc),
    }
    for c in GROUP_COLUMNS + tuple(cat_cols):
        sub = og.create_group(c)
        app[f"obs/{c}/codes"] = Appender(_array(sub, "codes", n_cells, "int32", cc), cc)
    for c in num_cols:
        app[f"obs/{c}"] = Appender(_array(og, c, n_cells, "float64", cc), cc)
    app["X/indptr"].append(np.zeros(1, dtype=np.int64))
    group_sums = {c: np.zeros(len(keys)) for c in num_cols}  # -> per-group values (e.g. dose)
    group_min = {c: np.full(len(keys), np.inf) for c in num_cols}
    group_max = {c: np.full(len(keys), -np.inf) for c in num_cols}

    # ---- stream blocks ----------------------------------------------------------------------
    seg_end = seg_dst + seg_count
    nnz_done = 0
    # Shuffle units: each group's rows in windows of SHUFFLE_WINDOW cells from its start. Blocks end
    # on unit boundaries, so the within-unit shuffle does not depend on block_cells.
    g_n_all = np.bincount(seg_group, weights=seg_count, minlength=len(keys)).astype(np.int64)
    g_start_all = np.concatenate([[0], np.cumsum(g_n_all)[:-1]]).astype(np.int64)
    per_group = (g_n_all + SHUFFLE_WINDOW - 1) // SHUFFLE_WINDOW
    unit_group = np.repeat(np.arange(len(keys)), per_group)
    unit_w = np.arange(len(unit_group)) - np.repeat(np.cumsum(per_group) - per_group, per_group)
    unit_start = g_start_all[unit_group] + unit_w * SHUFFLE_WINDOW
    unit_stop = np.minimum(unit_start + SHUFFLE_WINDOW, g_start_all[unit_group] + g_n_all[unit_group])
    # Block ends: the last shuffle-unit boundary within block_cells cells and block_nnz nonzeros of
    # the block start (at least one unit). Nonzeros before a unit start are exact when the unit
    # starts a group (groups are whole segments) and interpolated within a segment otherwise.
    seg_nnz_start = np.cumsum(seg_nnz) - seg_nnz
    s_of = np.maximum(np.searchsorted(seg_dst, unit_start, side="right") - 1, 0)
    unit_nnz = seg_nnz_start[s_of] + (unit_start - seg_dst[s_of]) * seg_nnz[s_of] / np.maximum(seg_count[s_of], 1)
    unit_nnz = np.append(unit_nnz, float(seg_nnz.sum()))
    unit_edges = np.append(unit_start, n_cells)
    bounds, u = [0], 0
    while bounds[-1] < n_cells:
        by_nnz = int(np.searchsorted(unit_nnz, unit_nnz[u] + max(1, cfg.block_nnz), side="right")) - 1
        by_cells = int(np.searchsorted(unit_edges, unit_edges[u] + max(1, cfg.block_cells), side="right")) - 1
        u = max(u + 1, min(by_nnz, by_cells))
        bounds.append(int(unit_edges[u]))
    n_blocks = len(bounds) - 1
    for bi in range(n_blocks):
        a, b = bounds[bi], bounds[bi + 1]
        s0 = int(np.searchsorted(seg_end, a, side="right"))
        s1 = int(np.searchsorted(seg_dst, b, side="left"))
        sl = slice(s0, s1)
        lo = np.maximum(seg_dst[sl], a)
        hi = np.minimum(seg_end[sl], b)
        src_lo = seg_src[sl] + (lo - seg_dst[sl])
        parts_here = seg_part[sl]
        # one contiguous read per part
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
        u0, u1 = np.searchsorted(unit_start, [a, b], side="left")
        for u in range(u0, u1):
            piece = slice(int(unit_start[u]) - a, int(unit_stop[u]) - a)
            perm = np.random.default_rng([SHUFFLE_SEED, int(unit_group[u]), int(unit_w[u])]).permutation(
                piece.stop - piece.start)
            rows[piece] = rows[piece][perm]
        indptr, gather = take_rows(cat_indptr, rows)
        indices, data = cat_indices[gather], cat_data[gather]

        app["X/indptr"].append(indptr[1:] + nnz_done)
        app["X/indices"].append(indices)
        app["X/data"].append(data)
        nnz_done += int(indptr[-1])
        row_nnz = np.diff(indptr)
        app[f"obs/{N_GENES}"].append(row_nnz.astype(np.int32))
        tot = np.zeros(len(rows))
        nz = row_nnz > 0
        if len(data):
            tot[nz] = np.add.reduceat(data.astype(np.float64), indptr[:-1][nz])
        app[f"obs/{TOTAL_COUNTS}"].append(tot)
        app[f"obs/{CELL_ID}"].append(np.concatenate([bufs[p]["cell_id"] for p in plist])[rows].astype(str))
        for c in cat_cols:
            codes = np.concatenate([remap[p][c][bufs[p]["categorical"][c]] for p in plist])
            app[f"obs/{c}/codes"].append(codes[rows])
        grp = np.repeat(seg_group[sl], hi - lo)
        for c in num_cols:
            values = np.concatenate([bufs[p]["numeric"][c] for p in plist])[rows]
            app[f"obs/{c}"].append(values)
            group_sums[c] += np.bincount(grp, weights=values, minlength=len(keys))
            if len(grp):  # rows are in group order: one reduceat per group run
                runs = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]])
                np.minimum.at(group_min[c], grp[runs], np.minimum.reduceat(values, runs))
                np.maximum.at(group_max[c], grp[runs], np.maximum.reduceat(values, runs))
        for i, c in enumerate(GROUP_COLUMNS):
            app[f"obs/{c}/codes"].append(group_code_table[grp, i])
        if clipped is not None:
            clipped.update(indices, data)
        _fault_point("merge_block", bi)
        log(f"  merged block {bi + 1}/{n_blocks} ({b:,}/{n_cells:,} cells)")

    checksums = {name: {"shape": list(a.array.shape), "dtype": str(a.array.dtype), "sha256": a.close()}
                 for name, a in app.items()}
    for c in GROUP_COLUMNS + tuple(cat_cols):
        cats = np.array(group_cats[c] if c in GROUP_COLUMNS else categories[c], dtype=str)
        _write_small(og[c], "categories", cats, checksums, f"obs/{c}/categories")

    # ---- var, HVG, conditions ---------------------------------------------------------------
    scores, ranking = hvg.select(flavor, stats, clipped, cfg.hvg.num_bins)
    rank = np.empty(num_genes, dtype=np.int32)
    rank[ranking] = np.arange(num_genes, dtype=np.int32)
    _write_small(vg, "gene_id", np.asarray(gene_ids).astype(str), checksums, "var/gene_id")
    _write_small(vg, "gene_symbol", np.asarray(gene_symbols).astype(str), checksums, "var/gene_symbol")
    _write_small(vg, "hvg_rank", rank, checksums, "var/hvg_rank")
    _write_small(vg, "hvg_score", np.nan_to_num(scores, nan=-np.inf).astype(np.float64), checksums,
                 "var/hvg_score")

    control_perts = set((extra or {}).get("control_perturbations", []))
    g_start = np.zeros(len(keys), dtype=np.int64)
    g_n = np.bincount(seg_group, weights=seg_count, minlength=len(keys)).astype(np.int64)
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
    for c in num_cols:  # numeric covariates of each group: its cells' value if they share one, else the mean
        mean = group_sums[c] / np.maximum(g_n, 1)
        conditions[c] = np.where(group_min[c] == group_max[c], group_min[c], mean)
    conditions.to_parquet(tmp / CONDITIONS_FILE, index=False)
    checksums[CONDITIONS_FILE] = {"sha256": file_sha256(tmp / CONDITIONS_FILE)}

    num_top = min(cfg.hvg.num_top_genes, num_genes)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "format": "perturbdiff-store",
        "dataset": cfg.dataset,
        "value_kind": value_kind,
        "num_cells": n_cells,
        "num_genes": num_genes,
        "nnz": nnz_total,
        "num_groups": len(keys),
        "num_control_groups": int(conditions["is_control"].sum()),
        "group_columns": list(GROUP_COLUMNS),
        "categorical_obs": list(GROUP_COLUMNS) + cat_cols,
        "numeric_obs": [TOTAL_COUNTS, N_GENES] + num_cols,
        "control_perturbations": sorted(control_perts),
        "hvg": {"flavor": flavor, "num_top_genes": num_top,
                "genes": [str(gene_ids[i]) for i in ranking[:num_top]]},
        "gene_panel": {"num_genes": num_genes, "id_kind": (extra or {}).get("gene_id_kind", "symbol")},
        "sources": sources,
        "arrays": checksums,
        "layout": {"chunk_nnz": cfg.chunk_nnz, "shard_nnz": cfg.shard_nnz, "chunk_cells": cfg.chunk_cells,
                   "compressor": cfg.compressor},
    }
    manifest.update({k: v for k, v in (extra or {}).items() if k not in manifest})
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    commit_directory(tmp, out, "store")  # replaces only an earlier store (--overwrite)
    log(f"wrote {out} ({n_cells:,} cells, {len(keys):,} groups, {nnz_total:,} nonzeros) "
        f"in {time.time() - t0:.1f}s")
    return manifest



def _fault_point(name: str, index: int) -> None:
    """Test hook: ``PERTURBDIFF_FAULT_MERGE=merge_block:1`` kills the process after that block."""
    spec = os.environ.get(MERGE_FAULT_ENV)
    if spec and spec == f"{name}:{index}":
        os._exit(17)
