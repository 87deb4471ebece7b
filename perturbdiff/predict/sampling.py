"""Sampling the populations of a list of conditions and streaming them into pred.h5ad.

``predict`` generates each condition's ``n_samples`` populations of ``n_cells`` cells in sets of the
training set size, each set conditioned on its own seeded draw of the condition's control cells,
from noise or from those control cells (``control_covariates``: the covariates they are inverted
under), decodes them to counts-shaped values, and appends the controls; under torchrun each rank
writes a contiguous block of sets to a part file that rank 0 joins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import distributed as pdist
from ..conditions import covariates
from ..config import STARTS, NormalizeConfig
from ..data.batch import numeric_key
from ..data.h5ad_writer import StreamingH5ad
from ..data.schema import DataError
from ..decode import DECODES, decode_counts
from ..predict_options import PredictOptions
from .controls import ControlPool


def attainable_max(diffusion_cfg, normalize: NormalizeConfig) -> float | None:
    """The largest value (model scale) a generated cell may hold: ``diffusion.x0_max`` when set, else
    what the normalisation can produce at most, log1p(target_sum) / scale (one gene holding every
    count of its cell; 9.21 in log1p units for target_sum 1e4). None without log1p (no bound)."""
    if diffusion_cfg.x0_max is not None:
        return float(diffusion_cfg.x0_max)
    if not normalize.log1p:
        return None
    return float(np.log1p(normalize.target_sum) / normalize.scale)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DataError(None, f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DataError(None, f"--device {name}: no CUDA device is available here (use auto or cpu)")
    return device


def _set_seed(seed: int, i: int, s: int, k: int) -> int:
    """One seed per generated set (condition i, population s, chunk k): a population is the same
    whatever the batch size or the number of processes."""
    return int(np.random.SeedSequence([seed, 29, i, s, k]).generate_state(1)[0])


def predict(found, conditions: pd.DataFrame, pool: ControlPool, out_path: str | Path, opts: PredictOptions,
            log=print) -> Path | None:
    """Sample every condition's populations and stream them, then the controls, into ``out_path``.

    Under torchrun (a process group is initialised) the sets are split into contiguous blocks, one
    per rank, each on its own device; every rank streams its block to a part file and rank 0 joins
    the parts in order and appends the controls. The result equals a one-process run (each set has
    its own seed for its control draw and its x_T). Returns the path on rank 0, None elsewhere."""
    from ..diffusion import SetDiffusion
    from ..diffusion.sampler import bridge_sets, sample_sets

    normalize = found.normalize
    diffusion = SetDiffusion(found.diffusion)
    m = found.set_size
    rank, world = pdist.get_rank(), pdist.get_world_size()
    device = _device(opts.device) if world == 1 or opts.device != "auto" else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    steps = opts.sample_steps or diffusion.cfg.sample_steps
    if not 1 <= steps <= diffusion.cfg.steps:
        raise DataError(None, f"--sample-steps {steps}: must be in 1 .. {diffusion.cfg.steps} (the checkpoint's "
                        "diffusion.steps)")
    x0_max = attainable_max(diffusion.cfg, normalize)
    if opts.decode not in DECODES:
        raise DataError(None, f"--decode {opts.decode!r}: must be one of {', '.join(DECODES)}")
    counts = opts.decode == "counts" and pool.libraries is not None
    model = found.build(device=device).eval()
    marginal = diffusion.cfg.p_drop_control >= 1.0
    notes = list(pool.notes)
    if opts.decode == "counts" and not counts:
        notes.append("decode=counts: the control cells' library sizes are unknown (log-normalised values without "
                     "log1p), so the continuous output is written")
    cov = covariates(conditions, found.vocabularies, model, notes, found.numeric_in_data)
    cov_ctrl = control_covariates(cov, found, opts, notes)  # None: start from noise
    if cov_ctrl is not None and steps < 2:
        raise DataError(None, f"--sample-steps {steps}: starting from the controls needs at least 2 (or --start noise)")
    jobs = [(i, s, k, min(m, n - k)) for i, row in conditions.iterrows() for s in range(int(row["n_samples"]))
            for n in [int(row["n_cells"])] for k in range(0, n, m)]
    lo, hi = len(jobs) * rank // world, len(jobs) * (rank + 1) // world
    G = len(found.genes)
    out_path = Path(out_path)
    part = out_path.with_name(f".{out_path.name}.rank{rank}") if world > 1 else out_path
    writer = StreamingH5ad(part, found.genes)
    try:
        B = max(1, opts.sets_per_batch)
        for start in range(lo, hi, B):
            chunk = jobs[start:min(start + B, hi)]
            ctrl = np.zeros((len(chunk), m, G), dtype=np.float32)
            ctrl_mask = np.zeros((len(chunk), m), dtype=bool)
            noise = torch.empty(len(chunk), m, G)
            picks = []
            for j, (i, s, k, _) in enumerate(chunk):
                row = conditions.iloc[i]
                rows = pool.rows(row["context"], row["batch"])
                if len(rows) == 0:
                    raise DataError(pool.source, f"condition (context={row['context']!r}, perturbation="
                                    f"{row['perturbation']!r}): empty control pool")
                seed = _set_seed(opts.seed, i, s, k)
                pick = np.random.default_rng(seed).choice(rows, min(m, len(rows)), replace=False)
                ctrl[j, :len(pick)], ctrl_mask[j, :len(pick)] = pool.x[pick], not marginal
                picks.append((seed, pick))
                noise[j] = torch.randn(m, G, generator=torch.Generator().manual_seed(seed))
            idx = torch.tensor([i for i, _, _, _ in chunk])
            ctrl_t, ctrl_mask_t = torch.from_numpy(ctrl).to(device), torch.from_numpy(ctrl_mask).to(device)

            def rows_of(c: dict, idx=idx) -> dict:  # the chunk's rows of [C] covariates, on the device
                return {k: v[idx].to(device) for k, v in c.items()}

            kw = dict(ctrl=ctrl_t, ctrl_mask=ctrl_mask_t, cov=rows_of(cov), guidance=opts.guidance,
                      sample_steps=opts.sample_steps, x0_max=x0_max)
            if cov_ctrl is not None:  # cell c of set j is control pick[c % n] plus the model's response for it
                source = torch.from_numpy(np.stack([pool.x[np.resize(pick, m)] for _, pick in picks])).to(device)
                out = bridge_sets(model, diffusion, source, source_cov=rows_of(cov_ctrl), noise=noise, **kw)
            else:
                out = sample_sets(model, diffusion, num_cells=m, num_samples=1, noise=noise, **kw)[:, 0]
            out = out.float().cpu().numpy()
            for j, (i, s, _, n) in enumerate(chunk):
                row = conditions.iloc[i]
                cells = out[j, :n]
                if counts:  # each cell takes the library of one control cell of its set, in order
                    seed, pick = picks[j]
                    cells = decode_counts(cells, pool.libraries[np.resize(pick, n)], normalize,
                                          np.random.default_rng([seed, 41]))
                writer.append(cells * normalize.scale, row["perturbation"], row["context"], str(row["batch"]), s,
                              False)
            log(f"  predicted {min(start + B, hi) - lo}/{hi - lo} sets" + (f" on rank {rank}" if world > 1 else ""))
        uns = {"perturbdiff": {"notes": notes, "set_size": m, "control_label": opts.control_label,
                               "decode": "counts" if counts else "continuous",
                               "start": "noise" if cov_ctrl is None else "controls",
                               "sample_steps": opts.sample_steps or diffusion.cfg.sample_steps, "processes": world}}
        if world == 1:
            append_controls(writer, pool, normalize, opts)
            path = writer.close(uns=uns)
        else:
            writer.close()
    except BaseException:
        writer.abort()
        raise
    if world > 1:
        pdist.barrier()  # every part is complete
        path = _join_parts(out_path, found.genes, world, pool, normalize, opts, uns) if rank == 0 else None
        pdist.barrier()
    if rank == 0:
        for note in notes:
            log(f"  note: {note}")
    return path


def control_covariates(cov: dict, found, opts: PredictOptions, notes: list[str]) -> dict | None:
    """The covariates of the conditions' controls (each condition's context and batch, the control
    perturbation, the controls' numeric values), under which its control cells are inverted; None
    when the populations start from noise (asked for, or no control perturbation is known)."""
    start = opts.start or found.diffusion.start
    if start not in STARTS:
        raise DataError(None, f"--start {start!r}: must be one of {', '.join(STARTS)}")
    if start == "noise":
        return None
    vocab = found.vocabularies.get("perturbation", [])
    recorded = found.control_perturbations
    labels = [p for p in (recorded if recorded is not None else [opts.control_label]) if p in vocab]
    if "perturbation" not in cov or not labels:
        notes.append("start=controls needs a model with a perturbation branch that learned the control "
                     "perturbation; the populations start from noise")
        return None
    label = opts.control_label if opts.control_label in labels else labels[0]
    if len(labels) > 1:
        notes.append(f"start=controls: controls inverted as perturbation {label!r} (of {labels})")
    out = dict(cov, perturbation=torch.full_like(cov["perturbation"], vocab.index(label)))
    for name, value in found.control_numeric.items():
        key = numeric_key(name)
        if key in out:
            out[key] = torch.full_like(out[key], float("nan") if value is None else value)
    return out


def _join_parts(out_path: Path, genes: list[str], world: int, pool: ControlPool, normalize: NormalizeConfig,
                opts: PredictOptions, uns: dict) -> Path:
    """Rank 0: the ranks' part files, in rank order, then the controls, into ``out_path``."""
    import anndata as ad

    parts = [out_path.with_name(f".{out_path.name}.rank{r}") for r in range(world)]
    writer = StreamingH5ad(out_path, genes)
    try:
        for part in parts:
            a = ad.read_h5ad(part, backed="r")
            obs = a.obs
            for lo in range(0, a.n_obs, 4096):
                hi = min(lo + 4096, a.n_obs)
                o = obs.iloc[lo:hi]
                writer.append(a.X[lo:hi], o["perturbation"].astype(str).to_numpy(), o["context"].astype(str).to_numpy(),
                              o["batch"].astype(str).to_numpy(), o["sample"].to_numpy(), False)
            a.file.close()
        append_controls(writer, pool, normalize, opts)
        path = writer.close(uns=uns)
    except BaseException:
        writer.abort()
        raise
    for part in parts:
        part.unlink(missing_ok=True)
    return path


def append_controls(writer: StreamingH5ad, pool: ControlPool, normalize: NormalizeConfig, opts: PredictOptions) -> None:
    for start in range(0, len(pool.x), 4096):
        sl = slice(start, start + 4096)
        writer.append(pool.x[sl] * normalize.scale, opts.control_label, pool.context[sl], pool.batch[sl], -1, True)
