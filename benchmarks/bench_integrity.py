"""Cost of the integrity checks (perturbdiff/data/integrity.py) on the training read path.

    python benchmarks/bench_integrity.py STORE [STORE ...] [--sets 400] [--set-size 256]

For each store: the time of opening it (the open-time structural checks included), and of reading
``--sets`` training sets of ``--set-size`` cells plus their matched controls with
``CellStore.read_csr``, with the time spent inside the per-read checks measured separately (best
of 5 passes, one process, warm page cache). Build a store with ``perturbdiff synth`` and
``perturbdiff shard`` (e.g. 60,000 cells x 2,000 genes, ``shard.compressor=none`` and ``lz4``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perturbdiff.config import DataConfig  # noqa: E402
from perturbdiff.data import store as store_module  # noqa: E402
from perturbdiff.data.loader import SetLoader  # noqa: E402
from perturbdiff.data.store import CellStore  # noqa: E402


def measure(path: str, n_sets: int, set_size: int) -> dict:
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            fn(*args, **kwargs)
            spent[0] += time.perf_counter() - t0
        return wrapper

    cfg = DataConfig(store=path, set_size=set_size, sets_per_batch=1, num_workers=0)
    cfg.panel.kind = "all"
    loader = SetLoader(cfg, log=lambda *_: None)
    sets = loader.sampler.sets_at(0, np.arange(min(n_sets, loader.sampler.num_sets(0))))
    t0 = time.perf_counter()
    for _ in range(20):
        CellStore(path)
    open_s = (time.perf_counter() - t0) / 20
    originals = store_module.check_indptr_slice, store_module.check_values
    store_module.check_indptr_slice, store_module.check_values = (timed(f) for f in originals)
    try:
        best = (float("inf"), 0.0, 0)
        for _ in range(5):
            st, spent[0], nnz = CellStore(path), 0.0, 0
            t0 = time.perf_counter()
            for s in sets:
                for rows in (s.rows, s.ctrl_rows):
                    nnz += len(st.read_csr(rows)[1])
            total = time.perf_counter() - t0
            if total < best[0]:
                best = (total, spent[0], nnz)
    finally:
        store_module.check_indptr_slice, store_module.check_values = originals
    total, checks, nnz = best
    reads = 2 * len(sets)
    return {"store": path, "groups": len(loader.store.conditions), "reads": reads,
            "nnz_per_read": round(nnz / reads), "open_ms": round(open_s * 1e3, 1),
            "read_us": round(total / reads * 1e6, 1), "checks_us": round(checks / reads * 1e6, 1),
            "checks_share": round(checks / total, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--sets", type=int, default=400)
    ap.add_argument("--set-size", type=int, default=256)
    args = ap.parse_args()
    for path in args.stores:
        print(measure(path, args.sets, args.set_size))


if __name__ == "__main__":
    main()
