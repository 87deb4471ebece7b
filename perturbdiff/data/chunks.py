"""Direct reads of the store's 1-D Zarr v3 arrays, for the hot path of set sampling.

Why: zarr-python 3 costs about 0.5-1.5 ms per small slice on these machines (asyncio round trip
plus its codec pipeline), which made one 256-cell set with controls cost ~8 ms, barely faster than
the reference's per-row HDF5 reads. The store's X arrays have one fixed, documented layout (Zarr v3
spec: regular 1-D chunks, default chunk keys, optionally the ``sharding_indexed`` codec with the
index at the end, inner codecs bytes(little) [+ blosc]). This reader reads those chunk bytes with
``os.pread`` and decodes them with numcodecs' Blosc, keeping decoded chunks in a small LRU cache.
Any other layout raises ``Unsupported`` and the caller falls back to zarr-python. Tests check the
two paths agree element for element.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from numcodecs import blosc

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

    def __getstate__(self):  # file descriptors do not travel to DataLoader workers
        state = self.__dict__.copy()
        state.update(_fds={}, _cache=OrderedDict(), _cache_bytes=0, _index={})
        return state

    def _fd(self, key: int) -> int | None:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        if key not in self._fds:
            path = self.dir / "c" / str(key)
            if not path.is_file():
                return None
            if len(self._fds) > 64:
                for fd in self._fds.values():
                    os.close(fd)
                self._fds.clear()
            self._fds[key] = os.open(path, os.O_RDONLY)
        return self._fds[key]

    def _shard_index(self, shard: int) -> np.ndarray | None:
        if shard not in self._index:
            fd = self._fd(shard)
            if fd is None:
                self._index[shard] = None
            else:
                nbytes = 16 * self.per_shard + self.index_tail
                offset = os.fstat(fd).st_size - nbytes if self.index_at_end else 0
                raw = os.pread(fd, nbytes, offset)
                self._index[shard] = np.frombuffer(raw[:16 * self.per_shard], dtype="<u8").reshape(-1, 2)
        return self._index[shard]

    def _decode(self, raw: bytes, n: int) -> np.ndarray:
        buf = blosc.decompress(raw) if self.compressed else raw
        return np.frombuffer(buf, dtype=self.dtype, count=n)

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
                values = self._decode(os.pread(self._fd(shard), nbytes, offset), n)
        else:
            fd = self._fd(k)
            if fd is None:
                values = np.full(n, self.fill, dtype=self.dtype)
            else:
                values = self._decode(os.pread(fd, os.fstat(fd).st_size, 0), n)
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
                        raise OSError(f"short read in {self.dir} chunk {k}")
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
    """The same ``take`` over zarr-python, for layouts ChunkReader does not handle."""

    def __init__(self, array):
        self.array = array

    def __getitem__(self, sl: slice) -> np.ndarray:
        return np.asarray(self.array[sl])

    def take(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        runs = merge_ranges(starts, lengths)
        return np.concatenate([np.asarray(self.array[a:b]) for a, b in runs] or
                              [np.zeros(0, dtype=self.array.dtype)])


def fast_or_zarr(array, array_dir: Path, cache_bytes: int):
    """A ChunkReader when the layout allows, else a zarr-python reader with the same interface."""
    try:
        return ChunkReader(array_dir, cache_bytes)
    except (Unsupported, KeyError, OSError, ValueError, TypeError):
        return ZarrRanges(array)
