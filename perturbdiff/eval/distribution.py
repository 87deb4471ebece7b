"""Distribution-level evaluation beyond cell-eval, on the evaluation layout (see ``baselines.py``).

Inputs: a predicted AnnData (obs perturbation, context, sample: population index, -1 for real
cells such as the appended controls) and the real AnnData (obs perturbation, context and, for
calibration, batch = the replicate: plate / donor / lane). Both on the same genes in the same
order. A condition is (context, perturbation); control cells are never a condition.

1. ``condition_distances``: per condition, between the predicted and the real cells,

   - ``energy_distance_v`` = 2 E|X - Y| - E|X - X'| - E|Y - Y'| with Euclidean |.|, the V-statistic
     (every pair, the zero self-pairs included), in float64 on the expression as given. This is the
     statistic cell-eval's ``pearson_edistance`` computes per perturbation (there against controls).
     It is biased upward by about E|X - X'| / n + E|Y - Y'| / m, a lot on small sets.
   - ``energy_distance_u``: the same with the within-set means over distinct pairs only, the
     unbiased U-statistic (0 in expectation for two samples of one distribution).
   - ``mmd2`` = MMD^2 (V-statistic) through the training op ``perturbdiff.ops.kme.mmd2`` (energy
     kernel by default) on cells scaled by 1 / sqrt(genes), the training loss's scale. For the energy
     kernel k(x, y) = -|x - y| this is ``energy_distance_v / sqrt(genes)`` (up to float32 rounding).

   Cells beyond ``cap`` per side are subsampled without replacement, seeded by (seed, context,
   perturbation[, sample]) so a condition's value does not depend on which other conditions are
   scored. By default all sampled populations of a condition are pooled (the model's marginal
   distribution of cells); ``per_sample=True`` gives one row per population.

2. ``replicate_calibration``: is the distribution over distributions calibrated? For a condition
   with real replicate batches r_1..r_J and K sampled populations s_1..s_K:

   - pseudobulks: R[j] = mean expression of replicate j's cells, S[k] = mean of population k's cells
     (genes as columns). With ``match_cells`` (default) every replicate and population is first
     subsampled (seeded, without replacement) to the same number of cells m = the smallest of them,
     so the within-population sampling noise of a mean (var / m) is the same on both sides and only
     the between-population spread is compared. Replicates / populations with fewer than
     ``min_cells`` cells are left out.
   - genes: those whose K + J pseudobulk values are not all equal (e.g. all-zero genes carry no
     information and would count as covered); ``n_genes`` says how many.
   - coverage at level a: with the sample means of a gene sorted, S_(1) <= ... <= S_(K), the
     interval is [S_(i), S_(K+1-i)] with i = max(1, floor((K + 1)(1 - a) / 2)). If R[j] and the S[k]
     are exchangeable draws (a calibrated model), R[j] lands inside with probability exactly
     ``nominal_a`` = (K + 1 - 2 i) / (K + 1) (continuous values; ties can only add coverage). This is
     >= a when K is large enough, else the widest interval [min, max] with nominal (K - 1)/(K + 1).
     ``coverage_a`` = the fraction of (replicate, gene) pairs inside the interval, averaged over
     genes then replicates. Coverage well below nominal: the sampled populations are too alike (or
     biased); above nominal: too spread.
   - rank histogram (PIT): rank[j, g] = #{k: S[k, g] < R[j, g]} + U, U uniform on {0..#ties}
     (randomised ties), an integer in 0..K, uniform under calibration. Returned as ``pit_hist``
     (K + 1 counts over all replicate x gene pairs), ``pit_mean`` = mean(rank) / K (0.5 when
     calibrated; > 0.5: the real replicates lie above the samples, i.e. the model under-predicts)
     and ``pit_var_ratio`` = var(rank) / ((K + 1)^2 - 1) * 12 (1 when calibrated; > 1: U-shaped,
     samples too narrow; < 1: hump-shaped, samples too wide).

   Values are NaN, with ``reason`` saying why, when K < 2 or J < 1 (after ``min_cells``) or no gene
   varies. The condition's replicate and population counts are reported as ``n_samples`` (K) and
   ``n_replicates`` (J).
"""

from __future__ import annotations

import math
import zlib
from typing import Sequence

import anndata as ad
import numpy as np
import pandas as pd
import torch

from ..data.schema import DataError
from ..ops.kme import mmd2
from .inputs import KEY, as_conditions, dense_rows, group_rows, obs_str, require_obs, require_same_genes

# ---------------------------------------------------------------------------------------------
# Energy distance
# ---------------------------------------------------------------------------------------------


def _sum_dist(a: torch.Tensor, b: torch.Tensor, self_pair: bool, block: int = 1 << 22) -> float:
    """Sum of Euclidean distances over all (i, j) pairs of rows of a and b (float64, row blocks)."""
    total = 0.0
    bn = (b * b).sum(1)
    step = max(1, block // max(1, b.shape[0]))
    for s in range(0, a.shape[0], step):
        blk = a[s:s + step]
        d2 = (blk * blk).sum(1)[:, None] + bn[None, :] - 2.0 * (blk @ b.T)
        if self_pair:  # exact zeros on the diagonal, whatever the rounding
            idx = torch.arange(blk.shape[0], device=a.device)
            d2[idx, idx + s] = 0.0
        total += d2.clamp_min_(0.0).sqrt_().sum().item()
    return total


def energy_distances(x, y, device: str | torch.device = "cpu") -> tuple[float, float]:
    """(U, V) energy distances 2 E|X-Y| - E|X-X'| - E|Y-Y'| (Euclidean, float64) between the rows of
    x [n, G] and y [m, G]. They share the pair sums and differ in the within-set means: the
    V-statistic (cell-eval's helper) averages over all n^2 pairs, the zero self-pairs included, which
    biases it upward by about (E|X-X'| / n + E|Y-Y'| / m); the U-statistic averages over the n(n - 1)
    distinct pairs and is unbiased (it can be slightly negative). U is NaN for a set of one cell."""
    xt = torch.as_tensor(np.asarray(x), dtype=torch.float64, device=device)
    yt = torch.as_tensor(np.asarray(y), dtype=torch.float64, device=device)
    if xt.ndim != 2 or yt.ndim != 2 or xt.shape[1] != yt.shape[1]:
        raise ValueError(f"energy_distance needs [n, G] and [m, G] arrays, got {tuple(xt.shape)} and {tuple(yt.shape)}")
    n, m = xt.shape[0], yt.shape[0]
    if n == 0 or m == 0:
        return float("nan"), float("nan")
    sxy, sxx, syy = _sum_dist(xt, yt, False), _sum_dist(xt, xt, True), _sum_dist(yt, yt, True)
    v = 2.0 * sxy / (n * m) - sxx / (n * n) - syy / (m * m)
    u = 2.0 * sxy / (n * m) - sxx / (n * (n - 1)) - syy / (m * (m - 1)) if n > 1 and m > 1 else float("nan")
    return u, v


def energy_distance(x, y, device: str | torch.device = "cpu") -> float:
    """The V-statistic of ``energy_distances`` (cell-eval's helper's statistic)."""
    return energy_distances(x, y, device)[1]


# ---------------------------------------------------------------------------------------------
# Selecting conditions
# ---------------------------------------------------------------------------------------------


def _seed(seed: int, *parts) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32("\x00".join(map(str, parts)).encode())])


def _sample_ids(adata: ad.AnnData) -> np.ndarray:
    return adata.obs["sample"].to_numpy().astype(np.int64)


def _pred_real_groups(pred: ad.AnnData, real: ad.AnnData, conditions, control_label: str,
                      pred_cols: Sequence[str]) -> tuple[list[tuple[str, str]], dict, dict]:
    """The conditions to score and {condition: rows} of predicted (sample >= 0) and real cells."""
    require_obs(pred, ("perturbation", "context", *pred_cols), "pred")
    require_obs(real, ("perturbation", "context"), "real")
    require_same_genes(pred, real, "pred", "real")
    p_mask = obs_str(pred, "perturbation") != control_label
    if "sample" in pred.obs.columns:
        p_mask &= _sample_ids(pred) >= 0
    if "is_control" in pred.obs.columns:
        p_mask &= ~pred.obs["is_control"].to_numpy().astype(bool)
    r_mask = obs_str(real, "perturbation") != control_label
    if "sample" in real.obs.columns:
        r_mask &= _sample_ids(real) < 0
    pg, rg = group_rows(pred, p_mask), group_rows(real, r_mask)
    if conditions is None:
        conds = sorted(pg)
        unknown = [k for k in conds if k not in rg]
        if unknown:
            raise DataError(None, f"real has no cells of predicted condition(s) {unknown[:10]}")
    else:
        conds = [tuple(k) for k in as_conditions(conditions, need=())[list(KEY)].to_numpy()]
        no_pred = [k for k in conds if k not in pg]
        no_real = [k for k in conds if k not in rg]
        if no_pred or no_real:
            raise DataError(None, f"unknown condition(s): not in pred {no_pred[:10]}, not in real {no_real[:10]}")
    return conds, pg, rg


def _cap(rows: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    if cap is None or len(rows) <= cap:
        return rows
    return np.sort(rng.choice(rows, size=cap, replace=False))


# ---------------------------------------------------------------------------------------------
# Per-condition distances
# ---------------------------------------------------------------------------------------------


def condition_distances(pred: ad.AnnData, real: ad.AnnData, conditions=None, *, cap: int | None = 2000,
                        seed: int = 0, per_sample: bool = False, kernel: str = "energy",
                        bandwidths: Sequence[float] = (1.0,), impl: str = "auto", device: str = "cpu",
                        control_label: str = "control") -> pd.DataFrame:
    """Per condition (and per sampled population with ``per_sample``): MMD^2 through the training op
    and the float64 energy distance between predicted and real cells (see the module docstring).

    Columns: context, perturbation, [sample], n_pred, n_real (cells available), n_pred_used,
    n_real_used (after ``cap``), mmd2, energy_distance_u (unbiased), energy_distance_v (V-statistic).
    ``conditions`` defaults to every predicted
    condition; a condition missing from either side is an error naming it."""
    conds, pg, rg = _pred_real_groups(pred, real, conditions, control_label, ("sample",) if per_sample else ())
    genes = pred.n_vars
    scale = 1.0 / math.sqrt(genes)
    samples = _sample_ids(pred) if per_sample else None
    out = []
    for c, p in conds:
        r_rows = rg[(c, p)]
        parts = [(None, pg[(c, p)])]
        if per_sample:
            ids = samples[pg[(c, p)]]
            parts = [(int(s), pg[(c, p)][ids == s]) for s in np.unique(ids)]
        for s, p_rows in parts:
            rng = _seed(seed, c, p, "" if s is None else s)
            pu, ru = _cap(p_rows, cap, rng), _cap(r_rows, cap, rng)
            x, y = dense_rows(pred.X, pu), dense_rows(real.X, ru)
            xt = torch.as_tensor(x * scale, dtype=torch.float32, device=device)[None]
            yt = torch.as_tensor(y * scale, dtype=torch.float32, device=device)[None]
            m = float(mmd2(xt, yt, None, None, kernel, tuple(bandwidths), False, impl=impl)[0])
            row = {"context": c, "perturbation": p}
            if per_sample:
                row["sample"] = s
            u, v = energy_distances(x, y, device)
            row.update(n_pred=len(p_rows), n_real=len(r_rows), n_pred_used=len(pu), n_real_used=len(ru),
                       mmd2=m, energy_distance_u=u, energy_distance_v=v)
            out.append(row)
    cols = ["context", "perturbation", *(["sample"] if per_sample else []), "n_pred", "n_real", "n_pred_used",
            "n_real_used", "mmd2", "energy_distance_u", "energy_distance_v"]
    return pd.DataFrame(out, columns=cols)


# ---------------------------------------------------------------------------------------------
# Calibration of the distribution over distributions
# ---------------------------------------------------------------------------------------------


def interval_index(k: int, level: float) -> tuple[int, float]:
    """(i, nominal): the central interval [S_(i), S_(K+1-i)] (1-based order statistics) of K draws for
    ``level`` and its exact coverage of one more exchangeable draw, (K + 1 - 2i) / (K + 1)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"calibration levels must be in (0, 1), got {level}")
    i = max(1, math.floor((k + 1) * (1.0 - level) / 2.0 + 1e-12))
    return i, (k + 1 - 2 * i) / (k + 1)


def _level_name(level: float) -> str:
    return f"{100 * level:g}".replace(".", "_")


def calibration_scores(S: np.ndarray, R: np.ndarray, levels: Sequence[float] = (0.5, 0.8, 0.9),
                       rng: np.random.Generator | None = None) -> dict:
    """Coverage and rank-histogram summaries of replicate pseudobulks R [J, G] against sample
    pseudobulks S [K, G] (the definitions of the module docstring; genes already selected)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    K = S.shape[0]
    Ss = np.sort(S, axis=0)
    out: dict = {}
    for a in levels:
        i, nominal = interval_index(K, a)
        lo, hi = Ss[i - 1], Ss[K - i]
        inside = (R >= lo[None]) & (R <= hi[None])
        name = _level_name(a)
        out[f"coverage_{name}"] = float(inside.mean(1).mean())
        out[f"nominal_{name}"] = nominal
    lt = (S[None, :, :] < R[:, None, :]).sum(1)
    eq = (S[None, :, :] == R[:, None, :]).sum(1)
    rank = lt + np.floor(rng.random(lt.shape) * (eq + 1)).astype(np.int64)
    out["pit_mean"] = float(rank.mean() / K)
    out["pit_var_ratio"] = float(rank.var() / (((K + 1) ** 2 - 1) / 12.0))
    out["pit_hist"] = np.bincount(rank.ravel(), minlength=K + 1)
    return out


def replicate_calibration(pred: ad.AnnData, real: ad.AnnData, conditions=None, *,
                          levels: Sequence[float] = (0.5, 0.8, 0.9), match_cells: bool = True, min_cells: int = 10,
                          batch_key: str = "batch", seed: int = 0, control_label: str = "control") -> pd.DataFrame:
    """Per condition: do the real replicates' pseudobulks fall within the spread of the K sampled
    populations' pseudobulks? (Definitions in the module docstring.)

    Columns: context, perturbation, n_samples (K), n_replicates (J), n_cells (cells per pseudobulk
    with ``match_cells``, else NaN), n_genes, coverage_<level%> and nominal_<level%> per level (e.g.
    coverage_90, nominal_90), pit_mean, pit_var_ratio, pit_hist (array of K + 1 counts, or None),
    reason ("" when defined; why the values are NaN otherwise)."""
    for a in levels:
        interval_index(2, a)  # validates
    require_obs(real, (batch_key,), "real")
    conds, pg, rg = _pred_real_groups(pred, real, conditions, control_label, ("sample",))
    samples = _sample_ids(pred)
    batches = obs_str(real, batch_key)
    rows = []
    for c, p in conds:
        rng = _seed(seed, c, p, "calibration")
        pops = {int(s): pg[(c, p)][samples[pg[(c, p)]] == s] for s in np.unique(samples[pg[(c, p)]])}
        reps = {str(b): rg[(c, p)][batches[rg[(c, p)]] == b] for b in np.unique(batches[rg[(c, p)]])}
        pops = {k: v for k, v in pops.items() if len(v) >= min_cells}
        reps = {k: v for k, v in reps.items() if len(v) >= min_cells}
        K, J = len(pops), len(reps)
        row = {"context": c, "perturbation": p, "n_samples": K, "n_replicates": J, "n_cells": np.nan,
               "n_genes": 0}
        for a in levels:
            row[f"coverage_{_level_name(a)}"] = np.nan
            row[f"nominal_{_level_name(a)}"] = interval_index(K, a)[1] if K >= 2 else np.nan
        row.update(pit_mean=np.nan, pit_var_ratio=np.nan, pit_hist=None, reason="")
        if K < 2 or J < 1:
            why = []
            if K < 2:
                why.append(f"{K} sampled population(s) with >= {min_cells} cells (need >= 2)")
            if J < 1:
                why.append(f"no real replicate ({batch_key!r}) with >= {min_cells} cells")
            row["reason"] = "; ".join(why)
            rows.append(row)
            continue
        if match_cells:
            m = min(len(v) for v in (*pops.values(), *reps.values()))
            row["n_cells"] = m
            pick = lambda v, m=m, rng=rng: np.sort(rng.choice(v, size=m, replace=False))  # noqa: E731
        else:
            pick = lambda v: v  # noqa: E731
        S = np.stack([dense_rows(pred.X, pick(pops[k])).mean(0) for k in sorted(pops)])
        R = np.stack([dense_rows(real.X, pick(reps[k])).mean(0) for k in sorted(reps)])
        varies = np.ptp(np.concatenate([S, R]), axis=0) > 0
        row["n_genes"] = int(varies.sum())
        if not varies.any():
            row["reason"] = "no gene varies across the sampled and replicate pseudobulks"
            rows.append(row)
            continue
        row.update(calibration_scores(S[:, varies], R[:, varies], levels, rng))
        rows.append(row)
    return pd.DataFrame(rows)
