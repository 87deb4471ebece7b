"""Prediction throughput and quality against the number of DDIM sampling steps K.

    python benchmarks/bench_predict.py --run runs/demo/finetune --steps 5 10 25 50 100 \
        --out runs/bench/predict_cpu.json
    python benchmarks/bench_predict.py --run RUN --device cuda --sets-per-batch 64 --out runs/bench/predict_h200.json

For each K the held-out (test) conditions of the run's store are predicted with ``n_samples``
populations each (``perturbdiff.predict.predict_split``), timed (cells generated per second, model
load excluded), and scored against the truth: pearson_delta (cell-eval's definition, via the metric
suite), mae, and the energy distance between predicted and real cells per condition. The same seed
is used for every K, so the populations differ only by the sampler. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from perturbdiff.config import load_config, resolve_paths
from perturbdiff.eval.distribution import condition_distances
from perturbdiff.eval.suite import evaluate
from perturbdiff.predict import PredictOptions, predict_split
from perturbdiff.foundation import load_foundation


def run_k(found, cfg, k: int, args, tmp: Path) -> dict:
    import anndata as ad

    opts = PredictOptions(n_samples=args.n_samples, sets_per_batch=args.sets_per_batch, sample_steps=k,
                          seed=args.seed, device=args.device, train_cells=0)
    lines: list[str] = []
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pred_path, real_path = predict_split(found, cfg.data.store, cfg.data.split, "test", tmp / f"k{k}", opts,
                                         log=lines.append)
    wall = time.perf_counter() - t0
    pred, real = ad.read_h5ad(pred_path), ad.read_h5ad(real_path)
    generated = int((~pred.obs["is_control"].to_numpy()).sum())
    res = evaluate(real, pred, metrics=["pearson_delta", "mae"])
    dist = condition_distances(pred, real, device=args.device if args.device != "auto" else "cpu")
    return {"sample_steps": k, "seconds": round(wall, 2), "cells": generated,
            "cells_per_s": round(generated / wall, 1),
            "pearson_delta": float(res.per_condition["pearson_delta"].mean()),
            "mae": float(res.per_condition["mae"].mean()),
            "energy_distance_u": float(dist["energy_distance_u"].mean()),
            "n_conditions": int(len(res.per_condition))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a training run directory (config.yaml + foundation/)")
    ap.add_argument("--steps", type=int, nargs="+", default=[5, 10, 25, 50, 100])
    ap.add_argument("--n-samples", type=int, default=3)
    ap.add_argument("--sets-per-batch", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = Path(args.run)
    cfg = resolve_paths(load_config([str(run / "config.yaml")]))
    found = load_foundation(run / "foundation")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run_k(found, cfg, min(args.steps), args, Path(tmp))  # warm-up (imports, allocator, kernels)
        for k in args.steps:
            rows.append(run_k(found, cfg, k, args, Path(tmp)))
            r = rows[-1]
            print(f"K={k:>4}: {r['cells']:,} cells in {r['seconds']:.1f}s = {r['cells_per_s']:,.0f} cells/s; "
                  f"pearson_delta {r['pearson_delta']:.3f}, mae {r['mae']:.4f}, energy distance "
                  f"{r['energy_distance_u']:.3f}", flush=True)
    result = {"run": str(run), "device": args.device, "torch": torch.__version__, "machine": platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "n_samples": args.n_samples,
              "sets_per_batch": args.sets_per_batch, "set_size": found.set_size,
              "genes": len(found.genes), "model": found.model_cfg.size,
              "parameters": int(sum(np.prod(v) for v in [p.shape for p in found.build().parameters()])),
              "rows": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
