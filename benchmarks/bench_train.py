"""Training throughput (cells/s per device) and peak memory of the real training step.

What is timed: ``Engine.train_step`` (perturbdiff/train/engine.py) with the real ``SetDiffusion`` loss
(default DiffusionConfig, kme_impl "auto": noising, the gradient-free self-conditioning pass, the MM-DiT
on the perturbed + control streams, MSE + energy MMD^2), backward, gradient all-reduce (DDP / ZeRO),
clipping, AdamW and the LR schedule: everything of a training step except the data loader. Each rank
draws its batch once before timing: --sets sets of --cells perturbed cells and --cells control cells,
--genes genes, full masks, expression log1p(Poisson counts) with log-normal per-gene rates and per-cell
size factors (mostly zeros, like HVG log counts), random covariates (context, batch, perturbation, dose).

Every configuration (procs x precision x checkpointing) runs in fresh processes (this script re-invoked
with --worker), so peak memory never carries over: procs=1 is one process without a process group (the
DDP engine is the plain module); procs=N spawns N ranks on gloo (CPU) or nccl (one GPU per rank). On CPU
each rank gets torch.set_num_threads(max(1, usable cores // procs)) (--threads overrides), so ranks share
the cores; the figure is in the output. W warm-up steps, then N timed steps (time.perf_counter, CUDA
synchronised); a step's time is the slowest rank's.

Reported per configuration:
  cells/s per device = sets x cells per rank / mean step time (perturbed cells; controls not counted);
  total cells/s = that x procs; step time mean and std;
  memory, max over ranks. CPU: peak RSS (ru_maxrss semantics: the process peak, imports, model, data and
  steps included) and "step +MiB", the steady-state step's peak over the RSS before the timed steps
  (VmHWM reset through /proc/self/clear_refs after warm-up; "-" if the kernel refuses). CUDA:
  torch.cuda.max_memory_allocated / max_memory_reserved over the timed steps (reset after warm-up);
  TFLOP/s per device from perturbdiff.train.monitor.mmdit_train_flops (matmuls; forward x 3 plus the
  no-grad self-conditioning pass, which objective.py always runs when p_self_cond > 0; recomputation
  under activation checkpointing is not counted) and MFU = that / monitor.peak_flops (CUDA only).
Ratios: procs P vs the fewest procs (total and per-device cells/s), checkpointing on vs off (cells/s and
peak memory), at equal other settings. --find-max-sets (CUDA, procs=1): doubles the sets per rank from
--sets until torch.cuda.OutOfMemoryError (two steps per probe, cache emptied after an OOM), then times
the largest that fits. A configuration that fails ends as an "OOM" / "error" / "timeout" row.

CPU (the paper preset; the whole machine to itself, nothing else running):
    python benchmarks/bench_train.py --device cpu --preset paper --genes 2000 --cells 256 --sets 2 \\
        --procs 1 2 --precision fp32 --checkpointing off on --steps 5 --warmup 1 --out runs/bench/train_cpu.json
H200 (fixed batch, then the largest set batch that fits; target >= 35% MFU in bf16 there):
    python benchmarks/bench_train.py --device cuda --preset paper --genes 2000 --cells 256 --sets 16 \\
        --procs 1 --precision fp32 bf16 --checkpointing off on --steps 20 --warmup 3 --out runs/bench/train_h200.json
    python benchmarks/bench_train.py --device cuda --preset paper --genes 2000 --cells 256 --sets 16 \\
        --procs 1 --precision bf16 fp32 --checkpointing off on --find-max-sets --out runs/bench/train_h200_max.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kme import _cpu_name, _fmt, _hwm_bytes, _is_oom, _print_grid, _reset_hwm, _rss_bytes, _write  # noqa: E402

VOCAB = {"context": 50, "batch": 200, "perturbation": 1000}
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MiB, GiB = 2**20, 2**30


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Worker: one rank of one configuration (a fresh process)
# ---------------------------------------------------------------------------------------------


def make_batch(sets: int, cells: int, genes: int, device, seed: int) -> dict:
    """A loader-like batch drawn on ``device``: log1p Poisson counts, full masks, random covariates."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    rate = torch.exp(torch.randn(genes, generator=g, device=device) * 1.5 - 1.5)  # per-gene mean count

    def expression():
        size = torch.exp(torch.randn(sets, cells, 1, generator=g, device=device) * 0.3)  # library size
        return torch.log1p(torch.poisson(rate * size, generator=g))

    ones = torch.ones(sets, cells, dtype=torch.bool, device=device)
    return {"x": expression(), "mask": ones, "ctrl": expression(), "ctrl_mask": ones.clone(),
            **{k: torch.randint(0, n, (sets,), generator=g, device=device) for k, n in VOCAB.items()},
            "num_dose": 10.0 ** (torch.rand(sets, generator=g, device=device) * 2 - 1)}


def worker(case: dict) -> dict:
    import logging

    import torch

    from perturbdiff.config import DiffusionConfig, EngineConfig, ModelConfig, OptimConfig
    from perturbdiff.diffusion import SetDiffusion
    from perturbdiff.models import build_model
    from perturbdiff.ops.kme import resolve_impl
    from perturbdiff import distributed as pdist
    from perturbdiff.train.engine import create_engine
    from perturbdiff.train.monitor import mmdit_train_flops, peak_flops

    torch.set_num_threads(case["threads"])
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    info = pdist.init_distributed(timeout_s=case["dist_timeout"])
    cuda = case["device"] == "cuda"
    device = info.device if cuda else torch.device("cpu")
    if cuda and device.type != "cuda":
        raise RuntimeError("--device cuda but torch sees no GPU in the worker")
    row = {"rank": info.rank, "world": info.world, "threads": torch.get_num_threads()}
    try:
        torch.manual_seed(0)
        model = build_model(ModelConfig(size=case["preset"]), case["genes"], VOCAB)
        diffusion = SetDiffusion(DiffusionConfig(kme_impl="auto"))
        ecfg = EngineConfig(backend=case["backend"], zero_stage=case["zero_stage"], precision=case["precision"],
                            activation_checkpointing=case["checkpointing"] == "on")
        engine = create_engine(model, ecfg, OptimConfig(), 10**6, device, micro_batch_sets=case["sets"])
        gen = torch.Generator(device=device).manual_seed(1000 + info.rank)

        def loss_fn(net, micro):
            return diffusion.loss(net, micro, gen)

        def sync():
            if cuda:
                torch.cuda.synchronize(device)

        sets, cells, genes = case["sets"], case["cells"], case["genes"]
        if case["find_max"]:
            sets, row["probes"] = find_max_sets(engine, loss_fn, case, device)
            if sets is None:
                return dict(row, status="OOM", detail=f"{case['sets']} sets per rank do not fit")
        batch = make_batch(sets, cells, genes, device, seed=10 + info.rank)
        row.update(sets=sets, kme_impl=resolve_impl("auto", device), params=sum(p.numel() for p in engine.module.parameters()),
                   zero_fraction=round(float((batch["x"] == 0).float().mean()), 3))
        for _ in range(case["warmup"]):
            engine.train_step(loss_fn, [batch])
        sync()
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        else:
            peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # setup + warm-up
            reset = _reset_hwm()
            base = _rss_bytes()
        pdist.barrier()
        times, out = [], {}
        for _ in range(case["steps"]):
            sync()
            t0 = time.perf_counter()
            out = engine.train_step(loss_fn, [batch])
            sync()
            times.append(time.perf_counter() - t0)
        if cuda:
            row.update(alloc_gib=round(torch.cuda.max_memory_allocated(device) / GiB, 2),
                       reserved_gib=round(torch.cuda.max_memory_reserved(device) / GiB, 2))
        else:
            hwm = _hwm_bytes()
            row.update(peak_rss_mib=round(max(peak_before, hwm) / MiB, 1),
                       step_mib=round(max(0, hwm - base) / MiB, 1) if reset else None)
        self_cond = bool(getattr(engine.module, "self_condition", False)) and diffusion.cfg.p_self_cond > 0
        row.update(status="ok", times=times, loss=out.get("loss"), self_cond_pass=self_cond,
                   flops_per_step=sets * mmdit_train_flops(engine.module, cells, cells, self_cond),
                   peak_flops=peak_flops(device, engine.precision))
    except Exception as exc:  # noqa: BLE001 (every failure becomes a row)
        row.update(status="OOM" if _is_oom(exc) else "error", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        pdist.cleanup()
    return row


def find_max_sets(engine, loss_fn, case: dict, device) -> tuple[int | None, list]:
    """Double the sets per rank from case["sets"] until a step runs out of memory; (largest fit, probes)."""
    import torch
    sets, best, probes = case["sets"], None, []
    while sets <= case["max_sets"]:
        t0, ok = time.perf_counter(), False
        try:
            batch = make_batch(sets, case["cells"], case["genes"], device, seed=99)
            for _ in range(2):  # the first step also allocates the optimizer state
                engine.train_step(loss_fn, [batch])
            torch.cuda.synchronize(device)
            ok = True
        except Exception as exc:  # noqa: BLE001
            if not _is_oom(exc):
                raise
        finally:
            batch = None
            engine.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
        probes.append({"sets": sets, "fits": ok, "s": round(time.perf_counter() - t0, 2)})
        print(f"  probe {sets} sets per rank: {'fits' if ok else 'OOM'}", file=sys.stderr, flush=True)
        if not ok:
            break
        best, sets = sets, sets * 2
    return best, probes


# ---------------------------------------------------------------------------------------------
# Parent: one configuration = procs fresh processes
# ---------------------------------------------------------------------------------------------


def run_config(case: dict, args) -> dict:
    procs = case["procs"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(PERTURBDIFF_DS_SHM_COMM="0", PYTHONUNBUFFERED="1")
    if case["device"] == "cpu":  # also on a GPU machine: init_distributed would otherwise pick CUDA / nccl
        env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(case["threads"]),
                   MKL_NUM_THREADS=str(case["threads"]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
    for attempt in range(2):  # the free port can be taken between the pick and the bind
        port = None
        if procs > 1:
            from perturbdiff.distributed import free_port
            port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            handles = []
            for rank in range(procs):
                renv = dict(env)
                if port is not None:
                    renv.update(RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_RANK=str(rank),
                                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                out, err = open(Path(tmp, f"{rank}.out"), "w+"), open(Path(tmp, f"{rank}.err"), "w+")
                handles.append((subprocess.Popen(cmd, cwd=ROOT, env=renv, stdout=out, stderr=err), out, err))
            deadline, timed_out = time.time() + args.timeout, False
            for proc, _, _ in handles:
                try:
                    proc.wait(timeout=max(1.0, deadline - time.time()))
                except subprocess.TimeoutExpired:
                    timed_out = True
            for proc, _, _ in handles:  # only the processes started here, by their handles
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            ranks, errors = [], []
            for proc, out, err in handles:
                out.seek(0)
                err.seek(0)
                text, etext = out.read(), err.read()
                out.close()
                err.close()
                res = [json.loads(line[7:]) for line in text.splitlines() if line.startswith("RESULT ")]
                if res:
                    ranks.append(res[-1])
                else:
                    errors.append(f"exit {proc.returncode}: {etext.strip()[-300:]}")
        if errors and attempt == 0 and any("address already in use" in e.lower() for e in errors):
            continue
        break
    if timed_out:
        return dict(case, status="timeout", detail=f"over --timeout {args.timeout}s")
    if errors:
        killed = any(e.startswith("exit -9") or e.startswith("exit 137") for e in errors)
        return dict(case, status="OOM" if killed else "error", detail=errors[0])
    return summarize(case, ranks)


def summarize(case: dict, ranks: list[dict]) -> dict:
    row = dict(case)
    bad = [r for r in ranks if r["status"] != "ok"]
    if bad:
        row.update(status=bad[0]["status"], detail=bad[0].get("detail"), probes=bad[0].get("probes"))
        return row
    r0 = ranks[0]
    steps = [max(r["times"][i] for r in ranks) for i in range(len(r0["times"]))]  # the slowest rank's
    mean = statistics.mean(steps)
    per_dev = r0["sets"] * case["cells"] / mean
    row.update(status="ok", sets=r0["sets"], threads=r0["threads"], params=r0["params"], kme_impl=r0["kme_impl"],
               zero_fraction=r0["zero_fraction"], loss=r0["loss"], step_s=mean,
               step_std=statistics.stdev(steps) if len(steps) > 1 else 0.0, step_times=steps,
               cells_per_s_dev=per_dev, cells_per_s_total=per_dev * len(ranks),
               tflops_dev=r0["flops_per_step"] / mean / 1e12, self_cond_pass=r0["self_cond_pass"])
    row["mfu"] = r0["flops_per_step"] / mean / r0["peak_flops"] if r0["peak_flops"] else None
    if "probes" in r0:
        row["probes"] = r0["probes"]
    for key in ("peak_rss_mib", "step_mib", "alloc_gib", "reserved_gib"):
        vals = [r.get(key) for r in ranks]
        row[key] = max(vals) if all(v is not None for v in vals) else None
    return row


def ratios(rows: list[dict]) -> dict:
    ok = {(r["procs"], r["precision"], r["checkpointing"]): r for r in rows if r.get("status") == "ok"}
    procs = sorted({k[0] for k in ok})
    out = {"procs": [], "checkpointing": []}
    for (p, prec, ck), r in sorted(ok.items()):
        base = ok.get((procs[0], prec, ck)) if procs else None
        if p != procs[0] and base:
            out["procs"].append({"precision": prec, "checkpointing": ck, "procs": f"{p} vs {procs[0]}",
                                 "total_cells_per_s": r["cells_per_s_total"] / base["cells_per_s_total"],
                                 "cells_per_s_dev": r["cells_per_s_dev"] / base["cells_per_s_dev"]})
        off = ok.get((p, prec, "off"))
        if ck == "on" and off:
            entry = {"procs": p, "precision": prec, "cells_per_s": r["cells_per_s_dev"] / off["cells_per_s_dev"],
                     "sets": f"{off['sets']} -> {r['sets']}"}
            for key in ("peak_rss_mib", "step_mib", "alloc_gib", "reserved_gib"):
                if r.get(key) is not None and off.get(key):
                    entry[key] = r[key] / off[key]
            out["checkpointing"].append(entry)
    return out


def print_tables(res: dict) -> None:
    cuda = res["meta"]["device"] == "cuda"
    mem = ["alloc GiB", "reserved GiB"] if cuda else ["peak RSS MiB", "step +MiB"]
    lines = [["procs", "prec", "ckpt", "sets/rank", "thr/rank", "status", "step s", "std", "cells/s/dev",
              "cells/s total", *mem, "TFLOP/s/dev"] + (["MFU"] if cuda else [])]
    for r in res["rows"]:
        ok = r.get("status") == "ok"
        m = [_fmt(r.get("alloc_gib")), _fmt(r.get("reserved_gib"))] if cuda else \
            [_fmt(r.get("peak_rss_mib"), ".0f"), _fmt(r.get("step_mib"), ".0f")]
        line = [r["procs"], r["precision"], r["checkpointing"], r.get("sets"), r.get("threads"), r.get("status"),
                _fmt(r.get("step_s"), ".3f"), _fmt(r.get("step_std"), ".3f"), _fmt(r.get("cells_per_s_dev"), ",.0f"),
                _fmt(r.get("cells_per_s_total"), ",.0f"), *m, _fmt(r.get("tflops_dev"), ".3f")]
        line += [_fmt(r.get("mfu"), ".1%") if ok else "-"] if cuda else []
        lines.append([str(v) for v in line])
    print("| " + " | ".join(lines[0]) + " |")
    print("|" + "|".join("---:" for _ in lines[0]) + "|")
    for line in lines[1:]:
        print("| " + " | ".join(line) + " |")
    for r in res["rows"]:
        if r.get("status") != "ok":
            print(f'  procs={r["procs"]} {r["precision"]} ckpt={r["checkpointing"]}: {r["status"]}: {r.get("detail")}')
        if r.get("probes"):
            print(f'  procs={r["procs"]} {r["precision"]} ckpt={r["checkpointing"]} probes: '
                  + ", ".join(f'{p["sets"]}:{"fits" if p["fits"] else "OOM"}' for p in r["probes"]))
    rat = res["ratios"]
    if rat["procs"]:
        print("\nprocs speedup (cells/s ratio; total = all ranks, per device = one rank)")
        grid = [["precision", "ckpt", "procs", "total", "per device"]]
        grid += [[e["precision"], e["checkpointing"], e["procs"], f'{e["total_cells_per_s"]:.2f}',
                  f'{e["cells_per_s_dev"]:.2f}'] for e in rat["procs"]]
        _print_grid(grid)
    if rat["checkpointing"]:
        keys = ["alloc_gib", "reserved_gib"] if cuda else ["peak_rss_mib", "step_mib"]
        print("\nactivation checkpointing on / off (cells/s per device ratio; memory ratios)")
        grid = [["procs", "precision", "sets", "cells/s", *keys]]
        grid += [[str(e["procs"]), e["precision"], e["sets"], f'{e["cells_per_s"]:.2f}',
                  *[_fmt(e.get(k), ".2f") for k in keys]] for e in rat["checkpointing"]]
        _print_grid(grid)


def machine_info(device: str) -> dict:
    import torch
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    if device == "cuda":
        info.update(device_name=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                    cuda=torch.version.cuda, tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--preset", default="paper", help="ModelConfig.size")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, default=256, help="perturbed cells per set (and as many control cells)")
    p.add_argument("--sets", type=int, default=2, help="sets per rank per step (start of --find-max-sets)")
    p.add_argument("--procs", type=int, nargs="+", default=None, help="default: 1 2 on cpu, 1 on cuda")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32 on cpu, fp32 bf16 on cuda")
    p.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    p.add_argument("--backend", choices=["ddp", "deepspeed"], default="ddp")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="timed steps (cpu 3, cuda 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (cpu 1, cuda 3)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank (default cores // procs)")
    p.add_argument("--find-max-sets", action="store_true", help="cuda, procs=1: time the largest set batch")
    p.add_argument("--max-sets", type=int, default=8192, help="--find-max-sets stops doubling here")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per configuration before its ranks are killed")
    p.add_argument("--out", default=None, help="JSON results (default runs/bench/train_<device>.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:  # one rank of one configuration
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    if args.find_max_sets and device != "cuda":
        raise SystemExit("--find-max-sets needs --device cuda (it probes for torch.cuda.OutOfMemoryError)")
    procs = args.procs or ([1, 2] if device == "cpu" else [1])
    precisions = args.precision or (["fp32"] if device == "cpu" else ["fp32", "bf16"])
    steps = args.steps if args.steps is not None else (3 if device == "cpu" else 20)
    warmup = args.warmup if args.warmup is not None else (1 if device == "cpu" else 3)
    out_path = args.out or str(ROOT / "runs" / "bench" / f"train_{device}.json")
    meta = machine_info(device)
    meta.update(preset=args.preset, genes=args.genes, cells=args.cells, sets=args.sets, backend=args.backend,
                zero_stage=args.zero_stage if args.backend == "deepspeed" else None, steps=steps, warmup=warmup,
                find_max_sets=args.find_max_sets, diffusion="DiffusionConfig() defaults, kme_impl auto",
                threads_rule=f"--threads {args.threads}" if args.threads else "max(1, usable cores // procs) per rank",
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"# {meta.get('device_name', meta['cpu'])}, torch {meta['torch']}, {meta['usable_cores']} usable cores; "
          f"preset {args.preset}, {args.sets} sets x {args.cells} cells x {args.genes} genes per rank, "
          f"{args.backend}, {warmup} warm-up + {steps} timed steps", flush=True)
    busy = os.getloadavg()[0]
    if busy > max(0.5, 0.1 * usable_cores()):
        meta["warning"] = (f"machine not quiet: 1-min load average {busy:.2f} on {usable_cores()} cores at the start; "
                           "timings (especially multi-threaded CPU ones, OpenMP spin-waits) are unreliable")
        print("WARNING:", meta["warning"], flush=True)
    res = {"meta": meta, "rows": [], "ratios": {"procs": [], "checkpointing": []}}
    t_start = time.time()
    for n in procs:
        for prec in precisions:
            for ck in args.checkpointing:
                case = {"device": device, "procs": n, "precision": prec, "checkpointing": ck, "preset": args.preset,
                        "genes": args.genes, "cells": args.cells, "sets": args.sets, "backend": args.backend,
                        "zero_stage": args.zero_stage, "steps": steps, "warmup": warmup,
                        "threads": args.threads or max(1, usable_cores() // n),
                        "find_max": args.find_max_sets, "max_sets": args.max_sets, "dist_timeout": 600.0}
                if device == "cuda" and n > torch.cuda.device_count():
                    row = dict(case, status="skipped", detail=f"{torch.cuda.device_count()} GPU(s) for {n} ranks")
                elif args.find_max_sets and n > 1:
                    row = dict(case, status="skipped", detail="--find-max-sets runs with procs=1 only")
                else:
                    row = run_config(case, args)
                res["rows"].append(row)
                msg = (f'{row["step_s"]:.3f} s/step, {row["cells_per_s_dev"]:,.0f} cells/s/dev'
                       if row.get("status") == "ok" else f'{row.get("status")}: {row.get("detail")}')
                print(f"[{time.time() - t_start:6.0f}s] procs={n} {prec} ckpt={ck}: {msg}", flush=True)
                res["ratios"] = ratios(res["rows"])
                _write(out_path, res)  # partial results survive a killed run
    meta.update(wall_s=round(time.time() - t_start, 1), loadavg_end=[round(v, 2) for v in os.getloadavg()])
    print()
    print_tables(res)
    _write(out_path, res)
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
