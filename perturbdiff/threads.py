"""Torch's CPU thread count per process, from the cores this process may use.

torch starts one intra-op thread per core it sees, in every process: two ranks on 2 cores with 2
threads each oversubscribe them (throughput measured swinging from 77 to 6,500 cells/s under load;
steady at 1 thread per rank). ``configure_threads`` gives each of the node's processes an equal share
of the cores available to this process (its CPU affinity, which respects cgroup/taskset limits), at
least 1. An explicit ``OMP_NUM_THREADS`` (or ``PERTURBDIFF_THREADS``) always wins.
"""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (affinity mask; os.cpu_count() where that is unavailable)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def threads_per_process(local_processes: int | None = None) -> tuple[int, str]:
    """(threads, why): the explicit setting, or available cores // processes on this node."""
    for var in ("PERTURBDIFF_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(var, "").strip()
        if value:
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"{var}={value!r} is not a whole number of threads") from None
            if n < 1:
                raise ValueError(f"{var}={value!r}: the number of threads must be at least 1")
            return n, f"{var}={n}"
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    cores = available_cores()
    n = max(1, cores // max(1, local_processes))
    return n, f"{cores} core(s) / {local_processes} process(es) on this node"


def configure_threads(local_processes: int | None = None) -> int:
    """Set torch's intra-op threads for this process (see the module docstring); returns the count."""
    import torch

    n, _ = threads_per_process(local_processes)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
