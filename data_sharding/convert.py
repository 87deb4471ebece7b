"""Conversion driver: plan the parts of a source, convert them in parallel (resumably), merge.

    perturbdiff shard --config configs/data/tahoe100m.yaml shard.inputs=[data/] shard.out=tahoe.zarr

Work happens in ``<out>.work/``: every part is written under a temporary name and renamed when
complete, so a killed run picks up where it stopped; the merge writes ``<out>.tmp`` and renames it
to ``<out>`` last. The result is identical whether or not the run was interrupted. The output paths
are checked before any work and locked for the run (perturbdiff.outputs): only our own store and
its siblings are ever removed or replaced.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


from perturbdiff.config import ShardConfig
from perturbdiff.data.schema import MANIFEST_FILE, VALUES_COUNTS, DataError, StoreManifest, file_sha256
from perturbdiff.outputs import OutputLock, check_output, read_marker, remove_output, write_marker

from . import h5ad, hvg, tahoe
from .parts import Plan, write_part
from .pool import run_parallel
from .writer import COMPRESSORS, merge_parts

# The source formats: each module has plan(cfg, log) -> Plan and convert_task(task, shared) -> PartData.
SOURCES = {"tahoe": tahoe, "h5ad": h5ad}


def _source_module(name: str):
    if name not in SOURCES:
        raise DataError(None, f"unknown shard.source {name!r}: use {' or '.join(map(repr, SOURCES))}")
    return SOURCES[name]


def _run_task(args: tuple) -> dict:
    source, task, shared, part_dir, num_genes, value_kind, flavor = args
    module = _source_module(source)
    part = module.convert_task(task, shared)
    if task.get("hash"):
        part.source["sha256"] = file_sha256(Path(task["file"]))
    meta = write_part(Path(part_dir), part, num_genes, value_kind, flavor)
    return {"part": str(part_dir), "n": meta["n"], "source": meta["source"]}


def _log_part(log: Callable[[str], None], done: int, total: int, res: dict) -> None:
    log(f"  part {done}/{total}: {res['n']:,} cells from {Path(res['source']['file']).name}")


def convert(cfg: ShardConfig, log: Callable[[str], None] = print, overwrite: bool = False) -> StoreManifest:
    """Convert ``cfg.inputs`` into the store ``cfg.out``; returns the manifest."""
    if not cfg.out:
        raise DataError(None, "shard.out (the store path) is not set")
    if cfg.compressor not in COMPRESSORS:
        raise DataError(None, f"shard.compressor must be one of {sorted(COMPRESSORS)}, not {cfg.compressor!r}")
    # Before any work: the store and its two siblings (the parts, the store being merged) must be
    # new, empty or ours; never an input or a directory holding one (perturbdiff.outputs).
    inputs = [*cfg.inputs, cfg.metadata_dir]
    out = check_output(cfg.out, "store", inputs=inputs, replaces=False)
    work, tmp = out.with_name(out.name + ".work"), out.with_name(out.name + ".tmp")
    for path, kind in ((work, "work"), (tmp, "store")):
        check_output(path, kind, inputs=inputs, replaces=False)
    if (out / MANIFEST_FILE).is_file() and not overwrite:
        log(f"{out} is already a complete store; nothing to do (pass --overwrite to rebuild)")
        return StoreManifest.read(out)
    with OutputLock(out, "store"):
        return _convert(cfg, out, work, log)


def _convert(cfg: ShardConfig, out: Path, work: Path, log: Callable[[str], None]) -> StoreManifest:
    module = _source_module(cfg.source)
    t0 = time.time()
    plan: Plan = module.plan(cfg, log=log)
    flavor = cfg.hvg.flavor
    if flavor not in hvg.FLAVORS:
        raise DataError(None, f"shard.hvg.flavor must be {' or '.join(hvg.FLAVORS)}, not {flavor!r}")
    if plan.value_kind != VALUES_COUNTS and flavor == "seurat_v3":
        log("note: seurat_v3 needs raw counts; this input is log-normalised, so HVGs use the dispersion flavor")
        flavor = "dispersion"
    if read_marker(work) is None:
        write_marker(work, "work")  # an empty or new directory (check_output): ours from now on
    # a plan fingerprint guards against resuming with different inputs or settings
    fingerprint = json.dumps({"tasks": plan.tasks, "value_kind": plan.value_kind, "flavor": flavor,
                              "genes": len(plan.gene_ids)}, sort_keys=True, default=str)
    fp_file = work / "plan.json"
    if fp_file.is_file() and fp_file.read_text() != fingerprint:
        log(f"inputs or settings changed since the interrupted run; discarding {work}")
        remove_output(work, "work")
        write_marker(work, "work")
    fp_file.write_text(fingerprint)

    part_dirs = [work / f"part-{i:06d}" for i in range(len(plan.tasks))]
    todo = [i for i, p in enumerate(part_dirs) if not (p / "meta.json").is_file()]
    log(f"{cfg.source}: {len(plan.files)} file(s), {len(plan.tasks)} part(s), "
        f"{len(plan.tasks) - len(todo)} already done; {len(plan.gene_ids):,} genes ({plan.value_kind})")
    args = [(cfg.source, plan.tasks[i], plan.shared, str(part_dirs[i]), len(plan.gene_ids), plan.value_kind,
             flavor) for i in todo]
    done = 0

    def on_part(res: dict) -> None:
        nonlocal done
        done += 1
        _log_part(log, done, len(args), res)

    # Workers die with this process; SIGTERM stops cleanly (exit 143); a dead worker is an error (pool.py).
    run_parallel(_run_task, args, cfg.num_workers, on_part, job="perturbdiff shard",
                 kept="finished parts are kept", noun="parts")
    t1 = time.time()

    hashes: dict[str, str] = {}
    rows: dict[str, int] = {}
    for p in part_dirs:
        meta = json.loads((p / "meta.json").read_text())
        src = meta["source"]
        rows[src["file"]] = rows.get(src["file"], 0) + meta["n"]
        if "sha256" in src:
            hashes[src["file"]] = src["sha256"]
    sources = [{"path": f.name, "sha256": hashes.get(str(f)), "bytes": f.stat().st_size,
                "cells": rows.get(str(f), 0)} for f in plan.files]
    extra = dict(plan.extra)
    extra["timings"] = {"parts_seconds": round(t1 - t0, 3)}
    manifest = merge_parts(part_dirs, out, gene_ids=plan.gene_ids, gene_symbols=plan.gene_symbols,
                           cfg=cfg, sources=sources, value_kind=plan.value_kind, flavor=flavor, extra=extra,
                           log=log)
    if not cfg.keep_work:
        remove_output(work, "work")
    log(f"conversion done in {time.time() - t0:.1f}s")
    return manifest
