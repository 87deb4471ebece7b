"""Prediction: sampled populations for a list of conditions, as an AnnData in cell-eval's layout.

    perturbdiff predict --checkpoint RUN/foundation --store STORE.zarr --split test --out OUT
    perturbdiff predict --checkpoint RUN/foundation --controls ctrl.h5ad --conditions conds.csv --out OUT

For every condition (perturbation, context, batch, n_cells, n_samples, dose) the model draws
``n_samples`` independent populations of ``n_cells`` cells. A population is generated in sets of the
training set size, each conditioned on its own draw of real control cells of the condition's context
(and batch, when the pool has it). Output, written as it is generated (the matrix is never whole in
memory), to ``OUT/pred.h5ad`` and, when the truth is known (``--store`` with a split), ``OUT/real.h5ad``:

    .X      log-normalised expression, log1p(normalize_total) (the training scale undone), CSR
    .obs    perturbation, context, batch, sample (population index; -1 for real cells), is_control
    .var    the checkpoint's gene vocabulary

The SAME real control cells (up to ``max_controls`` per context, seeded) are appended to both files,
so a shifted prediction of the controls cannot game the delta metrics. Files are written under a
temporary name and renamed when complete.

Users' own controls (``--controls`` h5ad) are aligned to the checkpoint's genes by name: the overlap
is reported, and ``missing_genes`` says what to do with checkpoint genes the file lacks ("error", or
"zero": fill with zeros, reported). Raw counts vs log-normalised values are detected (integral
values are counts) and normalised like the training data.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .config import STARTS, NormalizeConfig
from .conditions import covariates, normalise_conditions
from .data.batch import numeric_key
from .data.schema import VALUES_COUNTS, VALUES_LOGNORM, DataError
from .data.store import to_dense
from .decode import DECODES, decode_counts, library_sizes
from .errors import one_line
from .outputs import OutputLock, Staging, check_output, out_of_space, space_error
from .predict_options import PredictOptions
from . import distributed as pdist

OBS_COLUMNS = ("perturbation", "context", "batch", "sample", "is_control")


# ---------------------------------------------------------------------------------------------
# Control cells
# ---------------------------------------------------------------------------------------------


@dataclass
class ControlPool:
    """Real control cells on the checkpoint's genes, at the model's scale, grouped by context/batch."""

    x: np.ndarray  # [n, G] float32, normalised as in training
    context: np.ndarray  # [n] str
    batch: np.ndarray  # [n] str
    source: str
    notes: list[str] = field(default_factory=list)
    libraries: np.ndarray | None = None  # [n] library sizes (total counts; perturbdiff.decode), None: unknown

    def rows(self, context: str, batch: str | None) -> np.ndarray:
        in_ctx = self.context == context
        if batch is not None and (in_ctx & (self.batch == batch)).any():
            return np.flatnonzero(in_ctx & (self.batch == batch))
        return np.flatnonzero(in_ctx)


def _gene_map(source_genes: np.ndarray, genes: list[str], missing: str, where: str) -> tuple[np.ndarray, list[str]]:
    """source gene index -> checkpoint column (-1: unused); raises or reports missing genes."""
    col = {g: i for i, g in enumerate(genes)}
    panel_map = np.array([col.get(str(g), -1) for g in source_genes], dtype=np.int64)
    found = set(panel_map[panel_map >= 0].tolist())
    lacking = [g for i, g in enumerate(genes) if i not in found]
    notes = [f"{where}: {len(found)} of the checkpoint's {len(genes)} genes found"]
    if lacking:
        if missing == "error":
            raise DataError(where, f"{len(lacking)} of the checkpoint's {len(genes)} genes are missing (gene "
                            f"vocabulary mismatch), e.g. {lacking[:5]}; pass --missing-genes zero to fill them "
                            "with zeros")
        if missing != "zero":
            raise ValueError(f"missing_genes must be error or zero, got {missing!r}")
        notes.append(f"{len(lacking)} missing genes filled with zeros, e.g. {lacking[:5]}")
    return panel_map, notes


def _sample(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(rows, cap, replace=False)) if len(rows) > cap else rows


def controls_from_store(store_path: str, genes: list[str], normalize: NormalizeConfig, contexts: list[str],
                        opts: PredictOptions) -> ControlPool:
    """The control cells of ``contexts`` in a store (at most ``max_controls`` per context)."""
    from .data.store import CellStore

    store = CellStore(store_path)
    panel_map, notes = _gene_map(store.gene_ids, genes, opts.missing_genes, str(store_path))
    cond = store.conditions[store.conditions["is_control"]]
    rng = np.random.default_rng([opts.seed, 17])
    xs, ctx, bat, lib = [], [], [], []
    for context in contexts:
        groups = cond[cond["context"] == context]
        if groups.empty:
            raise DataError(store_path, f"no control cells for context {context!r} (empty control pool)")
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(groups["start"], groups["n"])])
        batches = np.concatenate([[b] * n for b, n in zip(groups["batch"], groups["n"])])
        pick = _sample(np.arange(len(rows)), opts.max_controls, rng)
        indptr, indices, data = store.read_csr(rows[pick])
        lib.append(library_sizes(indptr, data, store.value_kind, normalize))
        totals = lib[-1] if store.value_kind == VALUES_COUNTS else None  # the row sums, computed once
        xs.append(to_dense(indptr, indices, data, panel_map, len(genes), normalize, store.value_kind, totals))
        ctx.append(np.full(len(pick), context))
        bat.append(batches[pick].astype(str))
    return ControlPool(np.concatenate(xs), np.concatenate(ctx), np.concatenate(bat), str(store_path), notes,
                       _libraries(lib))


def controls_from_h5ad(path: str, genes: list[str], normalize: NormalizeConfig, contexts: list[str],
                       opts: PredictOptions, *, pert_col: str = "perturbation", context_col: str | None = "context",
                       batch_col: str | None = "batch", only_context: str | None = None,
                       no_batch: str = "batch") -> ControlPool:
    """Control cells of a user's h5ad (rows whose ``pert_col`` is the control label). ``only_context``:
    the checkpoint's one context, given to every cell when obs has no ``context_col``; ``no_batch``:
    every cell's batch when ``batch_col`` is None."""
    import anndata as ad

    if not Path(path).is_file():
        raise DataError(path, "controls h5ad not found")
    try:
        adata = ad.read_h5ad(path, backed="r")
    except Exception as err:  # noqa: BLE001 - h5py / anndata raise many kinds for a damaged file
        raise DataError(path, f"cannot read the controls h5ad (truncated or damaged?): {one_line(err)}") from None
    implicit = only_context is not None and (context_col is None or context_col not in adata.obs.columns)
    for col in (pert_col, *([] if implicit else [context_col]), *([batch_col] if batch_col else [])):
        if col not in adata.obs.columns:
            raise DataError(path, f"obs has no column {col!r} (columns: {list(adata.obs.columns)[:10]})")
    is_ctrl = adata.obs[pert_col].astype(str).to_numpy() == opts.control_label
    if not is_ctrl.any():
        raise DataError(path, f"no control cells: no obs[{pert_col!r}] equals {opts.control_label!r}")
    panel_map, notes = _gene_map(adata.var_names.to_numpy(), genes, opts.missing_genes, path)
    context = np.full(adata.n_obs, only_context) if implicit else adata.obs[context_col].astype(str).to_numpy()
    batch = adata.obs[batch_col].astype(str).to_numpy() if batch_col else np.full(adata.n_obs, no_batch)
    rng = np.random.default_rng([opts.seed, 17])
    xs, ctx, bat, lib = [], [], [], []
    kind = None
    for c in contexts:
        rows = np.flatnonzero(is_ctrl & (context == c))
        if len(rows) == 0:
            raise DataError(path, f"no control cells for context {c!r} (empty control pool)")
        rows = _sample(rows, opts.max_controls, rng)
        first = kind is None
        x, sizes, kind = h5ad_rows(adata, path, rows, panel_map, len(genes), normalize, kind, f"context {c!r}")
        if first:
            notes.append(f"{path}: values look like {'raw counts' if kind == VALUES_COUNTS else 'log-normalised'}")
        xs.append(x)
        lib.append(sizes)
        ctx.append(np.full(len(rows), c))
        bat.append(batch[rows])
    adata.file.close()
    return ControlPool(np.concatenate(xs), np.concatenate(ctx), np.concatenate(bat), path, notes, _libraries(lib))


def h5ad_rows(adata, path: str, rows: np.ndarray, panel_map: np.ndarray, num_genes: int, normalize: NormalizeConfig,
              kind: str | None, what: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Rows (sorted) of a backed h5ad's X on the checkpoint's genes, normalised as in training, with
    their library sizes and the value kind (``kind`` None: detected here, integral values are counts)."""
    try:
        X = sp.csr_matrix(adata.X[rows])
    except Exception as err:  # noqa: BLE001 - a truncated X fails only when its rows are read
        raise DataError(path, f"cannot read X rows of {what} (truncated or damaged?): {one_line(err)}") from None
    if kind is None:
        kind = VALUES_COUNTS if np.array_equal(X.data, np.round(X.data)) else VALUES_LOGNORM
    totals = np.asarray(X.sum(axis=1)).ravel()
    x = to_dense(X.indptr, X.indices, X.data, panel_map, num_genes, normalize, kind, totals=totals)
    sizes = library_sizes(X.indptr, X.data, kind, normalize, totals if kind == VALUES_COUNTS else None)
    return x, sizes, kind


def _libraries(parts: list) -> np.ndarray | None:
    """The pool's library sizes, or None when any part's are unknown (perturbdiff.decode)."""
    return None if any(p is None for p in parts) else np.concatenate(parts)


# ---------------------------------------------------------------------------------------------
# The streaming AnnData writer
# ---------------------------------------------------------------------------------------------


# HDF5 chunks of the streamed X arrays (elements): large, so an append is a few big writes
DATA_CHUNK, INDPTR_CHUNK = 1 << 20, 1 << 16


class _WriteGuard(io.RawIOBase):
    """The file under an h5py.File that survives a failed write (a full disk or quota).

    When a write fails, HDF5 can neither flush nor close the file, and the process then crashes at
    exit (a segmentation fault while h5py frees its objects: seen with a full disk). Through this
    file object the first failed write is remembered and every later write is dropped, so HDF5
    closes cleanly; the writer then raises the remembered error and removes the file."""

    def __init__(self, path: Path):
        self.raw = open(path, "w+b", buffering=0)  # unbuffered: a failure surfaces in write()
        self.failed: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, buffer) -> int:
        return self.raw.readinto(buffer)

    def write(self, data) -> int:
        if self.failed is None:
            try:
                return self.raw.write(data)
            except OSError as err:
                self.failed = err
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        return self.raw.truncate(size)

    def close(self) -> None:
        super().close()
        self.raw.close()


class StreamingH5ad:
    """An .h5ad whose X (CSR) grows by appended row blocks; obs is written on ``close``. Written to
    ``<path>.partial`` and renamed on success, so a failure never leaves a complete-looking file.
    A failed write (a full disk) is raised at the next append or at close, as an OSError."""

    def __init__(self, path: str | Path, genes: list[str]):
        import h5py
        from anndata.io import write_elem

        self.path, self.tmp = Path(path), Path(f"{path}.partial")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.guard = _WriteGuard(self.tmp)
        self.file = h5py.File(self.guard, "w")
        self.file.attrs["encoding-type"], self.file.attrs["encoding-version"] = "anndata", "0.1.0"
        # X in anndata's CSR encoding, grown by hand: sizes are tracked here, nothing is read back
        x = self.file.create_group("X")
        x.attrs["encoding-type"], x.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        self._data = x.create_dataset("data", (0,), np.float32, maxshape=(None,), chunks=(DATA_CHUNK,))
        self._indices = x.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(DATA_CHUNK,))
        self._indptr = x.create_dataset("indptr", data=np.zeros(1, np.int64), maxshape=(None,),
                                        chunks=(INDPTR_CHUNK,))
        self.genes, self.nnz = len(genes), 0
        write_elem(self.file, "var", pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")))
        self.obs: dict[str, list] = {c: [] for c in OBS_COLUMNS}
        self.n = 0

    def append(self, x, perturbation, context, batch, sample, is_control) -> None:
        """Rows ``x`` (dense [k, G] or sparse) and their obs values (scalars or [k] arrays)."""
        m = sp.csr_matrix(x, dtype=np.float32)
        if m.shape[1] != self.genes:
            raise ValueError(f"rows have {m.shape[1]} genes, the file {self.genes}")
        m.sort_indices()
        k, nnz = m.shape[0], int(m.nnz)
        for dset, values, size in ((self._data, m.data, self.nnz + nnz), (self._indices, m.indices, self.nnz + nnz),
                                   (self._indptr, m.indptr[1:].astype(np.int64) + self.nnz, self.n + k + 1)):
            dset.resize((size,))
            dset[size - len(values):] = values
        self._raise_failed()
        for key, value in zip(OBS_COLUMNS, (perturbation, context, batch, sample, is_control)):
            self.obs[key].extend(np.broadcast_to(np.asarray(value), (k,)).tolist())
        self.n, self.nnz = self.n + k, self.nnz + nnz

    def close(self, uns: dict | None = None) -> Path:
        from anndata.io import write_elem

        obs = pd.DataFrame(self.obs, index=pd.Index([f"cell{i}" for i in range(self.n)]))
        for c in ("perturbation", "context", "batch"):
            obs[c] = obs[c].astype(str).astype("category")
        obs["sample"] = obs["sample"].astype(np.int64)
        obs["is_control"] = obs["is_control"].astype(bool)
        self.file["X"].attrs["shape"] = (self.n, self.genes)
        write_elem(self.file, "obs", obs)
        write_elem(self.file, "uns", uns or {})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(self.file, key, {})
        self.file.close()
        self.guard.close()
        self._raise_failed()
        os.replace(self.tmp, self.path)
        return self.path

    def _raise_failed(self) -> None:
        if self.guard.failed is not None:
            err = self.guard.failed
            raise OSError(err.errno, f"{err.strerror} (writing {self.tmp})", str(self.tmp)) from err

    def abort(self) -> None:
        try:
            if self.file.id.valid:
                self.file.close()
            self.guard.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


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
    from .diffusion import SetDiffusion
    from .diffusion.sampler import bridge_sets, sample_sets

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


def write_real(out_path: str | Path, genes: list[str], blocks, pool: ControlPool, normalize: NormalizeConfig,
               opts: PredictOptions, **uns) -> Path:
    """real.h5ad: the real cells ``blocks`` yields as (x [n, G] normalised as in training,
    perturbation, context, batch), then the same controls as the prediction; ``uns``: recorded too."""
    writer = StreamingH5ad(out_path, genes)
    try:
        for x, perturbation, context, batch in blocks:
            writer.append(x * normalize.scale, perturbation, context, batch, -1, False)
        append_controls(writer, pool, normalize, opts)
        return writer.close(uns={"perturbdiff": {"control_label": opts.control_label, **uns}})
    except BaseException:
        writer.abort()
        raise


def real_from_store(store_path: str, groups: pd.DataFrame, genes: list[str], normalize: NormalizeConfig,
                    pool: ControlPool, out_path: str | Path, opts: PredictOptions) -> Path:
    """The real cells of the conditions' store groups plus the same controls as the prediction."""
    from .data.store import CellStore

    store = CellStore(store_path)
    panel_map, _ = _gene_map(store.gene_ids, genes, "zero", str(store_path))

    def blocks():
        for _, g in groups.iterrows():
            for s in range(int(g["start"]), int(g["start"]) + int(g["n"]), 4096):
                rows = np.arange(s, min(s + 4096, int(g["start"]) + int(g["n"])))
                indptr, indices, data = store.read_csr(rows)
                x = to_dense(indptr, indices, data, panel_map, len(genes), normalize, store.value_kind)
                yield x, g["perturbation"], g["context"], g["batch"]

    return write_real(out_path, genes, blocks(), pool, normalize, opts)


def train_from_store(store_path: str, groups: pd.DataFrame, genes: list[str], normalize: NormalizeConfig,
                     out_path: str | Path, opts: PredictOptions) -> Path:
    """Training cells for the baselines: at most ``opts.train_cells`` cells of every group in
    ``groups`` (seeded), control groups labelled ``opts.control_label``. The baselines only need
    pseudobulk means, so a sample per group bounds the file for a store of any size."""
    from .data.store import CellStore

    store = CellStore(store_path)
    panel_map, _ = _gene_map(store.gene_ids, genes, "zero", str(store_path))
    rng = np.random.default_rng([opts.seed, 31])
    writer = StreamingH5ad(out_path, genes)
    try:
        for _, g in groups.iterrows():
            rows = _sample(np.arange(int(g["start"]), int(g["start"]) + int(g["n"])), opts.train_cells, rng)
            indptr, indices, data = store.read_csr(rows)
            x = to_dense(indptr, indices, data, panel_map, len(genes), normalize, store.value_kind)
            label = opts.control_label if bool(g["is_control"]) else g["perturbation"]
            writer.append(x * normalize.scale, label, g["context"], g["batch"], -1, bool(g["is_control"]))
        return writer.close(uns={"perturbdiff": {"control_label": opts.control_label,
                                                 "cells_per_group": opts.train_cells}})
    except BaseException:
        writer.abort()
        raise


def write_prediction(out_dir: str | Path, body, *, inputs=(), overwrite: bool = False) -> tuple[Path, ...]:
    """Run ``body(stage_dir) -> [written paths]`` on every rank and put its files in place as one unit.

    Rank 0 checks ``out_dir`` before any work (perturbdiff.outputs: never an input, a file or a
    directory that is not an earlier prediction; an earlier one only with ``overwrite``), holds its
    lock, and opens a staging directory beside it (the same on every rank). When ``body`` is done,
    rank 0 records the files with their sizes in the completion marker and renames the staging
    directory to ``out_dir``: a reader sees every file of the call or none (``evaluate --dir``
    requires the marker). On any failure the staging directory is removed; a full disk is one
    DataError naming ``out_dir``. Returns the final paths on rank 0, () elsewhere."""
    rank, world = pdist.get_rank(), pdist.get_world_size()
    out_dir = Path(out_dir)
    stage = Staging(out_dir, "predict", shared=world > 1)
    lock = None
    try:
        if rank == 0:
            check_output(out_dir, "predict", inputs=inputs, overwrite=overwrite)
            lock = OutputLock(out_dir, "prediction directory").acquire()
            stage.open(processes=world)
        if world > 1:
            pdist.barrier()  # the staging directory exists
        written = body(stage.path)
        if rank != 0:
            return ()
        names = [Path(w).name for w in written]
        stage.commit(names)
        return tuple(out_dir / n for n in names)
    except BaseException as err:
        if rank == 0:
            stage.abort()
        if out_of_space(err):
            raise space_error(out_dir, err) from None
        raise
    finally:
        if lock is not None:
            lock.release()


def predict_split(found, store_path: str, split_cfg, split: str, out_dir: str | Path, opts: PredictOptions,
                  log=print, overwrite: bool = False) -> tuple[Path, ...]:
    """Predict every group of ``split`` in a store (one condition per group, its size in cells) and
    write the truth beside it: (pred.h5ad, real.h5ad[, train.h5ad]), as one unit (``write_prediction``).
    With ``opts.train_cells`` > 0 a sample of the training groups (and the controls) goes to
    train.h5ad, for the baselines."""
    from .data.splits import assign_splits
    from .data.store import CellStore

    store = CellStore(store_path)
    cond = store.conditions
    labels = assign_splits(cond, split_cfg, log=lambda *a: None)
    groups = cond[(labels == split) & (cond["n"] > 0)].reset_index(drop=True)
    if groups.empty:
        raise DataError(store_path, f"split {split!r} has no conditions to predict")
    # the store's numeric covariates; one it lacks is unknown (NaN), as in training on this store
    numeric = {c: groups[c] if c in groups.columns else np.nan for c in found.model_cfg.numeric_covariates}
    conditions = normalise_conditions(groups[["perturbation", "context", "batch"]].assign(
        **numeric, n_cells=groups["n"], n_samples=opts.n_samples), opts, source=store_path)
    genes = found.genes
    normalize = found.normalize

    def body(stage: Path) -> list[Path]:
        pool = controls_from_store(store_path, genes, normalize, sorted(conditions["context"].unique()), opts)
        log(f"predicting {len(conditions)} {split} condition(s), {int(conditions['n_cells'].sum()):,} cells x "
            f"{opts.n_samples} population(s)")
        pred = predict(found, conditions, pool, stage / "pred.h5ad", opts, log)
        if pred is None:  # not rank 0 of a multi-process prediction: rank 0 writes the rest
            return []
        written = [pred, real_from_store(store_path, groups, genes, normalize, pool, stage / "real.h5ad", opts)]
        if opts.train_cells > 0:
            keep = ((labels == "train") | (labels == "control")) & (cond["n"] > 0).to_numpy()
            log(f"sampling up to {opts.train_cells} cells of each of {int(keep.sum())} training/control group(s) "
                "for the baselines -> train.h5ad")
            written.append(train_from_store(store_path, cond[keep].reset_index(drop=True), genes, normalize,
                                            stage / "train.h5ad", opts))
        return written

    return write_prediction(out_dir, body, inputs=[store_path], overwrite=overwrite)
