"""What a training run reports: TensorBoard scalars, a metrics log, a progress line, FLOPs and MFU.

Only rank 0 writes. ``Monitor.scalars`` sends a dict of floats to TensorBoard (``<out>/tensorboard``)
and appends one JSON line per call to ``<out>/metrics.jsonl`` (the machine-readable record the tests
and benchmarks read; ``truncate_after(step)`` drops records a resumed run will write again).

MFU (model FLOPs utilisation) = the model's training FLOPs per second / the device's peak dense
FLOP/s. ``mmdit_train_flops`` counts the matrix multiplies of the MM-DiT analytically (2 FLOPs per
multiply-add): fwd + bwd = 3 x forward, plus one gradient-free forward when self-conditioning is on.
Recomputation under activation checkpointing is not model work and is not counted (the usual MFU
convention). The peak table covers the GPUs we run on; elsewhere MFU is not reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..outputs import read_jsonl, repair_jsonl

# Dense peak FLOP/s per device: (bf16, fp32). fp32 matmuls on these GPUs run as TF32 when allowed;
# we count the plain fp32 peak so fp32 MFU is not flattered.
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for ``precision`` ("bf16" | "fp32"), or None if unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, fp32) in PEAK_FLOPS.items():
        if key in name:
            return bf16 if precision == "bf16" else fp32
    return None


def mmdit_forward_flops(model, cells: int, controls: int) -> float:
    """FLOPs of one MM-DiT forward over one set of ``cells`` perturbed and ``controls`` control tokens."""
    W, G, depth = model.width, model.num_genes, model.depth
    ratio = model.cfg.mlp_ratio
    gin = 2 * G if model.self_condition else G
    T = cells + controls
    macs = cells * gin * W + controls * G * W + cells * W * G  # input projections, output head
    per_stream = (4 + 2 * ratio) * W * W  # qkv + out projection + MLP, per token
    for i in range(depth):
        last = i == depth - 1
        macs += cells * per_stream
        macs += controls * (2 * W * W if last else per_stream)  # the last control stream: K/V only
        macs += 2 * cells * T * W if last else 2 * T * T * W  # QK^T and AV (last: perturbed queries only)
    return 2.0 * macs


def mmdit_train_flops(model, cells: int, controls: int, self_cond_pass: bool) -> float:
    """Training FLOPs for one set: forward + backward (3 x forward), plus the no-grad self-cond pass."""
    fwd = mmdit_forward_flops(model, cells, controls)
    return fwd * (4.0 if self_cond_pass else 3.0)


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


class Monitor:
    """Rank 0's reporting; every method is a no-op on other ranks."""

    def __init__(self, out_dir: str | Path, enabled: bool, *, tensorboard: bool = True, progress: bool = True,
                 log=print):
        self.enabled, self.progress, self.log = enabled, progress, log
        self.out = Path(out_dir)
        self.writer = None
        self.metrics_path = self.out / "metrics.jsonl"
        if enabled:
            self.out.mkdir(parents=True, exist_ok=True)
            if repair_jsonl(self.metrics_path):  # a torn last record would glue onto the next append
                log(f"note: {self.metrics_path}: removed a torn last line")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out / "tensorboard"))
        self._t0 = time.perf_counter()
        self._start_step = 0

    def start(self, step: int) -> None:
        self._t0, self._start_step = time.perf_counter(), step

    def truncate_after(self, step: int) -> None:
        """Drop metrics.jsonl records of steps after ``step`` (a resumed run writes them again), and
        any torn or undecodable line (a crash or a full disk during an append); rewritten atomically."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        records, dropped = read_jsonl(self.metrics_path)
        if dropped:
            self.log(f"note: {self.metrics_path}: dropped {dropped} torn or undecodable line(s)")
        tmp = self.metrics_path.with_name(self.metrics_path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= step))
        os.replace(tmp, self.metrics_path)

    def scalars(self, step: int, values: dict[str, float], record: bool = True) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(key, value, step)
        if record:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps({"step": step, **{k: v for k, v in values.items() if v is not None}}) + "\n")

    def progress_line(self, step: int, max_steps: int, values: dict[str, float]) -> None:
        if not (self.enabled and self.progress):
            return
        done = step - self._start_step
        elapsed = time.perf_counter() - self._t0
        eta = elapsed / done * (max_steps - step) if done > 0 else float("nan")
        width = 24
        filled = int(width * step / max(1, max_steps))
        bar = "#" * filled + "-" * (width - filled)
        parts = [f"[{bar}] step {step}/{max_steps}"]
        for key, fmt in (("train/loss", ".4f"), ("train/mse", ".4f"), ("train/mmd", ".4f"), ("train/lr", ".2e"),
                         ("perf/cells_per_s", ",.0f"), ("perf/mfu", ".1%")):
            if values.get(key) is not None:
                parts.append(f"{key.split('/')[1]} {values[key]:{fmt}}")
        parts.append(f"ETA {format_seconds(eta)}")
        self.log("  ".join(parts))
        sys.stdout.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
