"""The ``perturbdiff`` command.

    perturbdiff demo        [--config F ...] [key=value ...]   the main job on the embedded default: synthesise,
                                                               shard, pretrain, fine-tune, predict, evaluate, report
    perturbdiff pipeline    [--config F ...] [key=value ...]   the same from shard on, for any data preset
    perturbdiff synth       [--config F ...] [key=value ...]   write a synthetic Tahoe-format dataset
    perturbdiff shard       [--config F ...] [key=value ...]   convert a source into a store
    perturbdiff verify      STORE [--sources DIR]              re-check a store against its manifest
    perturbdiff export-wds  [--config F ...] [key=value ...]   export training sets to WebDataset
    perturbdiff stream      [--config F ...] [key=value ...]   stream sets from a store, print throughput
    perturbdiff predict     --checkpoint DIR --out DIR [--config RUN/config.yaml] [--split test]
                            [--controls H5AD --conditions CSV] [options] [key=value ...]
                                                               sampled populations -> pred.h5ad (+ real.h5ad)
    perturbdiff evaluate    --dir PREDICT_OUT | --pred P --real R [--train T] [--out DIR] [options]
                                                               metrics, baselines, scores -> CSV + summary.json
    perturbdiff report      --eval EVAL_OUT [--run RUN_DIR] [--out DIR]   HTML report with its plots

Configs: dataclass defaults <- each --config YAML <- key=value overrides (unknown keys are errors).
The resolved config is saved next to every output. This module and ``pipeline.py`` are the
application layer: the only parts of ``perturbdiff`` that call into ``data_sharding``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import ConfigError, RunConfig, load_config, resolve_paths, save_config, validate_config
from .data.schema import DataError
from .errors import run_main

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


def cmd_synth(cfg: RunConfig, overwrite: bool) -> None:
    from data_sharding.synthetic import generate

    from .pipeline import prepare_synth_dir

    prepare_synth_dir(cfg.synth.out_dir, overwrite)
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
    from .data.integrity import verify

    summary = verify(store, sources)
    print(f"verified: {summary}")


def cmd_export(cfg: RunConfig, overwrite: bool) -> None:
    from data_sharding.wds_export import export_wds

    export_wds(cfg.data, cfg.wds, overwrite=overwrite)
    save_config(cfg, cfg.wds.out)


def cmd_demo(cfg: RunConfig, overwrite: bool) -> None:
    """The main job on the embedded default: synthesise, then the whole pipeline."""
    from .pipeline import run_pipeline

    run_pipeline(cfg, overwrite, synthetic=True)


def cmd_pipeline(cfg: RunConfig, overwrite: bool) -> None:
    from .pipeline import run_pipeline

    run_pipeline(cfg, overwrite)


# flags that are aliases of config keys: (section, flag dest) -> field; a flag given wins over the config
PREDICT_FLAGS = ("n_cells", "n_samples", "sets_per_batch", "sample_steps", "guidance", "missing_genes", "control_label",
                 "seed", "device", "train_cells", "max_cells", "decode", "start")
EVALUATE_FLAGS = ("control_label", "profile", "de_fdr", "methods", "distances", "seed", "pert_col", "context_col",
                  "batch_col")


def _with_flags(cfg: RunConfig, section: str, args, names) -> RunConfig:
    """``cfg`` with the flags given on the command line written into ``cfg.<section>``, checked again."""
    target = getattr(cfg, section)
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            setattr(target, name, value)
    return validate_config(cfg)


def cmd_predict(args) -> None:
    from . import distributed as pdist

    cfg = _with_flags(_load(args), "predict", args, PREDICT_FLAGS)
    info = pdist.init_distributed()  # under torchrun: the sets are split over the processes / GPUs
    try:
        _predict(args, cfg, info)
    finally:
        pdist.cleanup()


def _predict(args, cfg: RunConfig, info) -> None:
    from .conditions import read_conditions
    from .predict import controls_from_h5ad, predict, predict_split, write_prediction
    from .foundation import load_foundation

    opts = cfg.predict
    found = load_foundation(args.checkpoint)
    out = Path(args.out)
    t0 = time.time()
    if info.world > 1 and info.rank == 0:
        print(f"predicting on {info.world} processes ({info.device.type})")
    if args.conditions:
        if not args.controls:
            raise ConfigError("--conditions needs --controls (an h5ad with control cells)")

        contexts = found.vocabularies.get("context", [])
        only = str(contexts[0]) if len(contexts) == 1 else None  # one context: the columns may leave it out
        conditions = read_conditions(args.conditions, opts, only_context=only)
        normalize = found.normalize

        def body(stage: Path) -> list[Path]:
            pool = controls_from_h5ad(args.controls, found.genes, normalize, sorted(conditions["context"].unique()),
                                      opts, pert_col=args.pert_col, context_col=args.context_col,
                                      batch_col=args.batch_col, only_context=only)
            pred = predict(found, conditions, pool, stage / "pred.h5ad", opts)
            return [pred] if pred is not None else []

        paths = write_prediction(out, body, inputs=[args.checkpoint, args.controls, args.conditions],
                                 overwrite=args.overwrite)
    else:
        paths = predict_split(found, cfg.data.store, cfg.data.split, args.split, out, opts, overwrite=args.overwrite)
    if info.rank == 0:
        print(f"wrote {', '.join(str(p) for p in paths)} in {time.time() - t0:.1f}s")


def cmd_evaluate(args) -> None:
    from .eval.evaluate import evaluate_files, format_table, prediction_files

    if args.dir:
        files = prediction_files(args.dir)  # a complete prediction, or an error naming what is missing
        pred, real = args.pred or files["pred"], args.real or files["real"]
        train = args.train or files["train"]
        out = Path(args.out) if args.out else Path(args.dir) / "eval"
    else:
        if not (args.pred and args.real):
            raise ConfigError("give --dir PREDICT_OUT, or --pred and --real (and --out)")
        pred, real, train = args.pred, args.real, args.train
        out = Path(args.out) if args.out else Path(pred).parent / "eval"
    if args.methods is not None:
        args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.distances = False if args.no_distances else None
    opts = _with_flags(_load(args), "evaluate", args, EVALUATE_FLAGS).evaluate
    for col in ("context_col", "batch_col"):  # '' on the command line: the data have no such column
        if getattr(opts, col) == "":
            setattr(opts, col, None)
    ev = evaluate_files(pred, real, out, train, opts, overwrite=args.overwrite)
    print(format_table(ev))
    if ev.summary["score_baseline"]:
        print(f"score: cell-eval's normalised score against {ev.summary['score_baseline']} "
              "(0 = no better, 1 = perfect)")
    else:
        print("score: none (its baseline, perturbation_mean, needs the training cells: --train)")
    print(f"wrote {out}/ (metrics.csv, aggregated.csv, per_context.csv, scores.csv, summary.json) "
          f"in {ev.summary['seconds']['total']:.1f}s")


def cmd_report(args) -> None:
    from .eval.report import write_report

    path = write_report(args.eval, out=args.out, run_dir=args.run or None, conditions=args.condition or None,
                        overwrite=args.overwrite)
    print(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    from .config import STARTS, EvaluateConfig, PredictConfig
    from .config_rules import DECODES, MISSING_GENES, PROFILES

    PRED, EVAL = PredictConfig(), EvaluateConfig()  # the predict / evaluate flags' defaults (the config's)

    parser = argparse.ArgumentParser(prog="perturbdiff", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("demo", "main job on the embedded default"),
                        ("pipeline", "shard -> pretrain -> fine-tune -> predict -> evaluate -> report"),
                        ("synth", "write a synthetic dataset"),
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
    p.add_argument("--control-label", default=None, help=f"(predict.control_label; default {PRED.control_label!r})")
    p.add_argument("--n-cells", type=int, default=None,
                   help=f"cells per population when conditions do not say (predict.n_cells; default {PRED.n_cells})")
    p.add_argument("--n-samples", type=int, default=None,
                   help=f"sampled populations per condition (predict.n_samples; default {PRED.n_samples})")
    p.add_argument("--sets-per-batch", type=int, default=None, help=f"(default {PRED.sets_per_batch})")
    p.add_argument("--sample-steps", type=int, default=None, help="DDIM steps (default: the checkpoint's)")
    p.add_argument("--guidance", type=float, default=None, help="(default: the checkpoint's)")
    p.add_argument("--missing-genes", choices=MISSING_GENES, default=None, help=f"(default {PRED.missing_genes})")
    p.add_argument("--decode", choices=DECODES, default=None,
                   help="counts: generated cells as attainable counts at their context's library sizes (default); "
                        "continuous: the paper's output")
    p.add_argument("--start", choices=STARTS, default=None,
                   help="controls: each generated cell is a control cell of its context carried to the condition "
                        "(a diffusion bridge); noise: from pure noise (the paper); default: the checkpoint's "
                        "diffusion.start")
    p.add_argument("--seed", type=int, default=None, help=f"(default {PRED.seed})")
    p.add_argument("--device", default=None, help=f"(default {PRED.device})")
    p.add_argument("--train-cells", type=int, default=None,
                   help=f"with --split: cells per training group sampled to train.h5ad for the baselines (0: none; "
                        f"default {PRED.train_cells})")
    p.add_argument("--max-cells", type=int, default=None,
                   help=f"with --conditions: the most cells one call may generate (a guard against typos; default "
                        f"{PRED.max_cells:,})")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier prediction in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the run config (predict.* keys included: "
                   "each flag above is an alias of one)")
    p = sub.add_parser("evaluate", help="score a prediction and the baselines (cell-eval metrics and more)")
    p.add_argument("--dir", default=None, help="a predict output directory (pred.h5ad, real.h5ad, train.h5ad)")
    p.add_argument("--pred", default=None)
    p.add_argument("--real", default=None)
    p.add_argument("--train", default=None, help="training cells, for the perturbation-mean, linear and latent-shift baselines")
    p.add_argument("--out", default=None, help="output directory (default: <dir>/eval)")
    p.add_argument("--config", action="append", default=[], help="YAML config with an evaluate section (repeatable)")
    p.add_argument("--profile", default=None, choices=PROFILES, help=f"(evaluate.profile; default {EVAL.profile})")
    p.add_argument("--methods", default=None, help=f"comma-separated (default {','.join(EVAL.methods)})")
    p.add_argument("--control-label", default=None, help=f"(default {EVAL.control_label!r})")
    p.add_argument("--pert-col", default=None, help=f"obs column of the perturbation labels (default {EVAL.pert_col!r})")
    p.add_argument("--context-col", default=None,
                   help=f"obs column of the context (cell type / line); '' for data with one context (default "
                        f"{EVAL.context_col!r})")
    p.add_argument("--batch-col", default=None, help=f"obs column of the replicate batch ('' for none; default "
                   f"{EVAL.batch_col!r})")
    p.add_argument("--de-fdr", type=float, default=None, help=f"(default {EVAL.de_fdr})")
    p.add_argument("--no-distances", action="store_true", help="skip MMD / energy distance per condition")
    p.add_argument("--seed", type=int, default=None, help=f"(default {EVAL.seed})")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. evaluate.profile=paper (the flags above "
                   "are aliases of evaluate.* keys)")
    p = sub.add_parser("report", help="an HTML report of an evaluation (and the training curves)")
    p.add_argument("--eval", required=True, help="an evaluate output directory")
    p.add_argument("--run", action="append", default=[],
                   help="a training run directory, for its metrics.jsonl curves (repeatable: pretrain, finetune)")
    p.add_argument("--out", default=None, help="output directory (default: <eval>/report)")
    p.add_argument("--condition", action="append", default=[],
                   help="context/perturbation to show in the cell-level plots (repeatable; default: chosen)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p = sub.add_parser("verify", help="re-check a store against its manifest")
    p.add_argument("store")
    p.add_argument("--sources", default=None, help="directory with the source files, to re-hash them")
    args = parser.parse_args(argv)
    return run_main(f"perturbdiff {args.command}", lambda: _dispatch(args))


def _dispatch(args) -> None:
    from .threads import configure_threads

    configure_threads()  # torch threads: this node's cores shared by its processes (OMP_NUM_THREADS wins)
    if args.command == "verify":
        return cmd_verify(args.store, args.sources)
    if args.command in ("predict", "evaluate", "report"):
        return {"predict": cmd_predict, "evaluate": cmd_evaluate, "report": cmd_report}[args.command](args)
    cfg = _load(args)
    if args.command == "demo":
        cmd_demo(cfg, args.overwrite)
    elif args.command == "pipeline":
        cmd_pipeline(cfg, args.overwrite)
    elif args.command == "synth":
        cmd_synth(cfg, args.overwrite)
    elif args.command == "shard":
        cmd_shard(cfg, args.overwrite)
    elif args.command == "export-wds":
        cmd_export(cfg, args.overwrite)
    elif args.command == "stream":
        stream_throughput(cfg)


if __name__ == "__main__":
    sys.exit(main())
