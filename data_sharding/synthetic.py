"""A synthetic single-cell perturbation dataset in the exact Tahoe-100M parquet format, with known answers.

``generate(cfg)`` writes, under ``cfg.out_dir``::

    data/train-{i:05d}-of-{n:05d}.parquet     the cells: the 10 Tahoe columns, marker first in every row
    metadata/gene_metadata.parquet            token_id, ensembl_id, gene_symbol (token ids are NOT row + 3)
    metadata/drug_metadata.parquet            one row per drug, DMSO_TF included
    metadata/sample_metadata.parquet          one row per well: sample, plate, drug, drugname_drugconc
    metadata/cell_line_metadata.parquet       cell_line_id, cell_name
    ground_truth/                             the generating parameters and true effects (see its README.md)
    synthetic.h5ad                            only with cfg.write_h5ad: the same cells as an AnnData file

The biology (all on the log-mean, i.e. logit, scale; gene order = gene_metadata row order):

    logit[cell, g] = base[g] + offset[line, g]
                     + ((activity[line] + plate_shift[plate] + well_shift[well] + noise[cell]) @ W)[g]
                     + effect[line, drug, dose, g]                       (0 for DMSO_TF)
    effect = effect_scale * hill(dose; ec50[drug], n[drug]) * sensitivity[line, drug]
             * ((drug_programs[drug] + line_modifier[line, drug]) @ W + drug_hits[drug])
    mean[cell, g] = library_size[cell] * softmax(logit[cell])[g]
    count ~ NegativeBinomial(mean, inverse dispersion theta)  (gamma-Poisson)

W holds ``num_programs`` sparse gene programs. Every plate holds every cell line in every well (Tahoe pools the
lines in a well), ``control_wells_per_plate`` DMSO_TF wells and one well per (drug, dose), so each condition has
replicate plates, which differ through the hidden plate and well shifts.

Determinism: the global parameters come from ``cfg.seed``; each file's cells come from a generator seeded with
``(cfg.seed, file index)``, so the output is identical whatever ``num_workers`` is. Files are written under a
temporary name and renamed when complete; a rerun skips complete files (resumable).

Memory is bounded by one chunk of a few thousand dense cells per worker, whatever ``num_cells`` is: the cell ->
(well, line) assignment is computed per file from closed formulas, never for the whole dataset.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from perturbdiff.config import SynthConfig
from perturbdiff.data import schema
from perturbdiff.data.schema import DataError

GENERATOR_VERSION = 1

DATA_DIR = "data"
METADATA_DIR = "metadata"
TRUTH_DIR = "ground_truth"
CELL_LINE_METADATA_FILE = "cell_line_metadata.parquet"
CELL_LINE_METADATA_COLUMNS = ("cell_line_id", "cell_name")
H5AD_NAME = "synthetic.h5ad"

# Hidden constants of the biology (recorded in ground_truth/truth.json).
BIOLOGY = {
    "gene_base_sigma": 1.9,  # sd of the gene base logits: lognormal relative expression, a few genes dominate
    "program_gene_fraction": 0.06,  # fraction of genes each program loads on
    "program_loading_sigma": 0.8,  # sd of the nonzero program loadings
    "line_activity_sigma": 0.6,  # sd of the cell-line program activities
    "line_offset_sigma": 0.15,  # sd of the small gene-specific cell-line offset
    "cell_state_sigma": 0.3,  # sd of the per-cell program noise
    "drug_program_coef": [0.6, 1.2],  # |coefficient| range of a drug's 1-3 programs
    "drug_hit_fraction": 0.01,  # fraction of genes hit directly by a drug (at least 3, at most 25)
    "drug_hit_sigma": 1.0,  # sd of the direct gene hits
    "line_modifier_sigma": 0.3,  # sd of the (line, drug) program modifier on 1 program
    "hill_n": [1.0, 2.5],  # Hill coefficient range
    "sensitivity_classes": {"strong": [0.8, 1.2], "weak": [0.15, 0.4], "none": [0.0, 0.0]},
    "sensitivity_probs": [0.4, 0.3, 0.3],  # strong / weak / none
}

_LIST_I64 = pa.list_(pa.int64())
_LIST_F32 = pa.list_(pa.float32())
PARQUET_SCHEMA = pa.schema(
    [
        pa.field("genes", _LIST_I64),
        pa.field("expressions", _LIST_F32),
        pa.field("drug", pa.string()),
        pa.field("sample", pa.string()),
        pa.field("BARCODE_SUB_LIB_ID", pa.string()),
        pa.field("cell_line_id", pa.string()),
        pa.field("moa-fine", pa.string()),
        pa.field("canonical_smiles", pa.string()),
        pa.field("pubchem_cid", pa.string()),
        pa.field("plate", pa.string()),
    ]
)
assert tuple(PARQUET_SCHEMA.names) == schema.TAHOE_COLUMNS

# Config fields that do not change the content of the output.
_NON_CONTENT_FIELDS = ("out_dir", "num_workers", "write_h5ad")


# ---------------------------------------------------------------------------------------------
# Global parameters (a pure function of the config)
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


def _unique_names(rng: np.random.Generator, n: int, make) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        name = make(rng)
        tries += 1
        if name in seen:
            if tries > 50 * (n + 10):  # name space exhausted: number the rest
                name = f"{name}-{len(out) + 1}"
            else:
                continue
        seen.add(name)
        out.append(name)
    return out


_DRUG_PRE = ("Ab", "Bel", "Cor", "Dar", "El", "Fos", "Gal", "Hex", "Ir", "Jev", "Kal", "Lum", "Mor", "Nov",
             "Or", "Pax", "Quin", "Ral", "Sar", "Tov", "Ul", "Vex", "Wyn", "Xal", "Yor", "Zep")
_DRUG_MID = ("a", "e", "i", "o", "u", "ta", "ri", "lo", "ne", "vi", "zo", "ca")
_DRUG_SUF = ("tinib", "ciclib", "parib", "statin", "lisib", "zomib", "rafenib", "dostat", "clax", "sertib",
             "metinib", "platin", "tecan", "mycin")
_MOA = (
    ("inhibitor/antagonist", "Kinase inhibitor"), ("inhibitor/antagonist", "CDK inhibitor"),
    ("inhibitor/antagonist", "PARP inhibitor"), ("inhibitor/antagonist", "HDAC inhibitor"),
    ("inhibitor/antagonist", "Proteasome inhibitor"), ("inhibitor/antagonist", "MEK inhibitor"),
    ("inhibitor/antagonist", "PI3K inhibitor"), ("inhibitor/antagonist", "Topoisomerase inhibitor"),
    ("activator/agonist", "Nuclear receptor agonist"), ("activator/agonist", "AMPK activator"),
    ("unclear", "DNA alkylating agent"), ("unclear", "Microtubule disruptor"),
)
_SMILES_FRAG = ("c1ccccc1", "C(=O)N", "CC", "N", "O", "Cl", "F", "C(F)(F)F", "c1ccncc1", "S(=O)(=O)N",
                "C1CCNCC1", "OC", "C#N", "c1ccc2[nH]ccc2c1", "C(=O)O", "N1CCOCC1")
_LINE_PRE = ("HCC", "NCI-H", "SW", "HT-", "PANC-", "CAL-", "KATO-", "SK-MEL-", "MDA-MB-", "LS", "A", "HuH-")


def _build_params(cfg: SynthConfig) -> dict[str, Any]:
    """Every global parameter, drawn from cfg.seed only. Gene arrays are in gene_metadata row order."""
    B = BIOLOGY
    G, P, C, D = int(cfg.num_genes), int(cfg.num_programs), int(cfg.num_cell_lines), int(cfg.num_drugs)
    doses = np.asarray([float(x) for x in cfg.doses], dtype=np.float64) if D else np.zeros(0)
    Z = len(doses)
    rng = np.random.default_rng([int(cfg.seed), 0x5EED])

    # --- genes: token ids drawn from [3, 3 + 4G), rows not sorted by token, never row + 3
    token_id = rng.choice(np.arange(3, 3 + 4 * G, dtype=np.int64), size=G, replace=False)
    if G >= 2:
        if np.all(np.diff(token_id) > 0):
            token_id[[0, 1]] = token_id[[1, 0]]
        if np.array_equal(token_id, np.arange(G) + 3):  # pragma: no cover (impossible after the swap)
            token_id = token_id[::-1].copy()
    ensembl_num = 1 + rng.choice(max(300_000, 2 * G), size=G, replace=False)
    ensembl_id = [f"ENSG{x:011d}" for x in ensembl_num]
    gene_symbol = [f"SYN{i + 1:05d}" for i in range(G)]

    base = rng.normal(0.0, B["gene_base_sigma"], G)

    # --- gene programs: sparse loadings
    per_prog = max(3, int(round(B["program_gene_fraction"] * G)))
    per_prog = min(per_prog, G)
    programs = np.zeros((P, G))
    for p in range(P):
        idx = rng.choice(G, size=per_prog, replace=False)
        programs[p, idx] = rng.normal(0.0, B["program_loading_sigma"], per_prog)

    # --- cell lines
    line_ids = _unique_names(rng, C, lambda r: "CVCL_" + "".join(r.choice(list("0123456789ABCDEFGHJKLMNPRSTUVWXYZ"), 4)))
    line_names = _unique_names(rng, C, lambda r: f"{r.choice(_LINE_PRE)}{int(r.integers(1, 999))}")
    line_activity = rng.normal(0.0, B["line_activity_sigma"], (C, P))
    line_offset = rng.normal(0.0, B["line_offset_sigma"], (C, G))

    # --- drugs
    drug_names = _unique_names(rng, D, lambda r: r.choice(_DRUG_PRE) + r.choice(_DRUG_MID) + r.choice(_DRUG_SUF))
    drug_programs = np.zeros((D, P))
    drug_hits = np.zeros((D, G))
    n_hits = int(min(25, max(3, round(B["drug_hit_fraction"] * G)), G))
    drug_targets = []
    for d in range(D):
        k = int(rng.integers(1, min(3, P) + 1))
        progs = rng.choice(P, size=k, replace=False)
        lo, hi = B["drug_program_coef"]
        drug_programs[d, progs] = rng.choice([-1.0, 1.0], size=k) * rng.uniform(lo, hi, size=k)
        hits = rng.choice(G, size=n_hits, replace=False)
        drug_hits[d, hits] = rng.normal(0.0, B["drug_hit_sigma"], n_hits)
        top = hits[np.argsort(-np.abs(drug_hits[d, hits]), kind="stable")[: int(rng.integers(1, 4))]]
        drug_targets.append(", ".join(gene_symbol[i] for i in top))
    if Z:
        lo_d, hi_d = float(np.log(doses.min())), float(np.log(doses.max()))
        ec50 = np.exp(rng.uniform(lo_d, hi_d, D)) if D else np.zeros(0)
    else:
        ec50 = np.ones(D)
    hill_n = rng.uniform(*B["hill_n"], D)
    moa_idx = rng.integers(0, len(_MOA), D)
    smiles = ["".join(rng.choice(_SMILES_FRAG, int(rng.integers(3, 7)))) for _ in range(D)]
    cids = 100_000 + rng.choice(99_000_000 - 100_000, size=D, replace=False) if D else np.zeros(0, np.int64)

    # --- per (line, drug) sensitivity: some lines respond strongly, some weakly, some not at all
    classes = list(B["sensitivity_classes"])
    cls = rng.choice(len(classes), size=(C, D), p=B["sensitivity_probs"])
    for d in range(D):  # every drug has a strong responder, and a non-responder when there are >= 2 lines
        order = rng.permutation(C)
        if not np.any(cls[:, d] == 0):
            cls[order[0], d] = 0
        if C >= 2 and not np.any(cls[:, d] == 2):
            cand = [c for c in order if cls[c, d] != 0 or np.sum(cls[:, d] == 0) > 1]
            cls[cand[-1], d] = 2
    sensitivity = np.zeros((C, D))
    for j, name in enumerate(classes):
        lo, hi = B["sensitivity_classes"][name]
        m = cls == j
        sensitivity[m] = rng.uniform(lo, hi, int(m.sum()))
    line_modifier = np.zeros((C, D, P))
    for c in range(C):
        for d in range(D):
            line_modifier[c, d, int(rng.integers(P))] = rng.normal(0.0, B["line_modifier_sigma"])

    # --- plates and wells. Per plate: control wells + one well per (drug, dose), in a random layout.
    n_plates = int(cfg.num_plates)
    wells_per_plate = int(cfg.control_wells_per_plate) + D * Z
    plate_names = [f"plate{i + 1}" for i in range(n_plates)]
    well_drug = np.empty(n_plates * wells_per_plate, np.int64)  # -1 = DMSO_TF
    well_dose = np.empty(n_plates * wells_per_plate, np.int64)  # dose index, -1 = control
    well_plate = np.repeat(np.arange(n_plates), wells_per_plate)
    kinds = np.concatenate([np.full(int(cfg.control_wells_per_plate), -1), np.arange(D * Z)])
    for p in range(n_plates):
        layout = kinds[rng.permutation(wells_per_plate)]
        sl = slice(p * wells_per_plate, (p + 1) * wells_per_plate)
        well_drug[sl] = np.where(layout < 0, -1, layout // max(Z, 1))
        well_dose[sl] = np.where(layout < 0, -1, layout % max(Z, 1))
    sample_names = [f"smp_{i + 1:04d}" for i in range(n_plates * wells_per_plate)]
    plate_shift = rng.normal(0.0, float(cfg.plate_shift_scale), (n_plates, P))
    well_shift = rng.normal(0.0, float(cfg.well_shift_scale), (n_plates * wells_per_plate, P))

    # --- cells per (plate, well, line) group: split num_cells as evenly as possible
    n_groups = n_plates * wells_per_plate * C
    group_cells = np.full(n_groups, int(cfg.num_cells) // n_groups, np.int64)
    extra = int(cfg.num_cells) % n_groups
    if extra:
        group_cells[rng.permutation(n_groups)[:extra]] += 1
    plate_cells = group_cells.reshape(n_plates, -1).sum(1)
    plate_start = np.concatenate([[0], np.cumsum(plate_cells)])
    # A plate's cells are spread over its groups by an affine permutation (stride near the golden ratio):
    # position j of the plate -> slot (a * j + b) mod M, slot -> group by the cumulative counts.
    plate_stride = np.zeros(n_plates, np.int64)
    plate_offset = np.zeros(n_plates, np.int64)
    for p in range(n_plates):
        M = int(plate_cells[p])
        off = int(rng.integers(0, max(M, 1)))
        a = max(1, int(round(M * 0.6180339887498949)))
        while M > 1 and math.gcd(a, M) != 1:
            a += 1
        plate_stride[p], plate_offset[p] = a % max(M, 1) or 1, off

    return {
        "G": G, "P": P, "C": C, "D": D, "Z": Z, "doses": doses,
        "token_id": token_id, "ensembl_id": ensembl_id, "gene_symbol": gene_symbol,
        "base": base, "programs": programs,
        "line_ids": line_ids, "line_names": line_names,
        "line_activity": line_activity, "line_offset": line_offset,
        "drug_names": drug_names, "drug_programs": drug_programs, "drug_hits": drug_hits,
        "drug_targets": drug_targets, "ec50": ec50, "hill_n": hill_n, "moa_idx": moa_idx,
        "smiles": smiles, "cids": [str(int(x)) for x in cids],
        "sensitivity": sensitivity, "sensitivity_class": cls, "sensitivity_class_names": classes,
        "line_modifier": line_modifier,
        "plate_names": plate_names, "wells_per_plate": wells_per_plate, "well_plate": well_plate,
        "well_drug": well_drug, "well_dose": well_dose, "sample_names": sample_names,
        "plate_shift": plate_shift, "well_shift": well_shift,
        "group_cells": group_cells, "plate_cells": plate_cells, "plate_start": plate_start,
        "plate_stride": plate_stride, "plate_offset": plate_offset,
    }


def _hill(p: dict, d: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Dose response in [0, 1) for drug d at dose index z (vectorised); 0 where z < 0."""
    d = np.asarray(d)
    z = np.asarray(z)
    out = np.zeros(np.broadcast(d, z).shape)
    ok = z >= 0
    if np.any(ok):
        dose = p["doses"][z[ok]]
        n = p["hill_n"][d[ok]]
        e = p["ec50"][d[ok]]
        out[ok] = dose**n / (dose**n + e**n)
    return out


def _condition_effect(cfg: SynthConfig, p: dict, c: int, d: int, z: int) -> np.ndarray:
    """The additive logit effect [G] of drug d at dose index z on line c (gene_metadata order)."""
    scale = float(cfg.effect_scale) * float(_hill(p, np.array([d]), np.array([z]))[0]) * p["sensitivity"][c, d]
    prog = p["drug_programs"][d] + p["line_modifier"][c, d]
    return scale * (prog @ p["programs"] + p["drug_hits"][d])


def _line_logits(p: dict) -> np.ndarray:
    return p["base"][None, :] + p["line_offset"] + p["line_activity"] @ p["programs"]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


# ---------------------------------------------------------------------------------------------
# Per-process sampling state (token order, float32)
# ---------------------------------------------------------------------------------------------

_STATE_CACHE: dict[str, dict] = {}


def _sampling_state(cfg: SynthConfig) -> dict:
    key = json.dumps(_content_config(cfg), sort_keys=True)
    st = _STATE_CACHE.get(key)
    if st is not None:
        return st
    p = _build_params(cfg)
    order = np.argsort(p["token_id"], kind="stable")  # sampling works in ascending token order
    f32 = np.float32
    programs = p["programs"][:, order]
    st = {
        "p": p,
        "tokens_sorted": p["token_id"][order],
        "line_logits": (p["base"][None, :] + p["line_offset"])[:, order].astype(f32),  # programs added per cell
        "prog_idx": [np.flatnonzero(programs[k]) for k in range(p["P"])],
        "prog_val": [programs[k, np.flatnonzero(programs[k])].astype(f32) for k in range(p["P"])],
        "drug_hits": np.vstack([p["drug_hits"][:, order], np.zeros((1, p["G"]))]).astype(f32),  # last row: control
    }
    # string lookup arrays (index D = DMSO_TF)
    drugs = p["drug_names"] + [schema.TAHOE_CONTROL_DRUG]
    st["drug_arr"] = pa.array(drugs, pa.string())
    st["moa_arr"] = pa.array([_MOA[i][1] for i in p["moa_idx"]] + [_CONTROL_MOA[1]], pa.string())
    st["smiles_arr"] = pa.array(p["smiles"] + [_CONTROL_SMILES], pa.string())
    st["cid_arr"] = pa.array(p["cids"] + [_CONTROL_CID], pa.string())
    st["sample_arr"] = pa.array(p["sample_names"], pa.string())
    st["line_arr"] = pa.array(p["line_ids"], pa.string())
    st["plate_arr"] = pa.array(p["plate_names"], pa.string())
    _STATE_CACHE.clear()
    _STATE_CACHE[key] = st
    return st


_CONTROL_MOA = ("vehicle", "Vehicle control")
_CONTROL_SMILES = "CS(C)=O"
_CONTROL_CID = "679"


def _num_files(cfg: SynthConfig) -> int:
    return max(1, -(-int(cfg.num_cells) // int(cfg.cells_per_file)))


def _file_name(i: int, n: int) -> str:
    return f"train-{i:05d}-of-{n:05d}.parquet"


def _chunk_rows(cfg: SynthConfig) -> int:
    """Dense cells per sampling chunk (~4M matrix entries), a function of the config only."""
    return int(min(4096, max(256, (1 << 22) // max(int(cfg.num_genes), 1))))


def _file_cells(cfg: SynthConfig, st: dict, f: int, rng: np.random.Generator):
    """(plate, well, line) of the cells of file f, in file order, and their global positions."""
    p = st["p"]
    start = f * int(cfg.cells_per_file)
    stop = min(int(cfg.num_cells), start + int(cfg.cells_per_file))
    pos = np.arange(start, stop, dtype=np.int64)
    plate = np.searchsorted(p["plate_start"], pos, side="right") - 1
    # shuffle within each plate segment of the file (plates stay in order)
    perm = np.empty(0, np.int64)
    pieces = []
    for q in np.unique(plate):
        seg = np.flatnonzero(plate == q)
        pieces.append(seg[rng.permutation(seg.size)])
    perm = np.concatenate(pieces) if pieces else perm
    pos = pos[perm]
    plate = plate[perm]
    j = pos - p["plate_start"][plate]
    M = p["plate_cells"][plate]
    slot = (p["plate_stride"][plate] * j + p["plate_offset"][plate]) % np.maximum(M, 1)
    groups_per_plate = p["wells_per_plate"] * p["C"]
    gc = p["group_cells"].reshape(len(p["plate_names"]), groups_per_plate)
    cum = np.cumsum(gc, axis=1)
    local = np.empty(pos.size, np.int64)
    for q in np.unique(plate):
        m = plate == q
        local[m] = np.searchsorted(cum[q], slot[m], side="right")
    well = plate * p["wells_per_plate"] + local // p["C"]
    line = local % p["C"]
    return pos, plate, well, line


def _barcodes(pos: np.ndarray, plate: np.ndarray) -> list[str]:
    return [f"{g // 1_000_000:02d}_{(g // 1000) % 1000:03d}_{g % 1000:03d}-lib_{q + 1:04d}"
            for g, q in zip(pos.tolist(), plate.tolist())]


def _sample_chunk(cfg: SynthConfig, st: dict, rng: np.random.Generator, plate, well, line):
    """Counts of one chunk of cells: (row of each nonzero, token-order column, count)."""
    p = st["p"]
    n = plate.size
    G, P = p["G"], p["P"]
    f32 = np.float32
    drug = p["well_drug"][well]
    dose = p["well_dose"][well]
    ctrl = drug < 0
    drug_row = np.where(ctrl, p["D"], drug)
    if p["D"]:
        scale = float(cfg.effect_scale) * _hill(p, np.where(ctrl, 0, drug), dose)
        scale = scale * np.where(ctrl, 0.0, p["sensitivity"][line, np.where(ctrl, 0, drug)])
    else:
        scale = np.zeros(n)
    # program activities of each cell: line + plate + well + cell state (+ drug programs, scaled)
    act = (p["line_activity"][line] + p["plate_shift"][plate] + p["well_shift"][well]
           + rng.normal(0.0, BIOLOGY["cell_state_sigma"], (n, P)))
    if p["D"]:
        dprog = p["drug_programs"][np.where(ctrl, 0, drug)] + p["line_modifier"][line, np.where(ctrl, 0, drug)]
        act = act + scale[:, None] * dprog
    act = act.astype(f32)
    logits = st["line_logits"][line]  # gather -> new array
    if np.any(scale != 0):
        logits += scale.astype(f32)[:, None] * st["drug_hits"][drug_row]
    for k in range(P):  # sparse programs: exact and BLAS-free, hence identical in every process
        idx = st["prog_idx"][k]
        if idx.size:
            logits[:, idx] += act[:, k : k + 1] * st["prog_val"][k][None, :]
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    lib = np.exp(rng.normal(math.log(cfg.mean_library_size) - 0.5 * cfg.library_size_sigma**2,
                            cfg.library_size_sigma, n))
    theta = float(cfg.dispersion)
    # gamma-Poisson: lambda = mean * Gamma(theta, 1) / theta
    logits *= (lib / (theta * logits.sum(axis=1, dtype=np.float64))).astype(f32)[:, None]
    g = rng.standard_gamma(theta, size=(n, G), dtype=f32)
    g *= logits
    del logits
    counts = rng.poisson(g).reshape(-1)
    del g
    nz = np.flatnonzero(counts)
    rows = nz // G
    cols = nz - rows * G
    return rows, cols, counts[nz]


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
    pos, plate, well, line = _file_cells(cfg, st, f, rng)
    tmp = path.with_name(path.name + ".tmp")
    chunk = _chunk_rows(cfg)
    rgs = int(cfg.row_group_size)
    nnz = 0
    buffered: list[pa.Table] = []
    n_buf = 0
    with pq.ParquetWriter(tmp, PARQUET_SCHEMA, compression="snappy") as writer:
        for a in range(0, pos.size, chunk):
            b = min(pos.size, a + chunk)
            rows, cols, vals = _sample_chunk(cfg, st, rng, plate[a:b], well[a:b], line[a:b])
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
    os.replace(tmp, path)
    return {"file": f, "cells": int(pos.size), "nnz": nnz, "seconds": time.perf_counter() - t0}


def _worker(args) -> dict:
    cfg_dict, f, path = args
    return _write_file(SynthConfig(**cfg_dict), f, Path(path))


# ---------------------------------------------------------------------------------------------
# Metadata and ground truth
# ---------------------------------------------------------------------------------------------


def _write_parquet_atomic(table: pa.Table, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr)
    os.replace(tmp, path)


def _write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _dose_of_well(p: dict, w: int) -> float:
    return 0.0 if p["well_drug"][w] < 0 else float(p["doses"][p["well_dose"][w]])


def _drug_of_well(p: dict, w: int) -> str:
    return schema.TAHOE_CONTROL_DRUG if p["well_drug"][w] < 0 else p["drug_names"][p["well_drug"][w]]


def _write_metadata(cfg: SynthConfig, p: dict, meta: Path) -> None:
    meta.mkdir(parents=True, exist_ok=True)
    _write_parquet_atomic(pa.table({
        "token_id": pa.array(p["token_id"], pa.int64()),
        "ensembl_id": pa.array(p["ensembl_id"], pa.string()),
        "gene_symbol": pa.array(p["gene_symbol"], pa.string()),
    }), meta / schema.GENE_METADATA_FILE)
    D = p["D"]
    _write_parquet_atomic(pa.table({
        "drug": p["drug_names"] + [schema.TAHOE_CONTROL_DRUG],
        "targets": p["drug_targets"] + [""],
        "moa-broad": [_MOA[i][0] for i in p["moa_idx"]] + [_CONTROL_MOA[0]],
        "moa-fine": [_MOA[i][1] for i in p["moa_idx"]] + [_CONTROL_MOA[1]],
        "canonical_smiles": p["smiles"] + [_CONTROL_SMILES],
        "pubchem_cid": p["cids"] + [_CONTROL_CID],
    }, schema=pa.schema([(c, pa.string()) for c in schema.DRUG_METADATA_COLUMNS])), meta / schema.DRUG_METADATA_FILE)
    assert len(p["drug_names"]) == D
    n_wells = len(p["sample_names"])
    _write_parquet_atomic(pa.table({
        "sample": p["sample_names"],
        "plate": [p["plate_names"][p["well_plate"][w]] for w in range(n_wells)],
        "drug": [_drug_of_well(p, w) for w in range(n_wells)],
        "drugname_drugconc": [schema.format_drugconc(_drug_of_well(p, w), _dose_of_well(p, w))
                              for w in range(n_wells)],
    }, schema=pa.schema([(c, pa.string()) for c in schema.SAMPLE_METADATA_COLUMNS])),
        meta / schema.SAMPLE_METADATA_FILE)
    _write_parquet_atomic(pa.table({
        "cell_line_id": pa.array(p["line_ids"], pa.string()),
        "cell_name": pa.array(p["line_names"], pa.string()),
    }), meta / CELL_LINE_METADATA_FILE)


_TRUTH_README = """\
# Ground truth of a synthetic Tahoe-format dataset

Written by `data_sharding/synthetic.py` (generator version {version}); read it back with
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
    base_logits = _line_logits(p)
    base_ls = _log_softmax(base_logits)
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
                eff = _condition_effect(cfg, p, c, d, z)
                fc = _log_softmax(base_logits[c] + eff) - base_ls[c]
                mm_lg[k] = eff
                mm_fc[k] = fc
                h = float(_hill(p, np.array([d]), np.array([z]))[0])
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
    n_wells = len(p["sample_names"])
    _write_parquet_atomic(pa.table({
        "well": pa.array(np.arange(n_wells), pa.int64()),
        "sample": p["sample_names"],
        "plate": [p["plate_names"][q] for q in p["well_plate"]],
        "drug": [_drug_of_well(p, w) for w in range(n_wells)],
        "dose": pa.array([_dose_of_well(p, w) for w in range(n_wells)], pa.float64()),
        "dose_index": pa.array(p["well_dose"], pa.int64()),
        "drugname_drugconc": [schema.format_drugconc(_drug_of_well(p, w), _dose_of_well(p, w))
                              for w in range(n_wells)],
        "is_control": pa.array(p["well_drug"] < 0),
    }), gt / "wells.parquet")
    gw = p["group_cells"].reshape(n_wells, C)
    _write_parquet_atomic(pa.table({
        "sample": np.repeat(np.asarray(p["sample_names"], dtype=object), C).tolist(),
        "plate": np.repeat(np.asarray([p["plate_names"][q] for q in p["well_plate"]], dtype=object), C).tolist(),
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
        "files": [f"{DATA_DIR}/{n}" for n in file_names],
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
    data, meta, gt = out / DATA_DIR, out / METADATA_DIR, out / TRUTH_DIR
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
    names = [_file_name(i, n_files) for i in range(n_files)]
    p = _build_params(cfg)
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
    results = []
    if todo:
        workers = max(1, min(int(cfg.num_workers), len(todo)))
        tasks = [(cfg_dict, i, str(data / names[i])) for i in todo]
        if workers == 1:
            results = [_worker(t) for t in tasks]
        else:
            # A process pool that fails (BrokenProcessPool) rather than hangs when a worker is killed.
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_worker, t) for t in tasks]
                try:
                    for fut in as_completed(futures):
                        results.append(fut.result())
                except BrokenProcessPool as err:
                    for fut in futures:
                        fut.cancel()
                    raise RuntimeError(f"a generator worker died (killed, or out of memory) after {len(results)} "
                                       f"of {len(tasks)} files; rerun generate() to resume") from err
    t_gen = time.perf_counter() - t0
    written_cells = sum(r["cells"] for r in results)

    h5ad = None
    if cfg.write_h5ad:
        h5ad = write_h5ad(out, out / H5AD_NAME)
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
    gm = gt.parent / METADATA_DIR / schema.GENE_METADATA_FILE
    if gm.is_file():
        out["gene_metadata"] = pq.read_table(gm).to_pandas()
    return out


# ---------------------------------------------------------------------------------------------
# h5ad (AnnData on-disk spec, written by hand with h5py, streaming)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Command line: python -m data_sharding.synthetic out_dir=/tmp/synth num_cells=100000 num_workers=2
# ---------------------------------------------------------------------------------------------


def _main(argv: list[str] | None = None) -> None:
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


if __name__ == "__main__":
    _main()
