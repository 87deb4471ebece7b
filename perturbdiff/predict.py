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

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .config import NormalizeConfig
from .data.schema import VALUES_COUNTS, VALUES_LOGNORM, DataError
from .data.store import to_dense
from .train import distributed as pdist

OBS_COLUMNS = ("perturbation", "context", "batch", "sample", "is_control")


@dataclass
class PredictOptions:
    n_cells: int = 256  # per population, when a condition does not say
    n_samples: int = 1  # populations per condition, when a condition does not say
    sets_per_batch: int = 16
    sample_steps: int | None = None  # None: the checkpoint's diffusion.sample_steps
    guidance: float | None = None
    max_controls: int = 2_000  # real control cells per context appended to the outputs
    train_cells: int = 0  # > 0: predict_split also samples this many cells per training group (train.h5ad)
    missing_genes: str = "error"  # error | zero
    control_label: str = "control"
    seed: int = 0
    device: str = "auto"


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
    xs, ctx, bat = [], [], []
    for context in contexts:
        groups = cond[cond["context"] == context]
        if groups.empty:
            raise DataError(store_path, f"no control cells for context {context!r} (empty control pool)")
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(groups["start"], groups["n"])])
        batches = np.concatenate([[b] * n for b, n in zip(groups["batch"], groups["n"])])
        pick = _sample(np.arange(len(rows)), opts.max_controls, rng)
        indptr, indices, data = store.read_csr(rows[pick])
        xs.append(to_dense(indptr, indices, data, panel_map, len(genes), normalize, store.value_kind))
        ctx.append(np.full(len(pick), context))
        bat.append(batches[pick].astype(str))
    return ControlPool(np.concatenate(xs), np.concatenate(ctx), np.concatenate(bat), str(store_path), notes)


def controls_from_h5ad(path: str, genes: list[str], normalize: NormalizeConfig, contexts: list[str],
                       opts: PredictOptions, *, pert_col: str = "perturbation", context_col: str = "context",
                       batch_col: str | None = "batch") -> ControlPool:
    """Control cells of a user's h5ad (rows whose ``pert_col`` is the control label)."""
    import anndata as ad

    adata = ad.read_h5ad(path, backed="r")
    for col in (pert_col, context_col, *([batch_col] if batch_col else [])):
        if col not in adata.obs.columns:
            raise DataError(path, f"obs has no column {col!r} (columns: {list(adata.obs.columns)[:10]})")
    is_ctrl = adata.obs[pert_col].astype(str).to_numpy() == opts.control_label
    if not is_ctrl.any():
        raise DataError(path, f"no control cells: no obs[{pert_col!r}] equals {opts.control_label!r}")
    panel_map, notes = _gene_map(adata.var_names.to_numpy(), genes, opts.missing_genes, path)
    context = adata.obs[context_col].astype(str).to_numpy()
    batch = adata.obs[batch_col].astype(str).to_numpy() if batch_col else np.full(adata.n_obs, "batch")
    rng = np.random.default_rng([opts.seed, 17])
    xs, ctx, bat = [], [], []
    kind = None
    for c in contexts:
        rows = np.flatnonzero(is_ctrl & (context == c))
        if len(rows) == 0:
            raise DataError(path, f"no control cells for context {c!r} (empty control pool)")
        rows = _sample(rows, opts.max_controls, rng)
        X = sp.csr_matrix(adata.X[rows])
        if kind is None:
            kind = VALUES_COUNTS if np.array_equal(X.data, np.round(X.data)) else VALUES_LOGNORM
            notes.append(f"{path}: values look like {'raw counts' if kind == VALUES_COUNTS else 'log-normalised'}")
        xs.append(to_dense(X.indptr, X.indices, X.data, panel_map, len(genes), normalize, kind,
                           totals=np.asarray(X.sum(axis=1)).ravel()))
        ctx.append(np.full(len(rows), c))
        bat.append(batch[rows])
    adata.file.close()
    return ControlPool(np.concatenate(xs), np.concatenate(ctx), np.concatenate(bat), path, notes)


# ---------------------------------------------------------------------------------------------
# The streaming AnnData writer
# ---------------------------------------------------------------------------------------------


class StreamingH5ad:
    """An .h5ad whose X (CSR) grows by appended row blocks; obs is written on ``close``. Written to
    ``<path>.partial`` and renamed on success, so a failure never leaves a complete-looking file."""

    def __init__(self, path: str | Path, genes: list[str]):
        import h5py
        from anndata.io import write_elem

        self.path, self.tmp = Path(path), Path(f"{path}.partial")
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self.file = h5py.File(self.tmp, "w")
        self.file.attrs["encoding-type"], self.file.attrs["encoding-version"] = "anndata", "0.1.0"
        write_elem(self.file, "X", sp.csr_matrix((0, len(genes)), dtype=np.float32))
        write_elem(self.file, "var", pd.DataFrame(index=pd.Index([str(g) for g in genes], name="gene")))
        self.obs: dict[str, list] = {c: [] for c in OBS_COLUMNS}
        self.n = 0
        self._x = None

    def append(self, x: np.ndarray, perturbation, context, batch, sample, is_control) -> None:
        from anndata.io import sparse_dataset

        if self._x is None:
            self._x = sparse_dataset(self.file["X"])
        self._x.append(sp.csr_matrix(x, dtype=np.float32))
        k = x.shape[0]
        for key, value in zip(OBS_COLUMNS, (perturbation, context, batch, sample, is_control)):
            self.obs[key].extend(np.broadcast_to(np.asarray(value), (k,)).tolist())
        self.n += k

    def close(self, uns: dict | None = None) -> Path:
        from anndata.io import write_elem

        obs = pd.DataFrame(self.obs, index=pd.Index([f"cell{i}" for i in range(self.n)]))
        for c in ("perturbation", "context", "batch"):
            obs[c] = obs[c].astype(str).astype("category")
        obs["sample"] = obs["sample"].astype(np.int64)
        obs["is_control"] = obs["is_control"].astype(bool)
        write_elem(self.file, "obs", obs)
        write_elem(self.file, "uns", uns or {})
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(self.file, key, {})
        self.file.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Conditions
# ---------------------------------------------------------------------------------------------


def read_conditions(path: str, opts: PredictOptions) -> pd.DataFrame:
    """A conditions file (.csv, .tsv or .parquet): columns perturbation, context; optional batch,
    n_cells, n_samples, dose."""
    p = Path(path)
    if not p.is_file():
        raise DataError(path, "conditions file not found")
    df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p, sep="\t" if p.suffix == ".tsv" else ",")
    missing = [c for c in ("perturbation", "context") if c not in df.columns]
    if missing:
        raise DataError(path, f"conditions need columns {missing} (has {list(df.columns)})")
    return normalise_conditions(df, opts)


def normalise_conditions(df: pd.DataFrame, opts: PredictOptions) -> pd.DataFrame:
    df = df.copy()
    df["perturbation"], df["context"] = df["perturbation"].astype(str), df["context"].astype(str)
    if "batch" not in df.columns:
        df["batch"] = None
    df["n_cells"] = df["n_cells"].astype(int) if "n_cells" in df.columns else opts.n_cells
    df["n_samples"] = df["n_samples"].astype(int) if "n_samples" in df.columns else opts.n_samples
    bad = df[(df["n_cells"] < 1) | (df["n_samples"] < 1)]
    if len(bad):
        raise DataError(None, f"condition {tuple(bad.iloc[0][['context', 'perturbation']])}: n_cells and n_samples "
                        "must be >= 1")
    return df.reset_index(drop=True)


def covariates(conditions: pd.DataFrame, vocabularies: dict[str, list[str]], model, notes: list[str]) -> dict:
    """[C] covariate tensors for the conditions; unknown names are errors naming the condition."""
    out: dict[str, torch.Tensor] = {}
    branches = set(model.cov_encoder.branch_names)
    for name in ("context", "perturbation"):
        if name not in branches:
            continue
        index = {v: i for i, v in enumerate(vocabularies.get(name, []))}
        ids = []
        for _, row in conditions.iterrows():
            if row[name] not in index:
                what = ("neither in the checkpoint's perturbation vocabulary nor in its feature table"
                        if name == "perturbation" else "not in the checkpoint's context vocabulary")
                raise DataError(None, f"condition (context={row['context']!r}, perturbation={row['perturbation']!r}): "
                                f"{name} {row[name]!r} is {what} ({len(index)} known, e.g. {list(index)[:5]})")
            ids.append(index[row[name]])
        out[name] = torch.tensor(ids, dtype=torch.long)
    if "batch" in branches:
        index = {v: i for i, v in enumerate(vocabularies.get("batch", []))}
        known = conditions["batch"].map(lambda b: b in index)
        if known.all():
            out["batch"] = torch.tensor([index[b] for b in conditions["batch"]], dtype=torch.long)
        else:
            notes.append(f"{int((~known).sum())} condition(s) name no known batch: the batch covariate is left "
                         "out (its null token) for all conditions")
    for name in model.cfg.numeric_covariates:
        col = conditions[name] if name in conditions.columns else pd.Series(np.nan, index=conditions.index)
        out[f"num_{name}"] = torch.tensor(col.astype(float).to_numpy(), dtype=torch.float32)
    return out


# ---------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
    from .config import DiffusionConfig
    from .diffusion import SetDiffusion
    from .diffusion.sampler import sample_sets

    extra = found.manifest.get("extra", {})
    normalize = NormalizeConfig(**extra.get("normalize", {}))
    diffusion = SetDiffusion(DiffusionConfig(**extra.get("diffusion", {})))
    m = int(extra.get("set_size", 256))
    rank, world = pdist.get_rank(), pdist.get_world_size()
    device = _device(opts.device) if world == 1 or opts.device != "auto" else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    model = found.build(device=device).eval()
    marginal = diffusion.cfg.p_drop_control >= 1.0
    notes = list(pool.notes)
    cov = covariates(conditions, found.vocabularies, model, notes)
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
            for j, (i, s, k, _) in enumerate(chunk):
                row = conditions.iloc[i]
                rows = pool.rows(row["context"], row["batch"])
                if len(rows) == 0:
                    raise DataError(pool.source, f"condition (context={row['context']!r}, perturbation="
                                    f"{row['perturbation']!r}): empty control pool")
                seed = _set_seed(opts.seed, i, s, k)
                pick = np.random.default_rng(seed).choice(rows, min(m, len(rows)), replace=False)
                ctrl[j, :len(pick)], ctrl_mask[j, :len(pick)] = pool.x[pick], not marginal
                noise[j] = torch.randn(m, G, generator=torch.Generator().manual_seed(seed))
            idx = torch.tensor([i for i, _, _, _ in chunk])
            out = sample_sets(model, diffusion, ctrl=torch.from_numpy(ctrl).to(device),
                              ctrl_mask=torch.from_numpy(ctrl_mask).to(device),
                              cov={k: v[idx].to(device) for k, v in cov.items()}, num_cells=m, num_samples=1,
                              guidance=opts.guidance, sample_steps=opts.sample_steps, noise=noise)[:, 0]
            out = out.float().cpu().numpy() * normalize.scale
            for j, (i, s, _, n) in enumerate(chunk):
                row = conditions.iloc[i]
                writer.append(out[j, :n], row["perturbation"], row["context"], str(row["batch"]), s, False)
            log(f"  predicted {min(start + B, hi) - lo}/{hi - lo} sets" + (f" on rank {rank}" if world > 1 else ""))
        uns = {"perturbdiff": {"notes": notes, "set_size": m, "control_label": opts.control_label,
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


def real_from_store(store_path: str, groups: pd.DataFrame, genes: list[str], normalize: NormalizeConfig,
                    pool: ControlPool, out_path: str | Path, opts: PredictOptions) -> Path:
    """The real cells of the conditions' store groups plus the same controls as the prediction."""
    from .data.store import CellStore

    store = CellStore(store_path)
    panel_map, _ = _gene_map(store.gene_ids, genes, "zero", str(store_path))
    writer = StreamingH5ad(out_path, genes)
    try:
        for _, g in groups.iterrows():
            for s in range(int(g["start"]), int(g["start"]) + int(g["n"]), 4096):
                rows = np.arange(s, min(s + 4096, int(g["start"]) + int(g["n"])))
                indptr, indices, data = store.read_csr(rows)
                x = to_dense(indptr, indices, data, panel_map, len(genes), normalize, store.value_kind)
                writer.append(x * normalize.scale, g["perturbation"], g["context"], g["batch"], -1, False)
        append_controls(writer, pool, normalize, opts)
        return writer.close(uns={"perturbdiff": {"control_label": opts.control_label}})
    except BaseException:
        writer.abort()
        raise


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


def predict_split(found, store_path: str, split_cfg, split: str, out_dir: str | Path, opts: PredictOptions,
                  log=print) -> tuple[Path, ...]:
    """Predict every group of ``split`` in a store (one condition per group, its size in cells) and
    write the truth beside it: (pred.h5ad, real.h5ad[, train.h5ad]). With ``opts.train_cells`` > 0 a
    sample of the training groups (and the controls) goes to train.h5ad, for the baselines."""
    from .data.splits import assign_splits
    from .data.store import CellStore

    store = CellStore(store_path)
    cond = store.conditions
    labels = assign_splits(cond, split_cfg, log=lambda *a: None)
    groups = cond[(labels == split) & (cond["n"] > 0)].reset_index(drop=True)
    if groups.empty:
        raise DataError(store_path, f"split {split!r} has no conditions to predict")
    numeric = [c for c in found.model_cfg.numeric_covariates if c in groups.columns]
    conditions = normalise_conditions(groups[["perturbation", "context", "batch", *numeric]].assign(
        n_cells=groups["n"], n_samples=opts.n_samples), opts)
    genes = found.genes
    normalize = NormalizeConfig(**found.manifest.get("extra", {}).get("normalize", {}))
    pool = controls_from_store(store_path, genes, normalize, sorted(conditions["context"].unique()), opts)
    out_dir = Path(out_dir)
    log(f"predicting {len(conditions)} {split} condition(s), {int(conditions['n_cells'].sum()):,} cells x "
        f"{opts.n_samples} population(s)")
    pred = predict(found, conditions, pool, out_dir / "pred.h5ad", opts, log)
    if pred is None:  # not rank 0 of a multi-process prediction: rank 0 writes the rest
        return ()
    real = real_from_store(store_path, groups, genes, normalize, pool, out_dir / "real.h5ad", opts)
    if opts.train_cells <= 0:
        return pred, real
    keep = ((labels == "train") | (labels == "control")) & (cond["n"] > 0).to_numpy()
    log(f"sampling up to {opts.train_cells} cells of each of {int(keep.sum())} training/control group(s) for the "
        "baselines -> train.h5ad")
    train = train_from_store(store_path, cond[keep].reset_index(drop=True), genes, normalize,
                             out_dir / "train.h5ad", opts)
    return pred, real, train
