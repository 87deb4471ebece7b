"""Conditions to predict: the user's table (or a store split's groups), checked row by row, and
their covariate tensors for the model.

A conditions table has one row per condition: perturbation and context (required), batch, n_cells,
n_samples, and the checkpoint's numeric covariates (e.g. dose). Every value a user can get wrong is
a DataError naming the file, the row and the column: missing labels, counts that are not positive
integers, a condition listed twice, a request for an absurd number of cells, a covariate that is
not a number, a dose the checkpoint needs but the table lacks (see ``numeric_covariate``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from .data.batch import numeric_key
from .data.schema import DataError, parse_drugconc
from .models.covariates import UNSEEN_ID

if TYPE_CHECKING:
    from .predict import PredictOptions



CONDITION_KEYS = ("perturbation", "context", "batch")


def read_conditions(path: str, opts: PredictOptions, only_context: str | None = None) -> pd.DataFrame:
    """A conditions file (.parquet, .tsv, else comma-separated text): columns perturbation, context;
    optional batch, n_cells, n_samples, dose and other numeric covariates. Checked row by row.
    ``only_context``: the checkpoint's one context, taken when the table has no context column."""
    p = Path(path)
    if not p.is_file():
        raise DataError(path, "conditions file not found")
    try:
        if p.suffix == ".parquet":
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p, sep="\t" if p.suffix == ".tsv" else ",", dtype=str, keep_default_na=False,
                             na_values=[""], encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise DataError(path, "the conditions file is empty: give a header (perturbation,context[,batch,n_cells,"
                        "n_samples,dose]) and one row per condition") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(path, f"cannot read the conditions table (is it a .csv/.tsv/.parquet file?): {first}") from None
    if "context" not in df.columns and only_context is not None:
        df["context"] = only_context
    missing = [c for c in ("perturbation", "context") if c not in df.columns]
    if missing:
        raise DataError(path, f"conditions need columns {missing} (has {list(df.columns)[:10]})")
    if df.empty:
        raise DataError(path, "the conditions file has a header but no conditions")
    return normalise_conditions(df, opts, source=str(path), max_cells=opts.max_cells)


def _positive_ints(df: pd.DataFrame, col: str, source: str | None) -> pd.Series:
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() | (values != np.floor(values)) | (values < 1) | ~np.isfinite(values.fillna(0))
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(source, f"row {i + 1} ({df['context'].iloc[i]!r}, {df['perturbation'].iloc[i]!r}): "
                        f"{col}={df[col].iloc[i]!r} is not a positive integer")
    return values.astype(np.int64)


def normalise_conditions(df: pd.DataFrame, opts: PredictOptions, source: str | None = None,
                         max_cells: int | None = None) -> pd.DataFrame:
    """Conditions with their n_cells / n_samples as positive integers (the options' defaults where
    the table has none), batch None where absent; a missing label, a duplicated condition or a
    request for more than ``max_cells`` cells in all is a DataError naming the row."""
    df = df.copy().reset_index(drop=True)
    for col in ("perturbation", "context"):
        empty = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if empty.any():
            raise DataError(source, f"row {int(np.flatnonzero(empty.to_numpy())[0]) + 1}: no {col} label")
        df[col] = df[col].astype(str)
    if "batch" not in df.columns:
        df["batch"] = None
    else:
        df["batch"] = [None if pd.isna(b) else str(b) for b in df["batch"]]
    for col, default in (("n_cells", opts.n_cells), ("n_samples", opts.n_samples)):
        df[col] = _positive_ints(df, col, source) if col in df.columns else int(default)
        if int(default) < 1:
            raise DataError(source, f"{col} must be >= 1, got {default}")
    key = [c for c in df.columns if c not in ("n_cells", "n_samples")]
    dup = df.duplicated(subset=key, keep=False)
    if dup.any():
        rows = np.flatnonzero(dup.to_numpy())[:2] + 1
        raise DataError(source, f"rows {rows[0]} and {rows[1]} name the same condition "
                        f"({df['context'].iloc[rows[0] - 1]!r}, {df['perturbation'].iloc[rows[0] - 1]!r}); give it "
                        "once, with n_samples for several populations")
    total = int((df["n_cells"] * df["n_samples"]).sum())
    if max_cells is not None and total > max_cells:
        i = int(np.argmax((df["n_cells"] * df["n_samples"]).to_numpy()))
        raise DataError(source, f"the conditions ask for {total:,} cells in all (row {i + 1}: n_cells="
                        f"{int(df['n_cells'].iloc[i]):,} x n_samples={int(df['n_samples'].iloc[i])}), more than the "
                        f"limit of {max_cells:,}; raise --max-cells if you mean it")
    return df


def covariates(conditions: pd.DataFrame, vocabularies: dict[str, list[str]], model, notes: list[str],
               trained_with: list[str] | None = None) -> dict:
    """[C] covariate tensors for the conditions; unknown names are errors naming the condition."""
    out: dict[str, torch.Tensor] = {}
    branches = set(model.cov_encoder.branch_names)
    for name in ("context", "perturbation"):
        if name not in branches:
            continue
        index = {v: i for i, v in enumerate(vocabularies.get(name, []))}
        ids, unseen = [], set()
        for _, row in conditions.iterrows():
            if row[name] in index:
                ids.append(index[row[name]])
            elif name == "context":  # an unseen cell type: the prediction rests on its own control cells
                ids.append(UNSEEN_ID)
                unseen.add(row[name])
            else:
                raise DataError(None, f"condition (context={row['context']!r}, perturbation={row['perturbation']!r}): "
                                f"perturbation {row[name]!r} is neither in the checkpoint's perturbation vocabulary "
                                f"nor in its feature table ({len(index)} known, e.g. {list(index)[:5]})")
        if unseen:
            notes.append(f"context(s) {sorted(unseen)[:6]} not in the checkpoint's context vocabulary ({len(index)} known, "
                         f"e.g. {list(index)[:3]}): their context covariate is the null token, the prediction "
                         "conditioned on their control cells")
        out[name] = torch.tensor(ids, dtype=torch.long)
    if "batch" in branches:
        index = {v: i for i, v in enumerate(vocabularies.get("batch", []))}
        if len(index) == 1 and conditions["batch"].isna().any():  # one batch in training: it is the batch
            only = next(iter(index))
            notes.append(f"condition(s) without a batch take the checkpoint's only batch {only!r}")
            conditions = conditions.assign(batch=conditions["batch"].fillna(only))
        known = conditions["batch"].map(lambda b: b in index)
        if known.all():
            out["batch"] = torch.tensor([index[b] for b in conditions["batch"]], dtype=torch.long)
        else:
            notes.append(f"{int((~known).sum())} condition(s) name no known batch: the batch covariate is left "
                         "out (its null token) for all conditions")
    for name in model.cfg.numeric_covariates:
        out[numeric_key(name)] = torch.tensor(numeric_covariate(conditions, name, trained_with, notes), dtype=torch.float32)
    return out


def numeric_covariate(conditions: pd.DataFrame, name: str, trained_with: list[str] | None, notes: list[str]) -> np.ndarray:
    """[C] values of a numeric covariate (e.g. dose) for the conditions; NaN = unknown (the null token).

    Rules, so that a dose is never dropped silently: a column that is there must hold numbers (empty
    cells are unknown, with a note); without one, a dose is read from Tahoe-style labels
    ("[('drug', 0.5, 'uM')]", summed over the drugs as the converter does), with a note; otherwise a
    covariate the training data had (``trained_with``; None: not recorded, assumed) is an error
    naming the column, and one it never had stays unknown, as in training."""
    if name in conditions.columns:
        values = pd.to_numeric(conditions[name], errors="coerce")
        bad = values.isna() & conditions[name].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise DataError(None, f"condition row {i + 1}: {name}={conditions[name].iloc[i]!r} is not a number")
        if values.isna().any() and (trained_with is None or name in trained_with):
            notes.append(f"{int(values.isna().sum())} condition(s) have no {name}: the {name} covariate uses its "
                         "null (unknown) token for them")
        return values.to_numpy(np.float64)
    if name == "dose":
        try:
            doses = [sum(c for _, c, _ in parse_drugconc(p)) for p in conditions["perturbation"]]
        except ValueError:
            doses = None
        if doses is not None:
            notes.append("no dose column: doses read from the perturbation labels (drug, concentration, unit)")
            return np.asarray(doses, dtype=np.float64)
    if trained_with is None or name in trained_with:
        raise DataError(None, f"the conditions have no {name!r} column, which the checkpoint's {name} covariate "
                        f"needs; add it (leave a cell empty for an unknown {name})")
    return np.full(len(conditions), np.nan)
