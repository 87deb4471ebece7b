"""Any AnnData .h5ad (Parse PBMC, Replogle, users' own) -> store, in row chunks (bounded memory).

The perturbation / context / batch / control columns come from the config. X is read a chunk of
rows at a time from the file (CSR or dense), so a file larger than RAM converts. Values are
detected: integer counts are stored as counts; non-negative non-integer values with a small maximum
are taken as log-normalised (log1p of normalize_total) and stored as such, and the reader then skips
its own normalisation. Several files must share one gene vocabulary.

Rules checked at plan time, before any part is converted (each a one-line DataError naming the
file and the column):
- the perturbation, context, batch and cell id columns and categorical ``extra_obs`` columns hold
  no missing values (NaN / None / NA): a missing label would otherwise become a group "nan". The
  string "nan" written by a user is an ordinary label. Numeric ``extra_obs`` may hold NaN (stored
  as a missing number).
- var_names (the store's gene ids) are unique. ``shard.gene_symbol_col`` values need not be:
  references repeat symbols, so a repeat is a printed note and recorded in the manifest
  (``duplicate_gene_symbols``); a panel file should name such genes by id.
- cell ids (obs_names, or ``shard.cell_id_col``) are unique within each file and across the files
  of one conversion.
- raw counts are at most ``shard.max_count`` (checked again for every row while converting).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from perturbdiff.config import ShardConfig
from perturbdiff.data.schema import IMPLICIT_LABEL, VALUE_KINDS, VALUES_COUNTS, VALUES_LOGNORM, DataError

from .parts import PartData, Plan, check_values

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


def _obs_column(f: h5py.File, col: str, path: Path, what: str) -> Any:
    """A whole obs column as anndata reads it (ndarray, Categorical or a pandas nullable array), so
    missing values are still recognisable as missing (``pd.isna``) rather than the string 'nan'."""
    obs = f["obs"]
    if col not in obs:
        cols = [c for c in obs.keys() if c != obs.attrs.get("_index", "_index")]
        raise DataError(path, f"obs has no column {col!r} ({what}); columns are {sorted(cols)}")
    return _read_elem(f, f"obs/{col}", path)


def _is_numeric(values: Any) -> bool:
    """Whether convert_task stores this obs column as numbers (float64) rather than as categories
    (a categorical of numbers counts as numbers, as its rows read as numbers)."""
    if isinstance(values, pd.Categorical):
        return values.categories.dtype.kind in "biuf"
    return np.asarray(values).dtype.kind in "biuf"


def _require_labels(values: Any, path: Path, col: str, what: str) -> None:
    """A label column (group, cell id, categorical extra) must give every cell a value: a missing
    one would silently become the label "nan" and a group of its own."""
    missing = np.asarray(pd.isna(values), dtype=bool)
    if missing.any():
        rows = np.flatnonzero(missing)
        raise DataError(path, f"obs column {col!r} ({what}) has a missing value (NaN/None) in {len(rows):,} cell(s), "
                        f"the first in row {int(rows[0])}; fill or drop those cells (the string 'nan' is an "
                        "ordinary label)")


def _require_unique(values: np.ndarray, path: Path, what: str, hint: str) -> None:
    """Ids (cell ids, gene ids) must not repeat: name how many and a few examples."""
    index = pd.Index(values)
    if index.has_duplicates:
        dup = index.duplicated()
        examples = pd.unique(np.asarray(values)[dup])[:3].tolist()
        raise DataError(path, f"{what} not unique: {int(dup.sum()):,} repeated value(s), e.g. {examples} (first "
                        f"repeat in row {int(np.flatnonzero(dup)[0])}); {hint}")


def _hash_ids(ids: np.ndarray) -> np.ndarray:
    """64-bit hashes of string ids (uint64), vectorised."""
    return pd.util.hash_array(np.asarray(ids, dtype=object))


class _CellIdRegistry:
    """Cell ids seen in the earlier files of one conversion, as 64-bit hashes (8 bytes a cell,
    not the strings), so ids repeated across files are found with bounded memory. A hash match is
    confirmed on the strings (re-reading the earlier file's ids) before it is reported."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, str | None, np.ndarray]] = []  # (file, id column, sorted hashes)

    def add(self, path: Path, ids: np.ndarray, col: str | None, what: str) -> None:
        hashes = _hash_ids(ids)
        for other, other_col, other_hashes in self.files:
            hit = np.isin(hashes, other_hashes)
            if hit.any():
                with _open(other) as f:
                    theirs = _cell_ids(f, other, other_col)
                candidates = ids[hit]
                common = pd.unique(candidates[np.isin(candidates, theirs)])
                if len(common):
                    raise DataError(path, f"{what} repeat cell ids of {other} ({len(common):,} shared, e.g. "
                                    f"{common[:3].tolist()}); cell ids must be unique across the inputs of one "
                                    "conversion (give each file distinct ids, or set shard.cell_id_col)")
        self.files.append((path, col, np.sort(hashes)))


def _cell_ids(f: h5py.File, path: Path, col: str | None) -> np.ndarray:
    """The cell ids of a file as an object array of str (as the store will hold them): obs column
    ``col``, or obs_names. Strings stay the objects anndata read (no fixed-width copy)."""
    if col:
        values = _obs_column(f, col, path, "shard.cell_id_col")
        _require_labels(values, path, col, "shard.cell_id_col")
    else:
        values = _read_elem(f, f"obs/{f['obs'].attrs.get('_index', '_index')}", path)
    ids = np.asarray(values)
    return ids if ids.dtype == object else ids.astype(str).astype(object)


def _obs_rows(f: h5py.File, key: str, path: Path, a: int, b: int) -> np.ndarray:
    """Rows [a, b) of an obs column, reading only that slice where the encoding allows it
    (categorical codes, plain and string datasets); other encodings are read whole, then sliced."""
    elem = f[key]
    enc = elem.attrs.get("encoding-type", "")
    try:
        if isinstance(elem, h5py.Group) and enc == "categorical":
            cats = np.asarray(ad.io.read_elem(elem["categories"]))
            codes = np.asarray(elem["codes"][a:b]).astype(np.int64)
            if (codes < 0).any():  # missing values, as pandas shows them (numbers stay numbers)
                out = cats.astype(np.float64 if cats.dtype.kind in "biuf" else object)[np.maximum(codes, 0)]
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


def _genes(f: h5py.File, path: Path, cfg: ShardConfig) -> tuple[np.ndarray, np.ndarray]:
    """(gene ids, gene symbols): var_names, which must be unique (they identify the genes of the
    store), and ``shard.gene_symbol_col`` values (default: var_names again), which may repeat."""
    var = f["var"]
    index_name = var.attrs.get("_index", "_index")
    names = np.asarray(_read_elem(f, f"var/{index_name}", path)).astype(str)
    _require_unique(names, path, "var_names (gene ids)", "gene ids must be unique (rename the repeats, "
                    "e.g. adata.var_names_make_unique(), and keep the symbols in a var column for "
                    "shard.gene_symbol_col)")
    if cfg.gene_symbol_col:
        if cfg.gene_symbol_col not in var:
            raise DataError(path, f"var has no column {cfg.gene_symbol_col!r} (shard.gene_symbol_col)")
        return names, np.asarray(_read_elem(f, f"var/{cfg.gene_symbol_col}", path)).astype(str)
    return names, names


def _detect_values(f: h5py.File, path: Path, n_obs: int, forced: str, max_count: float) -> str:
    """Counts or log-normalised, from two probes of 2,000 rows (the start and the middle of X); the
    probes also fail early on bad values, which convert_task checks again on every row."""
    probe = [(0, min(n_obs, 2000)), (n_obs // 2, min(n_obs, n_obs // 2 + 2000))]
    datas = [_x_rows(f, path, a, b) for a, b in probe if b > a]
    data = np.concatenate([m.data for m in datas]) if datas else np.zeros(0)
    for (a, _), m in zip(probe, datas):
        check_values(path, m.data, m.indptr, a, require_integer=False)
    integer = bool(np.all(data == np.round(data)))
    if forced == VALUES_COUNTS:
        if not integer:
            raise DataError(path, "shard.values=counts but X holds non-integer values")
        kind = VALUES_COUNTS
    elif forced == VALUES_LOGNORM:
        kind = VALUES_LOGNORM
    elif forced != "auto":
        raise DataError(None, f"shard.values must be auto, {' or '.join(VALUE_KINDS)}, not {forced!r}")
    elif integer:
        kind = VALUES_COUNTS
    elif data.size and data.max() > LOGNORM_MAX:
        raise DataError(path, f"X holds non-integer values up to {data.max():.3g}: neither raw counts nor "
                        "log1p-normalised data (set shard.values if you are sure)")
    else:
        kind = VALUES_LOGNORM
    if kind == VALUES_COUNTS:
        for (a, _), m in zip(probe, datas):
            check_values(path, m.data, m.indptr, a, require_integer=True, max_count=max_count)
    return kind


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


def _check_obs(f: h5py.File, path: Path, cfg: ShardConfig) -> np.ndarray:
    """Read and check the obs columns the store keeps; returns the perturbation labels (str).

    Every column named in the config must exist; label columns must have no missing values
    (numeric ``extra_obs`` may: NaN is a missing number).
    """
    pert_raw = _obs_column(f, cfg.perturbation_col, path, "shard.perturbation_col")
    _require_labels(pert_raw, path, cfg.perturbation_col, "shard.perturbation_col")
    for col, key in ((cfg.context_col, "shard.context_col"), (cfg.batch_col, "shard.batch_col")):
        if col:
            _require_labels(_obs_column(f, col, path, key), path, col, key)
    for col in cfg.extra_obs:
        values = _obs_column(f, col, path, "shard.extra_obs")
        if not _is_numeric(values):
            _require_labels(values, path, col, "shard.extra_obs")
    return np.asarray(pert_raw).astype(str)


def plan(cfg: ShardConfig, log: Callable[[str], None] = print) -> Plan:
    """Check every input file (obs labels, ids, vocabulary, a probe of X) and cut it into parts.

    Everything that needs only obs / var, which the plan reads anyway, fails here, before any
    part is converted; ``log`` prints the notes of the rules that are not errors.
    """
    files = [Path(p) for p in cfg.inputs]
    if not files:
        raise DataError(None, "shard.inputs lists no h5ad files")
    if not cfg.max_count > 0:
        raise DataError(None, f"shard.max_count must be positive, not {cfg.max_count!r}")
    tasks, gene_ids, symbols, kinds, controls = [], None, None, set(), set()
    seen_ids = _CellIdRegistry()
    id_what = f"obs column {cfg.cell_id_col!r} (shard.cell_id_col)" if cfg.cell_id_col else "obs_names (cell ids)"
    for path in files:
        with _open(path) as f:
            if "X" not in f or "obs" not in f or "var" not in f:
                raise DataError(path, "not an AnnData h5ad (needs X, obs and var)")
            pert = _check_obs(f, path, cfg)
            n_obs = len(pert)
            if n_obs == 0:
                raise DataError(path, "contains no cells")
            labels = set(np.unique(pert).tolist())
            if cfg.control_label not in labels:
                shown = sorted(labels)[:10]
                raise DataError(path, f"control label {cfg.control_label!r} (shard.control_label) not found in "
                                f"obs column {cfg.perturbation_col!r}; values include {shown}")
            controls.add(cfg.control_label)
            cell_ids = _cell_ids(f, path, cfg.cell_id_col)
            _require_unique(cell_ids, path, id_what, "cell ids must be unique (set shard.cell_id_col to a "
                            "unique obs column, or make them unique, e.g. adata.obs_names_make_unique())")
            seen_ids.add(path, cell_ids, cfg.cell_id_col, id_what)
            del cell_ids
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
            kinds.add(_detect_values(f, path, n_obs, cfg.values, cfg.max_count))
            cuts = _part_cuts(x, n_obs, n_var, cfg)
        for i, (start, stop) in enumerate(zip(cuts[:-1], cuts[1:])):
            tasks.append({"file": str(path), "rows": [start, stop], "hash": i == 0})
    if len(kinds) > 1:
        raise DataError(None, "the h5ad inputs mix raw counts and log-normalised values")
    value_kind = kinds.pop()
    cols = {"perturbation": cfg.perturbation_col, "context": cfg.context_col, "batch": cfg.batch_col,
            "cell_id": cfg.cell_id_col, "extra": list(cfg.extra_obs)}
    extra = {"control_perturbations": sorted(controls), "gene_id_kind": "var_names", "source_format": "h5ad",
             "columns": cols}
    repeated = pd.unique(symbols[pd.Index(symbols).duplicated()]) if cfg.gene_symbol_col else np.zeros(0, str)
    if len(repeated):
        extra["duplicate_gene_symbols"] = len(repeated)
        log(f"note: {files[0]}: var column {cfg.gene_symbol_col!r} (shard.gene_symbol_col) repeats {len(repeated):,} "
            f"symbol(s), e.g. {repeated[:3].tolist()}; genes are identified by var_names, so name those genes by "
            "id in a panel file")
    return Plan(source="h5ad", files=files, tasks=tasks, gene_ids=gene_ids, gene_symbols=symbols,
                value_kind=value_kind, shared={"columns": cols, "value_kind": value_kind, "max_count": cfg.max_count},
                extra=extra)


def convert_task(task: dict, shared: dict) -> PartData:
    """Rows [a, b) of one file as a part; the values of every row are checked here."""
    path = Path(task["file"])
    a, b = task["rows"]
    cols = shared["columns"]
    counts = shared.get("value_kind") == VALUES_COUNTS
    with _open(path) as f:
        m = _x_rows(f, path, a, b)
        m.sort_indices()
        m.sum_duplicates()
        indptr = m.indptr.astype(np.int64)
        # counts: every row is held to the plan's rules (integers, at most shard.max_count), not only the probes
        check_values(path, m.data, indptr, a, require_integer=counts,
                     max_count=shared.get("max_count") if counts else None)
        data = m.data.astype(np.float32)
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
            if _is_numeric(v):
                numeric[c] = np.asarray(v, dtype=np.float64)
            else:
                categorical[c] = np.asarray(v).astype(str)
        groups = {"context": obs(cols["context"], IMPLICIT_LABEL).astype(str),
                  "batch": obs(cols["batch"], IMPLICIT_LABEL).astype(str),
                  "perturbation": obs(cols["perturbation"], "").astype(str)}
    return PartData(indptr=indptr, indices=m.indices.astype(np.int32), data=data, groups=groups,
                    cell_id=np.asarray(cell_id).astype(str), categorical=categorical, numeric=numeric,
                    source={"file": str(path), "rows": [a, b]})
