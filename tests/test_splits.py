"""Split assignment for the paper's protocols, the leakage check, and no test cell in any train batch."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from helpers import data_cfg, make_conditions
from perturbdiff.config import HoldoutRule, SplitConfig
from perturbdiff.data import schema
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.schema import DataError
from perturbdiff.data.splits import CONTROL, TEST, TRAIN, VAL, assign_splits, check_no_leakage


def expected(cond: pd.DataFrame, test_mask, val_mask=None) -> np.ndarray:
    out = np.full(len(cond), TRAIN, dtype=object)
    if val_mask is not None:
        out[np.asarray(val_mask)] = VAL
    out[np.asarray(test_mask)] = TEST
    out[cond["is_control"].to_numpy()] = CONTROL
    return out


TAHOE = dict(contexts=["CVCL_A", "CVCL_B", "CVCL_C", "CVCL_D"], batches=["plate1", "plate2", "plate3"],
             perts=["D1", "D2", "D3", "D4", "D5"])
PBMC = dict(contexts=["B", "NK", "T"], batches=["Donor1", "Donor2", "Donor3"],
            perts=["IFNG", "IL2", "IL4", "TNF"], control="PBS")


def assert_split(got, want, cond):
    bad = np.flatnonzero(np.asarray(got) != np.asarray(want))
    assert not len(bad), cond.iloc[bad].assign(got=np.asarray(got)[bad], want=np.asarray(want)[bad])


# ---------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------


def test_tahoe_contexts_x_perturbations():
    cond = make_conditions(**TAHOE)
    cfg = SplitConfig(test=[HoldoutRule(contexts=["CVCL_A", "CVCL_C"], perturbations=["D1", "D2"])],
                      val=[HoldoutRule(contexts=["CVCL_B"], perturbations=["D3"])])
    got = assign_splits(cond, cfg)
    t = cond["context"].isin(["CVCL_A", "CVCL_C"]) & cond["perturbation"].isin(["D1", "D2"])
    v = (cond["context"] == "CVCL_B") & (cond["perturbation"] == "D3")
    assert_split(got, expected(cond, t, v), cond)
    assert (got == TEST).sum() == 2 * 2 * 3 and (got == VAL).sum() == 3
    assert (got[cond["is_control"].to_numpy()] == CONTROL).all()
    check_no_leakage(cond, got, cfg)


def test_pbmc_batches_x_perturbations():
    cond = make_conditions(**PBMC)
    cfg = SplitConfig(test=[HoldoutRule(batches=["Donor2"], perturbations=["IFNG", "TNF"])])
    got = assign_splits(cond, cfg)
    t = (cond["batch"] == "Donor2") & cond["perturbation"].isin(["IFNG", "TNF"])
    assert_split(got, expected(cond, t), cond)
    assert (got == TEST).sum() == 3 * 2
    # the same (context, perturbation) pairs stay in training for the other donors: allowed with batch rules
    check_no_leakage(cond, got, cfg)


def test_unseen_perturbation():
    cond = make_conditions(**TAHOE)
    cfg = SplitConfig(test=[HoldoutRule(perturbations=["D4"])])
    got = assign_splits(cond, cfg)
    assert_split(got, expected(cond, cond["perturbation"] == "D4"), cond)
    assert (got == TEST).sum() == 4 * 3
    check_no_leakage(cond, got, cfg)


def test_unseen_context_keeps_its_controls_as_control():
    cond = make_conditions(**TAHOE)
    cfg = SplitConfig(test=[HoldoutRule(contexts=["CVCL_D"])])
    got = assign_splits(cond, cfg)
    assert_split(got, expected(cond, cond["context"] == "CVCL_D"), cond)
    ctrl_d = (cond["context"] == "CVCL_D") & cond["is_control"]
    assert ctrl_d.sum() == 3 and (got[ctrl_d.to_numpy()] == CONTROL).all()
    check_no_leakage(cond, got, cfg)


def test_held_out_batch():
    cond = make_conditions(**PBMC)
    cfg = SplitConfig(test=[HoldoutRule(batches=["Donor3"])], val=[HoldoutRule(batches=["Donor1"], perturbations=["IL2"])])
    got = assign_splits(cond, cfg)
    t = cond["batch"] == "Donor3"
    v = (cond["batch"] == "Donor1") & (cond["perturbation"] == "IL2")
    assert_split(got, expected(cond, t, v), cond)
    check_no_leakage(cond, got, cfg)


def test_test_rule_wins_over_val_rule():
    cond = make_conditions(**TAHOE)
    cfg = SplitConfig(test=[HoldoutRule(perturbations=["D1"])], val=[HoldoutRule(contexts=["CVCL_A"])])
    got = assign_splits(cond, cfg)
    t = cond["perturbation"] == "D1"
    v = cond["context"] == "CVCL_A"
    assert_split(got, expected(cond, t, v & ~t), cond)


def test_several_rules_union():
    cond = make_conditions(**TAHOE)
    cfg = SplitConfig(test=[HoldoutRule(contexts=["CVCL_A"], perturbations=["D1"]),
                            HoldoutRule(contexts=["CVCL_B"], perturbations=["D2"], batches=["plate1"])])
    got = assign_splits(cond, cfg)
    t = ((cond["context"] == "CVCL_A") & (cond["perturbation"] == "D1")) | \
        ((cond["context"] == "CVCL_B") & (cond["perturbation"] == "D2") & (cond["batch"] == "plate1"))
    assert_split(got, expected(cond, t), cond)


def test_random_val_fraction_holds_out_whole_pairs():
    cond = make_conditions(**TAHOE)
    cfg = SplitConfig(test=[HoldoutRule(perturbations=["D5"])], random_val_fraction=0.25, seed=3)
    got = assign_splits(cond, cfg)
    val = cond[got == VAL]
    pairs = set(zip(val["context"], val["perturbation"]))
    train_pairs = 4 * 4  # 4 contexts x D1..D4
    assert len(pairs) == round(0.25 * train_pairs)
    for c, p in pairs:  # every batch of a picked pair is val, never a control or a test group
        sel = (cond["context"] == c) & (cond["perturbation"] == p)
        assert (got[sel.to_numpy()] == VAL).all() and sel.sum() == 3
        assert p not in ("control", "D5")
    np.testing.assert_array_equal(got, assign_splits(cond, cfg))  # deterministic
    others = {tuple(assign_splits(cond, SplitConfig(test=cfg.test, random_val_fraction=0.25, seed=s)).tolist())
              for s in range(6)}
    assert len(others) > 1  # the seed matters
    check_no_leakage(cond, got, cfg)


@pytest.mark.parametrize("rule,field,value", [
    (HoldoutRule(contexts=["CVCL_Z"]), "contexts", "CVCL_Z"),
    (HoldoutRule(batches=["plate9"], perturbations=["D1"]), "batches", "plate9"),
    (HoldoutRule(contexts=["CVCL_A"], perturbations=["D1", "Dx_typo"]), "perturbations", "Dx_typo"),
])
def test_unknown_value_in_rule_raises_naming_it(rule, field, value):
    cond = make_conditions(**TAHOE)
    with pytest.raises(DataError, match=value) as err:
        assign_splits(cond, SplitConfig(test=[rule]))
    assert field in str(err.value) and "split.test[0]" in str(err.value)
    with pytest.raises(DataError, match=value):
        assign_splits(cond, SplitConfig(val=[rule]))


def test_non_strict_rule_reports_unknown_names_and_holds_out_the_rest():
    cond = make_conditions(**TAHOE)
    notes = []
    cfg = SplitConfig(test=[HoldoutRule(contexts=["CVCL_A", "CVCL_GONE"], perturbations=["D1", "D_missing"])],
                      strict=False)
    got = assign_splits(cond, cfg, log=notes.append)
    t = (cond["context"] == "CVCL_A") & (cond["perturbation"] == "D1")
    assert_split(got, expected(cond, t), cond)
    text = "\n".join(notes)
    assert "CVCL_GONE" in text and "D_missing" in text


def test_empty_rule_raises():
    cond = make_conditions(**TAHOE)
    with pytest.raises(DataError, match="empty"):
        assign_splits(cond, SplitConfig(test=[HoldoutRule()]))


# ---------------------------------------------------------------------------------------------
# Leakage check
# ---------------------------------------------------------------------------------------------


def test_leakage_check_raises_when_a_test_group_is_trained_on():
    cond = make_conditions(**TAHOE)
    cfg = SplitConfig(test=[HoldoutRule(contexts=["CVCL_A"], perturbations=["D1"])])
    split = assign_splits(cond, cfg)
    train = np.flatnonzero(split == TRAIN)
    check_no_leakage(cond, split, cfg, train)
    leaked = int(np.flatnonzero(split == TEST)[0])
    with pytest.raises(DataError, match="CVCL_A"):
        check_no_leakage(cond, split, cfg, np.append(train, leaked))
    # relabelled as train by mistake: the rule itself still catches it
    forged = split.copy()
    forged[leaked] = TRAIN
    with pytest.raises(DataError, match=r"split\.test\[0\]"):
        check_no_leakage(cond, forged, cfg)


def test_leakage_check_pair_in_test_and_train():
    cond = make_conditions(**TAHOE)
    # hold out (CVCL_A, D1) in two plates only: the pair is legitimately in train for plate3
    narrow = SplitConfig(test=[HoldoutRule(contexts=["CVCL_A"], perturbations=["D1"], batches=["plate1", "plate2"])])
    split = assign_splits(cond, narrow)
    pair = (cond["context"] == "CVCL_A") & (cond["perturbation"] == "D1")
    assert (split[pair.to_numpy()] == np.array([TEST, TEST, TRAIN], dtype=object)).all()
    check_no_leakage(cond, split, narrow)
    # the same labels without a batch rule to justify them: the pair leaks
    with pytest.raises(DataError, match="both test and train"):
        check_no_leakage(cond, split, SplitConfig())


def test_leakage_check_overlapping_ranges():
    cond = make_conditions(**TAHOE)
    split = assign_splits(cond, SplitConfig())
    bad = cond.copy()
    bad.loc[3, "start"] = bad.loc[2, "start"] + 1
    with pytest.raises(DataError, match="overlap"):
        check_no_leakage(bad, split, SplitConfig())


# ---------------------------------------------------------------------------------------------
# On a real store: no test cell in any training batch
# ---------------------------------------------------------------------------------------------

DIN05 = schema.format_drugconc("Dinaciclib", 0.5)
BEL = schema.format_drugconc("Belinostat", 0.05)


@pytest.mark.parametrize("workers", [0, 2])
def test_no_test_row_in_any_training_batch(tahoe_store, workers):
    split = SplitConfig(test=[HoldoutRule(contexts=["CVCL_0480", "CVCL_0023"], perturbations=[DIN05])],
                        val=[HoldoutRule(perturbations=[BEL])])
    cfg = data_cfg(tahoe_store, split=split, num_workers=workers, set_size=8, sets_per_batch=3)
    train = SetLoader(cfg, "train", rank=0, world=1, log=lambda m: None)
    cond = train.store.conditions
    labels = train.split_labels
    held_rows = np.concatenate([np.arange(r.start, r.stop) for r in cond[(labels == TEST) | (labels == VAL)].itertuples()])
    ctrl_rows = np.concatenate([np.arange(r.start, r.stop) for r in cond[cond["is_control"]].itertuples()])
    train_rows = np.concatenate([np.arange(r.start, r.stop) for r in cond[labels == TRAIN].itertuples()])
    assert (labels == TEST).sum() == 4 and (labels == VAL).sum() == 6
    seen, seen_ctrl, nb = [], [], 0
    for batch in train:
        nb += 1
        r = batch["rows"][batch["mask"]].numpy()
        c = batch["ctrl_rows"][batch["ctrl_mask"]].numpy()
        assert not np.isin(r, held_rows).any()
        assert not np.isin(c, held_rows).any()
        assert np.isin(c, ctrl_rows).all()
        assert np.isin(labels[batch["group"].numpy()], [TRAIN, CONTROL]).all()  # controls are targets too
        seen.append(r)
        seen_ctrl.append(c)
    assert nb == len(train) > 0
    seen = np.concatenate(seen)
    # proportional sampling without drop_last: every train and control cell exactly once as a target
    np.testing.assert_array_equal(np.sort(seen), np.sort(np.concatenate([train_rows, ctrl_rows])))
    # evaluation loader of the test split reads only the held-out cells, each once
    test = SetLoader(data_cfg(tahoe_store, split=split, num_workers=workers), "test", rank=0, world=1)
    rows = np.concatenate([b["rows"][b["mask"]].numpy() for b in test])
    test_rows = np.concatenate([np.arange(r.start, r.stop) for r in cond[labels == TEST].itertuples()])
    np.testing.assert_array_equal(np.sort(rows), test_rows)
