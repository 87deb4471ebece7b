"""Distributed, resumable loader of (perturbed set, matched control set, covariates) batches.

Shape legend: B sets per batch, M cells per set (data.set_size), P genes in the panel.

A rank's batches are fixed by (seed, epoch, rank, world): batch j holds the rank's positions
[j*B, (j+1)*B) of the epoch's global order. DataLoader worker w produces batches j with
(j - first) % W == w, and the DataLoader returns workers' batches round-robin, so the sequence a
rank sees is the same for any number of workers. The loader state is (epoch, next batch).

Batch (dict of tensors):
    x          float32 [B, M, P]  perturbed cells, normalised, zero rows where masked
    mask       bool    [B, M]     True for real cells
    ctrl       float32 [B, M, P]  control cells from the same (context, batch) pool
    ctrl_mask  bool    [B, M]
    context, batch, perturbation  int64 [B]  codes into the store's categories
    group      int64 [B]  conditions-table row;  index  int64 [B]  position in the epoch order
    num_<c>    float32 [B]  numeric covariates of the group (conditions.parquet columns, e.g. num_dose)
    rows, ctrl_rows  int64 [B, M]  store rows (-1 where masked), for tracing and tests

Errors: a DataError in a DataLoader worker (a damaged store read there) reaches the main process
as the same DataError (path and problem): torch re-raises worker exceptions as ``type(msg)``, which
DataError(path, problem) cannot be rebuilt from, so workers yield an error record instead
(``worker_safe``) and ``ResumableLoader.__iter__`` raises it. With ``data.verify_on_open`` the full
checksum pass runs once per store, in the main process, before any worker starts.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from perturbdiff.config import DataConfig

from .integrity import verify_once
from .. import distributed as pdist
from .sampler import SetSampler, SetSpec, num_batches
from .schema import CONDITION_COLUMNS, DataError
from .splits import TRAIN, assign_splits, check_no_leakage
from .store import CellStore


# Key of the record a worker yields in place of a batch when it hits a DataError: [path, problem].
DATA_ERROR_KEY = "__perturbdiff_data_error__"


def worker_safe(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, except that in a DataLoader worker a DataError becomes a last error record
    (re-raised by ResumableLoader.__iter__ in the main process as the same DataError)."""
    if get_worker_info() is None:
        yield from batches
        return
    try:
        yield from batches
    except DataError as err:
        yield {DATA_ERROR_KEY: [err.path, err.problem]}


class _SetDataset(IterableDataset):
    def __init__(self, loader: "SetLoader", epoch: int, first: int):
        self.store_path = loader.store.path
        self.sampler, self.cfg = loader.sampler, loader.cfg
        self.panel, self.codes, self.numeric = loader.panel, loader.group_codes, loader.group_numeric
        self.positions = loader.positions(epoch)
        self.epoch, self.first, self.total = epoch, first, loader.num_batches(epoch)

    def __iter__(self):
        return worker_safe(self._batches())

    def _batches(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        store = CellStore(self.store_path)
        group, k = self.sampler.epoch_sets(self.epoch)
        B = self.cfg.sets_per_batch
        for j in range(self.first, self.total):
            if (j - self.first) % nw != wid:
                continue
            pos = self.positions[j * B:(j + 1) * B]
            sets = [self.sampler.materialize(self.epoch, int(i), group[i], k[i]) for i in pos]
            yield collate(store, sets, self.panel, self.cfg, self.codes, self.numeric)


def collate(store: CellStore, sets: list[SetSpec], panel: np.ndarray, cfg: DataConfig,
            group_codes: np.ndarray, group_numeric: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    B, M, P = len(sets), cfg.set_size, len(panel)
    x = np.zeros((B, M, P), dtype=np.float32)
    ctrl = np.zeros((B, M, P), dtype=np.float32)
    rows = np.full((B, M), -1, dtype=np.int64)
    ctrl_rows = np.full((B, M), -1, dtype=np.int64)
    for b, s in enumerate(sets):
        n, c = len(s.rows), len(s.ctrl_rows)
        x[b, :n] = store.read_dense(s.rows, panel, cfg.normalize)
        ctrl[b, :c] = store.read_dense(s.ctrl_rows, panel, cfg.normalize)
        rows[b, :n], ctrl_rows[b, :c] = s.rows, s.ctrl_rows
    groups = np.array([s.group for s in sets], dtype=np.int64)
    numeric = {f"num_{c}": torch.from_numpy(v[groups].astype(np.float32)) for c, v in (group_numeric or {}).items()}
    return numeric | {
        "x": torch.from_numpy(x), "mask": torch.from_numpy(rows >= 0),
        "ctrl": torch.from_numpy(ctrl), "ctrl_mask": torch.from_numpy(ctrl_rows >= 0),
        "context": torch.from_numpy(group_codes[groups, 0].copy()),
        "batch": torch.from_numpy(group_codes[groups, 1].copy()),
        "perturbation": torch.from_numpy(group_codes[groups, 2].copy()),
        "group": torch.from_numpy(groups), "index": torch.tensor([s.index for s in sets], dtype=torch.int64),
        "rows": torch.from_numpy(rows), "ctrl_rows": torch.from_numpy(ctrl_rows),
    }


class ResumableLoader:
    """Epoch and next-batch bookkeeping shared by SetLoader and MultiSetLoader: iteration starts at
    ``next_batch`` of ``epoch``; a finished training epoch moves to the next one, an evaluation
    pass starts over. Subclasses give ``cfg``, ``eval_mode`` and ``_dataset(epoch, first)``."""

    cfg: DataConfig
    eval_mode: bool
    epoch: int = 0
    next_batch: int = 0

    def _dataset(self, epoch: int, first: int) -> IterableDataset:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.next_batch = int(epoch), 0

    def __iter__(self):
        workers = self.cfg.num_workers
        dl = DataLoader(self._dataset(self.epoch, self.next_batch), batch_size=None, num_workers=workers,
                        prefetch_factor=2 if workers else None, persistent_workers=False)
        for batch in dl:
            if DATA_ERROR_KEY in batch:
                raise DataError(*batch[DATA_ERROR_KEY])
            self.next_batch += 1
            yield batch
        if not self.eval_mode:
            self.epoch, self.next_batch = self.epoch + 1, 0
        else:
            self.next_batch = 0


class SetLoader(ResumableLoader):
    """Iterate batches of one split; ``state_dict`` / ``load_state_dict`` resume exactly."""

    def __init__(self, cfg: DataConfig, split: str = TRAIN, *, rank: int | None = None, world: int | None = None,
                 eval_mode: bool | None = None, log=print):
        if cfg.store is None:
            raise ValueError("data.store is not set")
        if cfg.sets_per_batch < 1:
            raise ValueError(f"data.sets_per_batch must be >= 1, got {cfg.sets_per_batch}")
        r, w = pdist.get_rank(), pdist.get_world_size()
        self.rank, self.world = (r if rank is None else rank), (w if world is None else world)
        self.cfg, self.split = cfg, split
        self.eval_mode = (split != TRAIN) if eval_mode is None else eval_mode
        self.store = CellStore(cfg.store)
        if cfg.verify_on_open:
            verify_once(self.store.path, log=log)
        cond = self.store.conditions
        self.split_labels = assign_splits(cond, cfg.split, log=log)
        self.sampler = SetSampler(cond, self.split_labels, cfg, split, self.eval_mode, log=log)
        if split == TRAIN:
            check_no_leakage(cond, self.split_labels, cfg.split, self.sampler.groups)
        self.panel = self.store.panel(cfg.panel)
        self.group_codes = np.stack([
            np.searchsorted(self.store.categories(c), cond[c].to_numpy().astype(str)) for c in
            ("context", "batch", "perturbation")], axis=1).astype(np.int64)
        self.group_numeric = {c: cond[c].to_numpy(np.float64) for c in cond.columns if c not in CONDITION_COLUMNS}
        self.epoch, self.next_batch = 0, 0

    # ---- sizes --------------------------------------------------------------------------------

    def positions(self, epoch: int) -> np.ndarray:
        return self.sampler.rank_positions(epoch, self.rank, self.world)

    def num_batches(self, epoch: int | None = None) -> int:
        drop = self.cfg.drop_last and not self.eval_mode
        return num_batches(len(self.positions(self.epoch if epoch is None else epoch)), self.cfg.sets_per_batch, drop)

    def __len__(self) -> int:
        return self.num_batches()

    @property
    def gene_ids(self) -> np.ndarray:
        return self.store.gene_ids[self.panel]

    @property
    def vocabularies(self) -> dict[str, list[str]]:
        """Names of the context, batch and perturbation codes of a batch (the store's categories)."""
        return {c: [str(n) for n in self.store.categories(c)] for c in ("context", "batch", "perturbation")}

    @property
    def control_perturbations(self) -> list[str]:
        """The perturbation labels of the store's control groups (each a perturbation code)."""
        cond = self.store.conditions
        return sorted({str(p) for p in cond.loc[cond["is_control"], "perturbation"]})

    @property
    def control_numeric(self) -> dict[str, float | None]:
        """Each numeric covariate's median over the control groups (None where they have none: its null token)."""
        ctrl = self.store.conditions["is_control"].to_numpy(bool)
        out = {}
        for name, v in self.group_numeric.items():
            v = v[ctrl]
            out[name] = float(np.median(v[np.isfinite(v)])) if np.isfinite(v).any() else None
        return out

    # ---- iteration ----------------------------------------------------------------------------

    def _dataset(self, epoch: int, first: int) -> IterableDataset:
        return _SetDataset(self, epoch, first)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "seed": self.cfg.seed, "split": self.split,
                "world": self.world, "rank": self.rank}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed") != self.cfg.seed or state.get("split") != self.split or state.get("world") != self.world:
            raise ValueError(f"loader state is for seed={state.get('seed')}, split={state.get('split')}, "
                             f"world={state.get('world')}; this loader has seed={self.cfg.seed}, "
                             f"split={self.split}, world={self.world}")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])


def build_loader(cfg: DataConfig, split: str = TRAIN, **kwargs):
    """The loader ``cfg`` asks for: a MultiSetLoader over ``data.stores`` when that list is non-empty
    (even with one entry), else a SetLoader over ``data.store``. kwargs: rank, world, eval_mode, log."""
    if cfg.stores:
        from .multi import MultiSetLoader

        return MultiSetLoader(cfg, list(cfg.stores), split, **kwargs)
    return SetLoader(cfg, split, **kwargs)
