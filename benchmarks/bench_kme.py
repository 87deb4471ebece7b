"""KME / MMD benchmark: forward + backward of the ops in perturbdiff/ops/kme.py (docs/benchmarks.md has
the numbers and the exact commands).

    python benchmarks/bench_kme.py --device cuda --out runs/bench/kme_h200.json     # the issue's full grid
    python benchmarks/bench_kme.py --device cpu  --out runs/bench/kme_cpu.json      # reduced CPU grid

What is timed, per size (B sets of m cells against B sets of m cells, d features) and dtype:
  mmd2  loss = mmd2(x, y, kernel="energy", unbiased=False).sum(), then loss.backward(); x requires grad,
        y does not (the training case: generated set against an observed set).
          impl "triton"    fused Triton kernels, no [B, m, m] matrix in memory
          impl "torch"     the Gram-matrix torch path of perturbdiff/ops/kme.py (the "torch reference" of
                           the issue; the [B, N, M, D] specification in kme_reference.py is far too big)
          impl "geomloss"  geomloss.SamplesLoss("energy", backend="tensorized")(x, y).sum() (optional:
                           "geomloss not installed" rows when it is absent; it is never installed here)
  kme   loss = (kme(x, y, kernel="energy") * g).sum() with a fixed random g [B, m], then backward
        (triton and torch only; geomloss has no such op).

geomloss "energy" returns HALF our V-statistic energy MMD^2 (kernel -|x - y|, both with the i = j terms,
which geomloss clamps at |x - x| = 1e-4): before timing, the script checks geomloss = 0.5 * mmd2 on a
small float64 case and stops if that fails. The factor does not enter the timings.

FLOP model (the same nominal count for every impl, "useful" flops only: Gram products; norms, sqrt and
the like are not counted; Triton recomputes the row norms per tile and is not credited for it):
  forward mmd2: three pair sums (xx, yy, xy), each a [m, d] x [d, m] distance Gram product of
                2 d flops per pair:                                    3 * 2 d * m^2 per set
  backward w.r.t. x (pair-gradient kernel, xx and xy terms; yy has no gradient): per pair 2 d for the
                distance recompute + 2 d for h @ b:                    2 * 4 d * m^2 per set
  mmd2 fwd+bwd = 14 * B * m^2 * d;  kme fwd+bwd = (2 + 4) * B * m^2 * d.
The torch path does not recompute distances in the backward (it keeps the [B, m, m] matrices) but
differentiates bmm(x, x^T) w.r.t. both operands, so it executes about 12 B m^2 d; geomloss differentiates
only the first operand of its xx product (and doubles that gradient): about 10 B m^2 d.
Achieved TFLOP/s = nominal flops / median time. On cuda the matmul ceiling is measured per size: torch.bmm
of [B, m, d] x [B, d, m] in the case dtype (fp32 with TF32 disabled, as the kernels use IEEE fp32 dots for
fp32 inputs; bf16, as they feed 16-bit inputs to tensor-core dots with fp32 accumulation), and also in
fp32 for every row, since the torch path computes in fp32 whatever the input dtype (geomloss computes
bf16 inputs in bf16).

Timing: cuda with torch.cuda.Event around each repeat (synchronised), warm-up first (the first call
includes Triton's autotuning), median of the repeats; cpu with time.perf_counter, median. The number of
repeats adapts to --case-budget seconds per case, between --min-repeats and --repeats.
Peak memory: cuda, torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what was allocated
before the step (inputs); cpu, every case runs in a fresh process (this script re-invoked with
--single-case) that resets its peak-RSS mark (/proc/self/clear_refs, VmHWM) after building its inputs,
so the figure is the peak RSS increase of one forward+backward (ru_maxrss if clear_refs is refused).
Errors and out-of-memory end as "OOM" / "error" rows, never as a crash.

On cpu, impl "triton" only runs in Triton's interpreter (TRITON_INTERPRET=1), which is far too slow to
benchmark: it is skipped unless named in --impls, and then runs with TRITON_INTERPRET=1 in the child.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
ALL_IMPLS = ("triton", "torch", "geomloss")
OPS = ("mmd2", "kme")
FLOP_FACTOR = {"mmd2": 14, "kme": 6}  # x B m^2 d, see the docstring
GRID = {
    "cuda": {"B": [8, 64], "m": [256, 1024, 4096], "d": [512, 2000], "dtypes": "fp32,bf16",
             "impls": "triton,torch,geomloss"},
    "cpu": {"B": [8], "m": [256, 1024], "d": [512, 2000], "dtypes": "fp32", "impls": "torch,geomloss"},
}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def geomloss_available() -> bool:
    try:
        import geomloss  # noqa: F401
    except ImportError:
        return False
    return True


def _import_kernels_package() -> None:
    """kernels/ installs as perturbdiff_kernels; from a plain checkout (e.g. a GPU box where the project
    is not pip-installed) register the folder under that name so impl="triton" can import it."""
    try:
        import perturbdiff_kernels  # noqa: F401
    except ImportError:
        import importlib.util
        spec = importlib.util.spec_from_file_location("perturbdiff_kernels", ROOT / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "kernels")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["perturbdiff_kernels"] = mod
        spec.loader.exec_module(mod)


# ---------------------------------------------------------------------------------------------
# One case: build inputs, the step function, time it, measure its peak memory
# ---------------------------------------------------------------------------------------------


def _inputs(B, m, d, dtype, device, seed=0):
    """x ~ N(0, 1), y ~ N(0.05, 1.1^2): random (never zeros), drawn on the device, then cast to dtype."""
    import torch
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(B, m, d, generator=gen, device=device).to(dtype).requires_grad_(True)
    y = (torch.randn(B, m, d, generator=gen, device=device) * 1.1 + 0.05).to(dtype)
    g = torch.rand(B, m, generator=gen, device=device)  # fixed weights for the kme loss
    return x, y, g


def _step_fn(op, impl, x, y, g):
    """A closure running one forward + backward w.r.t. x."""
    if impl == "geomloss":
        from geomloss import SamplesLoss
        loss_fn = SamplesLoss("energy", backend="tensorized")

        def step():
            x.grad = None
            loss_fn(x, y).sum().backward()
        return step
    from perturbdiff.ops.kme import kme, mmd2
    if op == "mmd2":
        def step():
            x.grad = None
            mmd2(x, y, kernel="energy", unbiased=False, impl=impl).sum().backward()
    else:
        def step():
            x.grad = None
            (kme(x, y, kernel="energy", impl=impl) * g).sum().backward()
    return step


def _adaptive_times(timed_once, first: float, args) -> list[float]:
    n = int(args.case_budget / max(first, 1e-6))
    n = max(args.min_repeats, min(args.repeats, n))
    return [timed_once() for _ in range(n)]


def _is_oom(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    return (isinstance(exc, MemoryError) or "out of memory" in low or "outofmemory" in low
            or "can't allocate memory" in low)


def run_case_cuda(case: dict, args) -> dict:
    import torch
    row = dict(case)
    dtype = getattr(torch, DTYPES[case["dtype"]])
    x = y = g = step = None
    try:
        torch.cuda.synchronize()
        x, y, g = _inputs(case["B"], case["m"], case["d"], dtype, "cuda")
        step = _step_fn(case["op"], case["impl"], x, y, g)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        # peak memory of one step, inputs excluded
        x.grad = None
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        row["peak_mem_mib"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed_once():
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        times = _adaptive_times(timed_once, timed_once(), args)
        row.update(status="ok", seconds=statistics.median(times), repeats=len(times),
                   spread=round((max(times) - min(times)) / statistics.median(times), 3))
    except Exception as exc:  # noqa: BLE001 (every failure becomes a row)
        row.update(status="OOM" if _is_oom(exc) else "error", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
    finally:
        x = y = g = step = None
        gc.collect()
        torch.cuda.empty_cache()
    return row


def _hwm_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def single_case_cpu(case: dict, args) -> dict:
    """Runs in a fresh child process: one (op, impl, size, dtype) case on the CPU."""
    import torch
    row = dict(case)
    try:
        dtype = getattr(torch, DTYPES[case["dtype"]])
        x, y, g = _inputs(case["B"], case["m"], case["d"], dtype, "cpu")
        step = _step_fn(case["op"], case["impl"], x, y, g)
        gc.collect()
        reset = _reset_hwm()
        base = _rss_bytes() if reset else _hwm_bytes()
        t0 = time.perf_counter()
        step()  # the first call: warm-up and the memory measurement
        first = time.perf_counter() - t0
        row["peak_mem_mib"] = round(max(0, _hwm_bytes() - base) / 2**20, 1)
        row["mem_method"] = "VmHWM after clear_refs" if reset else "ru_maxrss increase"

        def timed_once():
            t = time.perf_counter()
            step()
            return time.perf_counter() - t

        for _ in range(args.warmup - 1):
            first = timed_once()
        times = _adaptive_times(timed_once, first, args)
        row.update(status="ok", seconds=statistics.median(times), repeats=len(times),
                   spread=round((max(times) - min(times)) / statistics.median(times), 3),
                   threads=torch.get_num_threads(), loadavg_1m=round(os.getloadavg()[0], 2))
    except Exception as exc:  # noqa: BLE001
        row.update(status="OOM" if _is_oom(exc) else "error", detail=f"{type(exc).__name__}: {str(exc)[:300]}")
    return row


def run_case_cpu(case: dict, args) -> dict:
    env = dict(os.environ)
    if case["impl"] == "triton":
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--device", "cpu", "--single-case", json.dumps(case),
           "--repeats", str(args.repeats), "--min-repeats", str(args.min_repeats), "--warmup", str(args.warmup),
           "--case-budget", str(args.case_budget)] + (["--threads", str(args.threads)] if args.threads else [])
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        return dict(case, status="timeout", detail=f"over --case-timeout {args.case_timeout}s")
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    status = "OOM" if proc.returncode in (-9, 137) else "error"
    return dict(case, status=status, detail=f"exit code {proc.returncode}: {proc.stderr.strip()[-300:]}")


# ---------------------------------------------------------------------------------------------
# Checks before timing
# ---------------------------------------------------------------------------------------------


def geomloss_check(device: str) -> dict:
    """geomloss "energy" against our V-statistic mmd2 (torch path): fitted factor, asserted to be 1/2."""
    import torch

    from geomloss import SamplesLoss

    from perturbdiff.ops.kme import mmd2
    out = {}
    for dt in (torch.float64, torch.float32) if device == "cuda" else (torch.float64,):
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(3, 200, 32, generator=gen, dtype=torch.float64).to(device, dt)
        y = (torch.randn(3, 200, 32, generator=gen, dtype=torch.float64) * 1.3 + 0.2).to(device, dt)
        ours = mmd2(x, y, kernel="energy", unbiased=False, impl="torch").double()
        theirs = SamplesLoss("energy", backend="tensorized")(x, y).double()
        factor = (theirs / ours)
        rel = ((theirs - 0.5 * ours).abs() / ours.abs()).max().item()
        out[str(dt).replace("torch.", "")] = {"ours_mmd2": ours.tolist(), "geomloss": theirs.tolist(),
                                              "factor_geomloss_over_ours": factor.tolist(), "max_rel_err_vs_half": rel}
        # geomloss clamps the self-pair distances at 1e-4 (sqrt of 1e-8): an offset of 1e-4 / m, far below 1e-3
        if not rel < 1e-3:
            raise SystemExit(f"geomloss energy != 0.5 * mmd2 (max relative error {rel:.2e}): check before timing")
    return out


def triton_check() -> dict:
    """Triton against the torch path, value and gradient, one small fp32 case (cuda only)."""
    import torch

    from perturbdiff.ops.kme import mmd2
    x, y, _ = _inputs(3, 333, 130, torch.float32, "cuda", seed=2)
    res = {}
    for impl in ("triton", "torch"):
        x.grad = None
        v = mmd2(x, y, kernel="energy", impl=impl)
        v.sum().backward()
        res[impl] = (v.detach().double(), x.grad.double().clone())
    (vt, gt), (vr, gr) = res["triton"], res["torch"]
    out = {"value_rel_err": ((vt - vr).abs().max() / vr.abs().max()).item(),
           "grad_rel_err": ((gt - gr).norm() / gr.norm()).item()}
    if not (out["value_rel_err"] < 1e-3 and out["grad_rel_err"] < 1e-3):
        raise SystemExit(f"triton and torch disagree before timing: {out}")
    return out


def accuracy_check(device: str, impls, dtypes, have_geomloss: bool) -> list[dict]:
    """Each impl's mmd2 value and x-gradient against float64 (torch path) on the SAME rounded inputs, one
    B=2, m=256, d=2000 case per dtype: the timings compare implementations of different accuracy in bf16
    (ours accumulate in fp32; geomloss computes bf16 inputs in bf16). geomloss is scaled by 2."""
    import torch

    from perturbdiff.ops.kme import mmd2
    out = []
    for dt in dtypes:
        dtype = getattr(torch, DTYPES[dt])
        x, y, _ = _inputs(2, 256, 2000, dtype, device, seed=3)
        x64 = x.detach().double().requires_grad_(True)
        ref = mmd2(x64, y.double(), kernel="energy", impl="torch")
        ref.sum().backward()
        for impl in impls:
            if (impl == "geomloss" and not have_geomloss) or (impl == "triton" and device != "cuda"):
                continue
            try:
                x.grad = None
                if impl == "geomloss":
                    from geomloss import SamplesLoss
                    v = 2.0 * SamplesLoss("energy", backend="tensorized")(x, y)
                else:
                    v = mmd2(x, y, kernel="energy", impl=impl)
                v.sum().backward()
                out.append({"impl": impl, "dtype": dt, "B": 2, "m": 256, "d": 2000,
                            "value_rel_err": ((v.double() - ref).abs().max() / ref.abs().max()).item(),
                            "grad_rel_err": ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item()})
            except Exception as exc:  # noqa: BLE001
                out.append({"impl": impl, "dtype": dt, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    return out


def matmul_ceilings(sizes, dtypes, args) -> dict:
    """TFLOP/s of torch.bmm [B, m, d] x [B, d, m] per size and dtype (TF32 off): the measured ceiling."""
    import torch
    out = {}
    for (B, m, d) in sizes:
        for dt in dtypes:
            key = f"{B}x{m}x{d}/{dt}"
            try:
                a = torch.randn(B, m, d, device="cuda").to(getattr(torch, DTYPES[dt]))
                b = torch.randn(B, d, m, device="cuda").to(getattr(torch, DTYPES[dt]))
                for _ in range(3):
                    torch.bmm(a, b)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

                def timed_once(a=a, b=b, start=start, end=end):
                    start.record()
                    torch.bmm(a, b)
                    end.record()
                    end.synchronize()
                    return start.elapsed_time(end) / 1e3

                times = _adaptive_times(timed_once, timed_once(), args)
                out[key] = round(2.0 * B * m * m * d / statistics.median(times) / 1e12, 2)
            except Exception as exc:  # noqa: BLE001
                out[key] = None
                print(f"matmul ceiling {key}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            a = b = None
            gc.collect()
            torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------
# Summaries and the table
# ---------------------------------------------------------------------------------------------


def add_flops(rows, ceilings, device):
    for r in rows:
        r["gflop"] = round(FLOP_FACTOR[r["op"]] * r["B"] * r["m"] ** 2 * r["d"] / 1e9, 2)
        if r.get("status") == "ok":
            r["tflops"] = round(r["gflop"] / 1e3 / r["seconds"], 3)
            if device == "cuda":
                size = f'{r["B"]}x{r["m"]}x{r["d"]}'
                for name, dt in (("ceiling_tflops", r["dtype"]), ("ceiling_fp32_tflops", "fp32")):
                    r[name] = ceilings.get(f"{size}/{dt}")
                if r.get("ceiling_tflops"):
                    r["frac_of_ceiling"] = round(r["tflops"] / r["ceiling_tflops"], 3)
                if r.get("ceiling_fp32_tflops"):
                    r["frac_of_fp32_ceiling"] = round(r["tflops"] / r["ceiling_fp32_tflops"], 3)


def speedups(rows, device) -> list[dict]:
    """Per (op, dtype, size): time ratios (> 1 means the first impl is faster), and the issue's targets."""
    by = {}
    for r in rows:
        if r.get("status") == "ok":
            by.setdefault((r["op"], r["dtype"], r["B"], r["m"], r["d"]), {})[r["impl"]] = r["seconds"]
    out = []
    for (op, dt, B, m, d), t in sorted(by.items()):
        s = {"op": op, "dtype": dt, "B": B, "m": m, "d": d}
        for a, b in (("triton", "torch"), ("triton", "geomloss"), ("torch", "geomloss")):
            if a in t and b in t:
                s[f"{a}_vs_{b}"] = round(t[b] / t[a], 3)
        if device == "cuda" and op == "mmd2" and m >= 1024 and "triton_vs_torch" in s:
            s["target_3x_torch_met"] = s["triton_vs_torch"] >= 3.0
            if "triton_vs_geomloss" in s:
                s["target_beats_geomloss_met"] = s["triton_vs_geomloss"] > 1.0
        out.append(s)
    return out


def memory_scaling(rows) -> list[dict]:
    """Peak memory against m at fixed (op, impl, dtype, B, d): ratio between consecutive m."""
    by = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("peak_mem_mib") is not None:
            by.setdefault((r["op"], r["impl"], r["dtype"], r["B"], r["d"]), []).append((r["m"], r["peak_mem_mib"]))
    out = []
    for (op, impl, dt, B, d), pts in sorted(by.items()):
        pts.sort()
        for (m0, p0), (m1, p1) in zip(pts, pts[1:]):
            out.append({"op": op, "impl": impl, "dtype": dt, "B": B, "d": d, "m_from": m0, "m_to": m1,
                        "m_ratio": round(m1 / m0, 2), "mem_from_mib": p0, "mem_to_mib": p1,
                        "mem_ratio": round(p1 / p0, 2) if p0 > 0 else None})
    return out


def _fmt(v, spec=""):
    if v is None:
        return "-"
    return format(v, spec) if spec else str(v)


def print_tables(res) -> None:
    cuda = res["meta"]["device"] == "cuda"
    head = ["op", "dtype", "B", "m", "d", "impl", "status", "ms", "TFLOP/s"]
    head += ["ceil", "frac", "frac_fp32"] if cuda else []
    head += ["peak MiB"]
    lines = [head]
    for r in res["rows"]:
        ok = r.get("status") == "ok"
        line = [r["op"], r["dtype"], r["B"], r["m"], r["d"], r["impl"], r.get("status"),
                _fmt(r["seconds"] * 1e3, ".1f") if ok else "-", _fmt(r.get("tflops"), ".3f")]
        if cuda:
            line += [_fmt(r.get("ceiling_tflops"), ".1f"), _fmt(r.get("frac_of_ceiling"), ".2f"),
                     _fmt(r.get("frac_of_fp32_ceiling"), ".2f")]
        line += [_fmt(r.get("peak_mem_mib"), ".1f")]
        lines.append([str(v) for v in line])
    _print_grid(lines)
    notes = [r for r in res["rows"] if r.get("status") not in ("ok",) and r.get("detail")]
    for r in notes:
        print(f'  {r["op"]} {r["dtype"]} {r["B"]}x{r["m"]}x{r["d"]} {r["impl"]}: {r["status"]}: {r["detail"]}')
    keys = ["triton_vs_torch", "triton_vs_geomloss", "torch_vs_geomloss"]
    keys = [k for k in keys if any(k in s for s in res["speedups"])]
    if keys:
        print("\nspeedups (time of the second impl / time of the first; > 1: the first is faster)")
        lines = [["op", "dtype", "B", "m", "d"] + keys]
        for s in res["speedups"]:
            if not any(k in s for k in keys):
                continue
            lines.append([str(s[k]) for k in ("op", "dtype", "B", "m", "d")] + [_fmt(s.get(k)) for k in keys])
        _print_grid(lines)
    if res["memory_scaling"]:
        print("\npeak memory against m (linear: mem_ratio ~ m_ratio; quadratic: ~ m_ratio^2)")
        lines = [["op", "impl", "dtype", "B", "d", "m", "MiB", "m ratio", "mem ratio"]]
        for s in res["memory_scaling"]:
            lines.append([s["op"], s["impl"], s["dtype"], str(s["B"]), str(s["d"]), f'{s["m_from"]}->{s["m_to"]}',
                          f'{s["mem_from_mib"]}->{s["mem_to_mib"]}', str(s["m_ratio"]), _fmt(s["mem_ratio"])])
        _print_grid(lines)


def _print_grid(lines) -> None:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths)))


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def _write(path: str, res: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(path)


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    p.add_argument("--B", type=_ints, default=None, help="sets per batch, comma-separated (grid default per device)")
    p.add_argument("--m", type=_ints, default=None, help="cells per set, comma-separated")
    p.add_argument("--d", type=_ints, default=None, help="features, comma-separated")
    p.add_argument("--sizes", default=None, help="explicit BxMxD list overriding the grid, e.g. 8x256x512,8x1024x2000")
    p.add_argument("--dtypes", default=None, help="comma-separated from fp32,bf16,fp16,fp64")
    p.add_argument("--impls", default=None, help="comma-separated from triton,torch,geomloss")
    p.add_argument("--ops", default="mmd2,kme", help="comma-separated from mmd2,kme")
    p.add_argument("--repeats", type=int, default=None, help="most timed repeats per case (cuda 20, cpu 10)")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (cuda 3, cpu 1)")
    p.add_argument("--case-budget", type=float, default=None,
                   help="seconds of timed repeats aimed at per case (cuda 2, cpu 20)")
    p.add_argument("--case-timeout", type=float, default=900.0, help="cpu: seconds before a case's child is killed")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--no-ceiling", action="store_true", help="cuda: skip the bmm ceiling measurement")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds from the start; cases not started by then become 'skipped (time limit)' rows")
    p.add_argument("--out", default=None, help="write the results as JSON here (rewritten after every case)")
    p.add_argument("--single-case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args


def main(argv=None) -> None:
    t_program = time.time()
    args = parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.single_case is not None:  # the child of a cpu run
        args.repeats = args.repeats or 10
        args.warmup = max(1, args.warmup or 1)
        args.case_budget = 20.0 if args.case_budget is None else args.case_budget
        print("RESULT " + json.dumps(single_case_cpu(json.loads(args.single_case), args)), flush=True)
        return

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    grid = GRID[device]
    args.repeats = args.repeats or (20 if device == "cuda" else 10)
    args.warmup = args.warmup if args.warmup is not None else (3 if device == "cuda" else 1)
    args.case_budget = args.case_budget if args.case_budget is not None else (2.0 if device == "cuda" else 20.0)
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s]
    else:
        sizes = [(B, m, d) for B in (args.B or grid["B"]) for m in (args.m or grid["m"]) for d in (args.d or grid["d"])]
    dtypes = (args.dtypes or grid["dtypes"]).split(",")
    impls = (args.impls or grid["impls"]).split(",")
    ops = args.ops.split(",")
    for name, vals, allowed in (("dtypes", dtypes, DTYPES), ("impls", impls, ALL_IMPLS), ("ops", ops, OPS)):
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; use {list(allowed)}")
    notes = []
    if device == "cpu" and args.impls is None:
        notes.append("triton skipped on cpu: it only runs in Triton's interpreter (TRITON_INTERPRET=1), far too "
                     "slow to benchmark; name it in --impls to run it anyway")
    if device == "cpu" and "triton" in impls and args.impls is not None:
        notes.append("triton on cpu runs in Triton's interpreter (TRITON_INTERPRET=1 in each child): not a "
                     "performance figure")
    have_geomloss = geomloss_available()
    if "geomloss" in impls and not have_geomloss:
        notes.append("geomloss not installed: its rows are reported as such (pip install --no-deps geomloss into "
                     "an environment that already has torch)")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # IEEE fp32 everywhere, as the kernels do
        torch.backends.cudnn.allow_tf32 = False
        _import_kernels_package()

    meta = {"device": device, "device_name": torch.cuda.get_device_name() if device == "cuda" else _cpu_name(),
            "torch": torch.__version__, "triton": _version("triton"), "geomloss": _version("geomloss"),
            "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "tf32": False if device == "cuda" else None,
            "flop_model": "mmd2 fwd+bwd 14*B*m^2*d, kme fwd+bwd 6*B*m^2*d (Gram products only)",
            "sizes": [list(s) for s in sizes], "dtypes": dtypes, "impls": impls, "ops": ops,
            "repeats": args.repeats, "min_repeats": args.min_repeats, "warmup": args.warmup,
            "case_budget_s": args.case_budget, "notes": notes, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()]}
    for n in notes:
        print("note:", n)
    res = {"meta": meta, "checks": {}, "ceilings": {}, "rows": []}
    if "geomloss" in impls and have_geomloss:
        res["checks"]["geomloss_energy_vs_mmd2"] = geomloss_check(device)
        f = res["checks"]["geomloss_energy_vs_mmd2"]["float64"]["factor_geomloss_over_ours"]
        print(f"check: geomloss energy / our V-statistic energy mmd2 = {[round(v, 6) for v in f]} (expected 0.5)")
    if device == "cuda" and "triton" in impls:
        res["checks"]["triton_vs_torch_fp32"] = triton_check()
        print("check: triton vs torch (value, grad) relative error", res["checks"]["triton_vs_torch_fp32"])
    res["checks"]["accuracy_vs_fp64"] = accuracy_check(device, impls, dtypes, have_geomloss)
    for a in res["checks"]["accuracy_vs_fp64"]:
        if "error" in a:
            print(f'accuracy {a["impl"]} {a["dtype"]}: {a["error"]}')
        else:
            print(f'accuracy vs fp64 on the same inputs, {a["impl"]} {a["dtype"]} (B=2, m=256, d=2000): '
                  f'mmd2 {a["value_rel_err"]:.1e}, grad {a["grad_rel_err"]:.1e}')
    if device == "cuda" and not args.no_ceiling:
        res["ceilings"] = matmul_ceilings(sizes, sorted(set(dtypes) | {"fp32"}), args)
        print("bmm ceilings, TFLOP/s:", res["ceilings"])

    t_start = time.time()
    for dt in dtypes:  # smallest sizes first, every op and impl per size: a time limit cuts whole sizes
        for (B, m, d) in sorted(sizes, key=lambda s: (s[0] * s[1] * s[1] * s[2], s)):
            for op in ops:
                for impl in impls:
                    if impl == "geomloss" and op != "mmd2":
                        continue
                    if impl == "triton" and device == "cpu" and args.impls is None:
                        continue
                    case = {"op": op, "impl": impl, "B": B, "m": m, "d": d, "dtype": dt}
                    if args.time_limit is not None and time.time() - t_program > args.time_limit:
                        row = dict(case, status="skipped (time limit)")
                    elif impl == "geomloss" and not have_geomloss:
                        row = dict(case, status="geomloss not installed")
                    elif device == "cuda":
                        row = run_case_cuda(case, args)
                    else:
                        row = run_case_cpu(case, args)
                    res["rows"].append(row)
                    msg = (f'{row["seconds"] * 1e3:.1f} ms, {row.get("peak_mem_mib")} MiB, {row["repeats"]} repeats'
                           if row.get("status") == "ok" else f'{row.get("status")} {row.get("detail", "")}')
                    print(f"[{time.time() - t_start:6.0f}s] {op} {dt} B={B} m={m} d={d} {impl}: {msg}", flush=True)
                    if args.out:  # partial results survive a killed run
                        _write(args.out, res)
    meta["wall_s"] = round(time.time() - t_start, 1)
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    add_flops(res["rows"], res["ceilings"], device)
    res["speedups"] = speedups(res["rows"], device)
    res["memory_scaling"] = memory_scaling(res["rows"])
    print()
    print_tables(res)
    if args.out:
        _write(args.out, res)
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
