"""The set sampler: one group per set, matched control pools, padding, coverage, modes, determinism,
empty control pools."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from helpers import data_cfg, make_conditions
from perturbdiff.config import DataConfig, SplitConfig
from perturbdiff.data import schema
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.sampler import SetSampler, num_batches
from perturbdiff.data.schema import DataError
from perturbdiff.data.splits import CONTROL, TRAIN, assign_splits

M = 8
KW = dict(contexts=["A", "B", "C"], batches=["p1", "p2"], perts=["d1", "d2", "d3", "d4"])


def sampler(cond, split=TRAIN, eval_mode=False, **kw) -> SetSampler:
    kw.setdefault("include_controls", False)  # perturbed targets only (the default adds the controls)
    cfg = DataConfig(store="unused", set_size=kw.pop("set_size", M), **kw)
    labels = assign_splits(cond, cfg.split)
    return SetSampler(cond, labels, cfg, split, eval_mode=eval_mode, log=lambda m: None)


def all_sets(s: SetSampler, epoch: int):
    return s.sets_at(epoch, np.arange(s.num_sets(epoch)))


def rows_of(cond, mask) -> np.ndarray:
    sel = cond[mask]
    return np.concatenate([np.arange(r.start, r.stop) for r in sel.itertuples()]) if len(sel) else np.zeros(0, int)


# ---------------------------------------------------------------------------------------------
# Sets and control sets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("control_n", [40, 5])  # a pool bigger than m, and one smaller than m
def test_sets_one_group_and_matched_controls(control_n):
    cond = make_conditions(**KW, control_n=control_n, seed=1)
    s = sampler(cond)
    start, stop = cond["start"].to_numpy(), cond["stop"].to_numpy()
    for epoch in (0, 1):
        sets = all_sets(s, epoch)
        assert [x.index for x in sets] == list(range(len(sets)))
        for x in sets:
            g = x.group
            assert not cond.at[g, "is_control"]
            assert len(x.rows) and ((x.rows >= start[g]) & (x.rows < stop[g])).all()
            assert len(np.unique(x.rows)) == len(x.rows) <= M and np.all(np.diff(x.rows) > 0)
            # controls: the (context, batch) control group only, no cell twice
            pool = cond[(cond["is_control"]) & (cond["context"] == cond.at[g, "context"]) &
                        (cond["batch"] == cond.at[g, "batch"])]
            assert len(pool) == 1
            p = pool.iloc[0]
            assert ((x.ctrl_rows >= p.start) & (x.ctrl_rows < p.stop)).all()
            assert len(np.unique(x.ctrl_rows)) == len(x.ctrl_rows) == min(M, control_n)
            assert np.all(np.diff(x.ctrl_rows) > 0)


def test_controls_pool_spans_several_control_groups():
    """Two control labels in one (context, batch) form one pool: draws span both, never duplicate."""
    cond = make_conditions(contexts=["A"], batches=["p1"], perts=["d1", "ctrl2"], control_n=5, seed=3,
                           sizes={("A", "p1", "d1"): 60, ("A", "p1", "ctrl2"): 6})
    cond.loc[cond["perturbation"] == "ctrl2", "is_control"] = True
    s = sampler(cond, run_cells=1)
    pool_rows = rows_of(cond, cond["is_control"])
    assert len(pool_rows) == 11
    hits = Counter()
    for epoch in range(4):
        for x in all_sets(s, epoch):
            assert np.isin(x.ctrl_rows, pool_rows).all()
            assert len(np.unique(x.ctrl_rows)) == len(x.ctrl_rows) == M
            hits.update(x.ctrl_rows.tolist())
    assert set(hits) == set(pool_rows.tolist())  # both groups are drawn from


def test_controls_differ_between_sets_and_epochs():
    cond = make_conditions(**KW, control_n=200, seed=2)
    s = sampler(cond, run_cells=1)
    a = [tuple(x.ctrl_rows) for x in all_sets(s, 0)]
    b = [tuple(x.ctrl_rows) for x in all_sets(s, 1)]
    assert len(set(a)) == len(a)  # independent draws per set
    assert set(a) != set(b)


def test_small_group_gives_padded_set_without_duplicates(tahoe_store):
    cfg = data_cfg(tahoe_store, set_size=M, sets_per_batch=2)
    loader = SetLoader(cfg, "train", rank=0, world=1, log=lambda m: None)
    cond = loader.store.conditions
    small = int(np.flatnonzero(cond["n"].to_numpy() < M)[0])
    n = int(cond.at[small, "n"])
    assert n == 3
    found = 0
    for batch in loader:
        for b in np.flatnonzero(batch["group"].numpy() == small):
            found += 1
            mask, rows = batch["mask"][b].numpy(), batch["rows"][b].numpy()
            assert mask.sum() == n and mask[:n].all() and not mask[n:].any()
            assert (rows[~mask] == -1).all()
            np.testing.assert_array_equal(rows[:n], np.arange(cond.at[small, "start"], cond.at[small, "stop"]))
            assert (batch["x"][b][~batch["mask"][b]] == 0).all()
            assert batch["x"][b][:n].abs().sum() > 0
            c = batch["ctrl_mask"][b].numpy()
            assert c.all()  # the control pool is larger than M
            assert len(np.unique(batch["ctrl_rows"][b].numpy())) == M
    assert found == 1


# ---------------------------------------------------------------------------------------------
# Epoch composition
# ---------------------------------------------------------------------------------------------


def test_proportional_covers_every_train_cell_once_per_epoch():
    cond = make_conditions(**KW, seed=4)
    s = sampler(cond)
    expected = rows_of(cond, ~cond["is_control"])
    n = cond.loc[~cond["is_control"], "n"].to_numpy()
    for epoch in (0, 1, 5):
        sets = all_sets(s, epoch)
        assert len(sets) == int(np.ceil(n / M).sum())
        got = np.concatenate([x.rows for x in sets])
        np.testing.assert_array_equal(np.sort(got), expected)
        per_group = Counter(x.group for x in sets)
        for g, k in per_group.items():
            assert k == int(np.ceil(cond.at[g, "n"] / M))
            sizes = sorted(len(x.rows) for x in sets if x.group == g)
            assert sum(sizes) == cond.at[g, "n"] and all(z == M for z in sizes[1:])  # only one partial set


def test_proportional_respects_split():
    from perturbdiff.config import HoldoutRule

    cond = make_conditions(**KW, seed=4)
    cfg = DataConfig(store="unused", set_size=M, include_controls=False,
                     split=SplitConfig(test=[HoldoutRule(perturbations=["d2"])]))
    labels = assign_splits(cond, cfg.split)
    s = SetSampler(cond, labels, cfg, TRAIN, log=lambda m: None)
    got = np.concatenate([x.rows for x in all_sets(s, 0)])
    np.testing.assert_array_equal(np.sort(got), rows_of(cond, (labels == TRAIN)))


def test_include_controls_makes_control_groups_targets():
    cond = make_conditions(**KW, seed=4)
    s = sampler(cond, include_controls=True)
    got = np.concatenate([x.rows for x in all_sets(s, 0)])
    np.testing.assert_array_equal(np.sort(got), np.arange(cond["stop"].max()))
    assert set(s.groups) == set(range(len(cond)))


@pytest.mark.parametrize("spg", [1, 3])
def test_balanced_gives_sets_per_group(spg):
    cond = make_conditions(**KW, seed=5)
    s = sampler(cond, sampling="balanced", sets_per_group=spg, run_cells=1)
    targets = np.flatnonzero(~cond["is_control"].to_numpy())
    for epoch in (0, 1):
        sets = all_sets(s, epoch)
        assert len(sets) == spg * len(targets)
        assert Counter(x.group for x in sets) == {int(g): spg for g in targets}
        for x in sets:
            n = cond.at[x.group, "n"]
            assert len(x.rows) == min(n, M) == len(np.unique(x.rows))
            assert ((x.rows >= cond.at[x.group, "start"]) & (x.rows < cond.at[x.group, "stop"])).all()
    if spg == 3:  # the draws of one group differ between its sets
        big = [g for g in targets if cond.at[g, "n"] > 2 * M]
        sets = all_sets(s, 0)
        for g in big:
            draws = {tuple(x.rows) for x in sets if x.group == g}
            assert len(draws) > 1


# ---------------------------------------------------------------------------------------------
# Determinism
# ---------------------------------------------------------------------------------------------


def test_same_seed_same_order_other_epoch_other_order():
    cond = make_conditions(**KW, seed=6)
    a, b = sampler(cond, seed=11), sampler(cond, seed=11)
    for e in (0, 3):
        ga, ka = a.epoch_sets(e)
        gb, kb = b.epoch_sets(e)
        np.testing.assert_array_equal(ga, gb)
        np.testing.assert_array_equal(ka, kb)
        for x, y in zip(all_sets(a, e), all_sets(b, e)):
            np.testing.assert_array_equal(x.rows, y.rows)
            np.testing.assert_array_equal(x.ctrl_rows, y.ctrl_rows)
    g0, k0 = a.epoch_sets(0)
    g1, k1 = a.epoch_sets(1)
    assert sorted(zip(g0, k0)) == sorted(zip(g1, k1))  # same sets ...
    assert list(zip(g0, k0)) != list(zip(g1, k1))  # ... in another order
    ind = sampler(cond, seed=11, run_cells=1)  # independent cells: every epoch re-mixes the sets
    rows0 = {(x.group, tuple(x.rows)) for x in all_sets(ind, 0)}
    rows1 = {(x.group, tuple(x.rows)) for x in all_sets(ind, 1)}
    assert rows0 != rows1  # and other cells per set
    c, _ = sampler(cond, seed=12).epoch_sets(0)
    assert list(c) != list(g0)
    # random access equals sequential materialisation (any rank / worker can build any position)
    pos = np.array([5, 0, 17, 3])
    direct = a.sets_at(1, pos)
    full = all_sets(b, 1)
    for x in direct:
        np.testing.assert_array_equal(x.rows, full[x.index].rows)
        np.testing.assert_array_equal(x.ctrl_rows, full[x.index].ctrl_rows)


def test_eval_mode_is_deterministic():
    cond = make_conditions(**KW, seed=7)
    s = sampler(cond, eval_mode=True)
    g0, k0 = s.epoch_sets(0)
    g9, k9 = s.epoch_sets(9)
    np.testing.assert_array_equal(g0, g9)
    np.testing.assert_array_equal(k0, k9)
    assert np.all(np.diff(g0) >= 0)  # fixed order
    a, b = all_sets(s, 0), all_sets(s, 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.rows, y.rows)
        np.testing.assert_array_equal(x.ctrl_rows, y.ctrl_rows)
    np.testing.assert_array_equal(np.sort(np.concatenate([x.rows for x in a])), rows_of(cond, ~cond["is_control"]))
    s2 = sampler(cond, eval_mode=True)
    for x, y in zip(a, all_sets(s2, 2)):
        np.testing.assert_array_equal(x.rows, y.rows)


def test_eval_loader_same_batches_every_pass(tahoe_store):
    from perturbdiff.config import HoldoutRule

    split = SplitConfig(test=[HoldoutRule(perturbations=[schema.format_drugconc("Dinaciclib", 5.0)])])
    loader = SetLoader(data_cfg(tahoe_store, split=split, set_size=M), "test", rank=0, world=1)
    first = list(loader)
    second = list(loader)
    assert len(first) == len(second) == len(loader) > 0
    for a, b in zip(first, second):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].equal(b[k]), k


# ---------------------------------------------------------------------------------------------
# Rank positions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_positions_partition_the_epoch(world, drop_last):
    cond = make_conditions(**KW, seed=8)
    s = sampler(cond, drop_last=drop_last)
    total = s.num_sets(0)
    per = [s.rank_positions(0, r, world) for r in range(world)]
    allpos = np.concatenate(per)
    assert len(np.unique(allpos)) == len(allpos)
    want = total - total % world if drop_last else total
    np.testing.assert_array_equal(np.sort(allpos), np.arange(want))
    if drop_last:
        assert len({len(p) for p in per}) == 1
    assert num_batches(10, 3, True) == 3 and num_batches(10, 3, False) == 4


# ---------------------------------------------------------------------------------------------
# Empty control pools
# ---------------------------------------------------------------------------------------------

SKIP = {("B", "p2", "control"), ("C", "p1", "control"), ("C", "p2", "control")}


def test_empty_pool_error_names_context_and_batch():
    cond = make_conditions(**KW, skip=SKIP, control_n=20)
    with pytest.raises(DataError) as err:
        sampler(cond, empty_control_pool="error")
    msg = str(err.value)
    assert ("'B'" in msg and "'p2'" in msg) or ("'C'" in msg and "'p1'" in msg), msg


def test_empty_pool_same_context_falls_back_to_other_batches():
    cond = make_conditions(**KW, skip=SKIP, control_n=20)
    s = sampler(cond, empty_control_pool="same_context")
    assert s.fallbacks == {("B", "p2"): "same_context", ("C", "p1"): "none", ("C", "p2"): "none"}
    b_ctrl = rows_of(cond, cond["is_control"] & (cond["context"] == "B"))
    assert len(b_ctrl) == 20  # only p1 has B controls
    for x in all_sets(s, 0):
        c, b = cond.at[x.group, "context"], cond.at[x.group, "batch"]
        if (c, b) == ("B", "p2"):
            assert np.isin(x.ctrl_rows, b_ctrl).all() and len(x.ctrl_rows) == M
        elif c == "C":  # no control of this context anywhere: an empty control set
            assert len(x.ctrl_rows) == 0
        else:
            pool = rows_of(cond, cond["is_control"] & (cond["context"] == c) & (cond["batch"] == b))
            assert np.isin(x.ctrl_rows, pool).all() and len(x.ctrl_rows) == M


def test_empty_pool_none_gives_empty_control_sets():
    cond = make_conditions(**KW, skip=SKIP, control_n=20)
    s = sampler(cond, empty_control_pool="none")
    assert set(s.fallbacks) == {("B", "p2"), ("C", "p1"), ("C", "p2")}
    for x in all_sets(s, 0):
        empty = (cond.at[x.group, "context"], cond.at[x.group, "batch"]) in s.fallbacks
        assert (len(x.ctrl_rows) == 0) == empty


def test_empty_pool_bad_policy_and_bad_settings():
    cond = make_conditions(**KW, skip=SKIP, control_n=20)
    with pytest.raises(DataError, match="empty_control_pool"):
        sampler(cond, empty_control_pool="whatever")
    with pytest.raises(DataError, match="set_size"):
        sampler(cond, set_size=0)
    with pytest.raises(DataError, match="sampling"):
        sampler(cond, sampling="uniform")


def test_empty_pool_warning_is_logged():
    cond = make_conditions(**KW, skip=SKIP, control_n=20)
    lines = []
    cfg = DataConfig(store="unused", set_size=M, empty_control_pool="same_context")
    SetSampler(cond, assign_splits(cond, cfg.split), cfg, TRAIN, log=lines.append)
    assert len(lines) == 1 and "3 (context, batch)" in lines[0]


def test_control_groups_are_labelled_control_not_targets():
    cond = make_conditions(**KW, seed=9)
    s = sampler(cond)
    labels = assign_splits(cond, SplitConfig())
    assert (labels[cond["is_control"].to_numpy()] == CONTROL).all()
    assert not cond["is_control"].to_numpy()[s.groups].any()


# ---------------------------------------------------------------------------------------------
# Runs of store-adjacent cells (data.run_cells)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run", [2, 4, 8])
def test_sets_are_made_of_aligned_runs(run):
    cond = make_conditions(**KW, control_n=50, seed=10)
    s = sampler(cond, run_cells=run)
    for x in all_sets(s, 0):
        g = x.group
        local = x.rows - cond.at[g, "start"]
        # a set is a few store-contiguous runs: at most M / run runs, plus one split at each set boundary
        segments = 1 + int((np.diff(local) != 1).sum())
        assert segments <= -(-M // run) + 2, (g, local, run)
        if run == M and len(local) == M:
            assert segments <= 2
    np.testing.assert_array_equal(  # coverage is unchanged: every cell once per epoch
        np.sort(np.concatenate([x.rows for x in all_sets(s, 0)])), rows_of(cond, ~cond["is_control"]))


@pytest.mark.parametrize("run", [1, 4, 8, 16])
def test_every_control_cell_is_reachable(run):
    """A control set is a sample of its pool: over many draws every pool cell must turn up.

    With run_cells > set_size, only the first set_size cells of each aligned run can ever be drawn
    (the set is the prefix of a run), so part of every control pool is never used.
    """
    cond = make_conditions(contexts=["A"], batches=["p1"], perts=["d1"], control_n=40, seed=11,
                           sizes={("A", "p1", "d1"): 400})
    s = sampler(cond, run_cells=run)
    pool = rows_of(cond, cond["is_control"])
    seen = set()
    for epoch in range(3):
        for x in all_sets(s, epoch):
            seen.update(x.ctrl_rows.tolist())
    missing = sorted(set(pool.tolist()) - seen)
    assert not missing, f"run_cells={run}, set_size={M}: {len(missing)} of {len(pool)} control cells never drawn"


@pytest.mark.parametrize("run", [1, 16])
def test_balanced_sets_reach_every_cell(run):
    cond = make_conditions(contexts=["A"], batches=["p1"], perts=["d1"], control_n=40, seed=12,
                           sizes={("A", "p1", "d1"): 40})
    s = sampler(cond, sampling="balanced", sets_per_group=20, run_cells=run)
    seen = set()
    for epoch in range(3):
        for x in all_sets(s, epoch):
            seen.update(x.rows.tolist())
    missing = sorted(set(rows_of(cond, ~cond["is_control"]).tolist()) - seen)
    assert not missing, f"run_cells={run}, set_size={M}: {len(missing)} of 40 cells never in any balanced set"
