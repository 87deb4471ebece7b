"""The evaluation's AnnData inputs: reading them in its layout, checking them, and finding their rows.

Every evaluation module (the suite, the baselines, the fidelity diagnostics, the distances, the
command and the report) takes AnnData objects in the evaluation layout: log-normalised ``.X``, obs
perturbation, context, batch (the replicate) and sample (population index, -1 for real cells), and
the same genes in the same order as its partner. The checks here are the only ones: each names the
file (or, for in-memory objects, the role: pred, real, train, controls) and the column or condition.

    read_layout(path, what, cols)      an h5ad with the user's obs columns renamed to the layout's
    require_obs / require_same_genes   the columns a step needs; one gene vocabulary
    numeric_matrix(adata, label)       .X present, numeric and finite
    check_pair(real, pred, paths, c)   what a user meets first: genes, control label, conditions
    check_scale(adata, path, log)      NaN refused; negative and above-log1p values flagged
    obs_str / rows_by / group_rows     obs columns as strings; {(context, perturbation): rows}
    dense_rows / group_means           rows of dense or sparse .X as float64; per-group means
    as_conditions                      the (context, perturbation, n_cells) table a baseline predicts
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.schema import IMPLICIT_LABEL, DataError

KEY = ("context", "perturbation")
LOG1P_MAX = 15.0  # cell-eval refuses .X whose maximum exceeds this ("Invalid scale ... log1p threshold")


# ---------------------------------------------------------------------------------------------
# Columns and rows
# ---------------------------------------------------------------------------------------------


def require_obs(adata, columns: Sequence[str], what: str, path=None) -> None:
    """A DataError naming every obs column of ``columns`` that ``adata`` lacks."""
    missing = [c for c in columns if c not in adata.obs.columns]
    if missing:
        name = f"column {missing[0]!r}" if len(missing) == 1 else f"columns {missing}"
        raise DataError(path, f"{what}: obs has no {name} (columns: {list(adata.obs.columns)[:12]})")


def obs_str(adata, column: str, what: str = "AnnData", default: str | None = None) -> np.ndarray:
    """An obs column as strings; an absent column is ``default`` everywhere, or an error naming ``what``."""
    if column not in adata.obs.columns:
        if default is not None:
            return np.full(adata.n_obs, default, dtype=object)
        require_obs(adata, [column], what)
    return adata.obs[column].astype(str).to_numpy()


def rows_by(*columns: np.ndarray, mask: np.ndarray | None = None, sort: bool = True) -> dict[tuple, np.ndarray]:
    """{tuple of values: sorted row positions} of the rows (where ``mask``) grouped by ``columns``;
    keys in sorted order with ``sort``, else in order of first appearance."""
    frame = pd.DataFrame({i: np.asarray(c) for i, c in enumerate(columns)})
    if mask is not None:
        frame = frame[np.asarray(mask, dtype=bool)]
    if frame.empty:
        return {}
    index = frame.index.to_numpy()
    groups = frame.groupby(list(frame.columns), sort=sort).indices.items()
    return {tuple(map(str, k)) if isinstance(k, tuple) else (str(k),): index[v] for k, v in groups}


def group_rows(adata, mask: np.ndarray | None = None, keys: Sequence[str] = KEY, what: str = "AnnData",
               sort: bool = True) -> dict[tuple, np.ndarray]:
    """{(context, perturbation): sorted row positions} of the cells where ``mask`` is True."""
    return rows_by(*(obs_str(adata, k, what) for k in keys), mask=mask, sort=sort)


def dense_rows(x, rows=None, dtype=np.float64, cols=None) -> np.ndarray:
    """The ``rows`` (all when None; then ``cols``) of a dense or sparse matrix as a dense array."""
    sub = x if rows is None else x[np.asarray(rows)]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    return (sub if cols is None else sub[:, cols]).astype(dtype, copy=False)


def group_means(x, groups: Sequence[np.ndarray]) -> np.ndarray:
    """[len(groups), G] float64 means of the rows ``groups[k]`` of ``x`` (dense or CSR), in one
    sparse product."""
    if not len(groups):
        return np.zeros((0, x.shape[1]))
    rows = np.concatenate(groups)
    gid = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    w = np.concatenate([np.full(len(g), 1.0 / len(g)) for g in groups])
    ind = sp.csr_matrix((w, (gid, np.arange(rows.size))), shape=(len(groups), rows.size))
    sub = x[rows]
    if sp.issparse(sub):
        return np.asarray((ind @ sub.astype(np.float64)).toarray(), dtype=np.float64)
    return np.asarray(ind @ np.asarray(sub, dtype=np.float64), dtype=np.float64)


def keyed_means(x, groups: dict[tuple, np.ndarray]) -> tuple[list[tuple], np.ndarray]:
    """(keys, [n_groups, G] float64 means) of ``x`` over each group's rows of ``groups``."""
    keys = list(groups)
    return keys, group_means(x, [groups[k] for k in keys])


def as_conditions(conditions, need: Sequence[str] = ("n_cells",)) -> pd.DataFrame:
    """A conditions DataFrame (columns context, perturbation and ``need``; optional n_samples) from a
    DataFrame or a list of (context, perturbation[, n_cells[, n_samples]]) tuples; names as str."""
    if not isinstance(conditions, pd.DataFrame):
        rows = [tuple(r) for r in conditions]
        cols = ["context", "perturbation", "n_cells", "n_samples"][: max((len(r) for r in rows), default=2)]
        conditions = pd.DataFrame(rows, columns=cols)
    missing = [c for c in (*KEY, *need) if c not in conditions.columns]
    if missing:
        raise DataError(None, f"conditions lack column(s) {missing} (has {list(conditions.columns)})")
    df = conditions.copy().reset_index(drop=True)
    for c in KEY:
        df[c] = df[c].astype(str)
    for c in ("n_cells", "n_samples"):
        if c in df.columns:
            df[c] = df[c].astype(int)
            bad = df[df[c] < 1]
            if len(bad):
                raise DataError(None, f"condition {tuple(bad.iloc[0][list(KEY)])}: {c} must be >= 1")
    dup = df.duplicated(list(KEY))
    if dup.any():
        raise DataError(None, f"duplicate condition(s) {[tuple(r) for r in df.loc[dup, list(KEY)].to_numpy()][:5]}")
    return df


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def require_same_genes(a, b, what_a: str, what_b: str, path=None, hint: str = "") -> np.ndarray:
    """The genes of ``a`` (as strings), which must be those of ``b`` in the same order; else a DataError
    with the counts, the genes only in one, and the first position that differs."""
    ga, gb = np.asarray(a.var_names).astype(str), np.asarray(b.var_names).astype(str)
    if ga.size == gb.size and np.array_equal(ga, gb):
        return ga
    in_a, in_b = set(ga), set(gb)
    only_a, only_b = [str(g) for g in ga if g not in in_b][:5], [str(g) for g in gb if g not in in_a][:5]
    n = min(ga.size, gb.size)
    diff = np.flatnonzero(ga[:n] != gb[:n])
    if not only_a and not only_b and ga.size == gb.size:
        only = "the same genes in another order"
    else:
        only = f"only in {what_a}: {only_a}; only in {what_b}: {only_b}"
    first = (f"; first difference at position {int(diff[0])}: {what_a} has {str(ga[diff[0]])!r}, {what_b} has "
             f"{str(gb[diff[0]])!r} ({diff.size} positions differ)" if diff.size else "")
    raise DataError(path, f"var_names differ: {what_a} has {ga.size} genes, {what_b} has {gb.size} (the same genes "
                    f"in the same order required; {only}{first})"
                    + (f": {hint}" if hint else ""))


def check_pair(real, pred, paths: dict, control: str) -> None:
    """The errors a user meets first, naming the file: genes, control label, conditions."""
    require_same_genes(pred, real, "pred", "real", paths["pred"], "predict and evaluate on one gene vocabulary")
    for adata, which in ((real, "real"), (pred, "pred")):
        labels = adata.obs["perturbation"].astype(str)
        if not (labels == control).any():
            seen = sorted(labels.unique())[:8]
            raise DataError(paths[which], f"no control cells: no obs['perturbation'] equals {control!r} "
                            f"(labels include {seen}); pass --control-label")
    key = lambda a: set(zip(a.obs["context"].astype(str), a.obs["perturbation"].astype(str)))  # noqa: E731
    missing = sorted(c for c in key(pred) - key(real) if c[1] != control)
    if missing:
        raise DataError(paths["pred"], f"condition(s) (context, perturbation) {missing[:5]} have no real cells in "
                        f"{paths['real']}")


def numeric_matrix(adata, label: str):
    """``adata.X`` as CSR or a dense array that the metrics can use: present, numeric (float16 widened),
    finite; the errors name ``label``."""
    x = adata.X
    if x is None:
        raise ValueError(f"{label}: .X is empty")
    if sp.issparse(x):
        x = sp.csr_matrix(x)
        data = x.data
    else:
        x = np.asarray(x)
        data = x
    if data.dtype == np.float16:
        x = x.astype(np.float32)
        data = x.data if sp.issparse(x) else x
    if not np.issubdtype(data.dtype, np.number):
        raise ValueError(f"{label}: .X must be numeric, got {data.dtype}")
    if data.size and not np.all(np.isfinite(data)):
        raise ValueError(f"{label}: .X contains NaN or infinite values")
    return x


def scale_problems(x) -> dict[str, int | float]:
    """Counts of NaN/infinite, negative and above-LOG1P_MAX values of a matrix, and its maximum."""
    values = x.data if sp.issparse(x) else np.asarray(x).ravel()
    finite = np.isfinite(values)
    good = values[finite]
    return {"non_finite": int((~finite).sum()), "negative": int((good < 0).sum()),
            "above_log1p_max": int((good > LOG1P_MAX).sum()), "max": float(good.max()) if good.size else 0.0}


def check_scale(adata, path: str, log) -> list[str]:
    """NaN / infinite values are refused (naming the file and how many); negative values and values
    above cell-eval's log1p limit are flagged in the notes and printed (cell-eval refuses the latter)."""
    found = scale_problems(adata.X)
    if found["non_finite"]:
        raise DataError(path, f"{found['non_finite']:,} NaN or infinite value(s) in .X: not scorable")
    flags = []
    if found["negative"]:
        flags.append(f"{path}: {found['negative']:,} negative value(s) in .X (log1p expression is >= 0)")
    if found["above_log1p_max"]:
        flags.append(f"{path}: {found['above_log1p_max']:,} value(s) above {LOG1P_MAX:g} (max {found['max']:.2f}), "
                     "the log1p scale cell-eval accepts: not log1p(normalize_total) data, or a model out of range")
    for flag in flags:
        log(f"  warning: {flag}")
    return flags


# ---------------------------------------------------------------------------------------------
# Reading a file in the layout
# ---------------------------------------------------------------------------------------------


def _layout(adata, path: Path, what: str, cols: dict[str, str | None]):
    """The user's obs columns under the evaluation layout's names (perturbation, context, batch);
    ``cols`` maps each to the user's column (context None: one context)."""
    obs = adata.obs
    for want, col in cols.items():
        if col is None or col == want:
            continue
        if col not in obs.columns:
            if want == "batch":  # an absent batch column: one batch
                continue
            flag = {"perturbation": "--pert-col", "context": "--context-col"}[want]
            raise DataError(path, f"{what}: obs has no column {col!r} ({flag}; columns: {list(obs.columns)[:12]})")
        if want in obs.columns:
            obs = obs.rename(columns={want: f"{want}_orig"})
        obs = obs.rename(columns={col: want})
    if cols.get("context") is None:
        if "context" in obs.columns:
            obs = obs.rename(columns={"context": "context_orig"})
        obs["context"] = IMPLICIT_LABEL
    adata.obs = obs
    return adata


def read_layout(path: str | Path, what: str, cols: dict[str, str | None]):
    """The h5ad at ``path`` (the ``what`` of the evaluation: pred, real, train) in the evaluation layout."""
    import anndata as ad

    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} AnnData not found")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for a damaged file
        raise DataError(path, f"cannot read {what} AnnData: {err}") from None
    adata = _layout(adata, path, what, cols)
    require_obs(adata, KEY[::-1], what, path)
    return adata


def real_only(adata):
    """The real cells of an h5ad that may hold sampled ones too (obs sample < 0)."""
    if "sample" not in adata.obs.columns:
        return adata
    return adata[adata.obs["sample"].to_numpy().astype(np.int64) < 0].copy()
