"""Real control cells for prediction: from a store or a user's h5ad, on the checkpoint's genes.

``ControlPool`` holds them at the model's scale with their context, batch and library sizes;
``gene_map`` aligns a source's genes to the checkpoint's by name (reporting, or refusing, missing
ones); ``read_store_rows`` / ``h5ad_rows`` read rows of a store / a backed h5ad normalised as in
training (h5ad values: counts or log-normalised, detected).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..config import NormalizeConfig
from ..data.schema import VALUES_COUNTS, VALUES_LOGNORM, DataError
from ..data.store import to_dense
from ..decode import library_sizes
from ..errors import one_line
from ..predict_options import PredictOptions


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


MISSING_GENES = ("error", "zero")  # predict.missing_genes


def gene_map(source_genes: np.ndarray, genes: list[str], missing: str, where: str) -> tuple[np.ndarray, list[str]]:
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
            raise ValueError(f"missing_genes must be {' or '.join(MISSING_GENES)}, got {missing!r}")
        notes.append(f"{len(lacking)} missing genes filled with zeros, e.g. {lacking[:5]}")
    return panel_map, notes


def sample_rows(rows: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``cap`` of ``rows`` (sorted, without replacement)."""
    return np.sort(rng.choice(rows, cap, replace=False)) if len(rows) > cap else rows


def read_store_rows(store, rows: np.ndarray, panel_map: np.ndarray, num_genes: int, normalize: NormalizeConfig,
                    libraries: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(x [n, G] normalised as in training, their library sizes or None) of the store ``rows`` on the
    checkpoint's genes (``panel_map``: store gene -> column, -1 unused). With ``libraries`` the row
    sums are computed once and used for both."""
    indptr, indices, data = store.read_csr(rows)
    if not libraries:
        return to_dense(indptr, indices, data, panel_map, num_genes, normalize, store.value_kind), None
    sizes = library_sizes(indptr, data, store.value_kind, normalize)
    totals = sizes if store.value_kind == VALUES_COUNTS else None
    return to_dense(indptr, indices, data, panel_map, num_genes, normalize, store.value_kind, totals), sizes


def controls_from_store(store_path: str, genes: list[str], normalize: NormalizeConfig, contexts: list[str],
                        opts: PredictOptions) -> ControlPool:
    """The control cells of ``contexts`` in a store (at most ``max_controls`` per context)."""
    from ..data.store import CellStore

    store = CellStore(store_path)
    panel_map, notes = gene_map(store.gene_ids, genes, opts.missing_genes, str(store_path))
    cond = store.conditions[store.conditions["is_control"]]
    rng = np.random.default_rng([opts.seed, 17])
    xs, ctx, bat, lib = [], [], [], []
    for context in contexts:
        groups = cond[cond["context"] == context]
        if groups.empty:
            raise DataError(store_path, f"no control cells for context {context!r} (empty control pool)")
        rows = np.concatenate([np.arange(s, s + n) for s, n in zip(groups["start"], groups["n"])])
        batches = np.concatenate([[b] * n for b, n in zip(groups["batch"], groups["n"])])
        pick = sample_rows(np.arange(len(rows)), opts.max_controls, rng)
        x, sizes = read_store_rows(store, rows[pick], panel_map, len(genes), normalize, libraries=True)
        xs.append(x)
        lib.append(sizes)
        ctx.append(np.full(len(pick), context))
        bat.append(batches[pick].astype(str))
    return ControlPool(np.concatenate(xs), np.concatenate(ctx), np.concatenate(bat), str(store_path), notes,
                       pool_libraries(lib))


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
    panel_map, notes = gene_map(adata.var_names.to_numpy(), genes, opts.missing_genes, path)
    context = np.full(adata.n_obs, only_context) if implicit else adata.obs[context_col].astype(str).to_numpy()
    batch = adata.obs[batch_col].astype(str).to_numpy() if batch_col else np.full(adata.n_obs, no_batch)
    rng = np.random.default_rng([opts.seed, 17])
    xs, ctx, bat, lib = [], [], [], []
    kind = None
    for c in contexts:
        rows = np.flatnonzero(is_ctrl & (context == c))
        if len(rows) == 0:
            raise DataError(path, f"no control cells for context {c!r} (empty control pool)")
        rows = sample_rows(rows, opts.max_controls, rng)
        first = kind is None
        x, sizes, kind = h5ad_rows(adata, path, rows, panel_map, len(genes), normalize, kind, f"context {c!r}")
        if first:
            notes.append(f"{path}: values look like {'raw counts' if kind == VALUES_COUNTS else 'log-normalised'}")
        xs.append(x)
        lib.append(sizes)
        ctx.append(np.full(len(rows), c))
        bat.append(batch[rows])
    adata.file.close()
    return ControlPool(np.concatenate(xs), np.concatenate(ctx), np.concatenate(bat), path, notes, pool_libraries(lib))


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


def pool_libraries(parts: list) -> np.ndarray | None:
    """The pool's library sizes, or None when any part's are unknown (perturbdiff.decode)."""
    return None if any(p is None for p in parts) else np.concatenate(parts)
