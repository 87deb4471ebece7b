"""Data-layer benchmarks (docs/benchmarks.md has the numbers and the exact commands).

    python benchmarks/bench_data.py shard  --cells 10000000 --genes 1000 --work /big/disk/bench
    python benchmarks/bench_data.py reads  --cells 200000 --genes 2000 --work /big/disk/bench
    python benchmarks/bench_data.py wds    --work /big/disk/bench   (after `reads`)

shard: synthesise a Tahoe-format parquet input, convert it, report cells/s and the peak RSS of the
       whole conversion process tree (sampled every 0.1 s with psutil), which must stay < 4 GB.
reads: set reads per second (m = 256 cells + 256 matched controls) from the store, against the
       reference code's way of reading the same cells: two random single-row h5py reads per cell
       (perturbed + control) from the h5ad with the HDF5 chunk cache off (rdcc_nbytes=0); same
       sets, same machine, one run, one process each.
wds:   WebDataset export, then streaming throughput (sets/s) with 0 and 2 DataLoader workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class PeakRSS:
    """Peak of the summed RSS of a process and all its descendants."""

    def __init__(self, pid: int, every: float = 0.1):
        self.proc, self.every, self.peak, self._stop = psutil.Process(pid), every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc] + self.proc.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def run_measured(cmd: list[str]) -> tuple[float, int]:
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    with PeakRSS(proc.pid) as peak:
        rc = proc.wait()
    if rc:
        raise SystemExit(f"{cmd} failed with exit code {rc}")
    return time.time() - t0, peak.peak


def synth(work: Path, cells: int, genes: int, workers: int, h5ad: bool, args) -> Path:
    """Tahoe-like geometry: groups of about cells / (plates * lines * wells) cells."""
    src = work / f"synth_{cells}_{genes}_{args.lines}x{args.drugs}x{args.plates}"
    overrides = [f"synth.out_dir={src}", f"synth.num_cells={cells}", f"synth.num_genes={genes}",
                 f"synth.num_workers={workers}", "synth.cells_per_file=100000",
                 f"synth.num_cell_lines={args.lines}", f"synth.num_drugs={args.drugs}",
                 f"synth.num_plates={args.plates}", "synth.control_wells_per_plate=6",
                 f"synth.write_h5ad={str(h5ad).lower()}"]
    if not (src / "metadata" / "gene_metadata.parquet").is_file() or (h5ad and not (src / "synthetic.h5ad").is_file()):
        dt, peak = run_measured([sys.executable, "-m", "perturbdiff.cli", "synth", *overrides])
        print(f"synthesised {cells:,} cells in {dt:.0f}s (peak RSS {peak / 2**30:.2f} GiB)")
    return src


def bench_shard(args) -> dict:
    work = Path(args.work)
    src = synth(work, args.cells, args.genes, args.workers, h5ad=False, args=args)
    store = work / f"store_{args.cells}.zarr"
    overrides = [f"shard.inputs=[{src}]", f"shard.out={store}", f"shard.num_workers={args.workers}",
                 "shard.cells_per_part=100000", "shard.hvg.num_top_genes=2000"]
    dt, peak = run_measured([sys.executable, "-m", "perturbdiff.cli", "shard", "--overwrite", *overrides])
    manifest = json.loads((store / "manifest.json").read_text())
    src_bytes = sum(p.stat().st_size for p in (src / "data").glob("*.parquet"))
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    res = {"cells": manifest["num_cells"], "genes": manifest["num_genes"], "nnz": manifest["nnz"],
           "groups": manifest["num_groups"], "workers": args.workers, "seconds": round(dt, 1),
           "cells_per_s": round(manifest["num_cells"] / dt), "peak_rss_gib": round(peak / 2**30, 3),
           "source_gib": round(src_bytes / 2**30, 2), "store_gib": round(store_bytes / 2**30, 2)}
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "perturbdiff.cli", "verify", str(store)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL)
    res["verify_seconds"] = round(time.time() - t0, 1)
    return res


def _reference_read(f, rows: np.ndarray, num_genes: int) -> np.ndarray:
    """The reference code's access pattern: one h5py row read (indptr, indices, data) per cell."""
    indptr, indices, data = f["X/indptr"], f["X/indices"], f["X/data"]
    out = np.zeros((len(rows), num_genes), dtype=np.float32)
    for i, r in enumerate(rows):
        a, b = indptr[r], indptr[r + 1]
        out[i, indices[a:b]] = data[a:b]
    return out


def bench_reads(args) -> dict:
    import h5py

    from data_sharding.convert import convert
    from perturbdiff.config import DataConfig, ShardConfig
    from perturbdiff.data.loader import SetLoader

    work = Path(args.work)
    src = synth(work, args.cells, args.genes, args.workers, h5ad=True, args=args)
    store = work / f"store_reads_{args.cells}_{args.chunk_nnz}_{args.compressor}.zarr"
    convert(ShardConfig(source="tahoe", inputs=[str(src)], out=str(store), num_workers=args.workers,
                        cells_per_part=100_000, chunk_nnz=args.chunk_nnz, compressor=args.compressor),
            log=lambda s: None)
    cfg = DataConfig(store=str(store), set_size=256, sets_per_batch=1, num_workers=0, run_cells=args.run_cells)
    cfg.panel.kind = "all"
    loader = SetLoader(cfg, log=lambda s: None)
    sets = loader.sampler.sets_at(0, np.arange(min(args.sets, loader.sampler.num_sets(0))))
    cell_ids = loader.store.obs("cell_id")
    store_g = loader.store.num_genes

    # ours: sets (perturbed + control) as slices of the store -> dense [m, G] counts
    t0 = time.perf_counter()
    ours = []
    for s in sets:
        x = loader.store.read_csr(s.rows)
        c = loader.store.read_csr(s.ctrl_rows)
        ours.append((x, c))
    t_ours = time.perf_counter() - t0
    # dense too, with normalisation, as the loader delivers it
    t0 = time.perf_counter()
    for s in sets:
        loader.store.read_dense(s.rows, loader.panel, cfg.normalize)
        loader.store.read_dense(s.ctrl_rows, loader.panel, cfg.normalize)
    t_ours_dense = time.perf_counter() - t0

    # reference: random single-row reads from the h5ad, chunk cache off
    h5 = src / "synthetic.h5ad"
    with h5py.File(h5, "r", rdcc_nbytes=0) as f:
        import anndata as ad
        names = np.asarray(ad.io.read_elem(f["obs"][f["obs"].attrs["_index"]])).astype(str)
        pos = {n: i for i, n in enumerate(names)}
        todo = [(np.array([pos[c] for c in cell_ids[s.rows]]), np.array([pos[c] for c in cell_ids[s.ctrl_rows]]))
                for s in sets]
        num_genes = int(f["X"].attrs["shape"][1])
        t0 = time.perf_counter()
        ref = []
        for xr, cr in todo:
            order = np.random.default_rng(0).permutation(len(xr))  # cells arrive one by one, unsorted
            ref.append((_reference_read(f, xr[order], num_genes), _reference_read(f, cr[order], num_genes)))
        t_ref = time.perf_counter() - t0
    # same values: compare the first set
    (ip, idx, val), _ = ours[0]
    dense = np.zeros((len(sets[0].rows), store_g), dtype=np.float32)
    dense[np.repeat(np.arange(len(sets[0].rows)), np.diff(ip)), idx] = val
    xr, _ = todo[0]
    order = np.random.default_rng(0).permutation(len(xr))
    same = bool(np.array_equal(dense[order].sum(1), ref[0][0].sum(1)))
    n = len(sets)
    return {"sets": n, "set_size": 256, "cells": args.cells, "genes": args.genes,
            "store_sets_per_s": round(n / t_ours, 1), "store_dense_normalised_sets_per_s": round(n / t_ours_dense, 1),
            "reference_sets_per_s": round(n / t_ref, 2), "speedup": round(t_ref / t_ours, 1),
            "speedup_dense": round(t_ref / t_ours_dense, 1), "same_cells": same}


def bench_wds(args) -> dict:
    from data_sharding.wds_export import export_wds
    from perturbdiff.config import DataConfig, WdsConfig
    from perturbdiff.data.wds import wds_loader

    work = Path(args.work)
    store = work / f"store_reads_{args.cells}_{args.chunk_nnz}_{args.compressor}.zarr"
    cfg = DataConfig(store=str(store), set_size=256, sets_per_batch=8)
    cfg.panel.num_genes = 2000 if args.genes >= 2000 else args.genes
    out = work / "wds"
    t0 = time.time()
    manifest = export_wds(cfg, WdsConfig(out=str(out), epochs=1, sets_per_shard=64), log=lambda s: None)
    res = {"sets": manifest["num_sets"], "shards": len(manifest["shards"]), "export_s": round(time.time() - t0, 1),
           "export_sets_per_s": round(manifest["num_sets"] / (time.time() - t0), 1),
           "bytes_per_set": int(sum(p.stat().st_size for p in out.glob("*.tar")) / manifest["num_sets"])}
    for workers in (0, 2):
        loader, _ = wds_loader(out, sets_per_batch=8, num_workers=workers)
        t0, n = time.perf_counter(), 0
        for batch in loader:
            n += batch["x"].shape[0]
        res[f"stream_sets_per_s_workers{workers}"] = round(n / (time.perf_counter() - t0), 1)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=["shard", "reads", "wds"])
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--genes", type=int, default=2_000)
    p.add_argument("--sets", type=int, default=200, help="reads: number of sets timed")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--lines", type=int, default=10, help="synthetic cell lines")
    p.add_argument("--drugs", type=int, default=10, help="synthetic drugs (x3 doses)")
    p.add_argument("--plates", type=int, default=2)
    p.add_argument("--run-cells", type=int, default=32, help="reads: data.run_cells")
    p.add_argument("--chunk-nnz", type=int, default=1 << 15, help="reads: shard.chunk_nnz of the store")
    p.add_argument("--compressor", default="lz4", help="reads: shard.compressor of the store")
    p.add_argument("--work", default=os.environ.get("PERTURBDIFF_BENCH_DIR", "runs/bench"))
    args = p.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    res = {"shard": bench_shard, "reads": bench_reads, "wds": bench_wds}[args.what](args)
    res["machine"] = {"cpus": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 2**30, 1)}
    print(json.dumps(res, indent=1))
    out = Path(args.work) / f"bench_{args.what}.json"
    out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
