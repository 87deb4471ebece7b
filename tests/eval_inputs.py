"""Small inputs in the evaluation layout (pred / real / train h5ad) with known effects, shared by the
evaluate and report tests: 2 contexts x 3 held-out conditions, 3 sampled populations, 2 real
batches, 60 genes. The "prediction" is a decent model: the true effect shrunk to 70%, plus a
per-population offset."""

from __future__ import annotations

import zlib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

N_GENES = 60
# held-out conditions per context with the size of their real effect (the default choice shows
# the 3 largest: c1/drug/A, c2/drug/A, c1/p3); "drug/A" has a "/" in its name, p3 / p4 are in one
# context only, p2 in both
HELD_OUT = {"c1": {"drug/A": 2.0, "p2": 0.3, "p3": 1.2}, "c2": {"drug/A": 1.6, "p2": 0.2, "p4": 0.4}}
TRAIN_PERTS = ("drug/A", "p2", "p3", "p4", "t1", "t2")
BATCHES = ("b1", "b2")
K = 3


def _effect(pert: str, size: float) -> np.ndarray:
    """A perturbation's shift of the log expression: ``size`` on its own 8 genes, up and down."""
    rng = np.random.default_rng(zlib.crc32(pert.encode()))
    e = np.zeros(N_GENES)
    e[rng.choice(N_GENES, 8, replace=False)] = size * rng.choice([-1.0, 1.0], 8)
    return e


def _cells(rng, base: np.ndarray, shift: np.ndarray, n: int) -> np.ndarray:
    return np.maximum(base + shift + rng.normal(0, 0.35, (n, N_GENES)), 0.0)


def _adata(blocks: list[tuple[np.ndarray, dict]]) -> ad.AnnData:
    x = np.concatenate([b[0] for b in blocks]).astype(np.float32)
    obs = pd.concat([pd.DataFrame({**meta, "is_control": meta["perturbation"] == "control"}, index=range(len(b)))
                     for b, meta in blocks], ignore_index=True)
    obs.index = [f"cell{i}" for i in range(len(obs))]
    return ad.AnnData(sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=[f"G{g:02d}" for g in range(N_GENES)]))


def _meta(pert, context, batch, sample) -> dict:
    return {"perturbation": pert, "context": context, "batch": batch, "sample": sample}


def build_inputs(root: Path) -> dict[str, Path]:
    """pred.h5ad, real.h5ad, train.h5ad under ``root`` (the evaluation layout)."""
    rng = np.random.default_rng(0)
    base = {c: rng.uniform(0.5, 2.5, N_GENES) for c in ("c0", "c1", "c2")}
    real, pred, train = [], [], []
    for c, perts in HELD_OUT.items():
        for b in BATCHES:
            real.append((_cells(rng, base[c], 0, 30), _meta("control", c, b, -1)))
        for p, size in perts.items():
            truth = _effect(p, size)
            for b in BATCHES:
                real.append((_cells(rng, base[c], truth, 20), _meta(p, c, b, -1)))
            for k in range(K):  # a decent model: the right effect, shrunk, plus a per-population offset
                shift = 0.7 * truth + rng.normal(0, 0.1, N_GENES)
                pred.append((_cells(rng, base[c], shift, 30), _meta(p, c, "b1", k)))
    pred += [blk for blk in real if blk[1]["perturbation"] == "control"]  # the same real controls
    for c in ("c0", "c1", "c2"):
        train.append((_cells(rng, base[c], 0, 40), _meta("control", c, "b1", -1)))
        for p in TRAIN_PERTS:
            if p not in HELD_OUT.get(c, {}):
                train.append((_cells(rng, base[c], _effect(p, 1.0), 25), _meta(p, c, "b1", -1)))
    paths = {}
    for name, blocks in (("pred", pred), ("real", real), ("train", train)):
        paths[name] = root / f"{name}.h5ad"
        _adata(blocks).write_h5ad(paths[name])
    return paths
