"""cell-eval's normalised score: each method's mean metrics against a baseline's (``cell-eval score``)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .schema import BEST_ONE, BEST_ZERO, SCORE_BASELINE, empty_scores


def normalised_score(model_metric, baseline_metric, higher_is_better: bool = True):
    """cell-eval's ``score`` of a model metric against the baseline's (cell-eval ``_score.py``):

        best value 1 (higher_is_better=True):   (u - b) / (1 - b)
        best value 0 (higher_is_better=False):  1 - u / b

    then NaN (including 0/0) -> 0 and clipped below at 0 (no upper clip): 0 = no better than the
    baseline, 1 = perfect. cell-eval applies it to the ``mean`` row of the aggregated results and
    averages the per-metric scores into ``avg_score``. "higher is better" here means a metric whose
    best value is 1 (Pearson, overlap, AUC, ...); use it only for such metrics. Scalars in, float
    out; arrays broadcast."""
    u = np.asarray(model_metric, dtype=np.float64)
    b = np.asarray(baseline_metric, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = (u - b) / (1.0 - b) if higher_is_better else 1.0 - u / b
    s = np.where(np.isnan(s), 0.0, s)
    s = np.clip(s, 0.0, None)
    return float(s) if s.ndim == 0 else s


def normalised_scores(aggregated: pd.DataFrame, baseline: str = SCORE_BASELINE) -> pd.DataFrame:
    """cell-eval's ``score`` of every method's mean metrics against ``baseline``'s (long table:
    method, metric, from_baseline; one ``avg_score`` row per method). The metrics scored are those
    of cell-eval's registry whose best value is 0 (``BEST_ZERO``) or 1 (``BEST_ONE``)."""
    mean = aggregated.pivot(index="method", columns="metric", values="mean")
    if baseline not in mean.index:
        return empty_scores()
    rows = []
    for method in mean.index:
        vals = []
        for metric, best_one in [(m, False) for m in BEST_ZERO] + [(m, True) for m in BEST_ONE]:
            if metric in mean.columns:
                s = normalised_score(mean.at[method, metric], mean.at[baseline, metric], best_one)
                vals.append(s)
                rows.append({"method": method, "metric": metric, "from_baseline": s})
        rows.append({"method": method, "metric": "avg_score", "from_baseline": float(np.mean(vals)) if vals else np.nan})
    return pd.DataFrame(rows)
