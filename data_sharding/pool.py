"""The one process pool of the data layer: workers that never outlive the job that started them.

``run_parallel(fn, tasks, workers, on_result)`` runs ``fn(task)`` for every task, in spawned worker
processes when ``workers > 1`` (in this process otherwise), and calls ``on_result`` in this process
with each result as it arrives. The conversion (``convert.py``) and the synthetic generator
(``synthetic/``) both use it. Each worker can hold half a gigabyte and writes files, so a worker
left running after its job ended is a real cost; every way the job can end is handled:

* the job is SIGKILLed (or crashes hard): the kernel kills each worker, because a worker's first act
  is ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux), and a worker whose parent died before that exits
  at once. The death signal fires when the *thread* that started the worker ends; workers are
  started by the thread that calls ``run_parallel``, which stays inside it while they live.
* SIGTERM or SIGINT during the run (in the main thread): the handler only records the signal; the
  run loop sees it within ``_POLL_SECONDS``, cancels the pending tasks, terminates and reaps the
  workers, restores the previous handlers, prints one line to stderr (``<job>: stopped by SIGTERM;
  <kept>, rerun the same command to resume``) and raises ``SystemExit(128 + signal)``, so
  ``finally`` blocks (locks, temporary files) run and no traceback is printed. Workers ignore
  SIGINT: a Ctrl-C reaches the whole process group, and the parent alone decides how to stop.
* a worker dies (OOM killer, kill -9): ``WorkerDied`` (a ``BrokenProcessPool``) naming the job and
  the progress; the other workers are stopped. (Which signal ended it is not reliable to report:
  the pool SIGTERMs the survivors as soon as one dies.)
* a task raises (say a ``DataError`` naming a file): that exception propagates unchanged and the
  other workers are stopped, not left to finish their tasks.
* every task done: the workers get the shutdown sentinel and exit normally.

Work is resumable by construction in the callers (finished outputs are renamed into place), so
stopping a worker in the middle of a task loses at most that task.

Test hook: ``PERTURBDIFF_SLOW_TASKS=<seconds>`` makes every task sleep that long before it starts
(the environment reaches spawned workers, where monkeypatching does not), so the kill tests can
catch a small conversion in the middle.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from types import FrameType
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

SLOW_TASKS_ENV = "PERTURBDIFF_SLOW_TASKS"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_POLL_SECONDS = 0.2  # how soon the run loop notices a recorded SIGTERM / SIGINT
_TERMINATE_GRACE_SECONDS = 5.0  # SIGTERM, then SIGKILL a worker that has not exited by then
_MANAGER_JOIN_SECONDS = 30.0


class WorkerDied(BrokenProcessPool):
    """A worker process ended without returning its task (killed, out of memory, crashed).

    A ``BrokenProcessPool`` (hence a ``RuntimeError``), so callers that caught either still do.
    """


class _Stopped(BaseException):
    """Raised by the signal handler in the in-process (one worker) path, which has no loop to poll.

    A BaseException, so task code's ``except Exception`` does not swallow the stop.
    """


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the Linux kernel to send ``sig`` to this process when its parent (thread) dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    # prctl is variadic: pass every argument as the unsigned long the kernel reads
    if libc.prctl(ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(sig)), ctypes.c_ulong(0),
                  ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


def _init_worker(parent_pid: int) -> None:
    """Pool initializer: die with the parent; leave SIGINT to the parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        set_parent_death_signal(signal.SIGKILL)
    # The parent may have died between our start and the prctl above; then nothing will kill us.
    if os.getppid() != parent_pid:
        os._exit(1)


def _run_one(fn: Callable[[T], R], task: T) -> R:
    """Run one task (in a worker, or in-process), after the optional test-hook delay."""
    delay = float(os.environ.get(SLOW_TASKS_ENV) or 0)
    if delay > 0:
        time.sleep(delay)
    return fn(task)


# ---------------------------------------------------------------------------------------------
# Signals in the parent
# ---------------------------------------------------------------------------------------------


class _StopSignals:
    """While entered (in the main thread only): SIGTERM / SIGINT are recorded as a request to stop.

    ``raise_at_once``: also raise ``_Stopped`` from the handler (the in-process path, where the
    task itself must be interrupted). Only the first signal counts; a second one while stopping is
    ignored, so stopping is not itself interrupted. The previous handlers are restored on exit.
    """

    def __init__(self, raise_at_once: bool):
        self.raise_at_once = raise_at_once
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.raise_at_once:
            raise _Stopped(signum)

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *_exc: object) -> None:
        for sig, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best guess
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()


def _exit_stopped(signum: int, job: str, kept: str) -> None:
    name = signal.Signals(signum).name
    print(f"{job}: stopped by {name}; {kept}, rerun the same command to resume", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


# ---------------------------------------------------------------------------------------------
# The pool
# ---------------------------------------------------------------------------------------------


def run_parallel(fn: Callable[[T], R], tasks: Sequence[T], workers: int, on_result: Callable[[R], None], *,
                 job: str, kept: str, noun: str = "tasks") -> None:
    """Run ``fn(task)`` for every task on up to ``workers`` spawned processes; see the module doc.

    ``fn`` and the tasks must be picklable (``fn`` a module-level function). ``on_result`` runs in
    this process, in completion order. ``job`` (e.g. ``"perturbdiff shard"``), ``kept`` (e.g.
    ``"finished parts are kept"``) and ``noun`` (``"parts"``) word the stop message and errors.

    Raises:
        SystemExit(128 + signal): SIGTERM / SIGINT arrived during the run (main thread only).
        WorkerDied: a worker process died.
        whatever ``fn`` or ``on_result`` raised, unchanged.
    """
    if not tasks:
        return
    workers = max(1, min(int(workers), len(tasks)))
    stop = _StopSignals(raise_at_once=workers == 1)
    try:
        with stop:
            if workers == 1:
                for task in tasks:
                    on_result(_run_one(fn, task))
            else:
                _run_pool(fn, tasks, workers, on_result, stop, job=job, noun=noun)
    except _Stopped:
        pass
    if stop.signum is not None:
        _exit_stopped(stop.signum, job, kept)


def _run_pool(fn: Callable[[T], R], tasks: Sequence[T], workers: int, on_result: Callable[[R], None],
              stop: _StopSignals, *, job: str, noun: str) -> None:
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(),))
    completed = 0
    finished = False
    try:
        try:
            # Workers are spawned on demand by submit(), i.e. by this thread (see the module doc).
            futures = [pool.submit(_run_one, fn, t) for t in tasks]
            pending = set(futures)
            while pending and stop.signum is None:
                done, pending = wait(pending, timeout=_POLL_SECONDS, return_when=FIRST_COMPLETED)
                for fut in done:
                    res = fut.result()
                    completed += 1
                    on_result(res)
                # The pool notices a dead worker only at its next event if that worker was added
                # while its thread was already waiting (CPython 3.11 submit() race): look ourselves.
                if pending and any(p.exitcode is not None for p in _processes(pool)):
                    raise BrokenProcessPool("a worker process exited while tasks were pending")
            finished = stop.signum is None
        except BrokenProcessPool as err:
            if stop.signum is not None:  # a SIGTERM to the whole process group reached the workers too
                return
            raise WorkerDied(f"{job}: a worker process died (killed, or out of memory) after {completed} of "
                             f"{len(tasks)} {noun}; the finished {noun} are kept, rerun the same command to "
                             "resume") from err
    finally:
        if finished:
            pool.shutdown(wait=True)
        else:
            _stop_workers(pool)


def _processes(pool: ProcessPoolExecutor) -> list[mp.process.BaseProcess]:
    # ProcessPoolExecutor has no public handle on its workers before Python 3.14 (terminate_workers)
    return list((getattr(pool, "_processes", None) or {}).values())


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Cancel what has not started, terminate (then kill) the workers, reap them, join the pool."""
    procs = _processes(pool)
    manager = getattr(pool, "_executor_manager_thread", None)
    # The pool's own thread cancels the pending tasks: cancelling them from here races with its
    # failing them once the workers are gone (InvalidStateError in that thread, Python 3.11).
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_SECONDS
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()
    # The manager thread notices the dead workers, fails the running tasks' futures and exits.
    if manager is not None:
        manager.join(timeout=_MANAGER_JOIN_SECONDS)
