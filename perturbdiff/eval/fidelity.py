"""Do predicted cells look like measured cells? Per-condition shape diagnostics.

Real expression is counts: after normalize_total + log1p a measured value is either 0 or at least
what one count gives that cell, and it cannot exceed what one gene holding all of the cell's counts
gives. A generated population can match the mean change and still be implausible cell by cell (a
shift added to control cells moves every zero; a collapsed model has no spread), and such cells
break the DE metrics (Wilcoxon then calls most genes DE). ``fidelity`` reports, per (context,
perturbation), on the evaluation layout (``perturbdiff.eval.inputs``):

    zero_frac_pred / zero_frac_real   fraction of exact zeros among the condition's cells
    subcount_frac_pred                fraction of the predicted NONZERO values below the smallest value
                                      one count produces in any real cell of the context (the real
                                      cells' smallest nonzero value: their largest library): values no
                                      measured cell can hold
    sd_ratio                          median over genes (real SD > 0) of SD_pred / SD_real (ddof 1):
                                      < 1 collapsed populations, > 1 too noisy
    delta_norm_ratio                  |mean_pred - mean_ctrl| / |mean_real - mean_ctrl| (Euclidean, the
                                      context's control cells of each file): the size of the response
    max_pred / max_real               the largest value

The input checks (``scale_problems``: NaN, negative, above cell-eval's log1p limit) are in
``perturbdiff.eval.inputs``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .inputs import dense_rows, group_rows, keyed_means, obs_str
from .schema import FIDELITY_COLUMNS

def _min_positive(x, rows: np.ndarray) -> float:
    """The smallest positive value in the rows of x (dense or CSR; sparse rows are not densified)."""
    sub = x[rows]
    values = sub.data if sp.issparse(sub) else np.asarray(sub)
    pos = values[values > 0]
    return float(pos.min()) if pos.size else np.inf


def _per_context(adata: ad.AnnData, ctrl: dict, groups: dict) -> tuple[dict, dict]:
    """({context: control mean [G]}, {context: smallest positive value over all its cells})."""
    keys, means = keyed_means(adata.X, ctrl)
    mean = {k[0]: m for k, m in zip(keys, means)}
    floor: dict[str, float] = {}
    for (c, *_), rows in [*ctrl.items(), *groups.items()]:
        floor[c] = min(floor.get(c, np.inf), _min_positive(adata.X, rows))
    return mean, floor


def fidelity(real: ad.AnnData, pred: ad.AnnData, control: str = "control") -> pd.DataFrame:
    """One row per (context, perturbation) of ``pred`` that ``real`` has: the columns of the module
    docstring. ``pred`` is ONE population per condition (score populations one at a time); the
    control cells of each file are those labelled ``control``."""
    is_ctrl_p = obs_str(pred, "perturbation") == control
    is_ctrl_r = obs_str(real, "perturbation") == control
    pg, rg = group_rows(pred, ~is_ctrl_p), group_rows(real, ~is_ctrl_r)
    pc, rc = group_rows(pred, is_ctrl_p, keys=("context",)), group_rows(real, is_ctrl_r, keys=("context",))
    # per context, once: the control means, and the smallest nonzero of the real cells (one count in
    # the largest library)
    ctrl_mean_r, floor = _per_context(real, rc, rg)
    keys_p, means_p = keyed_means(pred.X, pc)
    ctrl_mean_p = {k[0]: m for k, m in zip(keys_p, means_p)}
    nan = np.full(real.n_vars, np.nan)
    rows = []
    for (c, p) in sorted(k for k in pg if k in rg):
        xp, xr = dense_rows(pred.X, pg[(c, p)]), dense_rows(real.X, rg[(c, p)])
        mu_ctrl_r = ctrl_mean_r.get(c, nan)
        mu_ctrl_p = ctrl_mean_p.get(c, mu_ctrl_r)
        nz = xp[xp > 0]
        sd_r, sd_p = (xr.std(0, ddof=1) if len(xr) > 1 else np.full(xr.shape[1], np.nan),
                      xp.std(0, ddof=1) if len(xp) > 1 else np.full(xp.shape[1], np.nan))
        varying = sd_r > 0
        d_real = xr.mean(0) - mu_ctrl_r
        d_pred = xp.mean(0) - mu_ctrl_p
        norm_real = float(np.linalg.norm(d_real))
        rows.append({
            "context": c, "perturbation": p,
            "zero_frac_pred": float((xp == 0).mean()) if xp.size else np.nan,
            "zero_frac_real": float((xr == 0).mean()) if xr.size else np.nan,
            # a relative tolerance: float32 storage of the same value must not count
            "subcount_frac_pred": float((nz < floor[c] * (1 - 1e-5)).mean()) if nz.size and np.isfinite(floor[c])
            else np.nan,
            "sd_ratio": float(np.median(sd_p[varying] / sd_r[varying])) if varying.any() else np.nan,
            "delta_norm_ratio": float(np.linalg.norm(d_pred)) / norm_real if norm_real > 0 else np.nan,
            "max_pred": float(xp.max()) if xp.size else np.nan,
            "max_real": float(xr.max()) if xr.size else np.nan,
        })
    return pd.DataFrame(rows, columns=["context", "perturbation", *FIDELITY_COLUMNS])
