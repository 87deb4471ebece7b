"""The biological model of the synthetic Tahoe-format dataset: its hidden parameters and per-cell counts.

``dataset.py`` beside it writes the dataset; this module holds the model it samples from:

- ``BIOLOGY``, the hidden constants (recorded in ``ground_truth/truth.json``);
- ``build_params``, every global parameter (genes, gene programs, cell lines, drugs, sensitivities, the plate and
  well layout and shifts, the number of cells of each (plate, well, line) group), a pure function of the config;
- ``file_cells``, the (plate, well, line) of the cells of one parquet file, from closed formulas;
- ``sample_chunk``, the counts of one chunk of cells.

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

Sampling works in ascending token order and float32 (``sampling_arrays``), with the sparse programs applied
without BLAS, so every process draws identical counts from the same generator.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from perturbdiff.config import SynthConfig
from perturbdiff.data import schema

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

_CONTROL_MOA = ("vehicle", "Vehicle control")
_CONTROL_SMILES = "CS(C)=O"
_CONTROL_CID = "679"


def build_params(cfg: SynthConfig) -> dict[str, Any]:
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
    cvcl_chars = list("0123456789ABCDEFGHJKLMNPRSTUVWXYZ")
    line_ids = _unique_names(rng, C, lambda r: "CVCL_" + "".join(r.choice(cvcl_chars, 4)))
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


def hill(p: dict, d: np.ndarray, z: np.ndarray) -> np.ndarray:
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


def hill_at(p: dict, d: int, z: int) -> float:
    """The dose response of drug d at dose index z (one condition)."""
    return float(hill(p, np.array([d]), np.array([z]))[0])


def condition_effect(cfg: SynthConfig, p: dict, c: int, d: int, z: int) -> np.ndarray:
    """The additive logit effect [G] of drug d at dose index z on line c (gene_metadata order)."""
    scale = float(cfg.effect_scale) * hill_at(p, d, z) * p["sensitivity"][c, d]
    prog = p["drug_programs"][d] + p["line_modifier"][c, d]
    return scale * (prog @ p["programs"] + p["drug_hits"][d])


def baseline_logits(p: dict) -> np.ndarray:
    """[C, G] pre-softmax logits of an untreated cell of each line, without plate/well shifts or cell noise."""
    return p["base"][None, :] + p["line_offset"] + p["line_activity"] @ p["programs"]


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def sampling_arrays(p: dict) -> dict:
    """The parameters that ``sample_chunk`` reads besides ``p``, in ascending token order and float32."""
    order = np.argsort(p["token_id"], kind="stable")  # sampling works in ascending token order
    f32 = np.float32
    programs = p["programs"][:, order]
    return {
        "tokens_sorted": p["token_id"][order],
        "line_logits": (p["base"][None, :] + p["line_offset"])[:, order].astype(f32),  # programs added per cell
        "prog_idx": [np.flatnonzero(programs[k]) for k in range(p["P"])],
        "prog_val": [programs[k, np.flatnonzero(programs[k])].astype(f32) for k in range(p["P"])],
        "drug_hits": np.vstack([p["drug_hits"][:, order], np.zeros((1, p["G"]))]).astype(f32),  # last row: control
    }


def drug_columns(p: dict) -> dict[str, list[str]]:
    """The drug_metadata columns: one entry per drug, then DMSO_TF (index D)."""
    return {
        "drug": p["drug_names"] + [schema.TAHOE_CONTROL_DRUG],
        "targets": p["drug_targets"] + [""],
        "moa-broad": [_MOA[i][0] for i in p["moa_idx"]] + [_CONTROL_MOA[0]],
        "moa-fine": [_MOA[i][1] for i in p["moa_idx"]] + [_CONTROL_MOA[1]],
        "canonical_smiles": p["smiles"] + [_CONTROL_SMILES],
        "pubchem_cid": p["cids"] + [_CONTROL_CID],
    }


def well_columns(p: dict) -> dict[str, list]:
    """Per well (sample_metadata row order): sample, plate, drug, dose (0 for the control), drugname_drugconc."""
    n_wells = len(p["sample_names"])
    drug = [schema.TAHOE_CONTROL_DRUG if p["well_drug"][w] < 0 else p["drug_names"][p["well_drug"][w]]
            for w in range(n_wells)]
    dose = [0.0 if p["well_drug"][w] < 0 else float(p["doses"][p["well_dose"][w]]) for w in range(n_wells)]
    return {
        "sample": p["sample_names"],
        "plate": [p["plate_names"][q] for q in p["well_plate"]],
        "drug": drug,
        "dose": dose,
        "drugname_drugconc": [schema.format_drugconc(d, z) for d, z in zip(drug, dose)],
    }


def file_cells(cfg: SynthConfig, p: dict, f: int, rng: np.random.Generator):
    """(plate, well, line) of the cells of file f, in file order, and their global positions."""
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


def sample_chunk(cfg: SynthConfig, st: dict, rng: np.random.Generator, plate, well, line):
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
        scale = float(cfg.effect_scale) * hill(p, np.where(ctrl, 0, drug), dose)
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


