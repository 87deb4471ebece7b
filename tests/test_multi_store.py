"""Several stores trained as one: union vocabularies, the per-store batch schedule, ranks, workers
and exact resumption of ``MultiSetLoader`` (perturbdiff/data/multi.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_sharding.convert import convert
from helpers import data_cfg, h5ad_cfg, h5ad_obs, make_counts, quiet, write_h5ad
from perturbdiff.data.loader import SetLoader, build_loader
from perturbdiff.data.multi import MultiSetLoader

GENES_A = [f"G{i:03d}" for i in range(30)]
# overlaps A in G020..G029, adds G030..G044 and X000..X004, in a store order of its own
GENES_B = [str(g) for g in np.random.default_rng(5).permutation(
    [f"G{i:03d}" for i in range(20, 45)] + [f"X{i:03d}" for i in range(5)])]


def build_store(root: Path, name: str, genes, *, seed: int, n_cells: int, contexts, batches, extra, dataset) -> Path:
    rng = np.random.default_rng(seed)
    obs = h5ad_obs(rng, n_cells, contexts=contexts, batches=batches)
    counts = make_counts(rng, n_cells, len(genes))
    src = write_h5ad(root / f"{name}.h5ad", counts.astype(np.float64), obs, genes)
    out = root / f"{name}.zarr"
    convert(h5ad_cfg(src, out, dataset=dataset, extra_obs=extra), log=quiet)
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("multi")
    a = build_store(root, "a", GENES_A, seed=1, n_cells=200, contexts=("T_cell", "B_cell"),
                    batches=("donor1", "donor2"), extra=["n_counts_raw"], dataset="dsA")
    b = build_store(root, "b", GENES_B, seed=2, n_cells=150, contexts=("B_cell", "NK"),
                    batches=("donor1", "donor3"), extra=[], dataset="dsB")
    return [str(a), str(b)]


def cfg_for(stores, **kw):
    return data_cfg(Path(stores[0]), stores=list(stores), **kw)


def multi(stores, split="train", **kw) -> MultiSetLoader:
    loader_kw = {k: kw.pop(k) for k in ("rank", "world", "eval_mode") if k in kw}
    loader_kw.setdefault("rank", 0)
    loader_kw.setdefault("world", 1)
    return MultiSetLoader(cfg_for(stores, **kw), stores, split, log=quiet, **loader_kw)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True, msg=k)


def test_union_vocabularies_and_batches_match_single_store(stores):
    loader = multi(stores)
    union = GENES_A + [g for g in GENES_B if g not in GENES_A]
    assert loader.gene_ids.tolist() == union
    assert loader.vocabularies == {
        "context": ["B_cell", "NK", "T_cell"],
        "batch": ["dsA/donor1", "dsA/donor2", "dsB/donor1", "dsB/donor3"],
        "perturbation": ["IFNG", "IL2", "TNF", "control"],
        "dataset": ["dsA", "dsB"],
    }
    batches = list(loader)
    assert len(batches) == loader.num_batches(0) > 0 and loader.epoch == 1
    vocab = loader.vocabularies
    for s, path in enumerate(stores):
        single = SetLoader(data_cfg(Path(path)), "train", rank=0, world=1, log=quiet)
        ref = list(single)
        mine = [b for b in batches if int(b["dataset"][0]) == s]
        assert len(mine) == len(ref) == single.num_batches(0)
        cols = np.array([union.index(g) for g in single.gene_ids])
        others = np.setdiff1d(np.arange(len(union)), cols)
        store_vocab = single.vocabularies
        for got, want in zip(mine, ref):
            assert (got["dataset"] == s).all()
            for key in ("x", "ctrl"):
                assert torch.equal(got[key][:, :, cols], want[key])  # exact, in the union columns
                assert not got[key][:, :, others].any()
            assert got["x"].shape[-1] == len(union)
            assert torch.equal(got["gene_mask"], torch.from_numpy(np.isin(np.arange(len(union)), cols))
                               .expand(len(want["x"]), -1))
            for key in ("mask", "ctrl_mask", "group", "index", "rows", "ctrl_rows"):
                assert torch.equal(got[key], want[key]), key
            for c in ("context", "batch", "perturbation"):
                prefix = f"{vocab['dataset'][s]}/" if c == "batch" else ""
                assert [vocab[c][i] for i in got[c].tolist()] == \
                       [prefix + store_vocab[c][i] for i in want[c].tolist()]
            assert torch.equal(got["num_n_counts_raw"], want["num_n_counts_raw"]) if s == 0 else \
                torch.isnan(got["num_n_counts_raw"]).all()
    # the stores are interleaved, not one after the other
    order = [int(b["dataset"][0]) for b in batches]
    assert order != sorted(order)


def test_one_epoch_visits_every_set_once(stores):
    loader = multi(stores)
    seen = [(int(b["dataset"][0]), i) for b in loader for i in b["index"].tolist()]
    expected = [(s, int(i)) for s, sub in enumerate(loader.loaders) for i in sub.positions(0)]
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(expected)
    assert not np.array_equal(loader.schedule(0)[0], loader.schedule(1)[0])  # another order each epoch


def test_two_ranks_disjoint_same_schedule(stores):
    runs = [list(multi(stores, rank=r, world=2, drop_last=True)) for r in (0, 1)]
    assert len(runs[0]) == len(runs[1]) > 0
    assert [int(b["dataset"][0]) for b in runs[0]] == [int(b["dataset"][0]) for b in runs[1]]
    sets = [{(int(b["dataset"][0]), i) for b in run for i in b["index"].tolist()} for run in runs]
    assert not sets[0] & sets[1]
    for r in (0, 1):  # each rank: its full batches of every store (drop_last)
        ref = multi(stores, rank=r, world=2, drop_last=True)
        B = ref.cfg.sets_per_batch
        assert all(len(b["index"]) == B for b in runs[r])
        assert sets[r] == {(s, int(i)) for s, sub in enumerate(ref.loaders)
                           for i in sub.positions(0)[:sub.num_batches(0) * B]}


def test_resume_mid_epoch_and_across_epoch_boundary(stores):
    ref = multi(stores)
    epoch0, epoch1 = list(ref), list(ref)
    for consumed, tail in ((3, epoch0[3:] + epoch1), (len(epoch0) + 2, epoch1[2:])):
        loader = multi(stores)
        it = iter(loader)
        got = [next(it) for _ in range(min(consumed, len(epoch0)))]
        if consumed > len(epoch0):
            assert next(it, None) is None and loader.epoch == 1  # finish epoch 0
            it = iter(loader)
            got += [next(it) for _ in range(consumed - len(epoch0))]
        assert_same(got, (epoch0 + epoch1)[:consumed])
        state = json.loads(json.dumps(loader.state_dict()))
        resumed = multi(stores)
        resumed.load_state_dict(state)
        rest = list(resumed)
        if resumed.epoch == 1:  # the rest of epoch 0, then epoch 1
            rest += list(resumed)
        assert_same(rest, tail)
        assert resumed.epoch == 2


def test_workers_give_the_same_sequence(stores):
    base = list(multi(stores))
    assert_same(list(multi(stores, num_workers=2)), base)
    loader = multi(stores, num_workers=2)
    loader.load_state_dict(dict(multi(stores).state_dict(), next_batch=3))
    assert_same(list(loader), base[3:])


def test_eval_mode_store_order_and_fixed(stores):
    loader = multi(stores, eval_mode=True)
    first, second = list(loader), list(loader)
    order = [int(b["dataset"][0]) for b in first]
    assert order == sorted(order) and set(order) == {0, 1}
    assert_same(first, second)
    assert loader.epoch == 0 and loader.next_batch == 0


def test_refusals_and_build_loader(stores, tmp_path):
    loader = multi(stores)
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        multi(stores, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="stores"):
        multi(stores[::-1]).load_state_dict(state)
    with pytest.raises(ValueError, match="stores"):
        multi(stores[:1]).load_state_dict(state)
    dup = build_store(tmp_path, "c", GENES_A[:10], seed=3, n_cells=60, contexts=("T_cell",), batches=("d",),
                      extra=[], dataset="dsA")
    with pytest.raises(ValueError, match="same dataset name") as err:
        multi([stores[0], str(dup)])
    assert stores[0] in str(err.value) and str(dup) in str(err.value)
    with pytest.raises(ValueError, match="at least one store"):
        MultiSetLoader(cfg_for(stores), [], log=quiet)

    assert isinstance(build_loader(cfg_for(stores[:1]), rank=0, world=1, log=quiet), MultiSetLoader)
    single = build_loader(data_cfg(Path(stores[0])), rank=0, world=1, log=quiet)
    assert isinstance(single, SetLoader) and not isinstance(single, MultiSetLoader)
