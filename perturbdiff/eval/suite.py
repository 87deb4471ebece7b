"""The evaluation suite: cell-eval 0.6.6's metrics (plus CellFlow's R^2) on a pair of AnnData objects.

Contract: ``real`` and ``pred`` have the same ``var_names`` in the same order,
log-normalised ``.X`` (dense or scipy sparse), ``obs[pert_col]`` and ``obs[context_col]``, and the same
real control cells (``obs[pert_col] == control``) in both. Every (context, perturbation) present in
``pred`` is one *condition*; it is scored against the control cells of its own context. Each context is
evaluated as cell-eval evaluates one AnnData pair (``cell-eval run --celltype-col`` splits the same
way): DE FDR over all tests of the context, discrimination ranks among the conditions of the context,
``de_spearman_sig`` / ``pearson_edistance`` across them. With one context this is plain cell-eval.

Definitions (cell-eval 0.6.6 source, ``cell_eval/metrics/_anndata.py``, ``_de.py``, ``_types/_de.py``).
mu = pseudobulk = mean of ``.X`` over a condition's cells; delta = mu(pert) - mu(ctrl), each AnnData's
delta against *its own* controls (pred against pred's controls).

- ``pearson_delta``: Pearson r over genes of delta_pred vs delta_real.
- ``mse`` / ``mae``: mean over genes of (mu_pred - mu_real)^2 / |.| (no control subtraction).
- ``mse_delta`` / ``mae_delta``: the same on the deltas.
- ``r_squared``: CellFlow's ``compute_r_squared``: sklearn ``r2_score(mu_real, mu_pred)`` over genes
  (1 - SS_res / SS_tot; 1 if both are 0, 0 if only SS_tot is 0).
- ``discrimination_score_{l1,l2,cosine}``: distances of delta_pred[p] to every delta_real[q] of the
  context, leaving out the gene(s) named like p; score = 1 - rank / K (rank 0 = the true q = p is the
  nearest). Ties at the true distance count half (cell-eval's argsort breaks exact ties arbitrarily).
- ``pearson_edistance`` (context scalar): Pearson r across conditions of the energy distance to the
  controls, E = 2 mean d(X_p, X_ctrl) - mean d(X_p, X_p) - mean d(X_ctrl, X_ctrl) (Euclidean, means over
  all pairs including self-pairs), real vs pred. (The control term is one constant per side and does
  not change the correlation, so it is not computed.)
- DE (``perturbdiff.eval.de``): Wilcoxon rank-sum per gene vs the context's controls, BH over all
  conditions x genes of the context, significant = ``fdr < de_fdr``. As cell-eval stores the DE tables
  in float32, significance, the |log2 FC| ranking and the fold changes below use float32-rounded values.
  S_real / S_pred: significant genes; both ranked by |log2 FC| descending (ties: gene order).
- ``overlap_at_N``: |top_k(S_real) & top_k(S_pred)| / k with k = |S_real|; ``overlap_at_{n}``:
  k = min(n, |S_real|). 0 when k = 0.
- ``precision_at_N`` / ``precision_at_{n}``: the same with k = |S_pred| (min(n, |S_pred|)).
- ``de_direction_match``: over S_real, fraction of genes whose log2 FC sign agrees (NaN if S_real empty).
- ``de_spearman_lfc_sig``: Spearman over S_real of real vs pred fold change (NaN if < 2 genes).
- ``de_sig_genes_recall``: |S_real & S_pred| / |S_real| (NaN if S_real empty).
- ``de_nsig_counts_real`` / ``de_nsig_counts_pred``: |S_real|, |S_pred|.
- ``de_spearman_sig`` (context scalar): Spearman across conditions with |S_real| > 0 of |S_real| vs
  |S_pred|.
- ``roc_auc`` / ``pr_auc``: labels fdr_real < de_fdr over all genes, scores -log10(fdr_pred) (an fdr of
  exactly 0 counts as 1e-10); ROC AUC (trapezoid) and sklearn's average precision. NaN if one class.
  (cell-eval fixes the label threshold at 0.05; here it follows ``de_fdr``, default 0.05.)

Intended differences from cell-eval 0.6.6 (each listed in the parity test): ``de_spearman_sig`` is NaN
(cell-eval: 1.0) when no condition has a real DE gene; metrics cell-eval fails on (``pearson_edistance``
with one condition) are NaN here; exact distance ties in the discrimination scores count half;
integer-valued (count) ``.X`` is not normalised here (cell-eval runs normalize_total + log1p; a note
says so); DE rank sums and z are exact float64 (pdex uses ``.X``'s dtype), while the p-values' tails
are rounded to ``.X``'s dtype as scipy computes them (float32 data: tails below ~7e-46 are 0).
Exact |log2 FC| ties in the top-N sets (fold changes clipped at 20 or 1/20 are common) are broken in
gene order here; cell-eval's polars ordinal rank over a window does not keep that order, so its
overlap/precision can differ on such ties (0.044 measured on one condition of the devel h5ad, from
identical DE tables).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from scipy.stats import rankdata

from .de import DEFAULT_MAX_ELEMS, differential_expression
from .inputs import dense_rows, group_means, numeric_matrix, obs_str, require_same_genes, rows_by

__all__ = ["EvalResult", "evaluate", "metric_names", "REFERENCE"]

REFERENCE = "cell-eval 0.6.6 (pdex 0.1.26) definitions; r_squared as CellFlow's compute_r_squared"

ANNDATA_METRICS = ("pearson_delta", "mse", "mae", "mse_delta", "mae_delta", "r_squared",
                   "discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
                   "pearson_edistance")
DE_SCALAR_METRICS = ("de_spearman_sig",)
AUC_CLIP = np.float32(1e-10)
# Dense entries per block of perturbed cells in the energy distances (16 MB in float64).
BLOCK_ELEMS = 1 << 21


def metric_names(top_n: Iterable[int] = (50, 100, 200)) -> list[str]:
    """All metric columns ``evaluate`` can produce, in output order."""
    top_n = [int(n) for n in top_n]
    names = list(ANNDATA_METRICS)
    names += ["overlap_at_N"] + [f"overlap_at_{n}" for n in top_n]
    names += ["precision_at_N"] + [f"precision_at_{n}" for n in top_n]
    names += ["de_direction_match", "de_spearman_lfc_sig", "de_spearman_sig", "de_sig_genes_recall",
              "de_nsig_counts_real", "de_nsig_counts_pred", "roc_auc", "pr_auc"]
    return names


@dataclass
class EvalResult:
    """Output of ``evaluate``.

    - ``per_condition``: one row per (context, perturbation): ``context``, ``perturbation``,
      ``n_cells_real``, ``n_cells_pred`` and one column per metric (context scalars repeated).
    - ``aggregated``: one row per metric: count (non-NaN conditions), mean, median, std (ddof 1), min, max.
    - ``per_context``: the same statistics per (context, metric).
    - ``notes``: every metric left NaN or defined by convention, and other warnings about the input.
    - ``de_real`` / ``de_pred``: long DE tables (context, target, feature, statistic, p_value, fdr,
      fold_change, log2_fold_change) when ``return_de=True``.
    """

    per_condition: pd.DataFrame
    aggregated: pd.DataFrame
    per_context: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=list)
    de_real: pd.DataFrame | None = None
    de_pred: pd.DataFrame | None = None
    reference: str = REFERENCE


# ----------------------------------------------------------------------------------------------------
# input handling


def _load(x, which: str):
    if isinstance(x, (str, Path)):
        import anndata as ad

        path = Path(x)
        if not path.exists():
            raise ValueError(f"{which} AnnData file not found: {path}")
        return ad.read_h5ad(path), f"{which} ({path})"
    return x, which


def _looks_like_counts(x) -> bool:
    data = x.data if sp.issparse(x) else x
    if data.size == 0:
        return False
    sample = np.asarray(data).ravel()[:1_000_000]
    return not bool(np.any(np.abs(np.modf(sample)[0]) > 1e-3))


# ----------------------------------------------------------------------------------------------------
# numeric helpers


def _rows_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    am = a - a.mean(axis=1, keepdims=True)
    bm = b - b.mean(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (am * bm).sum(1) / np.sqrt((am * am).sum(1) * (bm * bm).sum(1))
    return np.clip(r, -1.0, 1.0)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return float("nan")
    return float(_rows_pearson(a[None, :].astype(np.float64), b[None, :].astype(np.float64))[0])


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2:
        return float("nan")
    return _pearson(rankdata(a), rankdata(b))


def _r2(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """sklearn r2_score (force_finite) per row."""
    ss_res = ((y_true - y_pred) ** 2).sum(1)
    ss_tot = ((y_true - y_true.mean(1, keepdims=True)) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - ss_res / ss_tot
    return np.where(ss_tot == 0, np.where(ss_res == 0, 1.0, 0.0), r2)


def _discrimination(pred_eff: np.ndarray, real_eff: np.ndarray, excl: list[np.ndarray], metric: str) -> np.ndarray:
    """cell-eval's discrimination score for each row p of pred_eff among the rows of real_eff."""
    k = pred_eff.shape[0]
    if metric == "l1":
        d = cdist(pred_eff, real_eff, "cityblock")
        for p, g in enumerate(excl):
            if g.size:
                d[p] -= np.abs(pred_eff[p, g][None, :] - real_eff[:, g]).sum(1)
    elif metric == "l2":
        d = cdist(pred_eff, real_eff, "sqeuclidean")
        for p, g in enumerate(excl):
            if g.size:
                d[p] -= ((pred_eff[p, g][None, :] - real_eff[:, g]) ** 2).sum(1)
        d = np.sqrt(np.maximum(d, 0.0))
    elif metric == "cosine":
        dot = pred_eff @ real_eff.T
        nf = np.broadcast_to((pred_eff ** 2).sum(1)[:, None], (k, k)).copy()
        nr = np.broadcast_to((real_eff ** 2).sum(1)[None, :], (k, k)).copy()
        for p, g in enumerate(excl):
            if g.size:
                dot[p] -= real_eff[:, g] @ pred_eff[p, g]
                nf[p] -= (pred_eff[p, g] ** 2).sum()
                nr[p] -= (real_eff[:, g] ** 2).sum(1)
        den = np.sqrt(np.maximum(nf, 0.0) * np.maximum(nr, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = np.where(den > 0, dot / den, 0.0)
        d = np.clip(1.0 - sim, 0.0, 2.0)
    else:
        raise ValueError(metric)
    own = np.diag(d)[:, None]
    less = (d < own).sum(1)
    ties = (d == own).sum(1) - 1
    rank = less + 0.5 * ties
    return 1.0 - rank / k


def _sqrt_row_sums(d2: np.ndarray) -> np.ndarray:
    """Row sums of sqrt(max(d2, 0)), in place."""
    np.maximum(d2, 0.0, out=d2)
    return np.sqrt(d2, out=d2).sum(1)


def _single_thread_blas():
    """A context factory in which BLAS runs on one thread (threadpoolctl, when installed; else a no-op)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext
    ctl = ThreadpoolController()
    return lambda: ctl.limit(limits=1, user_api="blas")


def _mean_pair_dist(a: np.ndarray, na: np.ndarray, max_elems: int) -> float:
    """Mean Euclidean distance over all ordered pairs of rows of ``a`` (self-pairs 0); na = |row|^2."""
    m = a.shape[0]
    step = max(1, max_elems // m)
    tot = 0.0
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        d2 = a @ a[lo:hi].T
        d2 *= -2.0
        d2 += na[:, None]
        d2 += na[None, lo:hi]
        d2[np.arange(lo, hi), np.arange(hi - lo)] = 0.0
        tot += float(_sqrt_row_sums(d2).sum())
    return tot / (m * m)


def _energy_terms(x, groups: Sequence[np.ndarray], ctrl: np.ndarray, max_elems: int) -> np.ndarray:
    """Per group k: 2 mean d(X_k, X_ctrl) - mean d(X_k, X_k) (Euclidean, all pairs, self-pairs 0).

    Squared distances as sklearn computes them, |x|^2 + |y|^2 - 2 x.y clamped at 0, with float64 GEMMs.
    The controls are densified once (in blocks if they exceed max_elems), the perturbed cells a few
    whole groups at a time (about BLOCK_ELEMS entries: blocks this small stay cached and reuse freed
    memory); each block gives its cells' distances to the controls (one GEMM per control block) and each
    group's own pairs (one small GEMM per group, on one BLAS thread: OpenBLAS's threads cost more than
    they bring there, much more on a busy machine).
    """
    n_genes = max(1, x.shape[1])
    k = len(groups)
    sizes = np.array([len(g) for g in groups])
    cs = int(min(ctrl.size, max(1, max_elems // n_genes)))

    def dense_with_norms(rows, scale=1.0):
        m = dense_rows(x, rows)
        return m * scale, np.einsum("ij,ij->i", m, m)

    ctrl_blocks = [ctrl[lo:lo + cs] for lo in range(0, ctrl.size, cs)]
    # controls times -2 (exact), so that the GEMM gives -2 x.y
    cached = dense_with_norms(ctrl, -2.0) if len(ctrl_blocks) == 1 else None
    rows_per_block = int(max(1, min(max_elems, BLOCK_ELEMS) // max(n_genes, cs)))
    single_thread = _single_thread_blas()
    cross = np.empty(k)
    own = np.empty(k)
    i = 0
    while i < k:  # groups [i, j)
        j, n = i + 1, sizes[i]
        while j < k and n + sizes[j] <= rows_per_block:
            n += sizes[j]
            j += 1
        a, na = dense_with_norms(np.concatenate(groups[i:j]))
        sums = np.zeros(a.shape[0])
        for cb in ctrl_blocks:
            b, nb = cached or dense_with_norms(cb, -2.0)
            d2 = a @ b.T
            d2 += na[:, None]
            d2 += nb[None, :]
            sums += _sqrt_row_sums(d2)
        off = np.concatenate([[0], np.cumsum(sizes[i:j])])
        cross[i:j] = np.add.reduceat(sums, off[:-1])
        with single_thread():
            own[i:j] = [_mean_pair_dist(a[lo:hi], na[lo:hi], max_elems) for lo, hi in zip(off[:-1], off[1:])]
        i = j
    return 2.0 * cross / (sizes * ctrl.size) - own


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn.metrics.average_precision_score for one binary problem."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    s = scores[order]
    y = labels[order].astype(np.float64)
    distinct = np.flatnonzero(np.diff(s))
    thr = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[thr]
    fps = 1 + thr - tps
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


# ----------------------------------------------------------------------------------------------------
# the suite


def evaluate(real, pred, *, control: str = "control", pert_col: str = "perturbation",
             context_col: str | None = "context", metrics: Sequence[str] | None = None, de_fdr: float = 0.05,
             top_n: Sequence[int] = (50, 100, 200), return_de: bool = False,
             max_elems: int = DEFAULT_MAX_ELEMS) -> EvalResult:
    """Score ``pred`` against ``real`` (AnnData objects or .h5ad paths) per (context, perturbation).

    ``metrics``: a subset of ``metric_names(top_n)`` (``"de_nsig_counts"`` selects both count columns);
    None = all. ``context_col=None`` treats all cells as one context. DE is only run when a DE metric is
    requested, the single-cell energy distances only for ``pearson_edistance``. ``max_elems`` bounds the
    entries one vectorised pass holds (memory).
    """
    real, lr = _load(real, "real")
    pred, lp = _load(pred, "pred")
    top_n = tuple(int(n) for n in top_n)
    all_names = metric_names(top_n)
    if metrics is None:
        wanted = list(all_names)
    else:
        req = []
        for m in metrics:
            req += ["de_nsig_counts_real", "de_nsig_counts_pred"] if m == "de_nsig_counts" else [m]
        unknown = [m for m in req if m not in all_names]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; known: {all_names}")
        wanted = [m for m in all_names if m in set(req)]
    de_wanted = [m for m in wanted if m not in ANNDATA_METRICS]
    notes: list[str] = []

    genes = require_same_genes(real, pred, lr, lp)
    xr, xp = numeric_matrix(real, lr), numeric_matrix(pred, lp)
    for x, lab in ((xr, lr), (xp, lp)):
        if _looks_like_counts(x):
            notes.append(f"{lab}: .X looks integer-valued (raw counts?); it is scored as given, while "
                         f"cell-eval would normalize_total + log1p it first")
    pr_col = obs_str(real, pert_col, lr)
    pp_col = obs_str(pred, pert_col, lp)
    if context_col is None:
        cr_col = np.full(real.n_obs, "all", dtype=object).astype(str)
        cp_col = np.full(pred.n_obs, "all", dtype=object).astype(str)
    else:
        cr_col = obs_str(real, context_col, lr)
        cp_col = obs_str(pred, context_col, lp)
    if not np.any(pr_col == control):
        raise ValueError(f"{lr}: no control cells (obs[{pert_col!r}] == {control!r})")
    if not np.any(pp_col == control):
        raise ValueError(f"{lp}: no control cells (obs[{pert_col!r}] == {control!r})")

    idx_r = rows_by(cr_col, pr_col, sort=False)
    idx_p = rows_by(cp_col, pp_col, sort=False)
    by_ctx_r: dict[str, set] = {}
    for c, p in idx_r:
        by_ctx_r.setdefault(c, set()).add(p)
    rows: list[dict] = []
    de_tables_r, de_tables_f = [], []
    for ctx in sorted({c for c, p in idx_p if p != control}):
        ctrl_r = idx_r.get((ctx, control))
        ctrl_p = idx_p.get((ctx, control))
        if ctrl_r is None:
            raise ValueError(f"{lr}: context {ctx!r} has no control cells (obs[{pert_col!r}] == {control!r})")
        if ctrl_p is None:
            raise ValueError(f"{lp}: context {ctx!r} has no control cells (obs[{pert_col!r}] == {control!r})")
        perts = sorted(p for c, p in idx_p if c == ctx and p != control)
        real_perts = by_ctx_r.get(ctx, set()) - {control}
        missing = [p for p in perts if p not in real_perts]
        if missing:
            raise ValueError(f"condition(s) in {lp} missing from {lr}: context {ctx!r}, perturbation(s) "
                             f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
        extra = sorted(real_perts - set(perts))
        if extra:
            notes.append(f"context {ctx!r}: {len(extra)} real condition(s) absent from pred are not scored "
                         f"(nor part of the DE FDR): {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        k = len(perts)
        gr = [idx_r[(ctx, p)] for p in perts]
        gp = [idx_p[(ctx, p)] for p in perts]

        mu_r = group_means(xr, gr)
        mu_f = group_means(xp, gp)
        c_r = group_means(xr, [ctrl_r])[0]
        c_f = group_means(xp, [ctrl_p])[0]
        if ctrl_r.size != ctrl_p.size or not np.allclose(c_r, c_f, rtol=1e-5, atol=1e-6):
            notes.append(f"context {ctx!r}: pred's control cells differ from real's ({ctrl_p.size} vs "
                         f"{ctrl_r.size} cells or different means); each side's deltas and DE use its own "
                         f"controls, as in cell-eval")
        d_r, d_f = mu_r - c_r, mu_f - c_f
        res: dict[str, np.ndarray] = {}
        if "pearson_delta" in wanted:
            res["pearson_delta"] = _rows_pearson(d_f, d_r)
        if "mse" in wanted:
            res["mse"] = ((mu_f - mu_r) ** 2).mean(1)
        if "mae" in wanted:
            res["mae"] = np.abs(mu_f - mu_r).mean(1)
        if "mse_delta" in wanted:
            res["mse_delta"] = ((d_f - d_r) ** 2).mean(1)
        if "mae_delta" in wanted:
            res["mae_delta"] = np.abs(d_f - d_r).mean(1)
        if "r_squared" in wanted:
            res["r_squared"] = _r2(mu_r, mu_f)
        excl = [np.flatnonzero(genes == p) for p in perts]
        for dm in ("l1", "l2", "cosine"):
            name = f"discrimination_score_{dm}"
            if name in wanted:
                res[name] = _discrimination(d_f, d_r, excl, dm)
                if k == 1:
                    notes.append(f"{name}: context {ctx!r} has one condition, the score is trivially 1")
        if "pearson_edistance" in wanted:
            if k < 2:
                val = float("nan")
                notes.append(f"pearson_edistance: NaN for context {ctx!r} (needs >= 2 conditions, has {k})")
            else:
                e_r = _energy_terms(xr, gr, ctrl_r, max_elems)
                e_f = _energy_terms(xp, gp, ctrl_p, max_elems)
                val = _pearson(e_f, e_r)
                if np.isnan(val):
                    notes.append(f"pearson_edistance: NaN for context {ctx!r} (constant energy distances)")
            res["pearson_edistance"] = np.full(k, val)

        if de_wanted:
            res.update(_de_metrics(xr, xp, gr, gp, ctrl_r, ctrl_p, perts, genes, ctx, wanted, de_fdr, top_n,
                                   notes, max_elems, de_tables_r, de_tables_f, return_de))

        for i, p in enumerate(perts):
            row = {"context": ctx, "perturbation": p, "n_cells_real": int(gr[i].size), "n_cells_pred": int(gp[i].size)}
            for m in wanted:
                row[m] = float(res[m][i])
            rows.append(row)

    if not rows:
        raise ValueError(f"{lp}: no perturbed cells to score (every cell has obs[{pert_col!r}] == {control!r})")
    per = pd.DataFrame(rows, columns=["context", "perturbation", "n_cells_real", "n_cells_pred"] + wanted)
    for m in wanted:
        n_nan = int(per[m].isna().sum())
        if n_nan and m not in ("pearson_edistance", "de_spearman_sig"):
            notes.append(f"{m}: NaN for {n_nan} of {len(per)} condition(s) (undefined there); "
                         f"aggregates skip NaN")
    agg = _describe(per, wanted)
    pc = pd.concat({ctx: _describe(sub, wanted) for ctx, sub in per.groupby("context", sort=True)},
                   names=["context", "metric"])
    de_r = pd.concat(de_tables_r, ignore_index=True) if return_de and de_tables_r else None
    de_f = pd.concat(de_tables_f, ignore_index=True) if return_de and de_tables_f else None
    return EvalResult(per_condition=per, aggregated=agg, per_context=pc, notes=notes, metrics=wanted,
                      de_real=de_r, de_pred=de_f)


STATS = ("count", "mean", "median", "std", "min", "max")


def _describe(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """count (non-NaN) / mean / median / std (ddof 1) / min / max per metric column, NaN skipped."""
    out = pd.DataFrame(index=pd.Index(cols, name="metric"), columns=list(STATS), dtype=np.float64)
    for c in cols:
        v = df[c].to_numpy(dtype=np.float64)
        v = v[~np.isnan(v)]
        if v.size:
            out.loc[c] = [v.size, v.mean(), np.median(v), v.std(ddof=1) if v.size > 1 else np.nan, v.min(), v.max()]
        else:
            out.loc[c] = [0, np.nan, np.nan, np.nan, np.nan, np.nan]
    return out


def _de_long(de, ctx: str, perts: list[str], genes: np.ndarray) -> pd.DataFrame:
    k, g = de.pvalue.shape
    return pd.DataFrame({
        "context": ctx,
        "target": np.repeat(np.asarray(perts, dtype=object), g),
        "feature": np.tile(genes, k),
        "statistic": de.statistic.ravel(),
        "p_value": de.pvalue.ravel(),
        "fdr": de.fdr.ravel(),
        "fold_change": de.fold_change.ravel(),
        "log2_fold_change": de.log2_fold_change.ravel(),
    })


def _de_metrics(xr, xp, gr, gp, ctrl_r, ctrl_p, perts, genes, ctx, wanted, de_fdr, top_n, notes, max_elems,
                tables_r, tables_f, return_de) -> dict[str, np.ndarray]:
    k = len(perts)
    de_r = differential_expression([xr[g] for g in gr], xr[ctrl_r], max_elems=max_elems)
    de_f = differential_expression([xp[g] for g in gp], xp[ctrl_p], max_elems=max_elems)
    if return_de:
        tables_r.append(_de_long(de_r, ctx, perts, genes))
        tables_f.append(_de_long(de_f, ctx, perts, genes))

    # cell-eval keeps the DE tables in float32
    fdr_r = de_r.fdr.astype(np.float32)
    fdr_f = de_f.fdr.astype(np.float32)
    sig_r = fdr_r.astype(np.float64) < de_fdr
    sig_f = fdr_f.astype(np.float64) < de_fdr
    lfc_r = de_r.log2_fold_change.astype(np.float32)
    lfc_f = de_f.log2_fold_change.astype(np.float32)
    fc_r = de_r.fold_change.astype(np.float32)
    fc_f = de_f.fold_change.astype(np.float32)
    n_r = sig_r.sum(1)
    n_f = sig_f.sum(1)

    def rank_of(sig, lfc):
        key = np.where(sig, -np.abs(lfc), np.float32(np.inf))
        order = np.argsort(key, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(order.shape[1])[None, :].repeat(k, 0), axis=1)
        return rank

    rank_r, rank_f = rank_of(sig_r, lfc_r), rank_of(sig_f, lfc_f)

    def overlap(k_eff):
        inter = ((rank_r < k_eff[:, None]) & sig_r & (rank_f < k_eff[:, None]) & sig_f).sum(1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(k_eff > 0, inter / np.maximum(k_eff, 1), 0.0)

    res: dict[str, np.ndarray] = {}
    if "overlap_at_N" in wanted:
        res["overlap_at_N"] = overlap(n_r)
    for n in top_n:
        if f"overlap_at_{n}" in wanted:
            res[f"overlap_at_{n}"] = overlap(np.minimum(n, n_r))
    if "precision_at_N" in wanted:
        res["precision_at_N"] = overlap(n_f)
    for n in top_n:
        if f"precision_at_{n}" in wanted:
            res[f"precision_at_{n}"] = overlap(np.minimum(n, n_f))
    if not n_r.any() and any(m.startswith("overlap_at") for m in wanted):
        notes.append(f"overlap_at_*: context {ctx!r} has no real DE gene at fdr < {de_fdr}; scored 0 "
                     f"(cell-eval's convention)")
    if "de_direction_match" in wanted:
        agree = (np.sign(lfc_r) == np.sign(lfc_f)) & sig_r
        with np.errstate(divide="ignore", invalid="ignore"):
            res["de_direction_match"] = np.where(n_r > 0, agree.sum(1) / np.maximum(n_r, 1), np.nan)
    if "de_spearman_lfc_sig" in wanted:
        res["de_spearman_lfc_sig"] = np.array([_spearman(fc_r[i, sig_r[i]], fc_f[i, sig_r[i]]) for i in range(k)])
    if "de_sig_genes_recall" in wanted:
        with np.errstate(divide="ignore", invalid="ignore"):
            res["de_sig_genes_recall"] = np.where(n_r > 0, (sig_r & sig_f).sum(1) / np.maximum(n_r, 1), np.nan)
    if "de_nsig_counts_real" in wanted:
        res["de_nsig_counts_real"] = n_r.astype(np.float64)
    if "de_nsig_counts_pred" in wanted:
        res["de_nsig_counts_pred"] = n_f.astype(np.float64)
    if "de_spearman_sig" in wanted:
        has = n_r > 0
        if not has.any():
            val = float("nan")
            notes.append(f"de_spearman_sig: NaN for context {ctx!r}: no condition has a real DE gene "
                         f"(cell-eval 0.6.6 reports 1.0 here)")
        else:
            val = _spearman(n_r[has].astype(np.float64), n_f[has].astype(np.float64))
            if np.isnan(val):
                notes.append(f"de_spearman_sig: NaN for context {ctx!r} ({int(has.sum())} condition(s) with real "
                             f"DE genes, or constant counts)")
        res["de_spearman_sig"] = np.full(k, val)
    if "roc_auc" in wanted or "pr_auc" in wanted:
        f = np.where(fdr_f == 0, AUC_CLIP, fdr_f)
        scores = -np.log10(f)  # float32, as polars computes it
        pos = sig_r.sum(1)
        neg = sig_r.shape[1] - pos
        defined = (pos > 0) & (neg > 0)
        if "roc_auc" in wanted:
            ranks = rankdata(scores, axis=1, method="average")
            with np.errstate(divide="ignore", invalid="ignore"):
                auc = ((ranks * sig_r).sum(1) - pos * (pos + 1) / 2.0) / (pos * neg)
            res["roc_auc"] = np.where(defined, auc, np.nan)
        if "pr_auc" in wanted:
            res["pr_auc"] = np.array([_average_precision(sig_r[i], scores[i]) if defined[i] else np.nan
                                      for i in range(k)])
    return res
