"""The set sampler: which cells form each training set, its matched control set, and who reads it.

An epoch is a list of set descriptors (group, k) in one global order that every rank computes the
same way from (seed, epoch). A set is up to m cells of one (context, batch, perturbation) group,
drawn without replacement as random runs of ``run_cells`` store-adjacent cells (the converter
shuffles cells within groups, so runs are random samples; run_cells=1 draws independent cells); a
group smaller than m gives a smaller set that the loader pads with a
mask (cells are never duplicated). Its control set is up to m cells drawn without replacement from
the (context, batch) control pool. All randomness is keyed by (seed, epoch, group, k), so any set
can be rebuilt anywhere: ranks and workers only choose WHICH positions of the global order they
materialise (position i goes to rank i % world), and resuming needs only (epoch, position).

Sampling modes: ``proportional`` cuts every group into ceil(n / m) sets per epoch (each cell once
per epoch, large groups weigh more); ``balanced`` draws ``sets_per_group`` sets from every group.
Evaluation mode is deterministic: fixed order, fixed cells, the same every call.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from perturbdiff.config import DataConfig

from .csr import ranges_index
from .schema import DataError
from .splits import CONTROL, TRAIN

_CTRL_STREAM = 1  # RNG stream tag for control draws


@dataclass(frozen=True)
class SetSpec:
    index: int  # position in the epoch's global order
    group: int  # row of the conditions table
    k: int  # set number within the group this epoch
    rows: np.ndarray  # sorted store rows of the perturbed cells (<= m)
    ctrl_rows: np.ndarray  # sorted store rows of the control cells (<= m)


SAMPLINGS = ("proportional", "balanced")  # data.sampling
EMPTY_POOL_POLICIES = ("error", "same_context", "none")  # data.empty_control_pool


class SetSampler:
    def __init__(self, conditions: pd.DataFrame, split_labels: np.ndarray, cfg: DataConfig, split: str = TRAIN,
                 eval_mode: bool = False, log=print):
        if cfg.set_size < 1:
            raise DataError(None, f"data.set_size must be >= 1, got {cfg.set_size}")
        if cfg.run_cells < 1:
            raise DataError(None, f"data.run_cells must be >= 1, got {cfg.run_cells}")
        if cfg.sampling not in SAMPLINGS:
            raise DataError(None, f"data.sampling must be {' or '.join(SAMPLINGS)}, not {cfg.sampling!r}")
        self.cfg, self.m, self.eval_mode, self.split = cfg, cfg.set_size, eval_mode, split
        self.run = min(cfg.run_cells, cfg.set_size)  # a run never exceeds a set
        self.start = conditions["start"].to_numpy(np.int64)
        self.n = conditions["n"].to_numpy(np.int64)
        targets = split_labels == split
        if cfg.include_controls and split == TRAIN:
            targets |= split_labels == CONTROL
        self.groups = np.flatnonzero(targets & (self.n > 0))
        self.fallbacks: dict[tuple[str, str], str] = {}
        self._pools = self._control_pools(conditions, log)
        self._perm_cache: OrderedDict = OrderedDict()

    # ---- control pools ------------------------------------------------------------------------

    def _control_pools(self, conditions: pd.DataFrame, log) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        ctrl = conditions[conditions["is_control"]]
        by_cb: dict[tuple[str, str], list[int]] = {}
        by_c: dict[str, list[int]] = {}
        for g, c, b in zip(ctrl.index, ctrl["context"], ctrl["batch"]):
            by_cb.setdefault((c, b), []).append(g)
            by_c.setdefault(c, []).append(g)
        pools = {}
        for g in self.groups:
            c, b = conditions.at[g, "context"], conditions.at[g, "batch"]
            members = by_cb.get((c, b), [])
            if not members:
                policy = self.cfg.empty_control_pool
                if policy == "error":
                    raise DataError(None, f"no control cells for context {c!r}, batch {b!r} (group "
                                    f"{conditions.at[g, 'perturbation']!r}); set data.empty_control_pool")
                if policy == "same_context" and by_c.get(c):
                    members = by_c[c]
                    self.fallbacks[(c, b)] = "same_context"
                elif policy in ("same_context", "none"):
                    self.fallbacks[(c, b)] = "none"
                else:
                    raise DataError(None, f"data.empty_control_pool must be {', '.join(EMPTY_POOL_POLICIES)}, "
                                    f"not {policy!r}")
            members = sorted(members)
            pools[g] = (self.start[members], self.n[members])
        if self.fallbacks:
            kinds = {k: sum(v == k for v in self.fallbacks.values()) for k in ("same_context", "none")}
            log(f"warning: {len(self.fallbacks)} (context, batch) pair(s) have no control cells: "
                f"{kinds['same_context']} use controls of the same context from other batches, "
                f"{kinds['none']} get an empty (masked) control set; e.g. {next(iter(self.fallbacks))}")
        return pools

    # ---- epoch order --------------------------------------------------------------------------

    def _epoch(self, epoch: int) -> int:
        return 0 if self.eval_mode else epoch

    def epoch_sets(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(group, k) of every set of the epoch, in global order."""
        if self.cfg.sampling == "proportional" or self.eval_mode:
            per = np.ceil(self.n[self.groups] / self.m).astype(np.int64)
        else:
            per = np.full(len(self.groups), self.cfg.sets_per_group, dtype=np.int64)
        group = np.repeat(self.groups, per)
        k = np.arange(len(group)) - np.repeat(np.cumsum(per) - per, per)
        if not self.eval_mode:
            order = np.random.default_rng([self.cfg.seed, self._epoch(epoch)]).permutation(len(group))
            group, k = group[order], k[order]
        return group, k

    def num_sets(self, epoch: int = 0) -> int:
        return len(self.epoch_sets(epoch)[0])

    def rank_positions(self, epoch: int, rank: int, world: int) -> np.ndarray:
        """Positions of the global order this rank reads; disjoint across ranks, union = the epoch."""
        total = self.num_sets(epoch)
        if self.cfg.drop_last and not self.eval_mode:
            total -= total % world
        return np.arange(rank, total, world, dtype=np.int64)

    # ---- one set ----------------------------------------------------------------------------

    def _perm(self, epoch: int, g: int) -> np.ndarray:
        key = (epoch, g)
        if key not in self._perm_cache:
            rng = np.random.default_rng([self.cfg.seed, epoch, g])
            self._perm_cache[key] = run_permutation(rng, int(self.n[g]), self.run)
            if len(self._perm_cache) > 64:
                self._perm_cache.popitem(last=False)
        return self._perm_cache[key]

    def materialize(self, epoch: int, index: int, group: int, k: int) -> SetSpec:
        e, g, m, n = self._epoch(epoch), int(group), self.m, int(self.n[group])
        if self.cfg.sampling == "proportional" or self.eval_mode:
            local = self._perm(e, g)[k * m:(k + 1) * m]
        else:
            rng = np.random.default_rng([self.cfg.seed, e, g, k])
            local = run_permutation(rng, n, self.run)[:m]
        rows = self.start[g] + np.sort(local)
        starts, sizes = self._pools[g]
        pool = int(sizes.sum())
        if pool:
            rng = np.random.default_rng([self.cfg.seed, e, g, k, _CTRL_STREAM])
            pick = np.sort(run_permutation(rng, pool, self.run)[:m])
            offsets = np.cumsum(sizes) - sizes
            which = np.searchsorted(offsets, pick, side="right") - 1
            ctrl = starts[which] + (pick - offsets[which])
        else:
            ctrl = np.zeros(0, dtype=np.int64)
        return SetSpec(index=int(index), group=g, k=int(k), rows=rows.astype(np.int64), ctrl_rows=np.sort(ctrl))

    def sets_at(self, epoch: int, positions: np.ndarray) -> list[SetSpec]:
        group, k = self.epoch_sets(epoch)
        return [self.materialize(epoch, int(i), group[i], k[i]) for i in positions]


def run_permutation(rng: np.random.Generator, n: int, run: int) -> np.ndarray:
    """A permutation of range(n) made of runs of ``run`` consecutive cells in random order.

    The run boundaries move with a random circular offset on every draw, so every cell can start
    a run (no cell is unreachable when a set takes only part of a run). run=1 is a uniform
    permutation. Any prefix is a sample without replacement.
    """
    if run <= 1 or n <= 1:
        return rng.permutation(n)
    num_runs = -(-n // run)
    order = rng.permutation(num_runs)
    starts = order * run
    offset = int(rng.integers(n))
    return (ranges_index(starts, np.minimum(run, n - starts)) + offset) % n


def num_batches(num_positions: int, sets_per_batch: int, drop_last: bool) -> int:
    if drop_last:
        return num_positions // sets_per_batch
    return math.ceil(num_positions / sets_per_batch)
