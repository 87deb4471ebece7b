"""Differential expression as cell-eval 0.6.6 runs it (through pdex 0.1.26), vectorised in numpy.

cell-eval computes DE with ``pdex.parallel_differential_expression(metric="wilcoxon")``, which calls
``scipy.stats.mannwhitneyu(x_target, x_ref, use_continuity=True)`` once per (group, gene). This module
computes the same numbers for every gene and every group against one reference in a few batched passes:

- **Statistic**: U1 of the target group = sum over target cells of (#ref < v) + 0.5 (#ref == v)
  (average ranks for ties), as scipy returns it.
- **p-value** (two-sided), scipy's ``method="auto"``: the normal approximation with tie correction and
  continuity correction ``z = (max(U1, U2) - n1 n2 / 2 - 0.5) / s``,
  ``s^2 = n1 n2 / 12 ((n + 1) - sum(t^3 - t) / (n (n - 1)))``, ``p = min(1, 2 Phi(-z))`` (a gene that is
  constant over both groups has s = 0 and p = 1). When a group has at most 8 cells (``n1 <= 8`` or
  ``n2 <= 8``) and the gene has no ties, scipy switches to the exact null distribution of U; so does
  this module (``method="auto"``).
- **Fold change** (pdex, ``is_log1p=True, exp_post_agg=True, clip_value=20``): means are taken in log
  space and then exponentiated, ``mu = expm1(mean(x))``; ``fc = mu_target / mu_ref`` with
  ``fc = 20`` when only ``mu_ref == 0``, ``1/20`` when only ``mu_target == 0`` and ``1`` when both are 0.
  cell-eval's ``log2_fold_change = log2(fc)``. There is no pseudocount.
- **FDR**: Benjamini-Hochberg over *all* tests of the table, i.e. every (group, gene) pair of one
  AnnData (of one cell type when cell-eval splits by ``--celltype-col``), not per group.

Intended difference: pdex ranks in the dtype of ``.X``, so for float32 data it sums ranks in float32;
here everything is float64 (exact for rank sums below 2**53).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
import scipy.sparse as sp
from scipy.special import ndtr

__all__ = [
    "RankSumResult",
    "DEResult",
    "wilcoxon_ranksum",
    "benjamini_hochberg",
    "fold_change",
    "differential_expression",
]

# Entries (cells x genes) sorted at once; bounds the peak memory of one pass (~50 bytes per entry).
DEFAULT_MAX_ELEMS = 1 << 23
# scipy's mannwhitneyu ("auto") uses the exact distribution when either group has at most this many cells.
EXACT_MAX_N = 8


@dataclass
class RankSumResult:
    """Per (group, gene) Mann-Whitney U results, arrays of shape [K, G] (float64)."""

    statistic: np.ndarray  # U1 of the group (scipy's ``statistic``)
    pvalue: np.ndarray     # two-sided
    n_group: np.ndarray    # [K] cells per group
    n_ref: int


def _shape_genes(x) -> int:
    return int(x.shape[1])


def _dense_cols(x, lo: int, hi: int) -> np.ndarray:
    """Columns [lo, hi) of a dense or sparse matrix as a dense float64 array."""
    if sp.issparse(x):
        return np.asarray(x[:, lo:hi].toarray(), dtype=np.float64)
    return np.asarray(x[:, lo:hi], dtype=np.float64)


def _to_csc(x):
    if sp.issparse(x):
        return sp.csc_matrix(x)
    return np.asarray(x)


def _ranksum_block(a: np.ndarray, n_ref: int, cond: np.ndarray, k: int):
    """One sorted pass over a gene-major block.

    ``a`` is [g, n]: row = gene, columns = the n_ref reference cells first, then the target cells
    ordered by their group id ``cond`` ([n - n_ref], values in [0, k)). Returns U1 [k, g] and the tie
    term sum(t^3 - t) [k, g] of (group k + reference).
    """
    g, n = a.shape
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    new = np.empty((g, n), dtype=bool)
    new[:, 0] = True
    np.not_equal(s[:, 1:], s[:, :-1], out=new[:, 1:])
    del s
    order = order.ravel()
    new = new.ravel()
    block = np.cumsum(new) - 1                       # global tie-block id (blocks never span genes)
    nb = int(block[-1]) + 1
    is_ref = order < n_ref
    c_b = np.bincount(block, weights=is_ref, minlength=nb)          # reference cells per block
    starts = np.flatnonzero(new)
    del new
    cum_ref = np.cumsum(is_ref.reshape(g, n), axis=1, dtype=np.int64).ravel()
    l_b = cum_ref[starts] - is_ref[starts]           # reference cells before the block (same gene)
    del cum_ref
    gene_b = starts // n
    tie_ref = np.bincount(gene_b, weights=c_b ** 3 - c_b, minlength=g)

    tgt = np.flatnonzero(~is_ref)
    del is_ref
    blk = block[tgt]
    del block
    cnd = cond[order[tgt] - n_ref]
    gene = tgt // n
    del tgt, order
    w = l_b[blk] + 0.5 * c_b[blk]
    key = cnd.astype(np.int64) * g + gene
    u1 = np.bincount(key, weights=w, minlength=k * g).reshape(k, g)

    # target entries of one block are grouped by group id (stable sort, targets ordered by group)
    rs = np.empty(blk.size, dtype=bool)
    if blk.size:
        rs[0] = True
        rs[1:] = (blk[1:] != blk[:-1]) | (cnd[1:] != cnd[:-1])
    run_start = np.flatnonzero(rs)
    d = np.diff(np.append(run_start, blk.size)).astype(np.float64)
    c = c_b[blk[run_start]]
    t = c + d
    contrib = (t ** 3 - t) - (c ** 3 - c)
    tie = np.bincount(key[run_start], weights=contrib, minlength=k * g).reshape(k, g) + tie_ref[None, :]
    return u1, tie


@lru_cache(maxsize=64)
def _u_cdf(m: int, n: int) -> np.ndarray:
    """CDF of the Mann-Whitney U statistic under H0 for group sizes m, n (no ties): [m n + 1].

    The number of arrangements with U = u is the coefficient of q^u in the Gaussian binomial
    [m + n choose m]_q = prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i), built factor by factor.
    """
    m, n = min(m, n), max(m, n)
    length = m * n + 1
    c = np.zeros(length, dtype=np.float64)
    c[0] = 1.0
    for i in range(1, m + 1):
        sh = n + i
        if sh < length:
            c[sh:] -= c[:-sh].copy()
        # divide by (1 - q^i): c[j] += c[j - i], i.e. a cumulative sum over every i-th entry
        pad = (-length) % i
        cc = np.concatenate([c, np.zeros(pad)]).reshape(-1, i)
        c = np.cumsum(cc, axis=0).ravel()[:length]
    return np.cumsum(c) / c.sum()


def _exact_pvalue(u1: np.ndarray, n1: int, n2: int) -> np.ndarray:
    """Two-sided exact p-value, min(1, 2 P(U <= min(U1, U2)))."""
    cdf = _u_cdf(int(n1), int(n2))
    umin = np.minimum(u1, n1 * n2 - u1)
    idx = np.clip(np.rint(umin).astype(np.int64), 0, cdf.size - 1)
    return np.clip(2.0 * cdf[idx], 0.0, 1.0)


def _asymptotic_pvalue(u1: np.ndarray, tie: np.ndarray, n1, n2, use_continuity: bool) -> np.ndarray:
    n1 = np.asarray(n1, dtype=np.float64)
    n2 = float(n2)
    n = n1 + n2
    mu = n1 * n2 / 2.0
    u = np.maximum(u1, n1 * n2 - u1)
    var = n1 * n2 / 12.0 * ((n + 1.0) - tie / (n * (n - 1.0)))
    num = u - mu - (0.5 if use_continuity else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = num / np.sqrt(np.maximum(var, 0.0))
    p = 2.0 * ndtr(-z)
    # all values tied (var == 0): scipy gets z = -inf and p = 1
    p = np.where(var <= 0.0, 1.0, p)
    return np.clip(p, 0.0, 1.0)


def wilcoxon_ranksum(groups: Sequence, ref, *, use_continuity: bool = True, method: str = "auto",
                     max_elems: int = DEFAULT_MAX_ELEMS) -> RankSumResult:
    """Two-sided Mann-Whitney U (Wilcoxon rank-sum) test of every gene of every group against ``ref``.

    ``groups``: K matrices [n_k, G] (dense or scipy sparse); ``ref``: [n_ref, G]. Equivalent to
    ``scipy.stats.mannwhitneyu(groups[k][:, g], ref[:, g], use_continuity=use_continuity,
    method=method)`` for all k, g (``method`` "auto", "asymptotic" or "exact"; "exact" is only
    defined here without ties and raises otherwise). Values must be finite.
    """
    if method not in ("auto", "asymptotic", "exact"):
        raise ValueError(f"method must be 'auto', 'asymptotic' or 'exact', got {method!r}")
    groups = list(groups)
    n_genes = _shape_genes(ref)
    n_ref = int(ref.shape[0])
    if n_ref == 0:
        raise ValueError("wilcoxon_ranksum: the reference group has no cells")
    sizes = np.array([int(x.shape[0]) for x in groups], dtype=np.int64)
    for i, x in enumerate(groups):
        if _shape_genes(x) != n_genes:
            raise ValueError(f"wilcoxon_ranksum: group {i} has {_shape_genes(x)} genes, reference {n_genes}")
        if x.shape[0] == 0:
            raise ValueError(f"wilcoxon_ranksum: group {i} has no cells")
    k_all = len(groups)
    u1 = np.zeros((k_all, n_genes))
    tie = np.zeros((k_all, n_genes))

    # chunks of consecutive groups with about max(n_ref, 2048) target cells each
    target_rows = max(n_ref, 2048)
    chunks, cur, rows = [], [], 0
    for i, s in enumerate(sizes):
        if cur and rows + s > target_rows:
            chunks.append(cur)
            cur, rows = [], 0
        cur.append(i)
        rows += int(s)
    if cur:
        chunks.append(cur)

    ref_c = _to_csc(ref)
    for chunk in chunks:
        xs = [_to_csc(groups[i]) for i in chunk]
        n_tgt = int(sizes[chunk].sum())
        n = n_ref + n_tgt
        cond = np.repeat(np.arange(len(chunk)), sizes[chunk])
        gb = max(1, int(max_elems) // n)
        for lo in range(0, n_genes, gb):
            hi = min(n_genes, lo + gb)
            a = np.concatenate([_dense_cols(ref_c, lo, hi)] + [_dense_cols(x, lo, hi) for x in xs], axis=0)
            if not np.all(np.isfinite(a)):
                raise ValueError("wilcoxon_ranksum: input contains NaN or infinite values")
            u_b, t_b = _ranksum_block(np.ascontiguousarray(a.T), n_ref, cond, len(chunk))
            u1[chunk, lo:hi] = u_b
            tie[chunk, lo:hi] = t_b

    n1 = sizes[:, None].astype(np.float64)
    if method == "exact":
        if np.any(tie > 0):
            raise ValueError("wilcoxon_ranksum: method='exact' is implemented only without ties")
        exact = np.ones_like(u1, dtype=bool)
    elif method == "asymptotic":
        exact = np.zeros_like(u1, dtype=bool)
    else:  # scipy's rule: exact when either group has <= 8 cells and the gene has no ties
        small = (sizes <= EXACT_MAX_N) | (n_ref <= EXACT_MAX_N)
        exact = small[:, None] & (tie == 0)
    p = _asymptotic_pvalue(u1, tie, n1, n_ref, use_continuity)
    if exact.any():
        for k in np.flatnonzero(exact.any(axis=1)):
            cols = exact[k]
            p[k, cols] = _exact_pvalue(u1[k, cols], int(sizes[k]), n_ref)
    return RankSumResult(statistic=u1, pvalue=p, n_group=sizes, n_ref=n_ref)


def benjamini_hochberg(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over *all* entries of ``p`` (any shape), as
    ``scipy.stats.false_discovery_control(p.ravel(), method="bh")``: sorted p times m / rank, made
    monotone from the largest down, capped at 1."""
    p = np.asarray(p, dtype=np.float64)
    flat = p.ravel()
    if flat.size == 0:
        return p.copy()
    if np.any(~np.isfinite(flat)) or np.any(flat < 0) or np.any(flat > 1):
        raise ValueError("benjamini_hochberg: p-values must be finite and in [0, 1]")
    m = flat.size
    order = np.argsort(flat, kind="stable")
    adj = flat[order] * (m / np.arange(1, m + 1))
    adj = np.minimum.accumulate(adj[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1.0)
    return out.reshape(p.shape)


def fold_change(mean_target_log, mean_ref_log, *, is_log1p: bool = True, clip_value: float | None = 20.0) -> np.ndarray:
    """pdex's fold change from per-gene means of the (log1p) expression: mu = expm1(mean) when
    ``is_log1p`` (means taken before exponentiating), fc = mu_t / mu_r, clipped as described above."""
    mt = np.asarray(mean_target_log, dtype=np.float64)
    mr = np.asarray(mean_ref_log, dtype=np.float64)
    if is_log1p:
        mt, mr = np.expm1(mt), np.expm1(mr)
    mt, mr = np.broadcast_arrays(mt, mr)
    with np.errstate(divide="ignore", invalid="ignore"):
        fc = mt / mr
    if clip_value is not None:
        fc = np.where(mr == 0, clip_value, fc)
        fc = np.where(mt == 0, 1.0 / clip_value, fc)
        fc = np.where((mr == 0) & (mt == 0), 1.0, fc)
    else:
        fc = np.where(mr == 0, np.nan, fc)
        fc = np.where(mt == 0, 0.0, fc)
    return fc


@dataclass
class DEResult:
    """DE of K groups against one reference, arrays [K, G] (float64)."""

    statistic: np.ndarray
    pvalue: np.ndarray
    fdr: np.ndarray
    mean_target: np.ndarray  # expm1(mean log expression) of the group
    mean_ref: np.ndarray     # [G]
    fold_change: np.ndarray
    log2_fold_change: np.ndarray  # log2(fold_change), NaN -> 0 as cell-eval fills it
    n_group: np.ndarray
    n_ref: int


def _col_mean(x) -> np.ndarray:
    if sp.issparse(x):
        return np.asarray(x.mean(axis=0), dtype=np.float64).ravel()
    return np.asarray(x, dtype=np.float64).mean(axis=0)


def differential_expression(groups: Sequence, ref, *, is_log1p: bool = True, clip_value: float | None = 20.0,
                            use_continuity: bool = True, method: str = "auto",
                            max_elems: int = DEFAULT_MAX_ELEMS) -> DEResult:
    """pdex/cell-eval DE of each group against ``ref``: Wilcoxon rank-sum p-values, BH FDR over all
    K x G tests, and fold changes of the expm1 of the log-space means."""
    groups = list(groups)
    rs = wilcoxon_ranksum(groups, ref, use_continuity=use_continuity, method=method, max_elems=max_elems)
    fdr = benjamini_hochberg(rs.pvalue)
    mean_ref_log = _col_mean(ref)
    mean_t_log = np.stack([_col_mean(x) for x in groups]) if groups else np.zeros((0, mean_ref_log.size))
    fc = fold_change(mean_t_log, mean_ref_log[None, :], is_log1p=is_log1p, clip_value=clip_value)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2(fc)
    lfc = np.where(np.isnan(lfc), 0.0, lfc)
    mt = np.expm1(mean_t_log) if is_log1p else mean_t_log
    mr = np.expm1(mean_ref_log) if is_log1p else mean_ref_log
    return DEResult(statistic=rs.statistic, pvalue=rs.pvalue, fdr=fdr, mean_target=mt, mean_ref=mr,
                    fold_change=fc, log2_fold_change=lfc, n_group=rs.n_group, n_ref=rs.n_ref)
