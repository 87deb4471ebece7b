"""Model throughput: MM-DiT forward + backward of the full training loss, in cells per second.

One step = SetDiffusion.loss (noising, the self-conditioning pass with its probability, the network
on the perturbed + control streams, per-gene MSE + energy MMD^2 through the KME op) and backward.
Throughput counts perturbed cells (sets x set_size) per second; the control stream adds the same
number of tokens again. Parameters and a FLOP estimate (matmuls only, forward x 3 for forward +
backward, self-conditioning pass excluded) are printed beside it.

    python benchmarks/bench_model.py --device cpu --preset paper --sets 2 --steps 3
    python benchmarks/bench_model.py --device cuda --preset paper --sets 16 --steps 20 --out model.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext

import torch

from perturbdiff.config import DiffusionConfig, ModelConfig
from perturbdiff.diffusion import SetDiffusion
from perturbdiff.models import build_model


def matmul_flops(model, sets: int, m: int, genes: int) -> float:
    """Forward matmul FLOPs of one batch: 2 x parameters-touched per token, plus attention scores."""
    W, depth = model.width, model.depth
    tokens = sets * 2 * m  # perturbed + control
    per_token_block = 2 * (3 * W * W + W * W + 2 * 4 * W * W)  # qkv, out proj, MLP (ratio 4)
    attention = 2 * 2 * sets * (2 * m) ** 2 * W  # QK^T and PV over the joint 2m tokens
    io = 2 * sets * m * (2 * genes * W + W * genes) + 2 * sets * m * genes * W  # x/ctrl embed, head
    return depth * (tokens * per_token_block + attention) + io


def run(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab = {"context": 50, "batch": 200, "perturbation": 1000}
    model = build_model(ModelConfig(size=args.preset), args.genes, vocab).to(device)
    diffusion = SetDiffusion(DiffusionConfig(kme_impl="auto", p_self_cond=args.p_self_cond))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    B, m, G = args.sets, args.set_size, args.genes
    gen = torch.Generator(device=device).manual_seed(0)
    batch = {"x": torch.rand(B, m, G, device=device) * 0.8, "mask": torch.ones(B, m, dtype=torch.bool, device=device),
             "ctrl": torch.rand(B, m, G, device=device) * 0.8, "ctrl_mask": torch.ones(B, m, dtype=torch.bool, device=device),
             "context": torch.randint(0, 50, (B,), device=device), "batch": torch.randint(0, 200, (B,), device=device),
             "perturbation": torch.randint(0, 1000, (B,), device=device), "num_dose": torch.rand(B, device=device)}
    rows = []
    for dtype in args.dtypes.split(","):
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()

        def step(amp=amp):
            with amp:
                out = diffusion.loss(model, batch, gen)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()

        for _ in range(args.warmup):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        med = sorted(times)[len(times) // 2]
        flops = 3 * matmul_flops(model, B, m, G)
        row = {"dtype": dtype, "preset": args.preset, "params_M": round(model.num_parameters() / 1e6, 1),
               "sets": B, "set_size": m, "genes": G, "step_s": round(med, 4),
               "cells_per_s": round(B * m / med, 1), "tflops": round(flops / med / 1e12, 3)}
        if device.type == "cuda":
            row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(row, flush=True)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "p_self_cond": args.p_self_cond,
            "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default="paper")
    p.add_argument("--sets", type=int, default=2)
    p.add_argument("--set-size", type=int, default=256)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--p-self-cond", type=float, default=0.5, help="0.0 = one network pass per step")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
