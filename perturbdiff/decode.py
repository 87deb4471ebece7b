"""Generated cells as counts: the values a measured cell can hold.

The diffusion model generates normalised expression, ``x = log1p(count / L * target_sum) / scale``
per gene, as a continuous vector. A measured cell cannot hold most such values: with library size
(total counts) L, a gene holds 0, or log1p(target_sum / L) for one count, log1p(2 target_sum / L)
for two, and so on. Continuous outputs have too few exact zeros and many values below one count
(seen: 51-67% of nonzero generated values), and Wilcoxon then calls most genes DE.

``decode_counts`` maps a generated cell to the nearest attainable cell:

    L      the library size of a real control cell of the same context (the control cell that the
           generated set was conditioned on, in order), so the libraries are the context's own
    mu_g   = expm1(x_g * scale) * L / target_sum        the expected count of gene g
    c_g    = floor(mu_g) + Bernoulli(mu_g - floor(mu_g))  unbiased stochastic rounding: E[c] = mu,
           and the least added variance of any unbiased integer rounding (at most 1/4 per gene)
    out_g  = log1p(c_g / L * target_sum) / scale        normalised exactly as the training data

So an expected count of 0.3 becomes 0 in 70% of cells and one count in 30%: exact zeros where real
cells have them, and the mean count is kept. The paper's continuous output stays available
(``decode="continuous"``).

``library_sizes`` gives L for real cells: the row sums of counts, or, for log-normalised values
(log1p(normalize_total)), target_sum / expm1(the cell's smallest positive value), the value one
count produces (exact when the cell has a gene with one count, as nearly every scRNA-seq cell has).
"""

from __future__ import annotations

import numpy as np

from .config import NormalizeConfig
from .data.schema import VALUES_COUNTS, VALUES_LOGNORM

DECODES = ("counts", "continuous")


def library_sizes(indptr: np.ndarray, data: np.ndarray, value_kind: str, normalize: NormalizeConfig,
                  totals: np.ndarray | None = None) -> np.ndarray | None:
    """[rows] float64 library sizes of CSR rows holding a cell's full vocabulary (``totals`` when given,
    for rows that hold only part of it); None when they cannot be known (log-normalised values
    without log1p). A row without any positive value gets NaN."""
    n = len(indptr) - 1
    if totals is not None:
        return np.asarray(totals, np.float64)
    row = np.repeat(np.arange(n), np.diff(indptr))
    x = np.asarray(data, np.float64)
    if value_kind == VALUES_COUNTS:
        out = np.bincount(row, weights=x, minlength=n).astype(np.float64)
        out[out <= 0] = np.nan
        return out
    if value_kind != VALUES_LOGNORM or not normalize.log1p:
        return None
    smallest = np.full(n, np.inf)
    pos = x > 0
    np.minimum.at(smallest, row[pos], x[pos])
    with np.errstate(divide="ignore"):
        out = normalize.target_sum / np.expm1(smallest)
    out[~np.isfinite(smallest)] = np.nan
    return out


def decode_counts(x: np.ndarray, libraries: np.ndarray, normalize: NormalizeConfig,
                  rng: np.random.Generator) -> np.ndarray:
    """Generated cells ``x`` [n, G] (model scale) -> attainable cells [n, G] float32 (model scale), each
    with the library size ``libraries[i]`` (module docstring). Rows with a non-finite library are
    returned unchanged."""
    x = np.asarray(x, np.float64) * normalize.scale
    lib = np.asarray(libraries, np.float64)[:, None]
    expr = np.expm1(np.maximum(x, 0.0)) if normalize.log1p else np.maximum(x, 0.0)
    mu = expr * (lib / normalize.target_sum)
    near = np.rint(mu)
    mu = np.where(np.abs(mu - near) < 1e-6, near, mu)  # a real cell's own values decode to its counts exactly
    base = np.floor(mu)
    counts = base + (rng.random(mu.shape) < (mu - base))
    value = counts * (normalize.target_sum / lib)
    out = np.log1p(value) if normalize.log1p else value
    bad = ~np.isfinite(lib[:, 0]) | (lib[:, 0] <= 0)
    out[bad] = x[bad]
    return (out / normalize.scale).astype(np.float32)
