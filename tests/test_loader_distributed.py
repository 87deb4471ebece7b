"""The loader across ranks and DataLoader workers, and exact resumption from a state dict.

Two spawned processes form a gloo process group; each builds a SetLoader with 2 DataLoader
workers (rank and world come from the process group) and iterates one epoch.
"""

from __future__ import annotations

import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import data_cfg, quiet
from perturbdiff.data.loader import SetLoader

WORLD = 2
B = 3  # sets per batch
M = 8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def summarize(batches) -> dict:
    return {
        "index": [b["index"].numpy().copy() for b in batches],
        "group": [b["group"].numpy().copy() for b in batches],
        "rows": [b["rows"].numpy().copy() for b in batches],
        "ctrl_rows": [b["ctrl_rows"].numpy().copy() for b in batches],
        "x_sum": [float(b["x"].double().sum()) for b in batches],
    }


def _dist_worker(rank: int, world: int, port: int, store: str, out_dir: str, workers: int, drop_last: bool,
                 seed: int) -> None:
    """Runs in a spawned process (must be importable: module level)."""
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = data_cfg(store, num_workers=workers, drop_last=drop_last, seed=seed, set_size=M, sets_per_batch=B)
        loader = SetLoader(cfg, "train", log=quiet)  # rank / world from the process group
        batches = list(loader)
        result = summarize(batches)
        result.update(rank=loader.rank, world=loader.world, num_batches=len(batches), len=loader.num_batches(0),
                      epoch_after=loader.epoch)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(gathered, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed(store: Path, out_dir: Path, *, workers: int, drop_last: bool, seed: int) -> list[dict]:
    import torch.multiprocessing as tmp

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp.start_processes(_dist_worker, args=(WORLD, free_port(), str(store), str(out_dir), workers, drop_last, seed),
                        nprocs=WORLD, join=True, start_method="spawn")
    views = []
    for r in range(WORLD):
        with open(out_dir / f"rank{r}.pkl", "rb") as f:
            views.append(pickle.load(f))
    assert all(len(v) == WORLD for v in views)
    for r in range(WORLD):  # every rank gathered the same per-rank results
        assert all(np.array_equal(np.concatenate(v[r]["index"]), np.concatenate(views[0][r]["index"])) for v in views)
    return views[0]


def flat(result: dict, key: str) -> np.ndarray:
    assert result[key], f"no batches for {key}"
    return np.concatenate(result[key])


@pytest.fixture(scope="module")
def dist_runs(tahoe_store, tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    return {
        False: run_distributed(tahoe_store, base / "keep", workers=2, drop_last=False, seed=5),
        True: run_distributed(tahoe_store, base / "drop", workers=2, drop_last=True, seed=5),
    }


@pytest.mark.parametrize("drop_last", [False, True])
def test_two_ranks_two_workers_partition_the_epoch(tahoe_store, dist_runs, drop_last):
    res = dist_runs[drop_last]
    ref = SetLoader(data_cfg(tahoe_store, drop_last=drop_last, seed=5, set_size=M, sets_per_batch=B), "train",
                    rank=0, world=1, log=quiet)
    num_sets = ref.sampler.num_sets(0)
    assert num_sets % WORLD == 1 or num_sets % (WORLD * B) != 0  # the fixture exercises the ragged end
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == WORLD for r in res)
    idx = [flat(r, "index") for r in res]
    assert not set(idx[0]) & set(idx[1])  # disjoint
    union = np.sort(np.concatenate(idx))
    if drop_last:
        per_rank = num_sets // WORLD
        kept = (per_rank // B) * B  # whole batches only
        assert all(len(i) == kept for i in idx)
        assert all(r["num_batches"] == r["len"] == kept // B for r in res)
        np.testing.assert_array_equal(union, np.sort(np.concatenate([np.arange(r, per_rank * WORLD, WORLD)[:kept]
                                                                     for r in range(WORLD)])))
    else:
        np.testing.assert_array_equal(union, np.arange(num_sets))
        assert sum(r["num_batches"] for r in res) == sum(-(-len(i) // B) for i in idx)
    for r, i in enumerate(idx):  # position i goes to rank i % world, in order
        assert (i % WORLD == r).all() and np.all(np.diff(i) > 0)
    # rows: disjoint between ranks, and (proportional, no drop) every train / control cell exactly once
    rows = [flat(r, "rows") for r in res]
    rows = [x[x >= 0] for x in rows]
    assert not set(rows[0].tolist()) & set(rows[1].tolist())
    if not drop_last:
        labels = ref.split_labels
        cond = ref.store.conditions
        targets = np.isin(labels, ["train", "control"])  # data.include_controls (the default): controls too
        train_rows = np.concatenate([np.arange(c.start, c.stop) for c in cond[targets].itertuples()])
        np.testing.assert_array_equal(np.sort(np.concatenate(rows)), train_rows)
    assert all(r["epoch_after"] == 1 for r in res)


@pytest.mark.parametrize("drop_last", [False, True])
def test_each_rank_equals_single_process_sequence(tahoe_store, dist_runs, drop_last):
    res = dist_runs[drop_last]
    for rank in range(WORLD):
        cfg = data_cfg(tahoe_store, num_workers=0, drop_last=drop_last, seed=5, set_size=M, sets_per_batch=B)
        local = summarize(list(SetLoader(cfg, "train", rank=rank, world=WORLD, log=quiet)))
        got = res[rank]
        assert len(local["index"]) == len(got["index"])
        for key in ("index", "group", "rows", "ctrl_rows"):
            for a, b in zip(local[key], got[key]):
                np.testing.assert_array_equal(a, b, err_msg=f"rank {rank} {key}")
        np.testing.assert_allclose(local["x_sum"], got["x_sum"], rtol=1e-6)


def test_same_seed_same_global_order_across_runs(tahoe_store, dist_runs):
    """The drop_last run is a prefix-by-rank of the other run: each kept position holds the same set."""
    by_pos = {}
    for r in dist_runs[False]:
        for i, g, rows in zip(flat(r, "index"), flat(r, "group"), flat(r, "rows")):
            by_pos[int(i)] = (int(g), tuple(rows))
    n = 0
    for r in dist_runs[True]:
        for i, g, rows in zip(flat(r, "index"), flat(r, "group"), flat(r, "rows")):
            assert by_pos[int(i)] == (int(g), tuple(rows))
            n += 1
    assert n > 10
    # and equals the single-process global order of the sampler
    ref = SetLoader(data_cfg(tahoe_store, seed=5, set_size=M, sets_per_batch=B), "train", rank=0, world=1, log=quiet)
    group, _ = ref.sampler.epoch_sets(0)
    for i, (g, _rows) in by_pos.items():
        assert group[i] == g
    other, _ = SetLoader(data_cfg(tahoe_store, seed=6), "train", rank=0, world=1, log=quiet).sampler.epoch_sets(0)
    assert list(other) != list(group)


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_worker_count_does_not_change_sequence(tahoe_store, workers):
    cfg0 = data_cfg(tahoe_store, num_workers=0, seed=2, set_size=M, sets_per_batch=2)
    cfgw = data_cfg(tahoe_store, num_workers=workers, seed=2, set_size=M, sets_per_batch=2)
    a = list(SetLoader(cfg0, "train", rank=1, world=3, log=quiet))
    b = list(SetLoader(cfgw, "train", rank=1, world=3, log=quiet))
    assert_batches_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------


def assert_batches_equal(a: list, b: list) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]), (i, k)


def take(loader: SetLoader, k: int) -> list:
    out = []
    it = iter(loader)
    for _ in range(k):
        out.append(next(it))
    it.close()  # stop the DataLoader workers; the loader keeps its position
    return out


@pytest.mark.parametrize("first_workers,resume_workers", [(0, 0), (2, 2), (0, 2), (2, 0)])
@pytest.mark.parametrize("k", [1, 4])
def test_resume_mid_epoch(tahoe_store, first_workers, resume_workers, k):
    kw = dict(seed=3, set_size=M, sets_per_batch=2)
    reference = list(SetLoader(data_cfg(tahoe_store, **kw), "train", rank=0, world=1, log=quiet))
    first = SetLoader(data_cfg(tahoe_store, num_workers=first_workers, **kw), "train", rank=0, world=1, log=quiet)
    head = take(first, k)
    state = first.state_dict()
    assert state["epoch"] == 0 and state["next_batch"] == k
    fresh = SetLoader(data_cfg(tahoe_store, num_workers=resume_workers, **kw), "train", rank=0, world=1, log=quiet)
    fresh.load_state_dict(state)
    tail = list(fresh)
    assert_batches_equal(head, reference[:k])
    assert_batches_equal(tail, reference[k:])
    assert fresh.state_dict()["epoch"] == 1 and fresh.state_dict()["next_batch"] == 0
    # the interrupted loader object itself also continues where it stopped
    assert_batches_equal(list(first), reference[k:])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_across_epoch_boundary(tahoe_store, workers):
    kw = dict(seed=4, set_size=M, sets_per_batch=2, drop_last=True)
    ref_loader = SetLoader(data_cfg(tahoe_store, **kw), "train", rank=1, world=2, log=quiet)
    epoch0, epoch1 = list(ref_loader), list(ref_loader)
    assert len(epoch0) == len(epoch1) > 3
    assert not all(torch.equal(a["index"], b["index"]) and torch.equal(a["rows"], b["rows"])
                   for a, b in zip(epoch0, epoch1))  # another epoch, another order
    # state exactly at the boundary
    a = SetLoader(data_cfg(tahoe_store, num_workers=workers, **kw), "train", rank=1, world=2, log=quiet)
    assert_batches_equal(list(a), epoch0)
    state = a.state_dict()
    assert (state["epoch"], state["next_batch"]) == (1, 0)
    b = SetLoader(data_cfg(tahoe_store, num_workers=workers, **kw), "train", rank=1, world=2, log=quiet)
    b.load_state_dict(state)
    assert_batches_equal(list(b), epoch1)
    # interrupted inside epoch 1, resumed in a fresh loader
    c = SetLoader(data_cfg(tahoe_store, num_workers=workers, **kw), "train", rank=1, world=2, log=quiet)
    list(c)
    take(c, 2)
    d = SetLoader(data_cfg(tahoe_store, num_workers=workers, **kw), "train", rank=1, world=2, log=quiet)
    d.load_state_dict(c.state_dict())
    assert_batches_equal(list(d), epoch1[2:])
    # set_epoch jumps straight to an epoch
    e = SetLoader(data_cfg(tahoe_store, num_workers=workers, **kw), "train", rank=1, world=2, log=quiet)
    e.set_epoch(1)
    assert_batches_equal(list(e), epoch1)


def test_state_for_another_run_is_refused(tahoe_store):
    a = SetLoader(data_cfg(tahoe_store, seed=1), "train", rank=0, world=2, log=quiet)
    state = a.state_dict()
    with pytest.raises(ValueError, match="seed"):
        SetLoader(data_cfg(tahoe_store, seed=2), "train", rank=0, world=2, log=quiet).load_state_dict(state)
    with pytest.raises(ValueError, match="world"):
        SetLoader(data_cfg(tahoe_store, seed=1), "train", rank=0, world=3, log=quiet).load_state_dict(state)


def test_batch_contents(tahoe_store):
    """Shapes, dtypes and codes of one batch agree with the store."""
    loader = SetLoader(data_cfg(tahoe_store, set_size=M, sets_per_batch=B), "train", rank=0, world=1, log=quiet)
    st = loader.store
    batch = next(iter(loader))
    P = st.num_genes
    assert batch["x"].shape == (B, M, P) and batch["ctrl"].shape == (B, M, P)
    assert batch["x"].dtype == torch.float32 and batch["mask"].dtype == torch.bool
    for b in range(B):
        g = int(batch["group"][b])
        row = st.conditions.iloc[g]
        assert st.categories("context")[int(batch["context"][b])] == row.context
        assert st.categories("batch")[int(batch["batch"][b])] == row.batch
        assert st.categories("perturbation")[int(batch["perturbation"][b])] == row.perturbation
        rows = batch["rows"][b][batch["mask"][b]].numpy()
        np.testing.assert_allclose(batch["x"][b][batch["mask"][b]].numpy(),
                                   st.read_dense(rows, loader.panel, loader.cfg.normalize))
        c = batch["ctrl_rows"][b][batch["ctrl_mask"][b]].numpy()
        np.testing.assert_allclose(batch["ctrl"][b][batch["ctrl_mask"][b]].numpy(),
                                   st.read_dense(c, loader.panel, loader.cfg.normalize))
        assert (st.obs("perturbation")[c] == st.conditions.loc[st.conditions["is_control"], "perturbation"].iloc[0]).all()
