"""Train / val / test assignment of (context, batch, perturbation) groups, and the leakage check.

The held-out unit is a group; rules (``HoldoutRule``) express the paper's protocols: held-out
(context x perturbation) lists (Tahoe, Replogle), held-out batches x perturbations (PBMC), unseen
perturbations, unseen contexts, held-out batches. Control groups are never targets of val/test;
they stay available as control pools in every split (as in the paper's protocol).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from perturbdiff.config import HoldoutRule, SplitConfig

from .schema import DataError

TRAIN, VAL, TEST, CONTROL = "train", "val", "test", "control"


def _matches(conditions: pd.DataFrame, rule: HoldoutRule) -> np.ndarray:
    m = np.ones(len(conditions), dtype=bool)
    for field, col in (("contexts", "context"), ("batches", "batch"), ("perturbations", "perturbation")):
        values = getattr(rule, field)
        if values:
            m &= conditions[col].isin([str(v) for v in values]).to_numpy()
    return m


def _check_rule(conditions: pd.DataFrame, rule: HoldoutRule, where: str, strict: bool = True, log=print) -> None:
    if not (rule.contexts or rule.batches or rule.perturbations):
        raise DataError(None, f"{where}: an empty holdout rule would hold out everything")
    for field, col in (("contexts", "context"), ("batches", "batch"), ("perturbations", "perturbation")):
        known = set(conditions[col].astype(str))
        unknown = [v for v in getattr(rule, field) if str(v) not in known]
        if unknown and strict:
            raise DataError(None, f"{where}.{field}: {unknown[:5]} not found in the store's {col} values "
                            "(set split.strict=false to allow names the store lacks)")
        if unknown:
            log(f"note: {where}.{field}: {len(unknown)} name(s) not in the store, e.g. {unknown[:3]}")


def assign_splits(conditions: pd.DataFrame, cfg: SplitConfig, log=print) -> np.ndarray:
    """One of train / val / test / control for every group (row of ``conditions``)."""
    split = np.full(len(conditions), TRAIN, dtype=object)
    is_control = conditions["is_control"].to_numpy()
    for i, rule in enumerate(cfg.val):
        _check_rule(conditions, rule, f"split.val[{i}]", cfg.strict, log)
        split[_matches(conditions, rule)] = VAL
    for i, rule in enumerate(cfg.test):
        _check_rule(conditions, rule, f"split.test[{i}]", cfg.strict, log)
        split[_matches(conditions, rule)] = TEST
    if cfg.random_val_fraction > 0:
        pairs = conditions.loc[(split == TRAIN) & ~is_control, ["context", "perturbation"]].drop_duplicates()
        rng = np.random.default_rng(cfg.seed)
        k = int(round(cfg.random_val_fraction * len(pairs)))
        chosen = pairs.iloc[np.sort(rng.choice(len(pairs), size=k, replace=False))] if k else pairs.iloc[:0]
        key = conditions["context"] + "\x1f" + conditions["perturbation"]
        picked = set(chosen["context"] + "\x1f" + chosen["perturbation"])
        split[(split == TRAIN) & key.isin(picked).to_numpy() & ~is_control] = VAL
    split[is_control] = CONTROL
    return split


def check_no_leakage(conditions: pd.DataFrame, split: np.ndarray, cfg: SplitConfig,
                     train_groups: np.ndarray | None = None) -> None:
    """Raise if any val/test group, or any of their cells, can reach training.

    Checks: (1) every group's row range is disjoint from every other group's (the store is
    contiguous by group); (2) no train target group is a val/test group or matches a test/val rule;
    (3) the (context, perturbation) pairs held out by pair rules never appear among train targets.
    """
    starts = conditions["start"].to_numpy()
    stops = conditions["stop"].to_numpy()
    order = np.argsort(starts)
    if (starts[order][1:] < stops[order][:-1]).any():
        raise DataError(None, "group row ranges overlap: the store's condition index is corrupt")
    groups = np.flatnonzero(split == TRAIN) if train_groups is None else np.asarray(train_groups)
    held = split[groups] != TRAIN
    held &= ~conditions["is_control"].to_numpy()[groups]
    if held.any():
        g = conditions.iloc[groups[held][0]]
        raise DataError(None, f"held-out group ({g.context}, {g.batch}, {g.perturbation}) is in training")
    sub = conditions.iloc[groups]
    for name, rules in (("test", cfg.test), ("val", cfg.val)):
        for i, rule in enumerate(rules):
            hit = _matches(sub, rule) & ~sub["is_control"].to_numpy()
            if hit.any():
                g = sub.iloc[np.flatnonzero(hit)[0]]
                raise DataError(None, f"split.{name}[{i}] matches training group "
                                f"({g.context}, {g.batch}, {g.perturbation})")
    held_pairs = set(zip(conditions["context"][split == TEST], conditions["perturbation"][split == TEST]))
    train_pairs = set(zip(sub["context"][~sub["is_control"]], sub["perturbation"][~sub["is_control"]]))
    both = held_pairs & train_pairs
    # a pair may legitimately be in both when only some batches are held out (PBMC protocol)
    batch_rules = any(r.batches for r in cfg.test)
    if both and not batch_rules:
        raise DataError(None, f"(context, perturbation) pair {sorted(both)[0]} is both test and train")
