"""The ``perturbdiff`` command.

    perturbdiff demo        [--config F ...] [key=value ...]   the main job on the embedded default
    perturbdiff synth       [--config F ...] [key=value ...]   write a synthetic Tahoe-format dataset
    perturbdiff shard       [--config F ...] [key=value ...]   convert a source into a store
    perturbdiff verify      STORE [--sources DIR]              re-check a store against its manifest
    perturbdiff export-wds  [--config F ...] [key=value ...]   export training sets to WebDataset
    perturbdiff stream      [--config F ...] [key=value ...]   stream sets from a store, print throughput
    perturbdiff predict     --checkpoint DIR --out DIR [--config RUN/config.yaml] [--split test]
                            [--controls H5AD --conditions CSV] [options] [key=value ...]
                                                               sampled populations -> pred.h5ad (+ real.h5ad)

Configs: dataclass defaults <- each --config YAML <- key=value overrides (unknown keys are errors).
The resolved config is saved next to every output. This module is the application layer: it is
the only part of ``perturbdiff`` that calls into ``data_sharding``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig, load_config, resolve_paths, save_config
from .data.schema import DataError
from .train.checkpoint import CheckpointError

DEFAULT_CONFIG = "configs/demo.yaml"


def _load(args) -> RunConfig:
    files = args.config if args.config else ([DEFAULT_CONFIG] if Path(DEFAULT_CONFIG).is_file() else [])
    return resolve_paths(load_config(files, args.overrides))


def stream_throughput(cfg: RunConfig, log=print) -> dict:
    """Iterate ``stream.num_batches`` batches of the loader; report sets/s and cells/s."""
    from .data.loader import SetLoader

    loader = SetLoader(cfg.data, cfg.stream.split, log=log)
    n_batches = min(cfg.stream.num_batches, len(loader))
    if n_batches == 0:
        raise DataError(cfg.data.store, f"split {cfg.stream.split!r} has no complete batch of "
                        f"{cfg.data.sets_per_batch} sets")
    t0, sets, cells, first = time.perf_counter(), 0, 0, None
    for i, batch in enumerate(loader):
        if first is None:
            first = time.perf_counter() - t0
        sets += batch["x"].shape[0]
        cells += int(batch["mask"].sum() + batch["ctrl_mask"].sum())
        if i + 1 >= n_batches:
            break
    dt = time.perf_counter() - t0
    shape = tuple(batch["x"].shape)
    out = {"batches": n_batches, "sets": sets, "cells": cells, "seconds": round(dt, 3),
           "sets_per_s": round(sets / dt, 1), "cells_per_s": round(cells / dt, 1),
           "first_batch_s": round(first, 3), "batch_shape": shape, "num_workers": cfg.data.num_workers}
    log(f"streamed {n_batches} batches x {shape} (set, cell, gene) + matched controls in {dt:.2f}s: "
        f"{sets / dt:,.1f} sets/s, {cells / dt:,.0f} cells/s (first batch {first:.2f}s, "
        f"{cfg.data.num_workers} worker(s))")
    return out


def cmd_synth(cfg: RunConfig) -> None:
    from data_sharding.synthetic import generate

    summary = generate(cfg.synth)
    save_config(cfg, cfg.synth.out_dir)
    print(f"synthetic dataset: {summary['num_cells']:,} cells in {summary['num_files']} parquet file(s) "
          f"under {cfg.synth.out_dir} ({summary['seconds']:.1f}s)")


def cmd_shard(cfg: RunConfig, overwrite: bool) -> None:
    from data_sharding.convert import convert

    if not cfg.shard.inputs:
        raise ConfigError("shard.inputs is empty: give the source files or directories, "
                          "e.g. shard.inputs=[path/to/data]")
    convert(cfg.shard, overwrite=overwrite)
    save_config(cfg, cfg.shard.out)


def cmd_verify(store: str, sources: str | None) -> None:
    from data_sharding.verify import verify

    summary = verify(store, sources)
    print(f"verified: {summary}")


def cmd_export(cfg: RunConfig) -> None:
    from data_sharding.wds_export import export_wds

    export_wds(cfg.data, cfg.wds)
    save_config(cfg, cfg.wds.out)


def _demo_holdout(source: Path):
    """The synthetic data's 4 strongest drug-dose effects in one cell line: a (context x
    perturbation) held-out split in the paper's style, whatever the synthetic size settings."""
    import pandas as pd

    from .config import HoldoutRule

    cond = pd.read_parquet(source / "ground_truth" / "conditions.parquet")
    line = sorted(cond["cell_line_id"].unique())[-1]
    top = cond[cond["cell_line_id"] == line].sort_values("effect_norm", ascending=False).head(4)
    return HoldoutRule(contexts=[str(line)], perturbations=[str(p) for p in top["drugname_drugconc"]])


def cmd_demo(cfg: RunConfig, overwrite: bool) -> None:
    """Main job on the embedded default: synthesise -> shard -> verify -> stream sets -> WebDataset."""
    from data_sharding.convert import convert
    from data_sharding.synthetic import generate
    from data_sharding.verify import verify
    from data_sharding.wds_export import export_wds

    from .data.wds import wds_loader

    t0 = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    print(f"[1/5] synthesise {cfg.synth.num_cells:,} cells x {cfg.synth.num_genes:,} genes "
          f"(Tahoe-100M parquet schema) -> {cfg.synth.out_dir}")
    if overwrite:
        shutil.rmtree(cfg.synth.out_dir, ignore_errors=True)
    try:
        summary = generate(cfg.synth)
    except ValueError as err:
        raise ConfigError(f"{err} (pass --overwrite to replace it, or choose another out_dir=...)") from None
    # a (re)generated source makes any existing store stale
    overwrite = overwrite or summary["num_written"] > 0
    if not cfg.data.split.test and not cfg.data.split.val:
        cfg.data.split.test = [_demo_holdout(Path(cfg.synth.out_dir))]
        rule = cfg.data.split.test[0]
        print(f"      held out for testing: {len(rule.perturbations)} drug-dose conditions in {rule.contexts[0]}")
    save_config(cfg, out)
    print(f"[2/5] shard -> {cfg.shard.out}")
    if not cfg.shard.inputs:
        cfg.shard.inputs = [cfg.synth.out_dir]
    convert(cfg.shard, overwrite=overwrite)
    save_config(cfg, cfg.shard.out)
    print("[3/5] verify the store against its manifest")
    summary = verify(cfg.shard.out, cfg.synth.out_dir, log=lambda s: None)
    print(f"      ok: {summary['num_cells']:,} cells, {summary['num_groups']:,} groups, "
          f"{summary['arrays_checked']} checksums, {summary['sources_checked']} source files")
    print(f"[4/5] stream sets of {cfg.data.set_size} cells + matched controls from the store")
    stats = stream_throughput(cfg)
    print(f"[5/5] export {cfg.wds.epochs} epoch(s) of training sets to WebDataset and stream them")
    manifest = export_wds(cfg.data, cfg.wds, log=lambda s: None)
    save_config(cfg, cfg.wds.out)
    loader, _ = wds_loader(cfg.wds.out, sets_per_batch=cfg.data.sets_per_batch,
                           num_workers=cfg.data.num_workers)
    t1, sets = time.perf_counter(), 0
    for batch in loader:
        sets += batch["x"].shape[0]
    dt = time.perf_counter() - t1
    print(f"      {len(manifest['shards'])} shards, {sets:,} sets streamed in {dt:.2f}s ({sets / dt:,.1f} sets/s)")
    print(f"done in {time.time() - t0:.1f}s. Store: {cfg.shard.out}  (config: {out / 'config.yaml'})")
    print(f"throughput: {stats['sets_per_s']} sets/s, {stats['cells_per_s']:,.0f} cells/s from the store")


def cmd_predict(args) -> None:
    from .predict import (PredictOptions, controls_from_h5ad, predict, predict_split, read_conditions)
    from .train.checkpoint import load_foundation

    opts = PredictOptions(n_cells=args.n_cells, n_samples=args.n_samples, sets_per_batch=args.sets_per_batch,
                          sample_steps=args.sample_steps, guidance=args.guidance, missing_genes=args.missing_genes,
                          control_label=args.control_label, seed=args.seed, device=args.device)
    found = load_foundation(args.checkpoint)
    out = Path(args.out)
    t0 = time.time()
    if args.conditions:
        if not args.controls:
            raise ConfigError("--conditions needs --controls (an h5ad with control cells)")
        from .config import NormalizeConfig

        conditions = read_conditions(args.conditions, opts)
        normalize = NormalizeConfig(**found.manifest.get("extra", {}).get("normalize", {}))
        pool = controls_from_h5ad(args.controls, found.genes, normalize, sorted(conditions["context"].unique()), opts,
                                  pert_col=args.pert_col, context_col=args.context_col, batch_col=args.batch_col)
        paths = [predict(found, conditions, pool, out / "pred.h5ad", opts)]
    else:
        cfg = _load(args)
        paths = list(predict_split(found, cfg.data.store, cfg.data.split, args.split, out, opts))
    print(f"wrote {', '.join(str(p) for p in paths)} in {time.time() - t0:.1f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perturbdiff", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("demo", "main job on the embedded default"), ("synth", "write a synthetic dataset"),
                        ("shard", "convert a source into a store"), ("export-wds", "export sets to WebDataset"),
                        ("stream", "stream sets from a store and print throughput")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--config", action="append", default=[], help="YAML preset (repeatable, merged in order)")
        p.add_argument("--overwrite", action="store_true", help="rebuild outputs that already exist")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.set_size=64")
    p = sub.add_parser("predict", help="sample populations for conditions into an AnnData")
    p.add_argument("--checkpoint", required=True, help="foundation checkpoint directory (e.g. RUN/foundation)")
    p.add_argument("--out", required=True, help="output directory (pred.h5ad, and real.h5ad with --split)")
    p.add_argument("--config", action="append", default=[], help="the run's config (data.store and split rules)")
    p.add_argument("--split", default="test", help="predict this split of data.store (default: test)")
    p.add_argument("--conditions", default=None, help="conditions file (.csv/.tsv/.parquet) instead of a split")
    p.add_argument("--controls", default=None, help="h5ad with the control cells for --conditions")
    p.add_argument("--pert-col", default="perturbation")
    p.add_argument("--context-col", default="context")
    p.add_argument("--batch-col", default=None)
    p.add_argument("--control-label", default="control")
    p.add_argument("--n-cells", type=int, default=256, help="cells per population when conditions do not say")
    p.add_argument("--n-samples", type=int, default=1, help="sampled populations per condition")
    p.add_argument("--sets-per-batch", type=int, default=16)
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--missing-genes", choices=("error", "zero"), default="error")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config")
    p = sub.add_parser("verify", help="re-check a store against its manifest")
    p.add_argument("store")
    p.add_argument("--sources", default=None, help="directory with the source files, to re-hash them")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            cmd_verify(args.store, args.sources)
            return 0
        if args.command == "predict":
            cmd_predict(args)
            return 0
        cfg = _load(args)
        if args.command == "demo":
            cmd_demo(cfg, args.overwrite)
        elif args.command == "synth":
            cmd_synth(cfg)
        elif args.command == "shard":
            cmd_shard(cfg, args.overwrite)
        elif args.command == "export-wds":
            cmd_export(cfg)
        elif args.command == "stream":
            stream_throughput(cfg)
            save_config(cfg, cfg.out_dir)
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"perturbdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
