"""The evaluation's vocabulary and its output directory.

The methods it scores, the metric groups (headline, profiles, which direction is better, which
enter cell-eval's normalised score) and ``EvalDir``, the one class that writes and reads a
``perturbdiff evaluate`` directory (``perturbdiff.eval.evaluate`` writes it, ``perturbdiff report``
and the benchmarks read it):

    metrics.csv         one row per (method, context, perturbation): every metric, mmd2, energy_distance_u
                        (unbiased) and energy_distance_v (V-statistic, cell-eval's helper)
    aggregated.csv      method, metric, count, mean, median, std, min, max (NaN skipped), population_sd
    per_context.csv     the same per (method, context, metric)
    populations.csv     the cell-eval metrics and the fidelity of every sampled population
    scores.csv          cell-eval's normalised score of each method against ``SCORE_BASELINE``
    calibration.csv     per condition: coverage at 50/80/90% vs nominal, PIT mean / variance ratio
    summary.json        inputs, options, headline table (method x metric means), notes, timings
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import EVAL_METHODS
from ..data.schema import DataError

METHODS = EVAL_METHODS  # defined with the evaluate config section (its default methods)
NEEDS_TRAIN = ("perturbation_mean", "linear", "latent_shift")  # the baselines built from training cells
SCORE_BASELINE = "perturbation_mean"  # cell-eval's normalised score is against this method
# each method's random stream; fixed as methods are added, so earlier methods keep their numbers
SEED_INDEX = {"model": 0, "control_mean": 1, "perturbation_mean": 2, "linear": 3, "ceiling": 4, "latent_shift": 5}

#: metrics whose best value is 1 / 0 (cell-eval's registry; r_squared and the counts are not in it,
#: so, as in ``cell-eval score``, they are not part of the normalised score)
BEST_ONE = ("pearson_delta", "discrimination_score_l1", "discrimination_score_l2", "discrimination_score_cosine",
            "pearson_edistance", "overlap_at_N", "overlap_at_50", "overlap_at_100", "overlap_at_200",
            "precision_at_N", "precision_at_50", "precision_at_100", "precision_at_200", "de_spearman_sig",
            "de_direction_match", "de_spearman_lfc_sig", "de_sig_genes_recall", "pr_auc", "roc_auc")
BEST_ZERO = ("mse", "mae", "mse_delta", "mae_delta")
#: best value is the smallest; every other ranked metric is better when larger
LOWER_IS_BETTER = frozenset({*BEST_ZERO, "energy_distance_u", "energy_distance_v", "mmd2"})
#: the shape diagnostics of perturbdiff.eval.fidelity, one column each per condition
FIDELITY_COLUMNS = ("zero_frac_pred", "zero_frac_real", "subcount_frac_pred", "sd_ratio", "delta_norm_ratio",
                    "max_pred", "max_real")
FIDELITY = FIDELITY_COLUMNS + ("de_nsig_counts_pred", "de_nsig_counts_real")
#: reported but not ranked: read against the real cells (counts of DE genes and the fidelity diagnostics)
NOT_RANKED = frozenset(FIDELITY)
HEADLINE = ("pearson_delta", "mae", "mse_delta", "discrimination_score_l1", "overlap_at_N", "de_direction_match",
            "de_spearman_lfc_sig", "r_squared", "energy_distance_u", "energy_distance_v", "mmd2")
PROFILES = {
    "full": None,
    # the metrics the PerturbDiff paper's tables report
    "paper": ("pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "overlap_at_50",
              "overlap_at_100", "overlap_at_200", "precision_at_N", "de_direction_match", "de_spearman_lfc_sig",
              "de_spearman_sig", "roc_auc", "pr_auc", "r_squared"),
    "vcc": ("mae", "discrimination_score_l1", "overlap_at_N"),
    "minimal": ("pearson_delta", "mse", "mae", "discrimination_score_l1", "overlap_at_N", "precision_at_N",
                "de_nsig_counts"),
}
SCORING = {
    "cell_eval_metrics": "each sampled population scored on its own (as many cells as the real condition "
                         "for a store split), then the mean over populations; populations.csv has each one, "
                         "aggregated.csv's population_sd their spread",
    "fidelity": "per population, like the cell-eval metrics (perturbdiff.eval.fidelity)",
    "distances": "mmd2, energy_distance_u / _v: the sampled populations pooled (the model's distribution of cells)",
    "calibration": "the sampled populations against the real replicate batches",
    "baselines": "one population each, with the real cell counts; the ceiling: real half vs real half",
}
REFERENCE = "cell-eval 0.6.6 metric definitions (perturbdiff.eval.suite)"

# the tables of an evaluation directory: attribute -> file (None: optional)
TABLES = {"metrics": "metrics.csv", "aggregated": "aggregated.csv", "per_context": "per_context.csv",
          "scores": "scores.csv", "populations": "populations.csv", "calibration": "calibration.csv"}
REQUIRED = ("summary.json", "metrics.csv", "aggregated.csv")
SCORE_COLUMNS = ["method", "metric", "from_baseline"]


def empty_scores() -> pd.DataFrame:
    """A scores table with no rows (no normalised score was computed)."""
    return pd.DataFrame(columns=SCORE_COLUMNS)


@dataclass
class EvalDir:
    """One evaluation directory's tables: what ``perturbdiff evaluate`` returns and writes (``write``),
    and what the report reads back (``load``)."""

    path: Path
    summary: dict
    metrics: pd.DataFrame
    aggregated: pd.DataFrame
    scores: pd.DataFrame
    calibration: pd.DataFrame | None = None
    per_context: pd.DataFrame | None = None
    populations: pd.DataFrame | None = None

    @property
    def control(self) -> str:
        """The control perturbation label the evaluation used."""
        return str(self.summary.get("options", {}).get("control_label", "control"))

    def conditions(self) -> list[tuple[str, str]]:
        """(context, perturbation) of every evaluated condition, sorted."""
        m = self.metrics[self.metrics["method"] == "model"] if (self.metrics["method"] == "model").any() \
            else self.metrics
        return sorted(set(zip(m["context"], m["perturbation"])))

    def methods(self) -> list[str]:
        """The evaluated methods, in ``METHODS`` order, unknown ones last."""
        found = list(dict.fromkeys(self.aggregated["method"]))
        return [m for m in METHODS if m in found] + [m for m in found if m not in METHODS]

    def avg_scores(self) -> dict[str, float]:
        """{method: avg_score} (empty without a normalised score)."""
        s = self.scores[self.scores["metric"] == "avg_score"]
        return dict(zip(s["method"], s["from_baseline"].astype(float)))

    def mean(self) -> pd.DataFrame:
        """method x metric: the mean of each metric over the conditions, methods in ``methods()`` order."""
        return self.aggregated.pivot(index="method", columns="metric", values="mean").reindex(index=self.methods())

    def write(self, directory: Path) -> list[str]:
        """Write every table and summary.json into ``directory`` (a staging directory); return the names."""
        files = []
        for attr, name in TABLES.items():
            table = getattr(self, attr)
            if table is None:
                continue
            if attr == "calibration" and "pit_hist" in table.columns:  # one JSON list per condition
                table = table.drop(columns=["pit_hist"]).assign(
                    pit_hist=[json.dumps(list(map(int, h))) if h is not None else "" for h in table["pit_hist"]])
            table.to_csv(directory / name, index=False)
            files.append(name)
        (directory / "summary.json").write_text(json.dumps(self.summary, indent=2, default=_json_default))
        return files + ["summary.json"]

    @classmethod
    def load(cls, eval_dir) -> EvalDir:
        """Read the tables of ``eval_dir``; a ``DataError`` names what is missing."""
        path = Path(eval_dir)
        if not path.is_dir():
            raise DataError(path, "evaluation directory not found (write one with `perturbdiff evaluate`)")
        for name in REQUIRED:
            if not (path / name).is_file():
                raise DataError(path / name, "missing: not a complete `perturbdiff evaluate` output directory")
        keys = {"context": str, "perturbation": str}

        def read(name):
            if not (path / name).is_file():
                return None
            return pd.read_csv(path / name, dtype=keys, keep_default_na=False, na_values=["", "nan", "NaN"])

        tables = {attr: read(name) for attr, name in TABLES.items()}
        if tables["scores"] is None:
            tables["scores"] = empty_scores()
        return cls(path, json.loads((path / "summary.json").read_text()), **tables)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if np.isnan(o) else float(o)
    if isinstance(o, tuple):
        return list(o)
    return str(o)
