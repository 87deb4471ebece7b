"""Distributed, resumable loader of (perturbed set, matched control set, covariates) batches.

Shape legend: B sets per batch, M cells per set (data.set_size), P genes in the panel.

A rank's batches are fixed by (seed, epoch, rank, world): batch j holds the rank's positions
[j*B, (j+1)*B) of the epoch's global order. DataLoader worker w produces batches j with
(j - first) % W == w, and the DataLoader returns workers' batches round-robin, so the sequence a
rank sees is the same for any number of workers. The loader state is (epoch, next batch).

The batch (keys, shapes, dtypes) is specified in ``perturbdiff.data.batch``, which also holds
``collate``, the workers' round-robin and ``ResumableLoader``.

Errors: a DataError in a DataLoader worker (a damaged store read there) reaches the main process
as the same DataError (path and problem): torch re-raises worker exceptions as ``type(msg)``, which
DataError(path, problem) cannot be rebuilt from, so workers yield an error record instead
(``worker_safe``) and ``ResumableLoader.__iter__`` raises it. With ``data.verify_on_open`` the full
checksum pass runs once per store, in the main process, before any worker starts.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
from torch.utils.data import IterableDataset

from perturbdiff.config import DataConfig

from .batch import CODES, ResumableLoader, collate, worker_batches, worker_safe
from .integrity import verify_once
from .. import distributed as pdist
from .sampler import SetSampler, num_batches
from .schema import CONDITION_COLUMNS
from .splits import TRAIN, assign_splits, check_no_leakage
from .store import CellStore


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
        store = CellStore(self.store_path)
        group, k = self.sampler.epoch_sets(self.epoch)
        B = self.cfg.sets_per_batch
        for j in worker_batches(self.first, self.total):
            pos = self.positions[j * B:(j + 1) * B]
            sets = [self.sampler.materialize(self.epoch, int(i), group[i], k[i]) for i in pos]
            yield collate(store, sets, self.panel, self.cfg, self.codes, self.numeric)


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
            np.searchsorted(self.store.categories(c), cond[c].to_numpy().astype(str)) for c in CODES], axis=1).astype(np.int64)
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
        return {c: [str(n) for n in self.store.categories(c)] for c in CODES}

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
