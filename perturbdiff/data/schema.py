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
IMPLICIT_LABEL = "all"  # the context / batch of every cell of an h5ad sharded without that column

DTYPES = {"indptr": "int64", "indices": "int32", "data": "float32"}


def group_sort_key(context: str, batch: str, perturbation: str) -> tuple[str, str, str]:
    """Global order of groups in a store (writer and reader must agree)."""
    return (context, batch, perturbation)


def read_manifest(store: str | os.PathLike) -> dict[str, Any]:
    """Read and check a store's manifest.

    Raises:
        DataError: no manifest (not a store, or an unfinished conversion), or an unknown version.
    """
    path = Path(store) / MANIFEST_FILE
    if not path.is_file():
        raise DataError(store, f"not a PerturbDiff store: {MANIFEST_FILE} is missing "
                        "(an unfinished conversion leaves only a '.tmp' directory)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(path, f"manifest is not valid JSON ({err})") from err
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DataError(store, f"unknown store schema version {version!r}; this perturbdiff reads "
                        f"version {SCHEMA_VERSION}. Re-run the conversion with this version.")
    return manifest


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
