"""Any AnnData .h5ad (Parse PBMC, Replogle, users' own) -> store, in row chunks (bounded memory).

The perturbation / context / batch / control columns come from the config. X is read a chunk of
rows at a time from the file (CSR or dense), so a file larger than RAM converts. Values are
detected: integer counts are stored as counts; non-negative non-integer values with a small maximum
are taken as log-normalised (log1p of normalize_total) and stored as such, and the reader then skips
its own normalisation. Several files must share one gene vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import scipy.sparse as sp

from perturbdiff.config import ShardConfig
from perturbdiff.data.schema import VALUES_COUNTS, VALUES_LOGNORM, DataError

from .convert import Plan, check_values
from .parts import PartData

LOGNORM_MAX = 30.0  # log1p values above this are implausible (1e13 counts)


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataError(path, "h5ad file does not exist")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise DataError(path, f"cannot open h5ad (empty or truncated?): {err}") from None


def _read_elem(f: h5py.File, key: str, path: Path):
    try:
        return ad.io.read_elem(f[key])
    except KeyError:
        raise DataError(path, f"h5ad has no {key!r} element") from None
    except Exception as err:  # noqa: BLE001 - anndata raises many kinds on damaged files
        raise DataError(path, f"cannot read {key!r} (truncated or damaged file?): {err}") from None


def _obs_column(f: h5py.File, col: str, path: Path, what: str) -> np.ndarray:
    obs = f["obs"]
    if col not in obs:
        cols = [c for c in obs.keys() if c != obs.attrs.get("_index", "_index")]
        raise DataError(path, f"obs has no column {col!r} ({what}); columns are {sorted(cols)}")
    values = _read_elem(f, f"obs/{col}", path)
    return np.asarray(values)


def _obs_rows(f: h5py.File, key: str, path: Path, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of an obs column, reading only that slice where the encoding allows it
    (categorical codes, plain and string datasets); other encodings are read whole, then sliced."""
    elem = f[key]
    enc = elem.attrs.get("encoding-type", "")
    try:
        if isinstance(elem, h5py.Group) and enc == "categorical":
            cats = np.asarray(ad.io.read_elem(elem["categories"]))
            codes = np.asarray(elem["codes"][a:b]).astype(np.int64)
            if (codes < 0).any():  # missing values, as pandas shows them
                out = cats.astype(object)[np.maximum(codes, 0)]
                out[codes < 0] = np.nan
                return out
            return cats[codes]
        if isinstance(elem, h5py.Dataset):
            if h5py.check_string_dtype(elem.dtype) is not None:
                return np.asarray(elem.asstr()[a:b], dtype=object)
            return np.asarray(elem[a:b])
    except Exception as err:  # noqa: BLE001 - damaged files raise many kinds
        raise DataError(path, f"cannot read {key!r} rows {a}..{b} (truncated or damaged file?): {err}") from None
    return np.asarray(_read_elem(f, key, path))[a:b]


def _x_rows(f: h5py.File, path: Path, start: int, stop: int) -> sp.csr_matrix:
    x = f["X"]
    try:
        if isinstance(x, h5py.Dataset):
            return sp.csr_matrix(np.asarray(x[start:stop]))
        enc = x.attrs.get("encoding-type", "")
        if enc != "csr_matrix":
            raise DataError(path, f"X is stored as {enc or 'an unknown encoding'}; only CSR or dense X "
                            "can be read in row chunks (re-save with X in CSR format)")
        m = ad.io.sparse_dataset(x)[start:stop]
        return sp.csr_matrix(m)
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001
        raise DataError(path, f"cannot read X rows {start}..{stop} (truncated file?): {err}") from None


def _genes(f: h5py.File, path: Path, cfg: ShardConfig) -> np.ndarray:
    var = f["var"]
    index_name = var.attrs.get("_index", "_index")
    names = np.asarray(_read_elem(f, f"var/{index_name}", path)).astype(str)
    if cfg.gene_symbol_col:
        if cfg.gene_symbol_col not in var:
            raise DataError(path, f"var has no column {cfg.gene_symbol_col!r} (shard.gene_symbol_col)")
        return names, np.asarray(_read_elem(f, f"var/{cfg.gene_symbol_col}", path)).astype(str)
    return names, names


def _detect_values(f: h5py.File, path: Path, n_obs: int, forced: str) -> str:
    probe = [(0, min(n_obs, 2000)), (n_obs // 2, min(n_obs, n_obs // 2 + 2000))]
    datas = [_x_rows(f, path, a, b) for a, b in probe if b > a]
    data = np.concatenate([m.data for m in datas]) if datas else np.zeros(0)
    for (a, _), m in zip(probe, datas):
        check_values(path, m.data, m.indptr, a, require_integer=False)
    integer = bool(np.all(data == np.round(data)))
    if forced == "counts":
        if not integer:
            raise DataError(path, "shard.values=counts but X holds non-integer values")
        return VALUES_COUNTS
    if forced == "lognorm":
        return VALUES_LOGNORM
    if forced != "auto":
        raise DataError(None, f"shard.values must be auto, counts or lognorm, not {forced!r}")
    if integer:
        return VALUES_COUNTS
    if data.size and data.max() > LOGNORM_MAX:
        raise DataError(path, f"X holds non-integer values up to {data.max():.3g}: neither raw counts nor "
                        "log1p-normalised data (set shard.values if you are sure)")
    return VALUES_LOGNORM


def _part_cuts(x, n_obs: int, n_var: int, cfg: ShardConfig) -> list[int]:
    """Row cut points so a part has <= cells_per_part rows and (beyond one row) <= part_nnz nonzeros."""
    if isinstance(x, h5py.Dataset):  # dense: every entry counts
        step = max(1, min(cfg.cells_per_part, cfg.part_nnz // max(n_var, 1)))
        return list(range(0, n_obs, step)) + [n_obs]
    indptr, cuts = x["indptr"], [0]
    while cuts[-1] < n_obs:
        a = cuts[-1]
        limit = min(n_obs, a + cfg.cells_per_part)
        ip = np.asarray(indptr[a:limit + 1], dtype=np.int64)  # at most cells_per_part + 1 values
        fits = int(np.searchsorted(ip - ip[0], cfg.part_nnz, side="right")) - 1  # rows within budget
        cuts.append(a + min(limit - a, max(1, fits)))
    return cuts


def plan(cfg: ShardConfig) -> Plan:
    files = [Path(p) for p in cfg.inputs]
    if not files:
        raise DataError(None, "shard.inputs lists no h5ad files")
    tasks, gene_ids, symbols, kinds, controls = [], None, None, set(), set()
    for path in files:
        with _open(path) as f:
            if "X" not in f or "obs" not in f or "var" not in f:
                raise DataError(path, "not an AnnData h5ad (needs X, obs and var)")
            pert = _obs_column(f, cfg.perturbation_col, path, "shard.perturbation_col").astype(str)
            n_obs = len(pert)
            if n_obs == 0:
                raise DataError(path, "contains no cells")
            if cfg.context_col:
                _obs_column(f, cfg.context_col, path, "shard.context_col")
            if cfg.batch_col:
                _obs_column(f, cfg.batch_col, path, "shard.batch_col")
            if cfg.cell_id_col:
                _obs_column(f, cfg.cell_id_col, path, "shard.cell_id_col")
            for c in cfg.extra_obs:
                _obs_column(f, c, path, "shard.extra_obs")
            labels = set(np.unique(pert).tolist())
            if cfg.control_label not in labels:
                shown = sorted(labels)[:10]
                raise DataError(path, f"control label {cfg.control_label!r} (shard.control_label) not found in "
                                f"obs column {cfg.perturbation_col!r}; values include {shown}")
            controls.add(cfg.control_label)
            ids, syms = _genes(f, path, cfg)
            if gene_ids is None:
                gene_ids, symbols = ids, syms
            elif not np.array_equal(ids, gene_ids):
                m = min(len(ids), len(gene_ids))
                diff = np.flatnonzero(ids[:m] != gene_ids[:m])
                k = int(diff[0]) if len(diff) else m
                raise DataError(path, f"gene vocabulary differs from {files[0]} ({len(ids)} vs {len(gene_ids)} "
                                f"genes; first difference at position {k})")
            x = f["X"]
            n_x = x.shape[0] if isinstance(x, h5py.Dataset) else int(x.attrs["shape"][0])
            n_var = x.shape[1] if isinstance(x, h5py.Dataset) else int(x.attrs["shape"][1])
            if n_x != n_obs or n_var != len(ids):
                raise DataError(path, f"X has shape ({n_x}, {n_var}) but obs has {n_obs} rows and var "
                                f"{len(ids)} genes")
            kinds.add(_detect_values(f, path, n_obs, cfg.values))
            cuts = _part_cuts(x, n_obs, n_var, cfg)
        for i, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:])):
            tasks.append({"file": str(path), "rows": [start, stop], "hash": i == 0})
    if len(kinds) > 1:
        raise DataError(None, "the h5ad inputs mix raw counts and log-normalised values")
    value_kind = kinds.pop()
    cols = {"perturbation": cfg.perturbation_col, "context": cfg.context_col, "batch": cfg.batch_col,
            "cell_id": cfg.cell_id_col, "extra": list(cfg.extra_obs)}
    return Plan(source="h5ad", files=files, tasks=tasks, gene_ids=gene_ids, gene_symbols=symbols,
                value_kind=value_kind, shared={"columns": cols},
                extra={"control_perturbations": sorted(controls), "gene_id_kind": "var_names",
                       "source_format": "h5ad", "columns": cols})


def convert_task(task: dict, shared: dict) -> PartData:
    path = Path(task["file"])
    a, b = task["rows"]
    cols = shared["columns"]
    with _open(path) as f:
        m = _x_rows(f, path, a, b)
        m.sort_indices()
        m.sum_duplicates()
        indptr = m.indptr.astype(np.int64)
        data = m.data.astype(np.float32)
        check_values(path, data, indptr, a, require_integer=False)
        n = b - a

        def obs(col: str | None, default: str) -> np.ndarray:
            if not col:
                return np.full(n, default)
            return _obs_rows(f, f"obs/{col}", path, a, b)

        index_name = f["obs"].attrs.get("_index", "_index")
        cell_id = obs(cols["cell_id"] or index_name, "")
        categorical, numeric = {}, {}
        for c in cols["extra"]:
            v = obs(c, "")
            if np.asarray(v).dtype.kind in "biuf":
                numeric[c] = np.asarray(v, dtype=np.float64)
            else:
                categorical[c] = np.asarray(v).astype(str)
        groups = {"context": obs(cols["context"], "all").astype(str),
                  "batch": obs(cols["batch"], "all").astype(str),
                  "perturbation": obs(cols["perturbation"], "").astype(str)}
    return PartData(indptr=indptr, indices=m.indices.astype(np.int32), data=data, groups=groups,
                    cell_id=np.asarray(cell_id).astype(str), categorical=categorical, numeric=numeric,
                    source={"file": str(path), "rows": [a, b]})
