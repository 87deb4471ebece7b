"""The one schema shared by the converters (``data_sharding``) and the readers (``perturbdiff.data``).

Two formats are defined here:

1. The Tahoe-100M parquet release (source format). Ten columns per cell row plus metadata tables;
   every row starts with a marker entry (gene token 1, value -2) that is not a gene.
2. The PerturbDiff cell store (our format). One Zarr v3 group per dataset:

   store.zarr/
     zarr.json                      group attrs: {"perturbdiff_store": SCHEMA_VERSION}
     X/indptr   int64   [N + 1]     CSR row pointers (raw counts, or log-normalised values, see manifest)
     X/indices  int32   [nnz]       gene index into var/, sorted within each row
     X/data     float32 [nnz]       values
     obs/<col>/codes       int32 [N]   categorical obs column (codes into categories)
     obs/<col>/categories  str   [K]
     obs/<col>             float64/int64 [N]   numeric obs column
     obs/cell_id           str   [N]
     var/gene_id           str   [G]   stable gene id (Ensembl when known, else the symbol)
     var/gene_symbol       str   [G]
     conditions.parquet             one row per (context, batch, perturbation) group: start, stop, n
     manifest.json                  schema version, sources + sha256, counts, array checksums, HVG ranking

   Cells are ordered so every (context, batch, perturbation) group is one contiguous row range.

Readers refuse a store whose schema version they do not know.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
STORE_ATTR = "perturbdiff_store"

# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class DataError(ValueError):
    """Bad input data: names the file (or store) and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")

    def __reduce__(self):  # survives pickling from worker processes
        return (DataError, (self.path, self.problem))


# ---------------------------------------------------------------------------------------------
# Tahoe-100M parquet release
# ---------------------------------------------------------------------------------------------

TAHOE_COLUMNS = (
    "genes",  # list<int64>: gene token ids of the nonzero genes, marker first
    "expressions",  # list<float>: raw UMI counts parallel to genes, marker value first
    "drug",  # drug name; vehicle control DMSO_TF
    "sample",  # well id, joins sample_metadata for the concentration
    "BARCODE_SUB_LIB_ID",  # unique cell id
    "cell_line_id",  # Cellosaurus id
    "moa-fine",
    "canonical_smiles",
    "pubchem_cid",
    "plate",
)
# The columns the converter reads (the rest are metadata the store does not keep).
TAHOE_READ_COLUMNS = ("genes", "expressions", "drug", "sample", "BARCODE_SUB_LIB_ID", "cell_line_id", "plate",
                      "moa-fine")
TAHOE_MARKER_TOKEN = 1
TAHOE_MARKER_VALUE = -2.0
TAHOE_CONTROL_DRUG = "DMSO_TF"
TAHOE_DOSE_UNIT = "uM"

GENE_METADATA_FILE = "gene_metadata.parquet"
GENE_METADATA_COLUMNS = ("token_id", "ensembl_id", "gene_symbol")
DRUG_METADATA_FILE = "drug_metadata.parquet"
DRUG_METADATA_COLUMNS = ("drug", "targets", "moa-broad", "moa-fine", "canonical_smiles", "pubchem_cid")
SAMPLE_METADATA_FILE = "sample_metadata.parquet"
SAMPLE_METADATA_COLUMNS = ("sample", "plate", "drug", "drugname_drugconc")
CELL_LINE_METADATA_FILE = "cell_line_metadata.parquet"
CELL_LINE_METADATA_COLUMNS = ("cell_line_id", "cell_name")

# The release's directory layout: the cell shards under data/, the tables above under metadata/.
# The synthetic generator writes this layout; the Tahoe reader and the h5ad twin read it.
TAHOE_DATA_DIR = "data"
TAHOE_METADATA_DIR = "metadata"
TAHOE_DATA_GLOB = "*.parquet"  # the cell shards in data/


def tahoe_data_file(index: int, total: int) -> str:
    """The release's shard name, e.g. ``train-00003-of-03388.parquet``."""
    return f"train-{index:05d}-of-{total:05d}.parquet"


def format_drugconc(drug: str, conc: float, unit: str = TAHOE_DOSE_UNIT) -> str:
    """The canonical Tahoe perturbation label, e.g. ``[('Dinaciclib', 0.5, 'uM')]``."""
    return str([(drug, float(conc), unit)])


def parse_drugconc(text: str) -> list[tuple[str, float, str]]:
    """Parse a ``drugname_drugconc`` label without ``eval``.

    Raises:
        ValueError: the text is not a list of (name, concentration, unit) tuples.
    """
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"not a drugname_drugconc label: {text!r}") from err
    if not isinstance(value, list) or not value:
        raise ValueError(f"not a drugname_drugconc label: {text!r}")
    out = []
    for item in value:
        if not (isinstance(item, tuple) and len(item) == 3 and isinstance(item[0], str)):
            raise ValueError(f"not a drugname_drugconc label: {text!r}")
        out.append((item[0], float(item[1]), str(item[2])))
    return out


# ---------------------------------------------------------------------------------------------
# The cell store
# ---------------------------------------------------------------------------------------------

X_GROUP = "X"
OBS_GROUP = "obs"
VAR_GROUP = "var"
CONDITIONS_FILE = "conditions.parquet"
MANIFEST_FILE = "manifest.json"

# Obs columns every store has. context / batch / perturbation define the groups.
GROUP_COLUMNS = ("context", "batch", "perturbation")
CELL_ID = "cell_id"
TOTAL_COUNTS = "total_counts"  # sum over ALL genes of the source, used by normalize_total on read
N_GENES = "n_genes"

# Columns of conditions.parquet, in order.
CONDITION_COLUMNS = (
    "group_id",  # int64, row number in this table
    "context",
    "batch",
    "perturbation",
    "is_control",  # bool
    "start",  # int64, first cell row
    "stop",  # int64, one past the last cell row
    "n",  # int64, stop - start
)
# ...followed by one float64 column per numeric obs column of the source (its group mean), e.g.
# the Tahoe dose: the groups' numeric covariates.

# Value kinds of X/data.
VALUES_COUNTS = "counts"  # raw integer counts (stored as float32)
VALUES_LOGNORM = "lognorm"  # log1p(normalize_total) values that could not be turned back into counts
VALUE_KINDS = (VALUES_COUNTS, VALUES_LOGNORM)
IMPLICIT_LABEL = "all"  # the context / batch of every cell of an h5ad sharded without that column

DTYPES = {"indptr": "int64", "indices": "int32", "data": "float32"}


def group_sort_key(context: str, batch: str, perturbation: str) -> tuple[str, str, str]:
    """Global order of groups in a store (writer and reader must agree)."""
    return (context, batch, perturbation)


# Array paths inside a store: what the writer creates and the readers and verify open.
X_INDPTR, X_INDICES, X_DATA = f"{X_GROUP}/indptr", f"{X_GROUP}/indices", f"{X_GROUP}/data"
X_ARRAYS = {X_INDPTR: DTYPES["indptr"], X_INDICES: DTYPES["indices"], X_DATA: DTYPES["data"]}
VAR_GENE_ID, VAR_GENE_SYMBOL = f"{VAR_GROUP}/gene_id", f"{VAR_GROUP}/gene_symbol"
VAR_HVG_RANK, VAR_HVG_SCORE = f"{VAR_GROUP}/hvg_rank", f"{VAR_GROUP}/hvg_score"  # int32 rank (0 = most variable), float64


def obs_codes(col: str) -> str:
    """The int32 codes of a categorical obs column."""
    return f"{OBS_GROUP}/{col}/codes"


def obs_categories(col: str) -> str:
    """The sorted labels a categorical obs column's codes index."""
    return f"{OBS_GROUP}/{col}/categories"


def obs_values(col: str) -> str:
    """A numeric obs column (and obs/cell_id)."""
    return f"{OBS_GROUP}/{col}"


STORE_FORMAT = "perturbdiff-store"
_COUNTS = ("num_cells", "num_genes", "nnz", "num_groups", "num_control_groups")


@dataclass
class StoreManifest:
    """A store's manifest.json: written by the writer (``data_sharding/writer.py``), read by the store,
    multi-store loading and ``verify``. Keys a source adds (``source_format``, ``columns``,
    ``gene_id_kind``, ``timings``, ...) are kept in ``extra`` and written beside the fields."""

    dataset: str
    value_kind: str  # VALUES_COUNTS | VALUES_LOGNORM
    num_cells: int
    num_genes: int
    nnz: int
    num_groups: int
    num_control_groups: int
    categorical_obs: list[str]  # the group columns, then the source's categorical columns
    numeric_obs: list[str]  # total_counts, n_genes, then the source's numeric columns
    control_perturbations: list[str]
    hvg: dict[str, Any]  # flavor, num_top_genes, genes (the top ids, most variable first)
    gene_panel: dict[str, Any]  # num_genes, id_kind
    sources: list[dict[str, Any]]  # path, sha256, bytes, cells
    arrays: dict[str, dict[str, Any]]  # array path (or CONDITIONS_FILE) -> shape, dtype, sha256
    layout: dict[str, Any]  # chunk_nnz, shard_nnz, chunk_cells, compressor
    extra: dict[str, Any] = field(default_factory=dict)
    group_columns: list[str] = field(default_factory=lambda: list(GROUP_COLUMNS))
    schema_version: int = SCHEMA_VERSION
    format: str = STORE_FORMAT

    def __post_init__(self) -> None:  # a key that is a field is the field's (the source's copy is dropped)
        names = {f.name for f in fields(self)}
        self.extra = {k: v for k, v in self.extra.items() if k not in names}

    def to_dict(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        return body | self.extra

    def write(self, store: str | os.PathLike) -> None:
        (Path(store) / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True))

    @classmethod
    def from_dict(cls, store: str | os.PathLike, manifest: dict[str, Any]) -> StoreManifest:
        """Check a parsed manifest: the schema version, every field present, the counts non-negative integers.

        Raises:
            DataError: naming the store and the key.
        """
        if not isinstance(manifest, dict):
            raise DataError(store, f"{MANIFEST_FILE} is not a JSON object")
        version = manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise DataError(store, f"unknown store schema version {version!r}; this perturbdiff reads "
                            f"version {SCHEMA_VERSION}. Re-run the conversion with this version.")
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = sorted(n for n in names if n not in manifest)
        if missing:
            raise DataError(store, f"{MANIFEST_FILE} lacks {missing} (damaged, or not written by perturbdiff)")
        for key in _COUNTS:
            value = manifest[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(store, f"manifest {key} is {value!r}, not a non-negative integer")
        if not isinstance(manifest["arrays"], dict):
            raise DataError(store, f"manifest arrays is {type(manifest['arrays']).__name__}, not a mapping")
        return cls(**{k: v for k, v in manifest.items() if k in names},
                   extra={k: v for k, v in manifest.items() if k not in names})

    @classmethod
    def read(cls, store: str | os.PathLike) -> StoreManifest:
        """Read and check a store's manifest.

        Raises:
            DataError: no manifest (not a store, or an unfinished conversion), invalid JSON, an unknown
                version, a missing field or a bad count.
        """
        path = Path(store) / MANIFEST_FILE
        if not path.is_file():
            raise DataError(store, f"not a PerturbDiff store: {MANIFEST_FILE} is missing "
                            "(an unfinished conversion leaves only a '.tmp' directory)")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise DataError(path, f"manifest is not valid JSON ({err})") from err
        return cls.from_dict(store, manifest)


def file_sha256(path: str | Path, bufsize: int = 1 << 22) -> str:
    """The sha256 of a file, read in blocks (manifests of stores and checkpoints record these)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def hash_update(sha, values: np.ndarray) -> None:
    """Feed values to a hash, independently of how the array is cut into pieces.

    The writer hashes each array as it appends it and the checksum pass re-hashes it chunk by
    chunk; both must agree, so strings are joined with NUL terminators and numbers hashed as
    little-endian bytes (whatever the machine's byte order).
    """
    if values.dtype.kind in "OUT":
        if len(values):
            sha.update(("\x00".join(values.tolist()) + "\x00").encode())
    else:
        le = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"), copy=False))
        sha.update(memoryview(le).cast("B"))
