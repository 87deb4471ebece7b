"""Read a PerturbDiff cell store: rows as CSR, or dense on a gene panel with on-read normalisation.

Shape legend: N cells in the store, G genes in the store vocabulary, P genes in the panel.

Opening a store runs the cheap structural checks and every ``read_csr`` checks what it read
(perturbdiff/data/integrity.py says which); a damaged store is a DataError, not a silent run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from perturbdiff.config import NormalizeConfig, PanelConfig

from .chunks import fast_or_zarr
from .integrity import check_arrays, check_indptr, check_indptr_slice, check_values, read_conditions
from .schema import (
    OBS_GROUP, STORE_ATTR, VALUES_COUNTS, VALUES_LOGNORM, VAR_GENE_ID, VAR_GENE_SYMBOL, VAR_HVG_RANK, X_DATA,
    X_INDICES, X_INDPTR, DataError, StoreManifest, obs_categories, obs_codes, obs_values,
)


PANEL_KINDS = ("hvg", "all", "file")  # panel.kind


class CellStore:
    """Read-only handle on a store; cheap to open, safe to re-open in every DataLoader worker."""

    def __init__(self, path: str | Path, cache_mb: int = 64):
        cache_bytes = int(cache_mb) << 20
        self.path = Path(path)
        self.manifest = StoreManifest.read(self.path)
        check_arrays(self.path, self.manifest)  # before zarr-python parses any array's metadata
        try:
            self.root = zarr.open_group(str(self.path), mode="r")
        except Exception as err:  # noqa: BLE001
            raise DataError(self.path, f"cannot open the Zarr group: {err}") from None
        if self.root.attrs.get(STORE_ATTR) != self.manifest.schema_version:
            raise DataError(self.path, "Zarr attributes and manifest disagree on the schema version")
        self.conditions: pd.DataFrame = read_conditions(self.path, self.manifest)
        self.indptr_arr = self.root[X_INDPTR]
        self.indices_arr = self.root[X_INDICES]
        self.data_arr = self.root[X_DATA]
        # hot-path readers (see chunks.py); fall back to zarr-python for other layouts
        self.indptr_fast = fast_or_zarr(self.indptr_arr, self.path / X_INDPTR, cache_bytes // 4)
        self.indices_fast = fast_or_zarr(self.indices_arr, self.path / X_INDICES, cache_bytes)
        self.data_fast = fast_or_zarr(self.data_arr, self.path / X_DATA, cache_bytes)
        self.value_kind = self.manifest.value_kind
        self._cache: dict[str, np.ndarray] = {}
        self._nnz, self._num_genes = self.manifest.nnz, self.manifest.num_genes
        check_indptr(self.path, self.manifest, self.conditions, self.indptr_fast)

    # ---- metadata -----------------------------------------------------------------------------

    @property
    def num_cells(self) -> int:
        return self.manifest.num_cells

    @property
    def num_genes(self) -> int:
        return self.manifest.num_genes

    def _small(self, key: str) -> np.ndarray:
        if key not in self._cache:
            self._cache[key] = as_numpy(self.root[key][:])
        return self._cache[key]

    @property
    def gene_ids(self) -> np.ndarray:
        return self._small(VAR_GENE_ID).astype(str)

    @property
    def gene_symbols(self) -> np.ndarray:
        return self._small(VAR_GENE_SYMBOL).astype(str)

    def categories(self, col: str) -> np.ndarray:
        return self._small(obs_categories(col)).astype(str)

    def obs(self, col: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """An obs column over rows [start, stop): labels for categorical columns, values otherwise."""
        stop = self.num_cells if stop is None else stop
        if f"{col}/codes" in self.root[OBS_GROUP]:
            return self.categories(col)[np.asarray(self.root[obs_codes(col)][start:stop])]
        if col in self.root[OBS_GROUP]:
            return as_numpy(self.root[obs_values(col)][start:stop])
        raise DataError(self.path, f"store has no obs column {col!r}")

    def hvg_ranking(self) -> np.ndarray:
        """Gene indices, most variable first."""
        return np.argsort(self._small(VAR_HVG_RANK), kind="stable")

    def panel(self, cfg: PanelConfig) -> np.ndarray:
        """Vocabulary indices of the configured gene panel, in vocabulary order."""
        if cfg.kind == "all":
            return np.arange(self.num_genes)
        if cfg.kind == "hvg":
            if cfg.num_genes > self.num_genes:
                raise DataError(self.path, f"panel.num_genes={cfg.num_genes} but the store has only "
                                f"{self.num_genes} genes")
            return np.sort(self.hvg_ranking()[: cfg.num_genes])
        if cfg.kind == "file":
            if not cfg.genes_file or not Path(cfg.genes_file).is_file():
                raise DataError(cfg.genes_file, "panel.genes_file does not exist")
            wanted = [g.strip() for g in Path(cfg.genes_file).read_text().splitlines() if g.strip()]
            lookup = {g: i for i, g in enumerate(self.gene_symbols)}
            lookup.update({g: i for i, g in enumerate(self.gene_ids)})
            missing = [g for g in wanted if g not in lookup]
            if missing:
                raise DataError(cfg.genes_file, f"{len(missing)} panel gene(s) not in the store vocabulary "
                                f"(gene vocabulary mismatch), e.g. {missing[:5]}")
            return np.array([lookup[g] for g in wanted], dtype=np.int64)
        raise DataError(None, f"unknown panel.kind {cfg.kind!r}: use {', '.join(PANEL_KINDS)}")

    # ---- rows -----------------------------------------------------------------------------------

    def read_csr(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """CSR (indptr, indices, data) of ``rows`` (sorted, unique); each needed chunk is read once.

        Checks what it reads (row pointers monotone within [0, nnz], gene indices within [0, G),
        values finite and non-negative): damage a store's open-time checks cannot see surfaces
        here as a DataError naming the array and the row, before it reaches a model.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros(1, np.int64), np.zeros(0, np.int32), np.zeros(0, np.float32)
        ip = np.asarray(self.indptr_fast[rows[0]:rows[-1] + 2])
        check_indptr_slice(self.path, int(rows[0]), ip, self._nnz)
        starts, stops = ip[rows - rows[0]], ip[rows - rows[0] + 1]
        lengths = stops - starts
        out_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=out_ptr[1:])
        indices, data = self.indices_fast.take(starts, lengths), self.data_fast.take(starts, lengths)
        check_values(self.path, rows, starts, out_ptr, indices, data, self._num_genes)
        return out_ptr, indices, data

    def read_dense(self, rows: np.ndarray, panel: np.ndarray, normalize: NormalizeConfig) -> np.ndarray:
        """Rows as a dense float32 [len(rows), P] array on ``panel``, normalised (see to_dense)."""
        indptr, indices, data = self.read_csr(rows)
        return to_dense(indptr, indices, data, self.panel_map(panel), len(panel), normalize, self.value_kind)

    def panel_map(self, panel: np.ndarray) -> np.ndarray:
        key = f"_panel_{hash(np.asarray(panel).tobytes())}"
        if key not in self._cache:
            m = np.full(self.num_genes, -1, dtype=np.int64)
            m[panel] = np.arange(len(panel))
            self._cache[key] = m
        return self._cache[key]


def as_numpy(values) -> np.ndarray:
    """Zarr string arrays come back as numpy StringDType; give plain fixed-width str arrays."""
    values = np.asarray(values)
    if values.dtype.kind == "T":
        return np.array(values.tolist(), dtype=str) if values.size else np.zeros(0, dtype="<U1")
    return values


def to_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, panel_map: np.ndarray, num_panel: int,
             normalize: NormalizeConfig, value_kind: str, totals: np.ndarray | None = None) -> np.ndarray:
    """CSR rows -> normalised dense [rows, P] float32.

    counts: x -> log1p(x / total * target_sum) / scale, where total sums ALL genes of the cell
    (not just the panel), as normalize_total does: the rows' own sums when they hold the full
    vocabulary, else ``totals`` [rows]; log-normalised stores: x -> x / scale.
    """
    n = len(indptr) - 1
    lengths = np.diff(indptr)
    row = np.repeat(np.arange(n), lengths)
    x = data.astype(np.float32)
    if value_kind == VALUES_COUNTS:
        total = np.bincount(row, weights=x, minlength=n) if totals is None else np.asarray(totals, np.float64)
        factor = np.divide(normalize.target_sum, total, out=np.zeros(n), where=total > 0).astype(np.float32)
        x = x * factor[row]
        if normalize.log1p:
            x = np.log1p(x)
    elif value_kind != VALUES_LOGNORM:
        raise DataError(None, f"unknown value kind {value_kind!r}")
    if normalize.scale != 1:
        x = x / np.float32(normalize.scale)
    col = panel_map[indices]
    keep = col >= 0
    out = np.zeros((n, num_panel), dtype=np.float32)
    out[row[keep], col[keep]] = x[keep]
    return out
