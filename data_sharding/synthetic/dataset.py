"""A synthetic single-cell perturbation dataset in the exact Tahoe-100M parquet format, with known answers.

``generate(cfg)`` writes, under ``cfg.out_dir``::

    data/train-{i:05d}-of-{n:05d}.parquet     the cells: the 10 Tahoe columns, marker first in every row
    metadata/gene_metadata.parquet            token_id, ensembl_id, gene_symbol (token ids are NOT row + 3)
    metadata/drug_metadata.parquet            one row per drug, DMSO_TF included
    metadata/sample_metadata.parquet          one row per well: sample, plate, drug, drugname_drugconc
    metadata/cell_line_metadata.parquet       cell_line_id, cell_name
    ground_truth/                             the generating parameters and true effects (see its README.md)
    synthetic.h5ad                            only with cfg.write_h5ad: the same cells as an AnnData file

This module is the public API (``generate``, ``load_ground_truth``, and ``write_h5ad`` re-exported), the config
checks, the parquet, metadata and ground-truth writing, and the orchestration (files, workers, resuming). The
biological model (hidden constants, parameter drawing, per-cell count sampling) is in
``biology.py`` beside this file; the h5ad twin's writer is in ``h5ad.py``. The directory layout is the Tahoe release's,
defined once in ``perturbdiff/data/schema.py`` (``TAHOE_DATA_DIR``, ``TAHOE_METADATA_DIR``, the table names), which
the Tahoe reader (``data_sharding/tahoe.py``) reads.

Determinism: the global parameters come from ``cfg.seed``; each file's cells come from a generator seeded with
``(cfg.seed, file index)``, so the output is identical whatever ``num_workers`` is. Files are written under a
temporary name and renamed when complete; a rerun skips complete files (resumable).

Memory is bounded by one chunk of a few thousand dense cells per worker, whatever ``num_cells`` is: the cell ->
(well, line) assignment is computed per file from closed formulas, never for the whole dataset.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from perturbdiff.config import SynthConfig
from perturbdiff.data import schema
from perturbdiff.data.schema import DataError

from ..pool import run_parallel
from .biology import (BIOLOGY, baseline_logits, build_params, condition_effect, drug_columns, file_cells, hill_at,
                      log_softmax, sample_chunk, sampling_arrays, well_columns)
from .h5ad import write_h5ad

GENERATOR_VERSION = 1

TRUTH_DIR = "ground_truth"
H5AD_NAME = "synthetic.h5ad"

PARQUET_SCHEMA = pa.schema([
    ("genes", pa.list_(pa.int64())), ("expressions", pa.list_(pa.float32())), ("drug", pa.string()),
    ("sample", pa.string()), ("BARCODE_SUB_LIB_ID", pa.string()), ("cell_line_id", pa.string()),
    ("moa-fine", pa.string()), ("canonical_smiles", pa.string()), ("pubchem_cid", pa.string()), ("plate", pa.string()),
])
assert tuple(PARQUET_SCHEMA.names) == schema.TAHOE_COLUMNS

# Config fields that do not change the content of the output.
_NON_CONTENT_FIELDS = ("out_dir", "num_workers", "write_h5ad")


# ---------------------------------------------------------------------------------------------
# Config checks and atomic writes
# ---------------------------------------------------------------------------------------------


def _content_config(cfg: SynthConfig) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    for key in _NON_CONTENT_FIELDS:
        d.pop(key, None)
    d["doses"] = [float(x) for x in d["doses"]]
    return d


def _check_config(cfg: SynthConfig) -> None:
    problems = []
    for name in ("num_cells", "num_genes", "num_cell_lines", "num_plates", "cells_per_file", "row_group_size"):
        if int(getattr(cfg, name)) < 1:
            problems.append(f"{name} must be >= 1")
    if cfg.num_drugs < 0 or cfg.control_wells_per_plate < 0 or cfg.num_programs < 1:
        problems.append("num_drugs and control_wells_per_plate must be >= 0, num_programs >= 1")
    if cfg.num_drugs > 0 and not cfg.doses:
        problems.append("doses is empty")
    if any(float(x) <= 0 for x in cfg.doses):
        problems.append("doses must be > 0 (the control has dose 0)")
    if len(set(float(x) for x in cfg.doses)) != len(cfg.doses):
        problems.append("doses must be distinct")
    if cfg.num_drugs * len(cfg.doses) + cfg.control_wells_per_plate < 1:
        problems.append("a plate has no wells")
    if cfg.mean_library_size <= 0 or cfg.library_size_sigma < 0 or cfg.dispersion <= 0:
        problems.append("mean_library_size and dispersion must be > 0, library_size_sigma >= 0")
    if problems:
        raise ValueError("bad SynthConfig: " + "; ".join(problems))


@contextlib.contextmanager
def _atomic(path: Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block completes."""
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Parquet files of cells (per-process sampling state, chunk tables, one file per task)
# ---------------------------------------------------------------------------------------------

_STATE_CACHE: dict[str, dict] = {}


def _sampling_state(cfg: SynthConfig) -> dict:
    """The parameters, their token-order float32 arrays and the parquet string columns; cached per process."""
    key = json.dumps(_content_config(cfg), sort_keys=True)
    st = _STATE_CACHE.get(key)
    if st is not None:
        return st
    p = build_params(cfg)
    st = {"p": p, **sampling_arrays(p)}
    # string lookup arrays (index D = DMSO_TF)
    drugs = drug_columns(p)
    st["drug_arr"] = pa.array(drugs["drug"], pa.string())
    st["moa_arr"] = pa.array(drugs["moa-fine"], pa.string())
    st["smiles_arr"] = pa.array(drugs["canonical_smiles"], pa.string())
    st["cid_arr"] = pa.array(drugs["pubchem_cid"], pa.string())
    st["sample_arr"] = pa.array(p["sample_names"], pa.string())
    st["line_arr"] = pa.array(p["line_ids"], pa.string())
    st["plate_arr"] = pa.array(p["plate_names"], pa.string())
    _STATE_CACHE.clear()
    _STATE_CACHE[key] = st
    return st


def _num_files(cfg: SynthConfig) -> int:
    return max(1, -(-int(cfg.num_cells) // int(cfg.cells_per_file)))


def _chunk_rows(cfg: SynthConfig) -> int:
    """Dense cells per sampling chunk (~4M matrix entries), a function of the config only."""
    return int(min(4096, max(256, (1 << 22) // max(int(cfg.num_genes), 1))))


def _barcodes(pos: np.ndarray, plate: np.ndarray) -> list[str]:
    return [f"{g // 1_000_000:02d}_{(g // 1000) % 1000:03d}_{g % 1000:03d}-lib_{q + 1:04d}"
            for g, q in zip(pos.tolist(), plate.tolist())]


def _chunk_table(st: dict, n: int, rows, cols, vals, pos, plate, well, line) -> pa.Table:
    p = st["p"]
    nnz_row = np.bincount(rows, minlength=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(nnz_row + 1, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise ValueError("a chunk holds more than 2^31 list entries; lower the chunk size")
    total = int(offsets[-1])
    flat_pos = np.arange(rows.size, dtype=np.int64) + rows + 1
    genes = np.empty(total, np.int64)
    genes[offsets[:-1]] = schema.TAHOE_MARKER_TOKEN
    genes[flat_pos] = st["tokens_sorted"][cols]
    expr = np.empty(total, np.float32)
    expr[offsets[:-1]] = schema.TAHOE_MARKER_VALUE
    expr[flat_pos] = vals
    off32 = pa.array(offsets.astype(np.int32))
    drug_row = np.where(p["well_drug"][well] < 0, p["D"], p["well_drug"][well])
    drug_idx = pa.array(drug_row)
    cols_out = [
        pa.ListArray.from_arrays(off32, pa.array(genes)),
        pa.ListArray.from_arrays(off32, pa.array(expr)),
        st["drug_arr"].take(drug_idx),
        st["sample_arr"].take(pa.array(well)),
        pa.array(_barcodes(pos, plate), pa.string()),
        st["line_arr"].take(pa.array(line)),
        st["moa_arr"].take(drug_idx),
        st["smiles_arr"].take(drug_idx),
        st["cid_arr"].take(drug_idx),
        st["plate_arr"].take(pa.array(plate)),
    ]
    return pa.Table.from_arrays(cols_out, schema=PARQUET_SCHEMA)


def _file_seed(cfg: SynthConfig, f: int) -> list[int]:
    return [int(cfg.seed), 0xF11E, int(f)]


def _write_file(cfg: SynthConfig, f: int, path: Path) -> dict:
    """Generate file f completely, under a temporary name, then rename."""
    t0 = time.perf_counter()
    st = _sampling_state(cfg)
    rng = np.random.default_rng(_file_seed(cfg, f))
    pos, plate, well, line = file_cells(cfg, st["p"], f, rng)
    chunk = _chunk_rows(cfg)
    rgs = int(cfg.row_group_size)
    nnz = 0
    buffered: list[pa.Table] = []
    n_buf = 0
    with _atomic(path) as tmp, pq.ParquetWriter(tmp, PARQUET_SCHEMA, compression="snappy") as writer:
        for a in range(0, pos.size, chunk):
            b = min(pos.size, a + chunk)
            rows, cols, vals = sample_chunk(cfg, st, rng, plate[a:b], well[a:b], line[a:b])
            nnz += int(vals.size)
            buffered.append(_chunk_table(st, b - a, rows, cols, vals, pos[a:b], plate[a:b], well[a:b], line[a:b]))
            n_buf += b - a
            if n_buf >= rgs:  # write whole row groups of exactly row_group_size rows
                t = pa.concat_tables(buffered)
                k = (n_buf // rgs) * rgs
                writer.write_table(t.slice(0, k), row_group_size=rgs)
                rest = t.slice(k)
                buffered, n_buf = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if n_buf:
            writer.write_table(pa.concat_tables(buffered), row_group_size=rgs)
    return {"file": f, "cells": int(pos.size), "nnz": nnz, "seconds": time.perf_counter() - t0}


def _worker(args) -> dict:
    cfg_dict, f, path = args
    return _write_file(SynthConfig(**cfg_dict), f, Path(path))


# ---------------------------------------------------------------------------------------------
# Metadata and ground truth
# ---------------------------------------------------------------------------------------------


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    with _atomic(path) as tmp:
        pq.write_table(table, tmp)


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    with _atomic(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr)


def _write_text_atomic(text: str, path: Path) -> None:
    with _atomic(path) as tmp:
        tmp.write_text(text)


def _write_metadata(cfg: SynthConfig, p: dict, meta: Path) -> None:
    meta.mkdir(parents=True, exist_ok=True)
    _write_parquet_atomic(pa.table({
        "token_id": pa.array(p["token_id"], pa.int64()),
        "ensembl_id": pa.array(p["ensembl_id"], pa.string()),
        "gene_symbol": pa.array(p["gene_symbol"], pa.string()),
    }), meta / schema.GENE_METADATA_FILE)
    drugs = drug_columns(p)
    _write_parquet_atomic(pa.table({c: drugs[c] for c in schema.DRUG_METADATA_COLUMNS},
                                   schema=pa.schema([(c, pa.string()) for c in schema.DRUG_METADATA_COLUMNS])),
                          meta / schema.DRUG_METADATA_FILE)
    wells = well_columns(p)
    _write_parquet_atomic(pa.table({c: wells[c] for c in schema.SAMPLE_METADATA_COLUMNS},
                                   schema=pa.schema([(c, pa.string()) for c in schema.SAMPLE_METADATA_COLUMNS])),
                          meta / schema.SAMPLE_METADATA_FILE)
    _write_parquet_atomic(pa.table({
        "cell_line_id": pa.array(p["line_ids"], pa.string()),
        "cell_name": pa.array(p["line_names"], pa.string()),
    }), meta / schema.CELL_LINE_METADATA_FILE)


_TRUTH_README = """\
# Ground truth of a synthetic Tahoe-format dataset

Written by `data_sharding/synthetic/` (generator version {version}); read it back with
`data_sharding.synthetic.load_ground_truth(<dataset dir>)`.

Indexing conventions:

- **genes (G = {G})**: the row order of `metadata/gene_metadata.parquet` (NOT token-id order). Every `[.., G]`
  array uses it.
- **cell lines (C = {C})**: the row order of `metadata/cell_line_metadata.parquet` (also `truth.json["cell_lines"]`).
- **drugs (D = {D})**: `truth.json["drugs"]` (the drug_metadata rows without DMSO_TF, same order).
- **doses (Z = {Z})**: `truth.json["doses"]` (uM).
- **programs (P = {P})**, **plates** (`truth.json["plates"]`), **wells** (`wells.parquet` row order = the
  sample_metadata row order).
- **conditions (K = C*D*Z = {K})**: row k of `conditions.parquet`, k = (line * D + drug) * Z + dose.

## The model

    logit[cell, g] = gene_base_logit[g] + line_gene_offset[line, g]
                     + ((line_program_activity[line] + plate_shift[plate] + well_shift[well]
                        + noise[cell]) @ programs)[g]
                     + effect_logit[k(line, drug, dose), g]                (0 for DMSO_TF cells)
    noise[cell] ~ Normal(0, cell_state_sigma) per program (cell state)
    library_size[cell] ~ LogNormal(log(mean_library_size) - sigma^2 / 2, sigma), sigma = library_size_sigma
    count[cell, g] ~ NegativeBinomial(mean = library_size * softmax(logit[cell])[g], inverse dispersion theta)
                     drawn as Poisson(mean * Gamma(theta, 1) / theta)
    effect_logit[k] = effect_scale * hill[k] * sensitivity[line, drug]
                      * ((drug_program_effect[drug] + line_drug_program_modifier[line, drug]) @ programs
                         + drug_gene_hits[drug])
    hill[k] = dose^n / (dose^n + ec50^n), with ec50 and n per drug (drugs.parquet)

## Files

| file | shape | meaning |
|---|---|---|
| `truth.json` | | the generating config, hidden constants (`biology`), the orders of lines/drugs/doses/plates, files |
| `baseline_log_mean.npy` | [C, G] | log expected count of an untreated cell of each line at the mean library size, without plate/well shifts or cell noise: `log(mean_library_size) + log_softmax(baseline_logits)` |
| `baseline_logits.npy` | [C, G] | the pre-softmax baseline `gene_base_logit + line_gene_offset + line_program_activity @ programs` |
| `effect_logfc.npy` | [K, G] | the true drug effect as a natural-log fold change of expected counts (treated vs control of the same line, no shifts, no noise): `log_softmax(baseline_logits[line] + effect_logit[k]) - log_softmax(baseline_logits[line])` |
| `effect_logit.npy` | [K, G] | the additive drug effect on the logits (differs from `effect_logfc` by a per-condition constant) |
| `conditions.parquet` | K rows | condition, cell_line_id, cell_line (index), drug, drug_index, dose, dose_index, drugname_drugconc, sensitivity, sensitivity_class, hill, effect_scale (= effect_scale * hill * sensitivity), effect_norm (L2 norm of effect_logfc) |
| `sensitivity.npy` | [C, D] | per (line, drug) sensitivity (0: the line does not respond) |
| `gene_base_logit.npy` | [G] | the gene base logits |
| `programs.npy` | [P, G] | the sparse gene-program loading vectors |
| `line_program_activity.npy` | [C, P] | program activities of each line |
| `line_gene_offset.npy` | [C, G] | the small gene-specific offset of each line |
| `drug_program_effect.npy` | [D, P] | program-level effect of each drug (1-3 nonzero) |
| `drug_gene_hits.npy` | [D, G] | gene-specific hits of each drug (a few nonzero) |
| `line_drug_program_modifier.npy` | [C, D, P] | per (line, drug) program modifier (one nonzero) |
| `drugs.parquet` | D rows | drug, ec50, hill_n, n_programs, n_hits |
| `plate_shift.npy` / `plate_shift_genes.npy` | [plates, P] / [plates, G] | the hidden plate shift of program activities, and in gene (logit) space |
| `well_shift.npy` / `well_shift_genes.npy` | [wells, P] / [wells, G] | the hidden well shift (wells = sample_metadata rows) |
| `wells.parquet` | wells rows | well, sample, plate, drug, dose, dose_index (-1 control), drugname_drugconc, is_control |
| `cell_counts.parquet` | wells*C rows | sample, plate, cell_line_id, n_cells: how many cells each (well, line) holds |

Replicate plates of one condition differ by `(plate_shift[a] - plate_shift[b] + well_shift[..] - well_shift[..])
@ programs` on the logit scale; DMSO_TF wells carry the plate and well shifts but no drug effect.
"""


def _write_ground_truth(cfg: SynthConfig, p: dict, gt: Path, file_names: list[str]) -> None:
    gt.mkdir(parents=True, exist_ok=True)
    C, D, Z, G, P = p["C"], p["D"], p["Z"], p["G"], p["P"]
    K = C * D * Z
    f32 = np.float32
    base_logits = baseline_logits(p)
    base_ls = log_softmax(base_logits)
    _save_npy_atomic((math.log(cfg.mean_library_size) + base_ls).astype(f32), gt / "baseline_log_mean.npy")
    _save_npy_atomic(base_logits.astype(f32), gt / "baseline_logits.npy")

    # [K, G] arrays, written block by block through memory maps (bounded memory for large K)
    rows = []
    for name in ("effect_logfc.npy", "effect_logit.npy"):
        tmp = gt / (name + ".tmp")
        np.lib.format.open_memmap(tmp, mode="w+", dtype=f32, shape=(K, G)).flush()
    mm_fc = np.lib.format.open_memmap(gt / "effect_logfc.npy.tmp", mode="r+")
    mm_lg = np.lib.format.open_memmap(gt / "effect_logit.npy.tmp", mode="r+")
    k = 0
    for c in range(C):
        for d in range(D):
            for z in range(Z):
                eff = condition_effect(cfg, p, c, d, z)
                fc = log_softmax(base_logits[c] + eff) - base_ls[c]
                mm_lg[k] = eff
                mm_fc[k] = fc
                h = hill_at(p, d, z)
                rows.append({
                    "condition": k, "cell_line_id": p["line_ids"][c], "cell_line": c,
                    "drug": p["drug_names"][d], "drug_index": d, "dose": float(p["doses"][z]), "dose_index": z,
                    "drugname_drugconc": schema.format_drugconc(p["drug_names"][d], float(p["doses"][z])),
                    "sensitivity": float(p["sensitivity"][c, d]),
                    "sensitivity_class": p["sensitivity_class_names"][p["sensitivity_class"][c, d]],
                    "hill": h, "effect_scale": float(cfg.effect_scale) * h * float(p["sensitivity"][c, d]),
                    "effect_norm": float(np.linalg.norm(fc)),
                })
                k += 1
    mm_fc.flush()
    mm_lg.flush()
    del mm_fc, mm_lg
    os.replace(gt / "effect_logfc.npy.tmp", gt / "effect_logfc.npy")
    os.replace(gt / "effect_logit.npy.tmp", gt / "effect_logit.npy")
    cond_schema = pa.schema([
        ("condition", pa.int64()), ("cell_line_id", pa.string()), ("cell_line", pa.int64()),
        ("drug", pa.string()), ("drug_index", pa.int64()), ("dose", pa.float64()), ("dose_index", pa.int64()),
        ("drugname_drugconc", pa.string()), ("sensitivity", pa.float64()), ("sensitivity_class", pa.string()),
        ("hill", pa.float64()), ("effect_scale", pa.float64()), ("effect_norm", pa.float64()),
    ])
    _write_parquet_atomic(pa.Table.from_pylist(rows, schema=cond_schema), gt / "conditions.parquet")

    arrays = {
        "sensitivity.npy": p["sensitivity"], "gene_base_logit.npy": p["base"], "programs.npy": p["programs"],
        "line_program_activity.npy": p["line_activity"], "line_gene_offset.npy": p["line_offset"],
        "drug_program_effect.npy": p["drug_programs"], "drug_gene_hits.npy": p["drug_hits"],
        "line_drug_program_modifier.npy": p["line_modifier"],
        "plate_shift.npy": p["plate_shift"], "plate_shift_genes.npy": p["plate_shift"] @ p["programs"],
        "well_shift.npy": p["well_shift"], "well_shift_genes.npy": p["well_shift"] @ p["programs"],
    }
    for name, arr in arrays.items():
        _save_npy_atomic(np.asarray(arr, dtype=f32), gt / name)

    _write_parquet_atomic(pa.table({
        "drug": pa.array(p["drug_names"], pa.string()),
        "ec50": pa.array(p["ec50"], pa.float64()),
        "hill_n": pa.array(p["hill_n"], pa.float64()),
        "n_programs": pa.array((p["drug_programs"] != 0).sum(1).astype(np.int64), pa.int64()),
        "n_hits": pa.array((p["drug_hits"] != 0).sum(1).astype(np.int64), pa.int64()),
    }), gt / "drugs.parquet")
    wells = well_columns(p)
    n_wells = len(wells["sample"])
    _write_parquet_atomic(pa.table({
        "well": pa.array(np.arange(n_wells), pa.int64()),
        "sample": wells["sample"],
        "plate": wells["plate"],
        "drug": wells["drug"],
        "dose": pa.array(wells["dose"], pa.float64()),
        "dose_index": pa.array(p["well_dose"], pa.int64()),
        "drugname_drugconc": wells["drugname_drugconc"],
        "is_control": pa.array(p["well_drug"] < 0),
    }), gt / "wells.parquet")
    gw = p["group_cells"].reshape(n_wells, C)
    _write_parquet_atomic(pa.table({
        "sample": np.repeat(np.asarray(wells["sample"], dtype=object), C).tolist(),
        "plate": np.repeat(np.asarray(wells["plate"], dtype=object), C).tolist(),
        "cell_line_id": p["line_ids"] * n_wells,
        "n_cells": pa.array(gw.reshape(-1), pa.int64()),
    }), gt / "cell_counts.parquet")

    truth = {
        "generator": "data_sharding.synthetic", "generator_version": GENERATOR_VERSION,
        "config": _content_config(cfg),
        "biology": BIOLOGY,
        "num_cells": int(cfg.num_cells), "num_genes": G, "num_programs": P,
        "cell_lines": p["line_ids"], "cell_names": p["line_names"], "drugs": p["drug_names"],
        "control_drug": schema.TAHOE_CONTROL_DRUG, "doses": [float(x) for x in p["doses"]],
        "dose_unit": schema.TAHOE_DOSE_UNIT, "plates": p["plate_names"],
        "wells_per_plate": p["wells_per_plate"], "num_conditions": K,
        "condition_index": "k = (cell_line * num_drugs + drug) * num_doses + dose_index",
        "gene_order": "metadata/gene_metadata.parquet row order",
        "files": [f"{schema.TAHOE_DATA_DIR}/{n}" for n in file_names],
    }
    _write_text_atomic(json.dumps(truth, indent=1) + "\n", gt / "truth.json")
    _write_text_atomic(_TRUTH_README.format(version=GENERATOR_VERSION, G=G, C=C, D=D, Z=Z, P=P, K=K),
                       gt / "README.md")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def generate(cfg: SynthConfig) -> dict:
    """Write the synthetic dataset under cfg.out_dir (resumable); return a summary.

    Returns:
        {"num_cells", "num_files", "num_written", "num_skipped", "nnz_written", "seconds",
         "cells_per_second" (of the files written by this call), "paths": {...}}

    Raises:
        ValueError: no out_dir, a bad config, or an out_dir that holds a dataset of another config.
    """
    t0 = time.perf_counter()
    if not cfg.out_dir:
        raise ValueError("SynthConfig.out_dir is not set")
    _check_config(cfg)
    out = Path(cfg.out_dir)
    data, meta, gt = out / schema.TAHOE_DATA_DIR, out / schema.TAHOE_METADATA_DIR, out / TRUTH_DIR
    truth_path = gt / "truth.json"
    if truth_path.is_file():
        try:
            old = json.loads(truth_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and (old.get("config") != _content_config(cfg)
                                or old.get("generator_version") != GENERATOR_VERSION):
            raise ValueError(f"{out} holds a synthetic dataset of another config or generator version; "
                             "use a fresh out_dir")
    data.mkdir(parents=True, exist_ok=True)
    n_files = _num_files(cfg)
    names = [schema.tahoe_data_file(i, n_files) for i in range(n_files)]
    p = build_params(cfg)
    _write_ground_truth(cfg, p, gt, names)  # records the config first: a rerun checks it
    _write_metadata(cfg, p, meta)
    for stale in data.glob("*.tmp"):
        stale.unlink()

    todo = []
    for i, name in enumerate(names):
        path = data / name
        expected = min(int(cfg.num_cells), (i + 1) * int(cfg.cells_per_file)) - i * int(cfg.cells_per_file)
        if path.is_file():
            try:
                if pq.ParquetFile(path).metadata.num_rows == expected:
                    continue
            except Exception:  # noqa: BLE001 - unreadable: regenerate it
                pass
            path.unlink()
        todo.append(i)

    cfg_dict = dataclasses.asdict(cfg)
    results: list[dict] = []
    tasks = [(cfg_dict, i, str(data / names[i])) for i in todo]
    # Workers die with this process; SIGTERM stops cleanly (exit 143); a dead worker raises WorkerDied (pool.py).
    run_parallel(_worker, tasks, int(cfg.num_workers), results.append, job="synthetic generator",
                 kept="finished files are kept", noun="files")
    t_gen = time.perf_counter() - t0
    written_cells = sum(r["cells"] for r in results)

    h5ad = None
    if cfg.write_h5ad:
        h5ad = out / H5AD_NAME
        if results or not h5ad.is_file():  # an existing h5ad was renamed into place from these same files
            write_h5ad(out, h5ad)
    seconds = time.perf_counter() - t0
    return {
        "num_cells": int(cfg.num_cells),
        "num_files": n_files,
        "num_written": len(results),
        "num_skipped": n_files - len(results),
        "nnz_written": int(sum(r["nnz"] for r in results)),
        "seconds": seconds,
        "generation_seconds": t_gen,
        "cells_per_second": written_cells / t_gen if written_cells and t_gen > 0 else None,
        "paths": {
            "out_dir": str(out),
            "data": [str(data / n) for n in names],
            "metadata": str(meta),
            "ground_truth": str(gt),
            "h5ad": None if h5ad is None else str(h5ad),
        },
    }


def load_ground_truth(source_dir) -> dict:
    """Read back what generate() wrote under ground_truth/.

    ``source_dir`` is the dataset directory (or its ground_truth/ directly). Returns a dict with ``truth``
    (truth.json), one numpy array per ``.npy`` file keyed by its stem (e.g. ``effect_logfc``), one pandas
    DataFrame per parquet table keyed by its stem (``conditions``, ``wells``, ``drugs``, ``cell_counts``), and
    ``gene_metadata`` (the gene table whose row order the gene axes follow) when the metadata is beside it.
    """
    src = Path(source_dir)
    gt = src if (src / "truth.json").is_file() else src / TRUTH_DIR
    if not (gt / "truth.json").is_file():
        raise DataError(src, "no ground_truth/truth.json: not a synthetic dataset (or generate() did not start)")
    out: dict[str, Any] = {"truth": json.loads((gt / "truth.json").read_text())}
    for f in sorted(gt.glob("*.npy")):
        out[f.stem] = np.load(f)
    for f in sorted(gt.glob("*.parquet")):
        out[f.stem] = pq.read_table(f).to_pandas()
    gm = gt.parent / schema.TAHOE_METADATA_DIR / schema.GENE_METADATA_FILE
    if gm.is_file():
        out["gene_metadata"] = pq.read_table(gm).to_pandas()
    return out


# ---------------------------------------------------------------------------------------------
# Command line: python -m data_sharding.synthetic out_dir=runs/synth num_cells=100000 num_workers=2
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    import sys

    args = sys.argv[1:] if argv is None else argv
    cfg = SynthConfig()
    fields = {f.name: f for f in dataclasses.fields(SynthConfig)}
    for a in args:
        key, sep, val = a.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"usage: python -m data_sharding.synthetic key=value ...; unknown or bad {a!r}; "
                             f"keys: {', '.join(fields)}")
        cur = getattr(cfg, key)
        if key == "doses":
            v: Any = [float(x) for x in val.strip("[]").split(",") if x.strip()]
        elif key == "out_dir":
            v = val
        elif isinstance(cur, bool):
            v = val.lower() in ("1", "true", "yes")
        elif isinstance(cur, int):
            v = int(float(val))
        else:
            v = float(val)
        setattr(cfg, key, v)
    summary = generate(cfg)
    summary["paths"]["data"] = f"{len(summary['paths']['data'])} files"
    print(json.dumps(summary, indent=1))
