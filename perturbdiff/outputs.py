"""Output safety: what a command may write, replace or remove, and one writer per output at a time.

Every command that writes a directory (``shard`` a store, a training run, ``predict``, ``evaluate``,
``report``, ``export-wds``, ``synth``, the ``pipeline`` root) follows the same rules:

- **Before any work**, ``check_output`` refuses an output path that is ``.``, the working directory,
  a filesystem root or the home directory, a symlink, an existing file, an input of the command or a
  directory holding one, or an existing non-empty directory that is not recognisably our own output
  of the same kind. Our own outputs carry a marker file (``MARKER``, JSON with the kind); a store is
  recognised by its manifest (or, while it is being written, by its Zarr attribute).
- **Only our own outputs are ever removed or replaced**, and replacing a complete one needs the
  caller's ``overwrite`` (``--overwrite`` on the command line). ``remove_output`` and
  ``commit_directory`` re-check the marker at the moment they act.
- **Outputs appear whole**: a command writes into a hidden staging sibling (``.<name>.partial...``),
  marks it complete with the list of its files, and renames it into place in one step; a reader of
  a directory that must be complete (``evaluate --dir``) checks ``require_complete``.
- **One writer at a time**: ``OutputLock`` holds an exclusive ``flock`` on a hidden sibling lock file
  (``.<name>.lock``) for the life of the command. The kernel releases it when the process dies, so
  a lock left by a killed process is stale and simply taken over; the file says who holds it.

Append-only logs (``metrics.jsonl``) are read with ``read_jsonl``, which drops a torn last line (a
crash or a full disk during an append) instead of failing every later restart.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from .data.schema import MANIFEST_FILE, STORE_ATTR, STORE_FORMAT, DataError

MARKER = ".perturbdiff-output.json"
FORMAT = "perturbdiff-output"
KINDS = ("store", "foundation", "run", "pipeline", "predict", "eval", "report", "wds", "synth", "work")
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# ---------------------------------------------------------------------------------------------
# Markers: what makes a directory recognisably ours
# ---------------------------------------------------------------------------------------------


def read_marker(path: str | Path) -> dict | None:
    """The marker of directory ``path``, or None (absent or unreadable)."""
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def write_marker(path: str | Path, kind: str, **info) -> dict:
    """Mark directory ``path`` (created if needed) as our output of ``kind``; returns the marker."""
    if kind not in KINDS:
        raise ValueError(f"unknown output kind {kind!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = {"format": FORMAT, "kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **info}
    tmp = path / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1, default=str))
    os.replace(tmp, path / MARKER)
    return marker


def output_kind(path: str | Path) -> str | None:
    """The kind of our output at ``path`` (a marked directory or a store), or None."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    marker = read_marker(path)
    if marker is not None:
        return marker.get("kind")
    try:  # stores and foundation checkpoints are known by their manifests
        fmt = json.loads((path / MANIFEST_FILE).read_text()).get("format")
        if fmt in (STORE_FORMAT, "perturbdiff-foundation"):
            return fmt.removeprefix("perturbdiff-")
    except (OSError, ValueError, AttributeError):
        pass
    try:  # a store being written: the Zarr group attribute is set first
        if STORE_ATTR in json.loads((path / "zarr.json").read_text()).get("attributes", {}):
            return "store"
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


# ---------------------------------------------------------------------------------------------
# Checks before any work
# ---------------------------------------------------------------------------------------------


def _forbidden(path: Path) -> str | None:
    here = Path.cwd().resolve()
    resolved = path.resolve()
    if resolved == here:
        return "is the working directory"
    if resolved == Path(resolved.anchor):
        return "is a filesystem root"
    if resolved == Path.home().resolve():
        return "is the home directory"
    return None


def check_output(path: str | Path, kind: str, *, inputs: Iterable[str | Path | None] = (), overwrite: bool = False,
                 replaces: bool = True) -> Path:
    """Refuse, before any work starts, an output path this command must not write to; returns it.

    Args:
        path: the output directory.
        kind: what the command writes there (one of ``KINDS``).
        inputs: the command's inputs (files or directories); the output may be neither one of them
            nor a directory that holds one.
        overwrite: the user asked to replace an existing output of ours.
        replaces: the command replaces an existing output (False: it continues one, e.g. a training
            run that resumes, so an existing output of ours is fine without ``overwrite``).

    Raises:
        DataError: naming the path and why it is refused.
    """
    if path is None or str(path).strip() in ("", "."):
        raise DataError(path, "refusing this output path: give a new directory (not '.')")
    p = Path(path)
    why = _forbidden(p)
    if why:
        raise DataError(p, f"refusing this output path: it {why}; give a new directory")
    resolved = p.resolve()
    for item in inputs:
        if item is None:
            continue
        src = Path(item).resolve()
        if src == resolved:
            raise DataError(p, "refusing this output path: it is an input of this command")
        if resolved in src.parents:
            raise DataError(p, f"refusing this output path: it holds the input {item}; give a new directory")
    if p.is_symlink():
        raise DataError(p, "refusing this output path: it is a symlink; give the real directory or a new path")
    if p.exists() and not p.is_dir():
        raise DataError(p, "refusing this output path: it is an existing file, not a directory")
    if p.is_dir() and not _is_empty_dir(p):
        found = output_kind(p)
        if found != kind:
            what = f"a perturbdiff {found} output" if found else "not a perturbdiff output (no marker)"
            raise DataError(p, f"refusing this output path: it exists and is {what}, not a {kind} output; "
                            "choose a new directory (nothing is ever removed that perturbdiff did not write)")
        if replaces and not overwrite and complete(p):
            raise DataError(p, f"an earlier {kind} output is here; pass --overwrite to replace it")
    return p


def complete(path: str | Path) -> bool:
    """Whether ``path`` is a finished output: a store with its manifest, or a marker saying complete
    (markers without a completion flag belong to outputs that are continued, e.g. runs)."""
    path = Path(path)
    marker = read_marker(path)
    if marker is not None:
        return bool(marker.get("complete", True))
    return (path / MANIFEST_FILE).is_file()


def require_complete(path: str | Path, kind: str) -> dict:
    """The marker of a finished output of ``kind`` whose listed files are all present with their
    recorded sizes; a DataError naming the directory otherwise."""
    path = Path(path)
    marker = read_marker(path)
    if marker is None or marker.get("kind") != kind:
        raise DataError(path, f"not a complete perturbdiff {kind} output (no {MARKER}): was the command that "
                        "writes it interrupted? Run it again")
    if not marker.get("complete"):
        raise DataError(path, f"incomplete {kind} output (the command did not finish): run it again")
    for name, size in (marker.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise DataError(path, f"incomplete {kind} output: {name} is missing")
        if size is not None and f.stat().st_size != size:
            raise DataError(f, f"size {f.stat().st_size} differs from the {size} bytes recorded when it was written "
                            "(truncated or altered)")
    return marker


# ---------------------------------------------------------------------------------------------
# Removing and replacing, only what is ours
# ---------------------------------------------------------------------------------------------


def remove_output(path: str | Path, kind: str | tuple[str, ...]) -> bool:
    """Remove our output of ``kind`` at ``path`` (an empty directory too); returns whether anything
    was removed. Anything else at ``path`` is a DataError and is left alone."""
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if not path.exists() and not path.is_symlink():
        return False
    if path.is_symlink() or not path.is_dir():
        raise DataError(path, "refusing to remove: not a directory perturbdiff wrote")
    if not _is_empty_dir(path) and output_kind(path) not in kinds:
        raise DataError(path, f"refusing to remove: not a perturbdiff {'/'.join(kinds)} output (no marker)")
    shutil.rmtree(path)
    return True


def fsync_tree(root: Path) -> None:
    """Flush every file of ``root`` and the directory itself to disk."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_directory(tmp: str | Path, final: str | Path, kind: str | None = None, fsync: bool = True) -> None:
    """Rename the finished ``tmp`` tree to ``final``, replacing an existing ``final`` only when it is
    our output of ``kind`` (or empty). With ``kind=None`` the caller vouches for ``final`` (a path
    inside an output it owns, e.g. a checkpoint under its run directory)."""
    tmp, final = Path(tmp), Path(final)
    if fsync:
        fsync_tree(tmp)
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists() or final.is_symlink():
        if kind is not None and not _is_empty_dir(final) and output_kind(final) != kind:
            raise DataError(final, f"refusing to replace: not a perturbdiff {kind} output (no marker)")
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: str | Path, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it replaces ``final`` in one rename
    (see ``commit_directory``). On an exception it is removed and ``final`` is untouched."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        commit_directory(tmp, final, kind)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Staging:
    """A whole output written beside its final place and renamed in when complete.

    ``open()`` makes ``.<name>.partial`` (``shared=True``: the same name on every rank of a
    multi-process job, which rank 0 opens) marked incomplete, replacing a stale one left by a crash;
    ``commit(files)`` records the files with their sizes, marks the directory complete and renames it
    to the final path (replacing an earlier output of the same kind, which ``check_output`` has
    allowed); ``abort()`` removes it."""

    def __init__(self, final: str | Path, kind: str, shared: bool = False):
        self.final, self.kind = Path(final), kind
        suffix = "" if shared else f"-{os.getpid()}"
        self.path = self.final.parent / f".{self.final.name}.partial{suffix}"

    def open(self, **info) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            remove_output(self.path, self.kind)
        write_marker(self.path, self.kind, complete=False, **info)
        return self.path

    def commit(self, files: Iterable[str] = (), **info) -> Path:
        sizes = {name: (self.path / name).stat().st_size for name in files}
        marker = read_marker(self.path) or {}
        extra = {k: v for k, v in marker.items() if k not in ("format", "kind", "created", "complete")}
        write_marker(self.path, self.kind, complete=True, files=sizes, **{**extra, **info})
        commit_directory(self.path, self.final, self.kind)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# One writer per output
# ---------------------------------------------------------------------------------------------


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


class OutputLock:
    """An exclusive, non-blocking lock on output ``path`` for the life of a command.

    The lock is an ``flock`` on ``.<name>.lock`` beside the output, which the kernel drops when the
    process dies: a lock file left by a killed process is stale and is taken over (its holder is
    checked by trying the lock, not by trusting the pid written in it). The file is removed on
    release. ``flock`` is honoured across the hosts of a shared filesystem where that filesystem
    supports it (NFSv4, Lustre and GPFS do)."""

    def __init__(self, path: str | Path, what: str = "output"):
        self.path, self.what = Path(path), what
        self.file = lock_path(self.path)
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.file.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
                os.close(fd)
                raise DataError(self.path, f"{self.what} is in use by another perturbdiff process ({holder or 'unknown'}); "
                                "wait for it to finish or choose another output path") from None
            try:  # the file may have been released and removed between open and flock: retry
                same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on host {socket.gethostname()}, since "
                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(sys.argv[:3])}\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.file)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Disk full, append-only files
# ---------------------------------------------------------------------------------------------


def out_of_space(err: BaseException) -> bool:
    """Whether ``err`` (or what it was raised from: h5py and anndata re-wrap OSErrors) is a full disk
    or quota."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _SPACE_ERRNOS:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return False


def space_error(path: str | Path, err: BaseException) -> DataError:
    """A one-line DataError for a full disk while writing ``path``, with the space left there."""
    where = Path(path)
    probe = where if where.exists() else next((p for p in where.parents if p.exists()), Path("."))
    try:
        free = f"{format_bytes(shutil.disk_usage(probe).free)} free there now"
    except OSError:
        free = "free space unknown"
    return DataError(where, f"out of disk space while writing ({free}); the incomplete output was removed, "
                     "nothing was left in place: free space or choose another path")


def format_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def read_jsonl(path: str | Path) -> tuple[list[dict], int]:
    """The records of an append-only JSON-lines file and the number of lines dropped: a torn last
    line (a crash or a full disk during an append) and any other undecodable line."""
    records, dropped = [], 0
    with open(path, "rb") as f:
        raw = f.read()
    for line in raw.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        if isinstance(rec, dict):
            records.append(rec)
        else:
            dropped += 1
    return records, dropped


def repair_jsonl(path: str | Path) -> int:
    """Cut a torn tail off an append-only JSON-lines file, so the next append starts a clean line:
    an unterminated last line, then any trailing lines that do not decode (a power loss can leave a
    block of NUL bytes). Returns the number of bytes removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as f:
        raw = f.read()
        body = raw[:raw.rfind(b"\n") + 1]
        while body:
            start = body.rfind(b"\n", 0, len(body) - 1) + 1
            try:
                json.loads(body[start:-1])
                break
            except ValueError:
                body = body[:start]
        if len(body) != len(raw):
            f.truncate(len(body))
        return len(raw) - len(body)
