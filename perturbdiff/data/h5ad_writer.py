"""The project's one streaming AnnData writer: an .h5ad whose X (CSR) grows by appended row blocks.

Prediction (pred.h5ad, real.h5ad, train.h5ad) and the synthetic dataset's h5ad twin write through
``StreamingH5ad``: X in anndata's csr_matrix encoding grown by hand (the matrix is never whole in
memory), obs columns collected per appended block and written with var, uns and the empty
obsm/varm/obsp/varp/layers groups on ``close`` (anndata's ``write_elem``). The file is written to
``<path>.partial`` and renamed on success, so a failure never leaves a complete-looking file, and a
failed write (a full disk) is raised as an OSError at the next append or at close.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

#: the obs columns of the evaluation layout (prediction's default)
OBS_COLUMNS = ("perturbation", "context", "batch", "sample", "is_control")
LAYOUT_DTYPES = {"perturbation": "category", "context": "category", "batch": "category", "sample": np.int64,
                 "is_control": bool}

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
    """An .h5ad whose X (CSR) grows by appended row blocks; obs is written on ``close``.

    ``var``: the gene names, or a var DataFrame (its index the names). ``obs_columns``: the obs
    values every ``append`` gives, in order; ``dtypes``: their dtypes at close ("category", or a
    numpy dtype; others as pandas infers), ``categories``: fixed category orders. ``dtype``: of X.
    Obs names are ``cell<i>`` unless ``append`` gives an ``index``."""

    def __init__(self, path: str | Path, var: Sequence[str] | pd.DataFrame, obs_columns: Sequence[str] = OBS_COLUMNS,
                 dtypes: dict | None = None, categories: dict[str, list] | None = None, dtype=np.float32):
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
        self._data = x.create_dataset("data", (0,), dtype, maxshape=(None,), chunks=(DATA_CHUNK,))
        self._indices = x.create_dataset("indices", (0,), np.int32, maxshape=(None,), chunks=(DATA_CHUNK,))
        self._indptr = x.create_dataset("indptr", data=np.zeros(1, np.int64), maxshape=(None,),
                                        chunks=(INDPTR_CHUNK,))
        if not isinstance(var, pd.DataFrame):
            var = pd.DataFrame(index=pd.Index([str(g) for g in var], name="gene"))
        self.genes, self.nnz, self.dtype = len(var), 0, dtype
        write_elem(self.file, "var", var)
        self.columns = tuple(obs_columns)
        self.dtypes = LAYOUT_DTYPES if dtypes is None and self.columns == OBS_COLUMNS else dict(dtypes or {})
        self.categories = dict(categories or {})
        self.obs: dict[str, list] = {c: [] for c in self.columns}
        self.index: list[str] = []
        self.n = 0

    def append(self, x, *values, index=None) -> None:
        """Rows ``x`` (dense [k, G] or sparse) and their obs values, one per ``obs_columns`` in order
        (scalars or [k] arrays); ``index``: their [k] obs names (every append, or none)."""
        if len(values) != len(self.columns):
            raise ValueError(f"append takes {len(self.columns)} obs values ({', '.join(self.columns)}), got {len(values)}")
        m = sp.csr_matrix(x, dtype=self.dtype)
        if m.shape[1] != self.genes:
            raise ValueError(f"rows have {m.shape[1]} genes, the file {self.genes}")
        m.sort_indices()
        k, nnz = m.shape[0], int(m.nnz)
        for dset, part, size in ((self._data, m.data, self.nnz + nnz), (self._indices, m.indices, self.nnz + nnz),
                                   (self._indptr, m.indptr[1:].astype(np.int64) + self.nnz, self.n + k + 1)):
            dset.resize((size,))
            dset[size - len(part):] = part
        self._raise_failed()
        for key, value in zip(self.columns, values):
            self.obs[key].extend(np.broadcast_to(np.asarray(value), (k,)).tolist())
        if index is not None:
            self.index.extend(str(i) for i in index)
        self.n, self.nnz = self.n + k, self.nnz + nnz

    def close(self, uns: dict | None = None) -> Path:
        from anndata.io import write_elem

        if self.index and len(self.index) != self.n:
            raise ValueError(f"obs names given for {len(self.index)} of {self.n} rows")
        obs = pd.DataFrame(self.obs, index=pd.Index(self.index or [f"cell{i}" for i in range(self.n)]))
        for c, dt in self.dtypes.items():
            obs[c] = obs[c].astype(str).astype("category") if dt == "category" else obs[c].astype(dt)
        for c, cats in self.categories.items():
            obs[c] = pd.Categorical(obs[c].astype(str), categories=list(cats))
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
