"""No orphans: the worker processes of a conversion or a synthetic generation never outlive the job.

Real processes throughout. A job runs in a subprocess with two spawned workers, slowed by the
``PERTURBDIFF_SLOW_TASKS`` hook (the environment reaches spawned workers; a monkeypatch in the
parent would not), and is killed in the middle: SIGKILL must take the workers with it (their
parent-death signal), SIGTERM must stop the job cleanly (exit 143, one stderr line, resumable),
and a killed worker must fail the job with a clear error instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import psutil
import pytest

from data_sharding.convert import convert
from data_sharding.pool import SLOW_TASKS_ENV, WorkerDied, run_parallel
from helpers import REPO, LogCapture, assert_stores_identical, build_tahoe, popen_convert, quiet, shard_cfg
from perturbdiff.data.schema import DataError

STOP_LINE = "perturbdiff shard: stopped by SIGTERM; finished parts are kept, rerun the same command to resume"
GONE_WITHIN = 10.0  # seconds for the kernel to deliver the death signal and the workers to exit
START_WITHIN = 90.0  # generous: the machine is shared, and every worker imports numpy / pyarrow / zarr
SLOW = {SLOW_TASKS_ENV: "0.5", "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------
# Process helpers
# ---------------------------------------------------------------------------------------------


def wait_for(cond: Callable[[], object], what: str, proc: subprocess.Popen | None = None,
             timeout: float = START_WITHIN) -> object:
    """Poll ``cond`` until it is truthy; fail if ``proc`` ends first or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended (status {proc.returncode}) before {what}: {err.decode()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def alive(p: psutil.Process) -> bool:
    """Running (a zombie has exited: it only waits for a reaper, which may be a PID 1 that never reaps)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def spawn_workers(pid: int) -> list[psutil.Process]:
    """The multiprocessing workers among the descendants of ``pid`` (not its resource tracker)."""
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for k in kids:
        with contextlib.suppress(psutil.Error):
            if "spawn_main" in " ".join(k.cmdline()):
                out.append(k)
    return out


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def assert_gone(procs: list[psutil.Process], timeout: float = GONE_WITHIN) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [(p.pid, " ".join(p.cmdline())[-80:]) for p in procs if alive(p)]
    assert not left, f"processes still running {timeout:.0f}s after their parent ended: {left}"


@contextlib.contextmanager
def job(proc: subprocess.Popen) -> Iterator[list[psutil.Process]]:
    """Yield a list the test fills with the job's descendants; whatever happens, end them all."""
    seen: list[psutil.Process] = []
    try:
        yield seen
    finally:
        for p in [*seen, *descendants(proc.pid)]:
            if alive(p):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def finished(directory: Path, pattern: str) -> list[Path]:
    """Completed outputs (renamed into place, so no ``.tmp`` name)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob(pattern) if not p.name.endswith(".tmp"))


def mid_run(proc: subprocess.Popen, outputs: Callable[[], list[Path]]) -> list[psutil.Process]:
    """Wait until both workers exist and the first output is complete (the workers are at work)."""
    workers = wait_for(lambda: (w if len(w := spawn_workers(proc.pid)) >= 2 else None), "two workers", proc)
    wait_for(outputs, "the first finished output", proc)
    return workers


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Four parquet files, 14 parts at 64 cells per part: two slowed workers stay busy for seconds."""
    return build_tahoe(tmp_path_factory.mktemp("orphans") / "tahoe", seed=5, n_files=4)


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    """The same source converted in one uninterrupted, in-process run."""
    out = tmp_path_factory.mktemp("orphans_ref") / "ref.zarr"
    convert(shard_cfg(source.root, out), log=quiet)
    return out


def work_dir(out: Path) -> Path:
    return out.with_name(out.name + ".work")


# ---------------------------------------------------------------------------------------------
# The conversion
# ---------------------------------------------------------------------------------------------


def test_sigkill_of_the_conversion_takes_its_workers_with_it(source, tmp_path):
    out = tmp_path / "killed.zarr"
    proc = popen_convert(shard_cfg(source.root, out, num_workers=2), env=SLOW)
    with job(proc) as seen:
        workers = mid_run(proc, lambda: finished(work_dir(out), "part-*"))
        seen += descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=GONE_WITHIN)
        assert proc.returncode == -signal.SIGKILL
        assert_gone(workers)
        assert_gone(seen)  # the resource tracker too, once no worker holds its pipe
        total = len(json.loads((work_dir(out) / "plan.json").read_text())["tasks"])
        assert len(finished(work_dir(out), "part-*")) < total  # it was killed mid-conversion


def test_sigterm_stops_the_conversion_cleanly_and_a_rerun_resumes(source, reference, tmp_path):
    out = tmp_path / "stopped.zarr"
    cfg = shard_cfg(source.root, out, num_workers=2)
    proc = popen_convert(cfg, env=SLOW)
    with job(proc) as seen:
        workers = mid_run(proc, lambda: finished(work_dir(out), "part-*"))
        seen += descendants(proc.pid)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=GONE_WITHIN)  # hangs if a worker kept the pipes open
        stderr = err.decode()
        assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, stderr[-2000:])  # -15: no handler ran
        assert time.monotonic() - t0 < GONE_WITHIN
        assert "Traceback" not in stderr
        assert stderr.strip().splitlines() == [STOP_LINE]
        assert_gone(workers, timeout=0.5)  # reaped by the parent before it exited
        assert_gone(seen)

    done = finished(work_dir(out), "part-*")
    total = len(json.loads((work_dir(out) / "plan.json").read_text())["tasks"])
    assert 1 <= len(done) < total
    assert all((p / "meta.json").is_file() for p in done)
    log = LogCapture()
    convert(cfg, log=log)
    assert f"{len(done)} already done" in log.text()  # it resumed
    assert_stores_identical(reference, out)


def test_a_killed_worker_fails_the_conversion_clearly(source, tmp_path):
    out = tmp_path / "broken.zarr"
    proc = popen_convert(shard_cfg(source.root, out, num_workers=2), env=SLOW)
    with job(proc) as seen:
        victim, other = mid_run(proc, lambda: finished(work_dir(out), "part-*"))[:2]
        seen += descendants(proc.pid)
        victim.kill()
        _, err = proc.communicate(timeout=30)  # a hang here is the bug this guards against
        stderr = err.decode()
        assert proc.returncode == 1, stderr[-2000:]
        assert "WorkerDied: perturbdiff shard: a worker process died (killed, or out of memory)" \
            in stderr, stderr[-2000:]
        assert "rerun the same command to resume" in stderr
        assert_gone([other], timeout=0.5)  # stopped and reaped by the parent


def test_cli_shard_sigterm_to_the_process_group(source, tmp_path):
    """``perturbdiff shard`` signalled as a terminal or a batch system does (the whole group)."""
    out = tmp_path / "cli.zarr"
    cmd = [sys.executable, "-m", "perturbdiff.cli", "shard", "shard.source=tahoe", f"shard.inputs=[{source.root}]",
           f"shard.out={out}", "shard.num_workers=2", "shard.cells_per_part=64", "shard.hvg.num_top_genes=20"]
    proc = subprocess.Popen(cmd, cwd=str(REPO), env={**os.environ, **SLOW}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    with job(proc) as seen:
        workers = mid_run(proc, lambda: finished(work_dir(out), "part-*"))
        seen += descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=GONE_WITHIN)
        stderr = err.decode()
        assert proc.returncode == 143, (proc.returncode, stderr[-2000:])
        assert stderr.strip().splitlines() == [STOP_LINE]
        assert_gone(workers, timeout=0.5)
        assert_gone(seen)
    assert not (out / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# The synthetic generator
# ---------------------------------------------------------------------------------------------


SYNTH_SCRIPT = """
import sys
from data_sharding.synthetic import generate
from perturbdiff.config import SynthConfig
generate(SynthConfig(out_dir=sys.argv[1], num_cells=1600, cells_per_file=400, num_genes=200, num_cell_lines=2,
                     num_drugs=2, num_plates=2, num_programs=4, control_wells_per_plate=2, row_group_size=128,
                     num_workers=2))
"""


def test_sigkill_of_the_synthetic_generator_takes_its_workers_with_it(tmp_path):
    out = tmp_path / "synth"
    proc = subprocess.Popen([sys.executable, "-c", SYNTH_SCRIPT, str(out)], cwd=str(REPO),
                            env={**os.environ, **SLOW, SLOW_TASKS_ENV: "1.0"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    with job(proc) as seen:
        workers = mid_run(proc, lambda: finished(out / "data", "train-*.parquet"))
        seen += descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=GONE_WITHIN)
        assert_gone(workers)
        assert_gone(seen)
        assert len(finished(out / "data", "train-*.parquet")) < 4  # it was killed mid-generation


# ---------------------------------------------------------------------------------------------
# run_parallel in this process: errors, dead workers, threads
# ---------------------------------------------------------------------------------------------


def _task(task: tuple[str, str]) -> int:
    """A pool task: record this worker's pid, then sleep, fail, die or return it."""
    kind, directory = task
    Path(directory, f"{kind}.pid").write_text(str(os.getpid()))
    if kind in ("fail", "die"):  # wait until the other worker is busy, so there is one to stop
        deadline = time.monotonic() + START_WITHIN
        while not Path(directory, "sleep.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
    if kind == "sleep":
        time.sleep(120)
    elif kind == "fail":
        raise DataError(Path(directory, "input.parquet"), "a bad value in cell row 3")
    elif kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def _worker_of(directory: Path, kind: str) -> list[psutil.Process]:
    """The worker that ran that task, if it still exists at all (an empty list once it was reaped)."""
    try:
        return [psutil.Process(int((directory / f"{kind}.pid").read_text()))]
    except psutil.NoSuchProcess:
        return []


def test_a_task_error_propagates_unchanged_and_stops_the_other_worker(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    t0 = time.monotonic()
    with pytest.raises(DataError) as info:
        run_parallel(_task, [("fail", str(tmp_path)), ("sleep", str(tmp_path))], 2, quiet, job="test", kept="-")
    assert type(info.value) is DataError
    assert info.value.path == str(tmp_path / "input.parquet") and info.value.problem == "a bad value in cell row 3"
    assert time.monotonic() - t0 < 60  # the sleeping task (120 s) was not waited for
    assert (tmp_path / "sleep.pid").is_file()
    assert_gone(_worker_of(tmp_path, "sleep"), timeout=0.5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_worker_killed_mid_task_is_an_error_not_a_hang(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(WorkerDied, match=r"test: a worker process died \(killed, or out of memory\) "
                                         r"after 0 of 2 files; the finished files are kept"):
        run_parallel(_task, [("die", str(tmp_path)), ("sleep", str(tmp_path))], 2, quiet, job="test", kept="-",
                     noun="files")
    assert (tmp_path / "sleep.pid").is_file()
    assert_gone(_worker_of(tmp_path, "sleep"), timeout=0.5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_workers_started_from_another_thread_live_until_the_run_ends(tmp_path):
    """Workers are started by the calling thread; their death signal must not fire while it runs."""
    results: list[int] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            dirs = [tmp_path / f"t{i}" for i in range(4)]
            for d in dirs:
                d.mkdir()
            run_parallel(_task, [("ok", str(d)) for d in dirs], 2, results.append, job="test", kept="-")
        except BaseException as err:  # noqa: BLE001 - reported to the test thread
            errors.append(err)

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(timeout=START_WITHIN)
    assert not thread.is_alive() and not errors, errors
    assert len(results) == 4 and len(set(results)) <= 2 and os.getpid() not in results
