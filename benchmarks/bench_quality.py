"""Prediction quality on held-out data: the model, every baseline and the ceiling, over splits and seeds.

    python benchmarks/bench_quality.py --out runs/bench/quality                  # everything (~30 min, 2 cores)
    python benchmarks/bench_quality.py --splits devel_unseen_context --seeds 0    # one split, one seed

Each run is the held-out protocol in one command (``perturbdiff pipeline``: shard once, pretrain,
fine-tune, predict the test split with the default counts decoding, evaluate beside the baselines),
at a FIXED CPU budget per run: ``--pretrain-steps`` + ``--finetune-steps`` optimiser steps of
8 sets (tiny MM-DiT), 3 sampled populations, 25 DDIM steps. The same fine-tuned model is then
sampled again with other sampling choices (``VARIANTS``: guidance w = 0 and 1, the paper's start
from noise, its continuous output, and the previous default: from noise at w = 0) and scored beside
the perturbation-mean baseline, so each choice is compared on the same weights.

Splits (``--splits``):

    devel_unseen_context    the real devel h5ad (../shared/data): every perturbed U87MG cell held out
                            (an unseen cell type; its 100 controls given), 9 CRISPRi perturbations
    devel_heldout_pert      devel: 5 perturbations held out in K562 (CRISPRa), seen in the other lines
    synth_context_pert      the synthetic generator: the 4 strongest drug-dose effects of one cell line
    synth_heldout_plate     synthetic: the same 4 conditions on ONE plate (a held-out replicate); their
                            other plates stay in training

(devel has no held-out-batch split: its batch column, the source study, is confounded with cell type.)
Seeds (``--seeds``) change the training seed, the sampling and the baselines' draws. Writes
``OUT/results.json`` (every run's headline means, fidelity and normalised score) and, per split,
method x metric mean +- sd over seeds as markdown tables: every metric (``OUT/tables.md``) and the
summary printed at the end (``OUT/summary.md``). A run already in results.json is not run again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEVEL = ROOT.parent / "shared" / "data" / "perturbench_devel_norman19_mcfaline23.h5ad"
SHARED9 = ["MAP2K3", "MAP2K6", "MAP3K21", "MAP4K3", "MAP4K5", "MAPK1", "PLK4", "SGK1", "TGFBR2"]
METRICS = ("pearson_delta", "mae", "mse_delta", "discrimination_score_l1", "overlap_at_N", "energy_distance_u",
           "mmd2", "avg_score", "zero_frac_pred", "zero_frac_real", "subcount_frac_pred", "sd_ratio",
           "delta_norm_ratio", "max_pred", "de_nsig_counts_pred", "de_nsig_counts_real")


# the default model (start=controls, guidance 0.5, counts) sampled again with other choices
VARIANTS = {"model (w=0)": {"guidance": 0.0}, "model (w=1)": {"guidance": 1.0},
            "model (noise start)": {"start": "noise"}, "model (continuous)": {"decode": "continuous"},
            "model (noise start, w=0: the previous default)": {"start": "noise", "guidance": 0.0}}


def split_overrides(split: str) -> tuple[list[str], list[str], bool]:
    """(config files, overrides, synthetic) for one split."""
    if split.startswith("devel"):
        if not DEVEL.is_file():
            raise SystemExit(f"{DEVEL} not found: the devel splits need ../shared/data")
        files = [str(ROOT / "configs" / "data" / "devel_h5ad.yaml")]
        base = [f"shard.inputs=[{DEVEL}]", "data.set_size=32", "data.sets_per_batch=8", "model.size=tiny"]
        if split == "devel_unseen_context":
            rule = f"{{contexts: [U87MG], perturbations: [{', '.join(SHARED9)}]}}"
        elif split == "devel_heldout_pert":
            rule = "{contexts: [k562], perturbations: [MAPK1, PLK4, SGK1, TGFBR2, MAP2K3]}"
        else:
            raise SystemExit(f"unknown split {split}")
        return files, [*base, f"data.split.test=[{rule}]", "data.split.val=[{contexts: [T98G], perturbations: "
                       "[MAP4K5]}]"], False
    files = [str(ROOT / "configs" / "demo.yaml")]
    base = ["synth.num_cells=12000", "synth.cells_per_file=4000", "data.set_size=32", "data.sets_per_batch=8"]
    if split == "synth_context_pert":
        return files, base, True
    if split == "synth_heldout_plate":
        return files, base, True  # the rule is set from the ground truth after synthesis (see run_one)
    raise SystemExit(f"unknown split {split}")


def _plate_rule(cfg) -> None:
    """synth_heldout_plate: the demo's test conditions on one plate only."""
    from perturbdiff.config import HoldoutRule
    from perturbdiff.pipeline import demo_holdout

    test, val = demo_holdout(Path(cfg.synth.out_dir))
    cfg.data.split.test = [HoldoutRule(contexts=test.contexts, batches=[_last_plate(cfg)],
                                       perturbations=test.perturbations)]
    cfg.data.split.val = [val]


def _last_plate(cfg) -> str:
    from perturbdiff.data.store import CellStore

    return sorted(CellStore(cfg.data.store).conditions["batch"].astype(str).unique())[-1]


def run_one(split: str, seed: int, args, out: Path) -> dict:
    from perturbdiff.config import load_config
    from perturbdiff.eval.evaluate import EvaluateOptions, evaluate_files
    from perturbdiff.pipeline import build_store, run_pipeline, synthesise, Stages
    from perturbdiff.predict import PredictOptions, predict_split
    from perturbdiff.foundation import load_foundation

    files, overrides, synthetic = split_overrides(split)
    run_dir = out / split / f"seed{seed}"
    store = out / "stores" / ("devel.zarr" if split.startswith("devel") else "synth.zarr")
    common = [f"out_dir={run_dir}", f"data.store={store}", f"shard.out={store}", f"train.seed={seed}",
              f"pipeline.pretrain_steps={args.pretrain_steps}", f"pipeline.finetune_steps={args.finetune_steps}",
              "predict.n_samples=3", "pipeline.report=false", "diffusion.sample_steps=25", "train.ckpt_every=0",
              "train.optim.lr=1e-3", "train.val_every=0", "train.sample_every=0", "data.num_workers=0"]
    if synthetic:
        common += [f"synth.out_dir={out / 'stores' / 'synth_source'}"]
    cfg = load_config(files, [*overrides, *common])
    t0 = time.time()
    if split == "synth_heldout_plate":
        # synthesise + shard first so the rule can name a plate of the store; the pipeline then reuses both
        stage = Stages(2, log=lambda s: None)
        synthesise(cfg, False, stage)
        build_store(cfg, False, stage, cfg.synth.out_dir)
        _plate_rule(cfg)
        synthetic = False
    run_pipeline(cfg, overwrite=False, synthetic=synthetic)
    seconds = time.time() - t0
    # the same weights, sampled with the paper's choices one at a time
    found = load_foundation(run_dir / "finetune" / "foundation")
    rows = _rows(run_dir / "eval")
    for name, change in VARIANTS.items():
        vdir = run_dir / ("variant_" + "_".join(f"{k}-{v}" for k, v in change.items()))
        opts = PredictOptions(n_samples=3, sample_steps=25, train_cells=0, seed=seed, **change)
        pred, real, *_ = predict_split(found, str(store), cfg.data.split, "test", vdir / "predict", opts,
                                       log=lambda s: None, overwrite=True)
        ev = evaluate_files(pred, real, vdir / "eval", run_dir / "predict" / "train.h5ad",
                            EvaluateOptions(seed=seed, methods=("model", "perturbation_mean")), log=lambda s: None,
                            overwrite=True)
        rows += [{**r, "method": name} for r in _rows(vdir / "eval") if r["method"] == "model"]
    return {"split": split, "seed": seed, "seconds": seconds, "rows": rows,
            "n_conditions": int(ev.metrics[ev.metrics["method"] == "model"].shape[0])}


def _rows(eval_dir: Path) -> list[dict]:
    agg = pd.read_csv(eval_dir / "aggregated.csv")
    mean = agg.pivot(index="method", columns="metric", values="mean")
    scores = pd.read_csv(eval_dir / "scores.csv")
    avg = scores[scores["metric"] == "avg_score"].set_index("method")["from_baseline"]
    out = []
    for method in mean.index:
        row = {"method": method, **{m: float(mean.at[method, m]) for m in METRICS if m in mean.columns}}
        row["avg_score"] = float(avg.get(method, np.nan))
        out.append(row)
    return out


SUMMARY = ("pearson_delta", "mae", "energy_distance_u", "avg_score", "zero_frac_pred", "zero_frac_real",
           "subcount_frac_pred", "sd_ratio", "delta_norm_ratio")


def tables(results: list[dict], metrics=METRICS) -> str:
    lines = []
    for split in dict.fromkeys(r["split"] for r in results):
        runs = [r for r in results if r["split"] == split]
        df = pd.DataFrame([{**row, "seed": r["seed"]} for r in runs for row in r["rows"]])
        cols = [m for m in metrics if m in df.columns]
        order = ["model", *VARIANTS, "control_mean", "perturbation_mean", "linear", "latent_shift",
                 "ceiling"]
        lines += [f"\n### {split} ({len(runs)} seed(s), {runs[0]['n_conditions']} conditions, "
                  f"{np.mean([r['seconds'] for r in runs]):.0f} s per run)\n",
                  "| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for method in [m for m in order if m in set(df["method"])]:
            sub = df[df["method"] == method]
            cells = []
            for c in cols:
                v = sub[c].astype(float)
                cells.append("" if v.isna().all() else f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0:.3f}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench/quality")
    ap.add_argument("--splits", default="devel_unseen_context,devel_heldout_pert,synth_context_pert,synth_heldout_plate")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pretrain-steps", type=int, default=150)
    ap.add_argument("--finetune-steps", type=int, default=1500)
    ap.add_argument("--train-cells", type=int, default=256)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else []
    done = {(r["split"], r["seed"]) for r in results}
    for split in args.splits.split(","):
        for seed in args.seeds:
            if (split, seed) in done:
                continue
            print(f"== {split} seed {seed}", flush=True)
            results.append(run_one(split, seed, args, out))
            path.write_text(json.dumps(results, indent=1))
            (out / "tables.md").write_text(tables(results))
    (out / "summary.md").write_text(tables(results, SUMMARY))
    print(tables(results, SUMMARY))


if __name__ == "__main__":
    main()
