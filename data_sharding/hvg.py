"""Highly-variable-gene selection from streamed per-gene sums (never a dense cells x genes matrix).

Two flavours, following the definitions scanpy documents for ``highly_variable_genes``:

- ``dispersion`` (scanpy's ``seurat``): on normalised counts (normalize_total, i.e. expm1 of
  log-normalised data): dispersion = var / mean; log dispersion is z-scored within ``num_bins``
  equal-width bins of log1p(mean); genes are ranked by the normalised dispersion.
- ``seurat_v3``: on raw counts: a local quadratic regression (loess, span 0.3) of log10 variance on
  log10 mean gives each gene an expected standard deviation sigma; the variance of the
  standardised counts, each clipped at mean + sqrt(N) * sigma, ranks the genes. This needs a
  second streamed pass (``ClippedMoments``) once the means and sigmas are known.

Both return a full ranking (rank 0 = most variable); ties break by gene index.
"""

from __future__ import annotations

import numpy as np

SPAN = 0.3
FLAVORS = ("seurat_v3", "dispersion")  # shard.hvg.flavor


def combine_stats(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    out = {k: np.zeros_like(np.asarray(v, dtype=np.float64)) for k, v in stats[0].items()}
    for s in stats:
        for k, v in s.items():
            out[k] = out[k] + v
    return out


def _mean_var(total: np.ndarray, total_sq: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mean = total / n
    var = (total_sq - n * mean * mean) / max(n - 1, 1)
    return mean, np.maximum(var, 0.0)


def loess(x: np.ndarray, y: np.ndarray, span: float = SPAN, max_points: int = 2000) -> np.ndarray:
    """Local quadratic regression with tricube weights over the nearest ``span`` fraction of points.

    Evaluated exactly at every point when there are at most ``max_points``; otherwise at
    ``max_points`` quantiles of x and linearly interpolated (what loess's 'interpolate' surface does).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 3:
        return y.copy()
    k = max(3, int(np.ceil(span * n)))
    grid = x if n <= max_points else np.quantile(x, np.linspace(0, 1, max_points))
    order = np.argsort(x, kind="stable")
    xs, ys = x[order], y[order]
    fitted = np.empty(len(grid))
    for lo in range(0, len(grid), 64):
        g = grid[lo:lo + 64]
        # the k nearest neighbours of each grid point form a window of the sorted xs
        pos = np.searchsorted(xs, g)
        left = np.clip(pos - k, 0, n - k)
        cand = left[:, None] + np.arange(2 * k)[None, :]
        cand = np.clip(cand, 0, n - 1)
        dist = np.abs(xs[cand] - g[:, None])
        near = np.argsort(dist, axis=1, kind="stable")[:, :k]
        idx = np.take_along_axis(cand, near, axis=1)
        d = np.take_along_axis(dist, near, axis=1)
        dmax = d.max(axis=1, keepdims=True)
        dmax[dmax == 0] = 1.0
        w = (1 - np.clip(d / dmax, 0, 1) ** 3) ** 3
        u = xs[idx] - g[:, None]
        design = np.stack([np.ones_like(u), u, u * u], axis=-1)  # [P, k, 3]
        wd = design * w[..., None]
        ata = np.einsum("pki,pkj->pij", wd, design) + 1e-12 * np.eye(3)
        aty = np.einsum("pki,pk->pi", wd, ys[idx])
        fitted[lo:lo + 64] = np.linalg.solve(ata, aty[..., None])[:, 0, 0]
    if n <= max_points:
        return fitted
    return np.interp(x, grid, fitted)


def rank_of(scores: np.ndarray) -> np.ndarray:
    """Gene order by descending score (NaN last), ties by index; returns the ordered gene indices."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    return np.lexsort((np.arange(len(s)), -s))


def dispersion_scores(stats: dict[str, np.ndarray], num_bins: int = 20) -> np.ndarray:
    n = int(stats["n"])
    mean, var = _mean_var(stats["norm_sum"], stats["norm_sumsq"], n)
    mean = np.where(mean == 0, 1e-12, mean)
    disp = var / mean
    disp = np.where(disp == 0, np.nan, disp)
    log_disp = np.log(disp)
    log_mean = np.log1p(mean)
    edges = np.linspace(log_mean.min(), log_mean.max(), num_bins + 1)
    bins = np.clip(np.searchsorted(edges, log_mean, side="left") - 1, 0, num_bins - 1)
    bins[log_mean == edges[0]] = 0
    norm = np.full(len(mean), np.nan)
    for b in np.unique(bins):
        sel = bins == b
        vals = log_disp[sel]
        ok = ~np.isnan(vals)
        if ok.sum() == 1:  # one gene in the bin: scanpy sets its normalised dispersion to 1
            norm[sel] = np.where(ok, 1.0, np.nan)
            continue
        if ok.sum() == 0:
            continue
        mu, sd = vals[ok].mean(), vals[ok].std(ddof=1)
        norm[sel] = (vals - mu) / sd if sd > 0 else np.where(ok, 0.0, np.nan)
    return norm


class ClippedMoments:
    """seurat_v3 second pass: per gene, sums of the clipped counts and of their squares."""

    def __init__(self, stats: dict[str, np.ndarray]):
        n = int(stats["n"])
        self.n = n
        self.mean, self.var = _mean_var(stats["sum"], stats["sumsq"], n)
        ok = self.var > 0
        fitted = np.zeros_like(self.mean)
        if ok.sum() >= 3:
            fitted[ok] = loess(np.log10(self.mean[ok]), np.log10(self.var[ok]))
        self.sigma = np.sqrt(10.0 ** fitted)
        self.sigma[~ok] = 0.0
        self.vmax = self.mean + np.sqrt(n) * self.sigma
        # clipped sums start as the plain sums; update() subtracts what clipping removes
        self.clip_sum = np.asarray(stats["sum"], dtype=np.float64).copy()
        self.clip_sumsq = np.asarray(stats["sumsq"], dtype=np.float64).copy()
        self._vmax32 = self.vmax.astype(np.float32)

    def update(self, indices: np.ndarray, data: np.ndarray) -> None:
        """Correct the sums for the (rare) entries above their gene's clip value."""
        over = data > self._vmax32[indices]
        if not over.any():
            return
        g = indices[over]
        x = data[over].astype(np.float64)
        v = self.vmax[g]
        self.clip_sum -= np.bincount(g, weights=x - v, minlength=len(self.mean))
        self.clip_sumsq -= np.bincount(g, weights=x * x - v * v, minlength=len(self.mean))

    def scores(self) -> np.ndarray:
        n, m, s = self.n, self.mean, self.sigma
        ssq = n * m * m + self.clip_sumsq - 2 * m * self.clip_sum
        with np.errstate(divide="ignore", invalid="ignore"):
            out = ssq / ((n - 1) * s * s)
        out[s == 0] = 0.0
        return out


def select(flavor: str, stats: dict[str, np.ndarray], clipped: ClippedMoments | None,
           num_bins: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Return (scores, ranking) for the flavor; ranking lists gene indices, most variable first."""
    if flavor == "seurat_v3":
        assert clipped is not None
        scores = clipped.scores()
    elif flavor == "dispersion":
        scores = dispersion_scores(stats, num_bins)
    else:
        raise ValueError(f"unknown HVG flavor {flavor!r}: use {' or '.join(FLAVORS)}")
    return scores, rank_of(scores)
