"""What ``perturbdiff report`` reads: the evaluation's cells for the plots, the training runs, and the
conditions a user asks for.

    Cells                the real cells (controls and perturbed) and the predicted cells of the shown
                         conditions, grouped by (context, perturbation), with their pseudobulk deltas
    load_cells           those cells from the h5ad files summary.json names, and the conditions to show
    Run, load_runs       a training run's metrics.jsonl records and config.yaml
    resolve_conditions   "context/perturbation" strings (or unique perturbation names) as conditions
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...data.schema import DataError
from ...outputs import read_jsonl
from ..inputs import group_means, obs_str, real_only, rows_by
from ..schema import EvalDir

N_DEFAULT = 3  # conditions shown when none are asked for


def resolve_conditions(requested, known: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """"context/perturbation" strings (split on the first "/"), or a perturbation name that is
    unique across contexts, as (context, perturbation) pairs of ``known``."""
    out = []
    for s in requested:
        s = str(s)
        ctx, sep, pert = s.partition("/")
        hit = [(ctx, pert)] if sep and (ctx, pert) in known else [k for k in known if k[1] == s]
        if len(hit) > 1:
            raise DataError(None, f"condition {s!r} is in {len(hit)} contexts ({[c for c, _ in hit][:5]}): "
                            "write it as context/perturbation")
        if not hit:
            few = ", ".join(repr(f"{c}/{p}") for c, p in known[:5])
            raise DataError(None, f"unknown condition {s!r}; known ({len(known)}, as context/perturbation): {few}"
                            + (", ..." if len(known) > 5 else ""))
        if hit[0] not in out:
            out.append(hit[0])
    return out


def input_path(ev: EvalDir, key: str) -> Path | None:
    """An input h5ad of summary.json: as written, else relative to the evaluation directory."""
    given = (ev.summary.get("inputs") or {}).get(key)
    if not given:
        return None
    p = Path(given)
    for cand in (p, ev.path / p, ev.path.parent / p.name):
        if cand.is_file():
            return cand
    return None


def _groups(adata) -> dict[tuple, np.ndarray]:
    """Row indices of each (context, perturbation) group of ``adata``."""
    return rows_by(obs_str(adata, "context", default=""), obs_str(adata, "perturbation", default=""), sort=False)


def _mean(x, rows: np.ndarray) -> np.ndarray:
    """Mean of the ``rows`` of ``x`` (dense or sparse) per gene, float64."""
    return group_means(x, [rows])[0]


@dataclass
class Cells:
    """The real cells (controls and perturbed) and the predicted cells of the shown conditions."""

    real: object  # AnnData
    pred: object  # AnnData, perturbed cells of the shown conditions only
    control: str
    real_groups: dict = field(init=False)
    pred_groups: dict = field(init=False)

    def __post_init__(self):
        self.real_groups = _groups(self.real)
        self.pred_groups = _groups(self.pred)

    def control_rows(self, context: str) -> np.ndarray:
        return self.real_groups.get((context, self.control), np.zeros(0, dtype=np.int64))

    def delta(self, which: str, key: tuple[str, str]) -> np.ndarray:
        """Pseudobulk log-fold-change per gene: mean perturbed - mean real control of the context."""
        perturbed = _mean(self.real.X, self.real_groups[key]) if which == "real" else \
            _mean(self.pred.X, self.pred_groups[key])
        return perturbed - _mean(self.real.X, self.control_rows(key[0]))


def real_effects(real, control: str, known: list[tuple[str, str]]) -> dict[tuple[str, str], float]:
    """|real pseudobulk delta| (L2 over genes) per condition with real cells and controls."""
    groups = _groups(real)
    ctrl = {c: _mean(real.X, groups[(c, control)]) for c, _ in known if (c, control) in groups}
    return {k: float(np.linalg.norm(_mean(real.X, groups[k]) - ctrl[k[0]])) for k in known
            if k in groups and k[0] in ctrl}


def load_cells(ev: EvalDir, requested, log) -> tuple[Cells | None, list[tuple[str, str]], str]:
    """The cells for the plots, the conditions to show, and a note when the h5ads are unavailable."""
    import anndata as ad

    known = ev.conditions()
    shown = resolve_conditions(requested, known) if requested else []
    paths = {k: input_path(ev, k) for k in ("real", "pred")}
    missing = [k for k, p in paths.items() if p is None]
    if missing:
        given = {k: (ev.summary.get("inputs") or {}).get(k) for k in missing}
        return None, shown, f"cell-level plots skipped: input h5ad not found ({given})"
    real = real_only(ad.read_h5ad(paths["real"]))
    if not shown:
        effects = real_effects(real, ev.control, known)
        shown = sorted(effects, key=lambda k: -effects[k])[:N_DEFAULT]
    log(f"report: cell-level plots for {len(shown)} condition(s) from {paths['pred'].name}, {paths['real'].name}")
    backed = ad.read_h5ad(paths["pred"], backed="r")
    try:
        keys = set(shown)
        ctx, pert = obs_str(backed, "context", default=""), obs_str(backed, "perturbation", default="")
        want = np.array([(c, p) in keys for c, p in zip(ctx, pert)], dtype=bool)
        if "sample" in backed.obs.columns:
            want &= backed.obs["sample"].to_numpy().astype(np.int64) >= 0
        pred = backed[np.flatnonzero(want)].to_memory()
    finally:
        backed.file.close()
    cells = Cells(real, pred, ev.control)
    usable = [k for k in shown if k in cells.real_groups and k in cells.pred_groups and len(cells.control_rows(k[0]))]
    dropped = [f"{c}/{p}" for c, p in shown if (c, p) not in usable]
    return cells, usable, f"no real, predicted or control cells for {dropped}: not plotted" if dropped else ""


@dataclass
class Run:
    """One training run: its metrics.jsonl records and config.yaml text."""

    label: str
    path: Path
    records: list[dict]
    n_bad: int
    config: str | None


def load_runs(run_dir) -> list[Run]:
    """The runs of ``run_dir`` (None, one directory or metrics.jsonl, or a list); unreadable lines counted."""
    if run_dir is None:
        return []
    dirs = [run_dir] if isinstance(run_dir, (str, os.PathLike)) else list(run_dir)
    runs = []
    for d in map(Path, dirs):
        log_file = d if d.is_file() else d / "metrics.jsonl"
        if not log_file.is_file():
            raise DataError(log_file, "training log not found (give a training run directory with metrics.jsonl)")
        records, bad = read_jsonl(log_file)  # a torn last line of a run still writing is counted, not fatal
        cfg = log_file.parent / "config.yaml"
        runs.append(Run(log_file.parent.name, log_file.parent, records, bad,
                         cfg.read_text() if cfg.is_file() else None))
    names = [r.label for r in runs]
    for r in runs:  # two runs called "run" -> "pretrain/run", "finetune/run"
        if names.count(r.label) > 1:
            r.label = f"{r.path.parent.name}/{r.path.name}"
    return runs


def numeric_series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records with a finite number under ``key``."""
    steps, vals = [], []
    for i, rec in enumerate(records):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            steps.append(rec.get("step", i))
            vals.append(float(v))
    return np.asarray(steps, dtype=float), np.asarray(vals)
