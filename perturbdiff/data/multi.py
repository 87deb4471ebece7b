"""Several cell stores trained as one (marginal pretraining over datasets).

``MultiSetLoader`` has the interface of ``SetLoader`` (iteration, sizes, epochs, exact resumption)
over a list of stores. Each store keeps its own ``SetLoader`` (its own split, sampler and gene
panel: ``data.panel`` applied to that store); this module merges them into one stream.

Shape legend: B sets per batch, M cells per set (data.set_size), G genes in the union panel,
S stores.

Union vocabularies (deterministic, fixed by the store list and the config):
    genes         by gene id: the first store's panel in order, then every further store's panel
                  genes not seen yet, in that store's order
    context       sorted union of the stores' context names
    batch         "<dataset>/<batch>", sorted (batches of different datasets never coincide)
    perturbation  sorted union of the stores' perturbation names
    dataset       the stores' manifest dataset names, in store order (must be distinct)

Epoch schedule: every batch holds sets of ONE store (reads stay local to one store). Store s
contributes ``loaders[s].num_batches(epoch)`` batches; the epoch's store order is the list
[0]*n0 + [1]*n1 + ... permuted by ``default_rng([seed, epoch, 7919])`` (evaluation: not permuted,
store after store). Batch j of the epoch is store order[j]'s k-th batch, k = the count of that store
in order[:j], made of that store's rank positions [k*B, (k+1)*B) exactly as its SetLoader would.
In training with drop_last every rank has the same per-store batch counts, hence the same schedule.
DataLoader worker w produces batches j with (j - first) % W == w and the DataLoader returns them
round-robin, so the sequence is the same for any number of workers. State: (epoch, next batch).

The batch is SetLoader's in the union (``perturbdiff.data.batch``): x and ctrl on the union genes
(zeros where the store does not measure a gene), plus ``gene_mask`` [B, G] and ``dataset`` [B] (the
store index, into ``vocabularies["dataset"]``); codes into the union vocabularies; numeric columns
the union of the stores' (NaN where a store lacks one: the model treats NaN as missing); group,
index, rows and ctrl_rows are PER-STORE values.

Integrity: as SetLoader's. Each store's SetLoader runs ``data.verify_on_open``'s full pass for its
store in the main process when it is built, and a DataError in a worker arrives as a DataError.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from perturbdiff.config import DataConfig

from .batch import CELL_KEYS, CODES, MASK_KEYS, TRACE_KEYS, ResumableLoader, collate, numeric_key, worker_batches, worker_safe
from .loader import SetLoader
from .schema import DataError
from .splits import TRAIN
from .store import CellStore

SCHEDULE_STREAM = 7919  # RNG stream tag of the epoch's store order


class _MultiDataset(IterableDataset):
    """One epoch's batches from ``first`` on; holds only picklable state (stores open per worker)."""

    def __init__(self, loader: "MultiSetLoader", epoch: int, first: int):
        subs = loader.loaders
        self.paths = [sub.store.path for sub in subs]
        self.samplers = [sub.sampler for sub in subs]
        self.cfgs = [sub.cfg for sub in subs]
        self.panels = [sub.panel for sub in subs]
        self.codes = [sub.group_codes for sub in subs]
        self.numeric = [sub.group_numeric for sub in subs]
        self.positions = [sub.positions(epoch) for sub in subs]
        self.columns, self.code_maps = loader.columns, loader.code_maps
        self.numeric_names, self.num_genes = loader.numeric_names, len(loader.gene_ids)
        self.order, self.local = loader.schedule(epoch)
        self.epoch, self.first, self.B = epoch, first, loader.cfg.sets_per_batch

    def __iter__(self):
        return worker_safe(self._batches())

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        stores: dict[int, CellStore] = {}
        epoch_sets: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        B = self.B
        for j in worker_batches(self.first, len(self.order)):
            s, k = int(self.order[j]), int(self.local[j])
            if s not in stores:
                stores[s] = CellStore(self.paths[s])
                epoch_sets[s] = self.samplers[s].epoch_sets(self.epoch)
            group, kk = epoch_sets[s]
            pos = self.positions[s][k * B:(k + 1) * B]
            # == samplers[s].sets_at(epoch, pos), without recomputing the epoch order per batch
            sets = [self.samplers[s].materialize(self.epoch, int(i), group[i], kk[i]) for i in pos]
            batch = collate(stores[s], sets, self.panels[s], self.cfgs[s], self.codes[s], self.numeric[s])
            yield self.remap(batch, s)

    def remap(self, batch: dict[str, torch.Tensor], s: int) -> dict[str, torch.Tensor]:
        """A store's batch -> the union layout (genes, covariate codes, numeric columns, dataset)."""
        B, M, _ = batch["x"].shape
        cols = self.columns[s]
        out = {}
        for key in CELL_KEYS:
            dense = np.zeros((B, M, self.num_genes), dtype=np.float32)
            dense[:, :, cols] = batch[key].numpy()
            out[key] = torch.from_numpy(dense)
        gene_mask = np.zeros((B, self.num_genes), dtype=bool)
        gene_mask[:, cols] = True
        out["gene_mask"] = torch.from_numpy(gene_mask)
        for c in CODES:
            out[c] = torch.from_numpy(self.code_maps[s][c][batch[c].numpy()])
        out["dataset"] = torch.full((B,), s, dtype=torch.int64)
        for name in self.numeric_names:
            key = numeric_key(name)
            out[key] = batch[key] if key in batch else torch.full((B,), float("nan"), dtype=torch.float32)
        for key in (*MASK_KEYS, *TRACE_KEYS):
            out[key] = batch[key]
        return out


class MultiSetLoader(ResumableLoader):
    """Iterate batches of one split over several stores; ``state_dict`` / ``load_state_dict`` resume exactly.

    Attributes: ``loaders`` (one SetLoader per store, in store order), ``datasets`` (their dataset
    names), ``columns`` (per store: union column of each of its panel genes), ``code_maps`` (per
    store and covariate: store code -> union code), ``numeric_names`` (union of numeric covariates).
    """

    def __init__(self, cfg: DataConfig, stores: list[str], split: str = TRAIN, *, rank: int | None = None,
                 world: int | None = None, eval_mode: bool | None = None, log=print):
        self.stores = [str(p) for p in stores]
        if not self.stores:
            raise ValueError("MultiSetLoader needs at least one store (data.stores is empty)")
        self.loaders = [SetLoader(replace(cfg, store=p, stores=[]), split, rank=rank, world=world,
                                  eval_mode=eval_mode, log=log) for p in self.stores]
        first = self.loaders[0]
        self.cfg, self.split = cfg, split
        self.rank, self.world, self.eval_mode = first.rank, first.world, first.eval_mode
        self.datasets = self._dataset_names()
        self._gene_ids, self.columns = self._union_genes()
        self._vocab, self.code_maps = self._union_covariates()
        self.numeric_names = sorted({c for sub in self.loaders for c in sub.group_numeric})
        self.epoch, self.next_batch = 0, 0

    # ---- union vocabularies -------------------------------------------------------------------

    def _dataset_names(self) -> list[str]:
        names, seen = [], {}
        for path, sub in zip(self.stores, self.loaders):
            name = str(sub.store.manifest.dataset or Path(path).name)
            if name in seen:
                raise ValueError(f"stores {seen[name]} and {path} have the same dataset name {name!r}; "
                                 "the datasets of data.stores must have distinct names (set the converter's "
                                 "dataset when converting)")
            seen[name] = path
            names.append(name)
        return names

    def _union_genes(self) -> tuple[np.ndarray, list[np.ndarray]]:
        index: dict[str, int] = {}
        columns = []
        for path, sub in zip(self.stores, self.loaders):
            ids = [str(g) for g in sub.gene_ids]
            if len(set(ids)) != len(ids):
                dup = sorted(g for g, n in Counter(ids).items() if n > 1)
                raise DataError(path, f"the gene panel has duplicate gene ids, e.g. {dup[:5]}; "
                                "genes of several stores are matched by id, so ids must be unique")
            for g in ids:
                index.setdefault(g, len(index))
            columns.append(np.array([index[g] for g in ids], dtype=np.int64))
        return np.array(list(index), dtype=str), columns

    def _union_covariates(self) -> tuple[dict[str, list[str]], list[dict[str, np.ndarray]]]:
        names = []  # per store: covariate -> its (dataset-qualified) names in store code order
        for ds, sub in zip(self.datasets, self.loaders):
            v = sub.vocabularies
            names.append({"context": v["context"], "batch": [f"{ds}/{b}" for b in v["batch"]],
                          "perturbation": v["perturbation"]})
        vocab = {c: sorted({n for per in names for n in per[c]}) for c in CODES}
        lookup = {c: {n: i for i, n in enumerate(vocab[c])} for c in CODES}
        code_maps = [{c: np.array([lookup[c][n] for n in per[c]], dtype=np.int64) for c in CODES}
                     for per in names]
        vocab["dataset"] = list(self.datasets)
        return vocab, code_maps

    @property
    def gene_ids(self) -> np.ndarray:
        """Gene ids of the union panel [G] (the columns of x, ctrl and gene_mask)."""
        return self._gene_ids

    @property
    def vocabularies(self) -> dict[str, list[str]]:
        """Union names of context, batch ("<dataset>/<batch>"), perturbation and dataset codes."""
        return {k: list(v) for k, v in self._vocab.items()}

    @property
    def control_perturbations(self) -> list[str]:
        """The perturbation labels of every store's control groups."""
        return sorted({p for sub in self.loaders for p in sub.control_perturbations})

    @property
    def control_numeric(self) -> dict[str, float | None]:
        """Each numeric covariate's control value (the first store's that has one)."""
        out: dict[str, float | None] = {}
        for sub in self.loaders:
            for name, v in sub.control_numeric.items():
                if out.get(name) is None:
                    out[name] = v
        return out

    # ---- sizes and schedule -------------------------------------------------------------------

    def schedule(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(store, k) of every batch of the epoch for this rank: batch j is store[j]'s k[j]-th batch."""
        counts = [sub.num_batches(epoch) for sub in self.loaders]
        order = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        if not self.eval_mode:
            order = order[np.random.default_rng([self.cfg.seed, epoch, SCHEDULE_STREAM]).permutation(len(order))]
        local = np.zeros(len(order), dtype=np.int64)
        for s, n in enumerate(counts):
            local[order == s] = np.arange(n)
        return order, local

    def num_batches(self, epoch: int | None = None) -> int:
        e = self.epoch if epoch is None else epoch
        return sum(sub.num_batches(e) for sub in self.loaders)

    def __len__(self) -> int:
        return self.num_batches()

    # ---- iteration ----------------------------------------------------------------------------

    def _dataset(self, epoch: int, first: int) -> IterableDataset:
        return _MultiDataset(self, epoch, first)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "next_batch": self.next_batch, "seed": self.cfg.seed, "split": self.split,
                "world": self.world, "rank": self.rank, "stores": list(self.stores)}

    def load_state_dict(self, state: dict) -> None:
        mine = (self.cfg.seed, self.split, self.world, self.stores)
        theirs = (state.get("seed"), state.get("split"), state.get("world"), list(state.get("stores") or []))
        if theirs != mine:
            raise ValueError(f"loader state is for seed={theirs[0]}, split={theirs[1]}, world={theirs[2]}, "
                             f"stores={theirs[3]}; this loader has seed={mine[0]}, split={mine[1]}, "
                             f"world={mine[2]}, stores={mine[3]}")
        self.epoch, self.next_batch = int(state["epoch"]), int(state["next_batch"])
