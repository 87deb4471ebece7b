"""The batch: one dict of tensors that every loader produces and the model side reads.

Shape legend: B sets per batch, M cells per set (data.set_size), P genes in the panel (G: the
union panel of several stores).

    key              dtype    shape      SetLoader  MultiSetLoader  WebDataset  what
    x                float32  [B, M, P]  yes        [B, M, G]       yes         perturbed cells, normalised;
                                                                                zero rows where masked
    mask             bool     [B, M]     yes        yes             yes         True for real cells
    ctrl             float32  [B, M, P]  yes        [B, M, G]       yes         control cells of the same
                                                                                (context, batch) pool
    ctrl_mask        bool     [B, M]     yes        yes             yes
    context, batch,  int64    [B]        yes        union codes     yes         codes into the store's
    perturbation                                                                categories
    dataset          int64    [B]        -          yes             -           store index
    gene_mask        bool     [B, G]     -          yes             -           genes the batch's store measures
    num_<name>       float32  [B]        yes        NaN if absent   yes         numeric covariates (num_dose)
    group            int64    [B]        yes        per store       yes         conditions-table row
    index            int64    [B]        yes        per store       yes         position in the epoch order
    rows, ctrl_rows  int64    [B, M]     yes        per store       -           store rows (-1 where masked)
    epoch            int64    [B]        -          -               yes         the epoch the set was drawn in

Where the WebDataset batch differs from SetLoader's: it has no ``rows`` / ``ctrl_rows`` (an export
holds the cells, not their store rows) and adds ``epoch`` (the export epoch of each set); its
values are the same cells normalised the same way (perturbdiff/data/wds.py). The model side reads
``x``, ``mask``, ``ctrl``, ``ctrl_mask``, ``gene_mask`` when present, and the covariates
(``covariates_of``: the ``CATEGORICAL`` codes and every ``num_<name>``).

Also here: ``collate`` (sets -> a batch), the workers' round-robin (``worker_batches``), the error
record a worker yields for a DataError (``worker_safe``), and ``ResumableLoader``, the epoch /
next-batch bookkeeping that SetLoader and MultiSetLoader share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .schema import DataError

if TYPE_CHECKING:  # annotations only: the model side imports this module without the store
    from ..config import DataConfig
    from .sampler import SetSpec
    from .store import CellStore

CODES = ("context", "batch", "perturbation")  # the categorical codes a store's batch carries
CATEGORICAL = ("context", "batch", "dataset", "perturbation")  # every categorical covariate (dataset: multi-store)
NUMERIC_PREFIX = "num_"
CELL_KEYS = ("x", "ctrl")  # [B, M, P] expression of the perturbed and the control set
MASK_KEYS = ("mask", "ctrl_mask")  # [B, M] their real cells
TRACE_KEYS = ("group", "index", "rows", "ctrl_rows")  # per-store bookkeeping, kept as is by the multi-store merge
# Key of the record a worker yields in place of a batch when it hits a DataError: [path, problem].
DATA_ERROR_KEY = "__perturbdiff_data_error__"


def numeric_key(name: str) -> str:
    """The batch key of numeric covariate ``name``."""
    return NUMERIC_PREFIX + name


def covariates_of(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The covariate entries of a batch: categorical codes and numeric ``num_<name>`` values."""
    return {k: v for k, v in batch.items() if k in CATEGORICAL or k.startswith(NUMERIC_PREFIX)}


def collate(store: CellStore, sets: list[SetSpec], panel: np.ndarray, cfg: DataConfig,
            group_codes: np.ndarray, group_numeric: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """The batch of ``sets`` read from ``store`` on ``panel``; ``group_codes`` [groups, 3] are the
    ``CODES`` of every conditions-table row, ``group_numeric`` its numeric covariate columns."""
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
    numeric = {numeric_key(c): torch.from_numpy(v[groups].astype(np.float32))
               for c, v in (group_numeric or {}).items()}
    return numeric | {
        "x": torch.from_numpy(x), "mask": torch.from_numpy(rows >= 0),
        "ctrl": torch.from_numpy(ctrl), "ctrl_mask": torch.from_numpy(ctrl_rows >= 0),
        **{c: torch.from_numpy(group_codes[groups, i].copy()) for i, c in enumerate(CODES)},
        "group": torch.from_numpy(groups), "index": torch.tensor([s.index for s in sets], dtype=torch.int64),
        "rows": torch.from_numpy(rows), "ctrl_rows": torch.from_numpy(ctrl_rows),
    }


def worker_batches(first: int, total: int) -> Iterator[int]:
    """The batch numbers j in [first, total) that this DataLoader worker produces: (j - first) % W == w.
    The DataLoader returns its workers' batches round-robin, so the sequence is the same for any W."""
    info = get_worker_info()
    wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
    return (j for j in range(first, total) if (j - first) % nw == wid)


def worker_safe(batches: Iterator[dict]) -> Iterator[dict]:
    """``batches``, except that in a DataLoader worker a DataError becomes a last error record
    (re-raised by ResumableLoader.__iter__ in the main process as the same DataError): torch
    re-raises worker exceptions as ``type(msg)``, which DataError(path, problem) cannot be rebuilt from."""
    if get_worker_info() is None:
        yield from batches
        return
    try:
        yield from batches
    except DataError as err:
        yield {DATA_ERROR_KEY: [err.path, err.problem]}


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
