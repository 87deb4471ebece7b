"""Kill-and-rerun: an interrupted conversion resumes to a store identical to an uninterrupted one,
and nothing half-written is ever visible at ``<out>``."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from data_sharding.convert import convert
from helpers import LogCapture, assert_stores_identical, popen_convert, quiet, run_convert, shard_cfg
from perturbdiff.data import schema
from perturbdiff.data.schema import DataError
from perturbdiff.data.store import CellStore


def finished_parts(work: Path) -> list[Path]:
    if not work.is_dir():
        return []
    return sorted(p for p in work.iterdir() if p.is_dir() and p.name.startswith("part-") and not p.name.endswith(".tmp"))


def test_sigkill_during_parts_then_rerun(tahoe_src, tahoe_store, tmp_path):
    out = tmp_path / "killed.zarr"
    work = out.with_name(out.name + ".work")
    cfg = shard_cfg(tahoe_src.root, out, num_workers=1)
    proc = popen_convert(cfg, slow_parts=0.4)
    deadline = time.time() + 90
    try:
        while not finished_parts(work):
            assert proc.poll() is None, f"conversion ended before it could be killed: {proc.communicate()}"
            assert time.time() < deadline, "no part finished in time"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = finished_parts(work)
    total = len(json.loads((work / "plan.json").read_text())["tasks"])
    assert 1 <= len(done) < total
    assert all((p / "meta.json").is_file() for p in done)
    assert not (out / schema.MANIFEST_FILE).exists()
    with pytest.raises(DataError, match="manifest"):
        CellStore(out)

    log = LogCapture()
    convert(shard_cfg(tahoe_src.root, out, num_workers=2), log=log)
    assert f"{len(done)} already done" in log.text()  # it resumed, it did not start over
    assert_stores_identical(tahoe_store, out)
    assert not work.exists() and not out.with_name(out.name + ".tmp").exists()  # cleaned up


def test_fault_in_merge_leaves_nothing_visible_then_rerun(tahoe_src, tahoe_store, tmp_path):
    out = tmp_path / "fault.zarr"
    cfg = shard_cfg(tahoe_src.root, out, block_cells=50)
    res = run_convert(cfg, env={"PERTURBDIFF_FAULT_MERGE": "merge_block:1"})
    assert res.returncode == 17, res.stderr.decode()[-2000:]
    assert not out.exists()  # nothing at <out>: no manifest, no half-written arrays
    assert out.with_name(out.name + ".tmp").is_dir()
    assert not (out.with_name(out.name + ".tmp") / schema.MANIFEST_FILE).exists()
    work = out.with_name(out.name + ".work")
    total = len(json.loads((work / "plan.json").read_text())["tasks"])
    assert len(finished_parts(work)) == total  # all parts were done before the merge
    with pytest.raises(DataError):
        CellStore(out)

    log = LogCapture()
    convert(cfg, log=log)
    assert f"{total} already done" in log.text()
    assert_stores_identical(tahoe_store, out)
    assert not out.with_name(out.name + ".tmp").exists()


def test_fault_after_an_earlier_complete_store_keeps_the_old_one(tahoe_src, tmp_path):
    """Rebuilding over a complete store with overwrite: a crash in the merge leaves the old store readable."""
    out = tmp_path / "old.zarr"
    cfg = shard_cfg(tahoe_src.root, out, block_cells=50)
    convert(cfg, log=quiet)
    before = (out / schema.MANIFEST_FILE).read_text()
    script_cfg = shard_cfg(tahoe_src.root, out, block_cells=50)
    import subprocess
    import sys

    from helpers import REPO, convert_script
    code = convert_script(script_cfg).replace("convert(cfg, log=lambda m: None)",
                                              "convert(cfg, log=lambda m: None, overwrite=True)")
    env = dict(os.environ, PERTURBDIFF_FAULT_MERGE="merge_block:1")
    res = subprocess.run([sys.executable, "-c", code], cwd=str(REPO), env=env, capture_output=True, timeout=120)
    assert res.returncode == 17, res.stderr.decode()[-2000:]
    assert (out / schema.MANIFEST_FILE).read_text() == before
    CellStore(out)  # still a valid store


def test_rerun_on_complete_store_is_a_noop(tahoe_src, tmp_path):
    out = tmp_path / "done.zarr"
    cfg = shard_cfg(tahoe_src.root, out)
    first = convert(cfg, log=quiet)
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    log = LogCapture()
    again = convert(cfg, log=log)
    assert again.to_dict() == json.loads((out / schema.MANIFEST_FILE).read_text())
    assert again.arrays == first.arrays
    assert "nothing to do" in log.text()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp
    assert not out.with_name(out.name + ".work").exists()


def test_changed_settings_discard_stale_parts(tahoe_src, tahoe_store, tmp_path):
    """Parts left by an interrupted run with other settings are not mixed into the new store."""
    out = tmp_path / "changed.zarr"
    res = run_convert(shard_cfg(tahoe_src.root, out, cells_per_part=200, block_cells=50),
                      env={"PERTURBDIFF_FAULT_MERGE": "merge_block:0"})
    assert res.returncode == 17
    log = LogCapture()
    convert(shard_cfg(tahoe_src.root, out), log=log)
    assert "discarding" in log.text()
    assert_stores_identical(tahoe_store, out)
