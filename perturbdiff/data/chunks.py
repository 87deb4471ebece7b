"""Direct reads of the store's 1-D Zarr v3 arrays, for the hot path of set sampling.

Why: zarr-python 3 costs about 0.5-1.5 ms per small slice on these machines (asyncio round trip
plus its codec pipeline), which made one 256-cell set with controls cost ~8 ms, barely faster than
the reference's per-row HDF5 reads. The store's X arrays have one fixed, documented layout (Zarr v3
spec: regular 1-D chunks, default chunk keys, optionally the ``sharding_indexed`` codec with the
index at the end, inner codecs bytes(little) [+ blosc]). This reader reads those chunk bytes with
``os.pread`` and decodes them with numcodecs' Blosc, keeping decoded chunks in a small LRU cache.
Any other layout raises ``Unsupported`` and the caller falls back to zarr-python. Tests check the
two paths agree element for element.

Damaged files: a chunk or shard file that is truncated, empty, or does not decode to the chunk's
size, and a shard index that fails its crc32c or points beyond its file, raise ``DataError`` naming
the file (both here and in ``ZarrRanges``), never an OSError or a codec traceback: a training run
on a damaged disk must stop with one line saying which file is bad. A chunk file that does not
exist reads as the fill value (Zarr's rule for chunks never written); only the checksum pass
(perturbdiff/data/integrity.py) tells a deleted chunk from an empty one.
"""

from __future__ import annotations

import json
import mmap
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import google_crc32c  # zarr's own crc32c implementation (a zarr dependency)
import numpy as np
from numcodecs import blosc

from .schema import DataError

_EMPTY = np.uint64(2**64 - 1)


class Unsupported(Exception):
    """The array's layout is not the one this reader handles; use zarr-python."""


def _parse_codecs(codecs: list[dict]) -> bool:
    """Return True when blosc-compressed; raise Unsupported for anything but bytes(+blosc)."""
    names = [c["name"] for c in codecs]
    if not names or names[0] != "bytes" or codecs[0].get("configuration", {}).get("endian", "little") != "little":
        raise Unsupported(f"codecs {names}")
    if names[1:] not in ([], ["blosc"]):
        raise Unsupported(f"codecs {names}")
    return names[1:] == ["blosc"]


class ChunkReader:
    """Read [a, b) of a 1-D Zarr v3 array written by our converter, fast."""

    def __init__(self, array_dir: str | Path, cache_bytes: int = 64 << 20):
        self.dir = Path(array_dir)
        meta = json.loads((self.dir / "zarr.json").read_text())
        if meta.get("zarr_format") != 3 or len(meta["shape"]) != 1:
            raise Unsupported("not a 1-D Zarr v3 array")
        if meta["chunk_key_encoding"]["name"] != "default" or \
                meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/") != "/":
            raise Unsupported("chunk key encoding")
        self.size = int(meta["shape"][0])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value") or 0
        outer = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        codecs = meta["codecs"]
        if len(codecs) == 1 and codecs[0]["name"] == "sharding_indexed":
            conf = codecs[0]["configuration"]
            self.chunk = int(conf["chunk_shape"][0])
            self.per_shard = outer // self.chunk
            self.compressed = _parse_codecs(conf["codecs"])
            index_names = [c["name"] for c in conf["index_codecs"]]
            if index_names not in (["bytes"], ["bytes", "crc32c"]):
                raise Unsupported(f"index codecs {index_names}")
            self.index_tail = 4 if "crc32c" in index_names else 0
            self.index_at_end = conf.get("index_location", "end") == "end"
        else:
            self.chunk, self.per_shard = outer, 0
            self.compressed = _parse_codecs(codecs)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_bytes, self._budget = 0, cache_bytes
        self._index: dict[int, np.ndarray | None] = {}
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()
        self._chunk_dir = os.path.join(str(self.dir), "c")  # str paths: pathlib costs ~40 us a call

    def __getstate__(self):  # file descriptors do not travel to DataLoader workers
        state = self.__dict__.copy()
        state.update(_fds={}, _cache=OrderedDict(), _cache_bytes=0, _index={})
        return state

    def path(self, key: int) -> Path:
        """The file of chunk (or shard) ``key``: what a DataError about it names."""
        return self.dir / "c" / str(key)

    def _fd(self, key: int) -> int | None:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if key not in self._fds:
            if len(self._fds) > 64:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
            try:
                fd = os.open(os.path.join(self._chunk_dir, str(key)), os.O_RDONLY)
            except (FileNotFoundError, IsADirectoryError):
                return None  # never written: reads as the fill value
            if not self.per_shard and not self.compressed:
                # an uncompressed chunk file is exactly one chunk (edge chunks are stored full size)
                size, want = os.fstat(fd).st_size, self.chunk * self.dtype.itemsize
                if size != want:
                    os.close(fd)
                    raise DataError(self.path(key), f"chunk file has {size} bytes, expected {want} "
                                    "(truncated or damaged)")
            self._fds[key] = fd
        return self._fds[key]

    def _shard_index(self, shard: int) -> np.ndarray | None:
        """The shard's (offset, nbytes) per inner chunk, checked against the file it indexes."""
        if shard not in self._index:
            fd = self._fd(shard)
            if fd is None:
                self._index[shard] = None
            else:
                self._index[shard] = self._read_index(shard, fd)
        return self._index[shard]

    def _read_index(self, shard: int, fd: int) -> np.ndarray:
        path = self.path(shard)
        size = os.fstat(fd).st_size
        nbytes = 16 * self.per_shard + self.index_tail
        if size < nbytes:
            raise DataError(path, f"shard file has {size} bytes, less than its {nbytes}-byte index "
                            "(truncated or empty)")
        offset = size - nbytes if self.index_at_end else 0
        raw = os.pread(fd, nbytes, offset)
        if len(raw) != nbytes:
            raise DataError(path, f"short read of the shard index ({len(raw)} of {nbytes} bytes)")
        if self.index_tail and google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise DataError(path, "shard index fails its crc32c check (truncated or damaged file)")
        index = np.frombuffer(raw[:16 * self.per_shard], dtype="<u8").reshape(-1, 2)
        used = index[:, 0] != _EMPTY
        lo, hi = (nbytes, size) if not self.index_at_end else (0, size - nbytes)
        starts, lengths = index[used, 0], index[used, 1]
        bad = (starts < lo) | (starts + lengths > hi)
        if not self.compressed:
            bad |= lengths != self.chunk * self.dtype.itemsize
        if bad.any():
            i = int(np.flatnonzero(used)[np.argmax(bad)])
            raise DataError(path, f"shard index entry {i} (bytes [{int(index[i, 0])}, "
                            f"{int(index[i, 0] + index[i, 1])})) does not fit the {size}-byte file")
        return index

    def _decode(self, raw: bytes, n: int, key: int) -> np.ndarray:
        """Chunk bytes -> n values; anything that does not decode to exactly n values is damage."""
        want = n * self.dtype.itemsize
        if self.compressed:
            try:
                raw = blosc.decompress(raw)
            except Exception as err:  # noqa: BLE001 - numcodecs raises RuntimeError / ValueError
                raise DataError(self.path(key), f"chunk does not decode (blosc: {err}); the file is "
                                "truncated or damaged") from None
        if len(raw) != want:
            raise DataError(self.path(key), f"chunk holds {len(raw)} bytes, expected {want} "
                            "(truncated or damaged)")
        return np.frombuffer(raw, dtype=self.dtype, count=n)

    def _chunk(self, k: int) -> np.ndarray:
        hit = self._cache.get(k)
        if hit is not None:
            self._cache.move_to_end(k)
            return hit
        n = self.chunk
        if self.per_shard:
            shard, inner = divmod(k, self.per_shard)
            index = self._shard_index(shard)
            if index is None or index[inner, 0] == _EMPTY:
                values = np.full(n, self.fill, dtype=self.dtype)
            else:
                offset, nbytes = (int(v) for v in index[inner])
                values = self._decode(os.pread(self._fd(shard), nbytes, offset), n, shard)
        else:
            fd = self._fd(k)
            if fd is None:
                values = np.full(n, self.fill, dtype=self.dtype)
            else:
                values = self._decode(os.pread(fd, os.fstat(fd).st_size, 0), n, k)
        self._cache[k] = values
        self._cache_bytes += values.nbytes
        while self._cache_bytes > self._budget and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return values

    def take(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Concatenation of [s, s + l) for each (s, l); adjacent ranges are read as one."""
        runs = merge_ranges(starts, lengths)
        if not self.compressed:
            return self._take_raw(runs)
        return np.concatenate([self[a:b] for a, b in runs] or [np.zeros(0, dtype=self.dtype)])

    def _take_raw(self, runs: list[tuple[int, int]]) -> np.ndarray:
        """Uncompressed chunks: pread exactly the bytes of each range into one output buffer."""
        total = sum(b - a for a, b in runs)
        out = np.empty(total, dtype=self.dtype)
        view = memoryview(out).cast("B")
        isz, pos = self.dtype.itemsize, 0
        for a, b in runs:
            while a < b:
                k = a // self.chunk
                stop = min(b, (k + 1) * self.chunk)
                where = self._chunk_location(k)
                n = stop - a
                if where is None:
                    out[pos:pos + n] = self.fill
                else:
                    fd, base = where
                    got = os.preadv(fd, [view[pos * isz:(pos + n) * isz]], base + (a - k * self.chunk) * isz)
                    if got != n * isz:
                        raise DataError(self.path(k // self.per_shard if self.per_shard else k),
                                        f"short read ({got} of {n * isz} bytes): the file is truncated")
                pos += n
                a = stop
        return out

    def _chunk_location(self, k: int) -> tuple[int, int] | None:
        """(file descriptor, byte offset) of uncompressed chunk k, or None if never written."""
        if self.per_shard:
            shard, inner = divmod(k, self.per_shard)
            index = self._shard_index(shard)
            if index is None or index[inner, 0] == _EMPTY:
                return None
            return self._fd(shard), int(index[inner, 0])
        fd = self._fd(k)
        return None if fd is None else (fd, 0)

    def values_at(self, positions: np.ndarray) -> np.ndarray:
        """The values at sorted ``positions``, touching each chunk once.

        Uncompressed chunks are memory-mapped and indexed, so a few values per chunk cost no more
        than their pages (the open-time check reads indptr at every group start this way);
        compressed chunks are decoded whole, so callers bound how many chunks they touch.
        """
        positions = np.asarray(positions, dtype=np.int64)
        out = np.empty(len(positions), dtype=self.dtype)
        if len(positions) == 0:
            return out
        if positions[0] < 0 or positions[-1] >= self.size:
            raise IndexError(f"positions outside [0, {self.size}) of {self.dir}")
        keys = positions // self.chunk
        cuts = np.flatnonzero(np.diff(keys)) + 1
        for i, j in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(keys)].tolist()):
            k = int(keys[i])
            local = positions[i:j] - k * self.chunk
            if self.compressed:
                out[i:j] = self._chunk(k)[local]
                continue
            where = self._chunk_location(k)
            if where is None:
                out[i:j] = self.fill
                continue
            fd, base = where
            with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
                view = np.frombuffer(mm, dtype=self.dtype, count=self.chunk, offset=base)
                out[i:j] = view[local]
                del view  # the mapping closes only once no array refers to it
        return out

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b, step = sl.indices(self.size)
        if step != 1:
            raise ValueError("only contiguous slices")
        if b <= a:
            return np.zeros(0, dtype=self.dtype)
        k0, k1 = a // self.chunk, (b - 1) // self.chunk
        if k0 == k1:
            return self._chunk(k0)[a - k0 * self.chunk:b - k0 * self.chunk]
        parts = [self._chunk(k) for k in range(k0, k1 + 1)]
        out = np.concatenate(parts)
        return out[a - k0 * self.chunk:b - k0 * self.chunk]


def merge_ranges(starts: np.ndarray, lengths: np.ndarray) -> list[tuple[int, int]]:
    """Sorted, non-overlapping [s, s + l) ranges -> maximal runs of touching ranges, as (a, b)."""
    starts = np.asarray(starts, dtype=np.int64)
    stops = starts + np.asarray(lengths, dtype=np.int64)
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    if len(starts) == 0:
        return []
    cut = np.flatnonzero(starts[1:] != stops[:-1]) + 1
    return list(zip(starts[np.r_[0, cut]].tolist(), stops[np.r_[cut - 1, len(stops) - 1]].tolist()))


class ZarrRanges:
    """The same ``take`` over zarr-python, for layouts ChunkReader does not handle.

    zarr-python and numcodecs report a damaged file as whatever their codecs raise (ValueError,
    RuntimeError, a crc32c mismatch, ...) and read an empty shard file as fill values; every read
    here turns both into a DataError naming the chunk file (found by re-reading file by file, on
    the failure path only). The full checksum pass reads through this class too.
    """

    def __init__(self, array, array_dir: str | Path | None = None):
        self.array = array
        self.dir = Path(array_dir) if array_dir is not None else Path(str(array.name).lstrip("/"))
        self.chunk = int(array.chunks[0])
        outer = getattr(array, "shards", None) or array.chunks
        self._span = int(outer[0])  # elements per file: a shard, or a chunk when unsharded
        enc = array.metadata.chunk_key_encoding if array.metadata.zarr_format == 3 else None
        default = enc is not None and enc.name == "default" and getattr(enc, "separator", "/") == "/"
        self._files = self.dir / "c" if default and array.ndim == 1 else None  # None: paths unknown

    def path(self, key: int) -> Path | str:
        """The file of chunk (or shard) ``key``, as far as the layout tells."""
        return self._files / str(key) if self._files is not None else f"{self.dir} (chunk {key})"

    def _read(self, read: Callable[[], Any], a: int, b: int) -> np.ndarray:
        """``read()`` of elements within [a, b); a damaged file there is a DataError naming it."""
        try:
            values = np.asarray(read())
        except Exception as err:  # noqa: BLE001 - any codec / store failure of a damaged file
            raise self._damage(a, b, err) from None
        if self._files is not None and b > a:
            for k in range(a // self._span, (b - 1) // self._span + 1):
                f = self._files / str(k)
                if f.is_file() and f.stat().st_size == 0:  # never a valid chunk or shard
                    raise DataError(f, "chunk file is empty (truncated)")
        return values

    def _damage(self, a: int, b: int, err: Exception) -> DataError:
        """The DataError for a failed read of [a, b): re-read file by file to name the bad one."""
        k0, k1 = a // self._span, max(a, b - 1) // self._span
        bad = k0
        if k1 > k0:
            for k in range(k0, k1 + 1):
                try:
                    self.array[max(a, k * self._span):min(b, (k + 1) * self._span)]
                except Exception as one:  # noqa: BLE001
                    bad, err = k, one
                    break
        first_line = (str(err).splitlines() or [""])[0]
        return DataError(self.path(bad), f"chunk file is truncated or damaged ({type(err).__name__}: "
                         f"{first_line})")

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b, _ = sl.indices(self.array.shape[0])
        return self._read(lambda: self.array[sl], a, b)

    def take(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        runs = merge_ranges(starts, lengths)
        return np.concatenate([self._read(lambda a=a, b=b: self.array[a:b], a, b) for a, b in runs] or
                              [np.zeros(0, dtype=self.array.dtype)])

    def values_at(self, positions: np.ndarray) -> np.ndarray:
        """The values at sorted ``positions`` (one zarr coordinate selection)."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            return np.zeros(0, dtype=self.array.dtype)
        return self._read(lambda: self.array.get_coordinate_selection(positions),
                          int(positions[0]), int(positions[-1]) + 1)


def fast_or_zarr(array, array_dir: Path, cache_bytes: int):
    """A ChunkReader when the layout allows, else a zarr-python reader with the same interface."""
    try:
        return ChunkReader(array_dir, cache_bytes)
    except (Unsupported, KeyError, OSError, ValueError, TypeError):
        return ZarrRanges(array, array_dir)
