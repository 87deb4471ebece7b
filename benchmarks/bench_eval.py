"""Evaluation throughput: perturbdiff.eval.suite.evaluate against cell-eval 0.6.6 on the same files.

    python benchmarks/bench_eval.py                      # the issue's size: 200 conditions x 2,000 genes
    python benchmarks/bench_eval.py --conditions 20 --genes 500 --cells 60 120 --control-cells 300   # quick

Input (synthesised once, cached under --work): real.h5ad and pred.h5ad in cell-eval's layout. --genes
genes named G0000.. with log-normal mean counts (at least 0.05, HVG-like); --control-cells control
cells ("non-targeting") and --conditions CRISPR-style conditions named after genes (uniformly --cells
lo..hi cells each); counts from a negative binomial (dispersion 2) with per-cell library sizes, each
condition knocking its target gene down and changing 2-10% of the other genes (log fold changes
~ N(0, 0.8)); then normalize_total (per cell, to a fixed 10,000, so control rows are identical in both
files) and log1p, stored as CSR float32 (about 56% zeros; --dtype float64 stores the same numbers as
float64). pred = a "model": fresh cells drawn with 70% of each true effect plus noise on the effects,
and the *same* real control cells. --contexts C splits the conditions over C contexts (obs
"cell_type"), each with its own --control-cells controls.

Timed, side by side in one process, each from the two .h5ad paths to the per-condition table (file
reading included, imports and data synthesis excluded):
  ours:      perturbdiff.eval.suite.evaluate(real, pred, pert_col="target_gene", control="non-targeting",
             context_col="cell_type", top_n=(50, 100, 200, 500)): every metric (cell-eval's full
             profile + r_squared); numpy/OpenBLAS with its default thread count (--threads sets it).
  cell-eval: MetricsEvaluator(num_threads=--threads) + compute(profile="full",
             skip_metrics=["clustering_agreement"], write_csv=False), as tests/test_eval_suite.py runs
             it; with several contexts the files are split with cell_eval.utils.split_anndata_on_celltype
             and evaluated per context, as `cell-eval run --celltype-col` does. It also writes its two DE
             tables as CSV (its own behaviour, included).
--repeats N times ours (cell-eval once unless --ce-repeats); the best time of each is compared. Ours
is timed with thin wrappers around suite internals for the breakdown (they add a handful of calls):
read_h5ad (both files), de_tests (Wilcoxon + BH + fold changes, both sides), de_metrics (slicing the
groups for DE, overlap / precision / direction / AUCs), pearson_edistance (the single-cell energy
terms, both sides), rest (checks, pseudobulks, deltas, discrimination scores, output tables).
cell-eval's is MetricsEvaluator (file reading + pdex DE + its CSVs) vs compute (the metrics).
Agreement: per metric column cell-eval writes, the max |ours - cell-eval| over conditions (NaN must
match NaN). On float32 .X cell-eval's pearson_edistance carries float32 rounding (sklearn returns
float32 distances, averaged in float32), so, untimed, cell-eval's own edistance() is also re-run on .X
cast to float64 and compared (--no-float64-check skips it). JSON to --out (default
runs/bench/eval_<conditions>x<genes>[_f64].json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # pdex's progress bars

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PERT_COL, CTX_COL, CONTROL = "target_gene", "cell_type", "non-targeting"
TOP_N = (50, 100, 200, 500)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------------------
# synthetic input
# ---------------------------------------------------------------------------------------------


def _lognorm(counts: np.ndarray) -> np.ndarray:
    """normalize_total to 10,000 per cell, then log1p (float32)."""
    total = counts.sum(1, keepdims=True).astype(np.float64)
    return np.log1p(counts * (1e4 / np.maximum(total, 1.0))).astype(np.float32)


def _nb(r: np.random.Generator, mu: np.ndarray, theta: float = 2.0) -> np.ndarray:
    return r.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)


def synthesise(work: Path, args) -> tuple[Path, Path, dict]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    lo, hi = args.cells
    tag = (f"c{args.conditions}_g{args.genes}_n{lo}-{hi}_ctl{args.control_cells}_x{args.contexts}_s{args.seed}"
           f"{'_f64' if args.dtype == 'float64' else ''}")
    d = work / tag
    real_p, pred_p = d / "real.h5ad", d / "pred.h5ad"
    info_p = d / "info.json"
    if real_p.is_file() and pred_p.is_file() and info_p.is_file():
        return real_p, pred_p, json.loads(info_p.read_text())
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    r = np.random.default_rng(args.seed)
    g = args.genes
    genes = np.array([f"G{i:04d}" for i in range(g)])
    # mean count per gene at library size 1; HVG-like, every gene expressed somewhere (a gene constant over
    # a condition and its controls makes pdex's float32 tie correction NaN and cell-eval fail)
    base = np.maximum(np.exp(r.normal(-0.5, 1.2, g)), 0.05)
    targets = r.choice(g, args.conditions, replace=False)
    xs_r, xs_p, obs_r, obs_p = [], [], [], []
    for c in range(args.contexts):
        ctx = f"ctx{c}"
        ctx_base = base * np.exp(r.normal(0.0, 0.3, g))   # context-specific baseline
        lib = np.exp(r.normal(0.0, 0.3, (args.control_cells, 1)))
        ctrl = _lognorm(_nb(r, ctx_base[None, :] * lib))
        xs_r.append(ctrl)
        xs_p.append(ctrl)
        obs_r += [(CONTROL, ctx)] * args.control_cells
        obs_p += [(CONTROL, ctx)] * args.control_cells
        for t in targets[c::args.contexts]:
            lfc = np.zeros(g)
            hit = r.choice(g, int(r.uniform(0.02, 0.10) * g), replace=False)
            lfc[hit] = r.normal(0.0, 0.8, hit.size)
            lfc[t] = -2.0                                  # knock-down of the target gene
            lfc_pred = 0.7 * lfc
            noisy = r.choice(g, g // 20, replace=False)
            lfc_pred[noisy] += r.normal(0.0, 0.3, noisy.size)
            for lfc_x, xs, obs in ((lfc, xs_r, obs_r), (lfc_pred, xs_p, obs_p)):
                n = int(r.integers(lo, hi + 1))
                libn = np.exp(r.normal(0.0, 0.3, (n, 1)))
                xs.append(_lognorm(_nb(r, (ctx_base * np.exp(lfc_x))[None, :] * libn)))
                obs += [(genes[t], ctx)] * n

    def write(xs, obs, path, tag):
        x = sp.csr_matrix(np.vstack(xs).astype(args.dtype))
        o = pd.DataFrame(obs, columns=[PERT_COL, CTX_COL], index=[f"{tag}{i}" for i in range(len(obs))])
        ad.AnnData(X=x, obs=o, var=pd.DataFrame(index=genes)).write_h5ad(path)
        return x

    xr = write(xs_r, obs_r, real_p, "r")
    xp = write(xs_p, obs_p, pred_p, "p")
    info = {"cells_real": int(xr.shape[0]), "cells_pred": int(xp.shape[0]),
            "density_real": round(xr.nnz / np.prod(xr.shape), 3), "density_pred": round(xp.nnz / np.prod(xp.shape), 3),
            "synth_seconds": round(time.time() - t0, 1)}
    info_p.write_text(json.dumps(info))
    return real_p, pred_p, info


# ---------------------------------------------------------------------------------------------
# the two evaluators
# ---------------------------------------------------------------------------------------------


class Breakdown:
    """Wall time of suite internals, through wrappers installed on the module (benchmark only)."""

    PARTS = {"read_h5ad": "_load", "de_tests": "differential_expression", "de_metrics": "_de_metrics",
             "pearson_edistance": "_energy_terms"}

    def __init__(self):
        from perturbdiff.eval import suite

        self.suite, self.t, self.orig = suite, {}, {}
        for part, name in self.PARTS.items():
            self.orig[name] = getattr(suite, name)
            setattr(suite, name, self._wrap(part, self.orig[name]))

    def _wrap(self, part, fn):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.t[part] = self.t.get(part, 0.0) + time.perf_counter() - t0
        return timed

    def close(self):
        for name, fn in self.orig.items():
            setattr(self.suite, name, fn)


def run_ours(real_p: Path, pred_p: Path):
    from perturbdiff.eval.suite import evaluate

    bd = Breakdown()
    try:
        t0 = time.perf_counter()
        res = evaluate(str(real_p), str(pred_p), control=CONTROL, pert_col=PERT_COL, context_col=CTX_COL,
                       top_n=TOP_N)
        total = time.perf_counter() - t0
    finally:
        bd.close()
    t = bd.t
    parts = {"read_h5ad": t.get("read_h5ad", 0.0),
             "de_tests": t.get("de_tests", 0.0),
             "de_metrics": t.get("de_metrics", 0.0) - t.get("de_tests", 0.0),
             "pearson_edistance": t.get("pearson_edistance", 0.0)}
    parts["rest"] = total - sum(parts.values())
    return res, total, {k: round(v, 3) for k, v in parts.items()}


def run_cell_eval(real_p: Path, pred_p: Path, threads: int, contexts: int, outdir: Path):
    import pandas as pd
    from cell_eval import MetricsEvaluator

    for name in ("cell_eval", "pdex"):
        logging.getLogger(name).setLevel(logging.WARNING)
    kw = dict(control_pert=CONTROL, pert_col=PERT_COL, num_threads=threads)
    comp = dict(profile="full", skip_metrics=["clustering_agreement"], write_csv=False, break_on_error=True)
    t_init = t_compute = 0.0
    t0 = time.perf_counter()
    if contexts == 1:
        pairs = {"ctx0": (str(real_p), str(pred_p))}
    else:
        import anndata as ad
        from cell_eval.utils import split_anndata_on_celltype

        real_s = split_anndata_on_celltype(ad.read_h5ad(real_p), CTX_COL)
        pred_s = split_anndata_on_celltype(ad.read_h5ad(pred_p), CTX_COL)
        pairs = {ct: (real_s[ct], pred_s[ct]) for ct in real_s}
    t_init += time.perf_counter() - t0
    frames = {}
    for ct, (real, pred) in pairs.items():
        t1 = time.perf_counter()
        ev = MetricsEvaluator(adata_pred=pred, adata_real=real, outdir=str(outdir),
                              prefix=None if contexts == 1 else ct, **kw)
        t2 = time.perf_counter()
        frames[ct] = ev.compute(**comp)[0]
        t_init += t2 - t1
        t_compute += time.perf_counter() - t2
    total = time.perf_counter() - t0
    out = pd.concat({ct: f.to_pandas().set_index("perturbation") for ct, f in frames.items()},
                    names=["context", "perturbation"])
    parts = {"read_h5ad + DE (MetricsEvaluator)": round(t_init, 3), "metrics (compute)": round(t_compute, 3)}
    return out, total, parts


def cell_eval_edistance_float64(real_p: Path, pred_p: Path, contexts: int) -> dict[str, float]:
    """cell-eval's own ``edistance`` (pearson_edistance) per context, on .X cast to float64: on float32
    .X cell-eval's sklearn distances and their means are float32, which alone moves the correlation."""
    import anndata as ad
    from cell_eval._types import PerturbationAnndataPair
    from cell_eval.metrics._anndata import edistance

    real, pred = ad.read_h5ad(real_p), ad.read_h5ad(pred_p)
    out = {}
    for c in range(contexts):
        r, p = (a[a.obs[CTX_COL] == f"ctx{c}"].copy() for a in (real, pred))
        r.X, p.X = r.X.astype(np.float64), p.X.astype(np.float64)
        out[f"ctx{c}"] = float(edistance(PerturbationAnndataPair(real=r, pred=p, pert_col=PERT_COL,
                                                                 control_pert=CONTROL)))
    return out


def agreement(ours, ce) -> dict:
    """Per cell-eval metric column: max |ours - cell-eval| over conditions, and NaN mismatches."""
    mine = ours.per_condition.set_index(["context", "perturbation"])
    ce = ce.copy()
    ce.index = ce.index.set_levels([lv.astype(str) for lv in ce.index.levels])
    assert sorted(ce.index) == sorted(mine.index), "the two evaluators scored different conditions"
    out = {}
    for col in ce.columns:
        if col not in mine.columns:
            out[col] = "missing here"
            continue
        a = ce[col].astype(float).to_numpy()
        b = mine.loc[ce.index, col].to_numpy(dtype=float)
        nan_a, nan_b = np.isnan(a), np.isnan(b)
        both = ~nan_a & ~nan_b
        out[col] = {"max_abs_diff": float(np.max(np.abs(a[both] - b[both]))) if both.any() else None,
                    "nan_mismatches": int((nan_a != nan_b).sum()), "n": int(a.size)}
    return out


# ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--conditions", type=int, default=200, help="perturbation conditions (over all contexts)")
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--cells", type=int, nargs=2, default=[100, 200], metavar=("LO", "HI"),
                   help="cells per condition, uniform in [LO, HI] (each file)")
    p.add_argument("--control-cells", type=int, default=1000, help="control cells per context")
    p.add_argument("--contexts", type=int, default=1, help="contexts the conditions are spread over")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help=".X dtype in the files (float64: the same float32 numbers, so cell-eval computes in float64)")
    p.add_argument("--threads", type=int, default=None,
                   help="cell-eval's num_threads and the BLAS threads of both (default: usable cores)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of ours (best reported)")
    p.add_argument("--ce-repeats", type=int, default=1, help="timed runs of cell-eval (best reported)")
    p.add_argument("--skip-cell-eval", action="store_true", help="time ours only (profiling)")
    p.add_argument("--no-float64-check", action="store_true",
                   help="skip re-running cell-eval's edistance on float64 .X (untimed; explains its float32 error)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench" / "eval_data"), help="cache of the synthetic h5ad")
    p.add_argument("--out", default=None, help="JSON results (default runs/bench/eval_<conditions>x<genes>.json)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    threads = args.threads or usable_cores()
    from threadpoolctl import threadpool_info, threadpool_limits

    threadpool_limits(threads)
    import cell_eval
    import pdex

    from perturbdiff.eval import suite  # noqa: F401  (imports outside the timings)

    meta = {"cpu": _cpu_name(), "cpu_count": os.cpu_count(), "usable_cores": usable_cores(),
            "loadavg_start": [round(v, 2) for v in os.getloadavg()], "python": platform.python_version(),
            "numpy": np.__version__, "cell_eval": cell_eval.__version__ if hasattr(cell_eval, "__version__") else None,
            "pdex": getattr(pdex, "__version__", None), "threads": threads,
            "blas": [{k: i.get(k) for k in ("internal_api", "num_threads", "version")} for i in threadpool_info()],
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    if meta["cell_eval"] is None:
        from importlib.metadata import version
        meta.update(cell_eval=version("cell-eval"), pdex=version("pdex"))
    meta.update(conditions=args.conditions, genes=args.genes, cells=args.cells, control_cells=args.control_cells,
                contexts=args.contexts, seed=args.seed, dtype=args.dtype)
    real_p, pred_p, info = synthesise(Path(args.work), args)
    meta["input"] = dict(info, real=str(real_p), pred=str(pred_p))
    print(f"# {meta['cpu']}, {meta['usable_cores']} usable cores, load {meta['loadavg_start']}; "
          f"cell-eval {meta['cell_eval']} (pdex {meta['pdex']}), {threads} threads", flush=True)
    print(f"# input: {args.conditions} conditions x {args.genes} genes, {args.contexts} context(s), "
          f"{info['cells_real']:,} real / {info['cells_pred']:,} pred cells, density {info['density_real']}",
          flush=True)

    res = {"meta": meta, "ours": {"seconds": [], "breakdown": []}, "cell_eval": {"seconds": []}}
    ours = None
    for i in range(args.repeats):
        ours, sec, parts = run_ours(real_p, pred_p)
        res["ours"]["seconds"].append(round(sec, 3))
        res["ours"]["breakdown"].append(parts)
        print(f"ours      run {i + 1}: {sec:8.2f} s  {parts}", flush=True)
    best = int(np.argmin(res["ours"]["seconds"]))
    res["ours"]["best"] = res["ours"]["seconds"][best]
    res["ours"]["best_breakdown"] = res["ours"]["breakdown"][best]
    if not args.skip_cell_eval:
        ce = None
        res["cell_eval"]["breakdown"] = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(args.ce_repeats):
                ce, sec, parts = run_cell_eval(real_p, pred_p, threads, args.contexts, Path(tmp) / f"run{i}")
                res["cell_eval"]["seconds"].append(round(sec, 3))
                res["cell_eval"]["breakdown"].append(parts)
                print(f"cell-eval run {i + 1}: {sec:8.2f} s  {parts}", flush=True)
        res["cell_eval"]["best"] = min(res["cell_eval"]["seconds"])
        res["speedup"] = round(res["cell_eval"]["best"] / res["ours"]["best"], 1)
        res["agreement"] = agreement(ours, ce)
        if not args.no_float64_check:
            ref = cell_eval_edistance_float64(real_p, pred_p, args.contexts)
            mine = ours.per_condition.groupby("context")["pearson_edistance"].first()
            res["pearson_edistance_vs_cell_eval_float64"] = {
                "cell_eval_float64": ref, "max_abs_diff": max(abs(float(mine[c]) - v) for c, v in ref.items())}
            print(f"pearson_edistance vs cell-eval's edistance() on float64 .X: max |diff| "
                  f"{res['pearson_edistance_vs_cell_eval_float64']['max_abs_diff']:.2e}", flush=True)
        print(f"\nours {res['ours']['best']:.2f} s, cell-eval {res['cell_eval']['best']:.2f} s: "
              f"{res['speedup']}x faster", flush=True)
        print(f"\n{'metric':28s} {'max |diff|':>12s}  NaN mismatches")
        for col, a in res["agreement"].items():
            if isinstance(a, dict):
                diff = "-" if a["max_abs_diff"] is None else f"{a['max_abs_diff']:.2e}"
                print(f"{col:28s} {diff:>12s}  {a['nan_mismatches']}")
            else:
                print(f"{col:28s} {a}")
    meta["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    suffix = "_f64" if args.dtype == "float64" else ""
    out = Path(args.out or ROOT / "runs" / "bench" / f"eval_{args.conditions}x{args.genes}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
