"""Process-group plumbing shared by every engine: start-up from launcher env, seeding, teardown.

torchrun and the deepspeed launcher both export ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; ``init_distributed`` reads them and forms the process group
(nccl on CUDA, gloo on CPU). Without those variables it is a single process and no group is made,
so the same entry point runs under a launcher and as a plain ``python`` command. Every helper here
(``barrier``, ``is_main``, ...) also works when no group exists.

SLURM: a task started by ``srun`` (one process per task, no torchrun) has no ``RANK``; without a
mapping every task would run as an independent rank 0 writing the same directory. ``slurm_variables``
maps ``SLURM_PROCID`` / ``SLURM_STEP_NUM_TASKS`` (or ``SLURM_NTASKS``) / ``SLURM_LOCALID`` and the
first host of the step's node list to ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR``
(``MASTER_PORT``: kept when set, else derived from ``SLURM_JOB_ID`` so every task agrees), and
``init_distributed`` exports them before forming the group. A launcher's own variables win
(torchrun or deepspeed inside an ``srun`` step set ``RANK``); a multi-task job's batch script
itself (no ``srun`` step) is refused with a message saying how to start it.
"""

from __future__ import annotations

import os
import random
import re
import socket
from collections.abc import Mapping
from datetime import timedelta
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

BACKENDS = ("auto", "gloo", "nccl")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000  # MASTER_PORT = base + SLURM_JOB_ID % span
_SLURM_BATCH_STEPS = ("batch", "4294967294")  # the step id of a job's batch script (not an srun step)


class DistInfo(NamedTuple):
    rank: int
    world: int
    local_rank: int
    device: torch.device


def _env_int(name: str, env: Mapping[str, str] = os.environ) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got '{value}'") from None


def _device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-005,9],cpu1`` -> ``gpu003``,
    ``rack[1-2]-n[07,9]`` -> ``rack1-n07`` (what ``scontrol show hostnames`` prints first)."""
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            end = i
            break
    host = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], nodelist[:end].strip())
    if not host or "[" in host or "]" in host:
        raise ValueError(f"cannot read the first host of the SLURM node list {nodelist!r}; set MASTER_ADDR")
    return host


def slurm_variables(env: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of a task that ``srun`` started; {} when there is nothing to
    map (not under SLURM, a launcher already set RANK, or a one-task step).

    Raises:
        ValueError: the batch script of a multi-task job (no ``srun`` step: its tasks would never
            join), or a SLURM variable missing or not an integer.
    """
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}

    def number(*names: str) -> int:  # the first of ``names`` that is set
        for name in names:
            value = _env_int(name, env)
            if value is not None:
                return value
        raise ValueError(f"SLURM_PROCID is set but {' / '.join(names)} is not; cannot map this SLURM task to a rank")

    world = number("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    if world <= 1:
        return {}
    step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
    if step is None or step in _SLURM_BATCH_STEPS:
        raise ValueError(f"this is the batch script of a {world}-task SLURM job (SLURM_NTASKS={world}) but not an "
                         "srun task: start one process per task with `srun python launch/pretrain.py ...`, or run "
                         "torchrun / deepspeed under `srun --ntasks-per-node=1`")
    rank, local = number("SLURM_PROCID"), number("SLURM_LOCALID")
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is not in [0, {world}) (the step's task count)")
    addr = env.get("MASTER_ADDR")
    if not addr:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but no SLURM node list (SLURM_STEP_NODELIST / SLURM_JOB_NODELIST) "
                             "nor MASTER_ADDR: cannot tell the tasks where rank 0 is")
        addr = first_host(nodelist)
    port = env.get("MASTER_PORT") or str(SLURM_PORT_BASE + number("SLURM_JOB_ID") % SLURM_PORT_SPAN)
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local), "MASTER_ADDR": addr,
            "MASTER_PORT": port}


def init_distributed(backend: str = "auto", timeout_s: float | None = None) -> DistInfo:
    """Join the process group the launcher describes; returns (rank, world, local_rank, device).

    Args:
        backend: "auto" (nccl when CUDA is available, else gloo), "gloo" or "nccl".
        timeout_s: collective timeout (a dead peer makes the others fail after this long instead of
            hanging); None keeps torch's default.

    Without ``RANK`` / ``WORLD_SIZE`` in the environment (nor an srun task to map them from,
    ``slurm_variables``) this is a single process: (0, 1, 0, device) and no process group. An
    already initialised group is reused as is.

    Raises:
        ValueError: an unknown backend, or inconsistent launcher variables.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown distributed backend '{backend}'; valid: {', '.join(BACKENDS)}")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK")
        local_rank = rank if local_rank is None else local_rank
        return DistInfo(rank, world, local_rank, _device_for(local_rank))
    os.environ.update(slurm_variables(os.environ))  # an srun task: its rank, world and rendezvous
    rank, world, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if rank is None or world is None:
        return DistInfo(0, 1, 0, _device_for(0))
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    local_rank = rank if local_rank is None else local_rank
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ValueError(f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; start the job with "
                         "torchrun or the deepspeed launcher, or set them")
    device = _device_for(local_rank)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("the nccl backend needs CUDA; use gloo (or backend='auto') on CPU")
    kwargs = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return DistInfo(rank, world, local_rank, device)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_initialized():
        dist.barrier()


def all_reduce_floats(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Reduce a few floats across ranks ("sum" or "min"; float64 on CPU); the values themselves
    without a process group or with one rank."""
    if not is_initialized() or get_world_size() == 1:
        return [float(v) for v in values]
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN}
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t, op=ops[op])
    return [float(v) for v in t.tolist()]


def cleanup() -> None:
    """Destroy the process group if one exists (safe to call twice)."""
    if is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed torch (CPU and CUDA), numpy and ``random`` with ``seed + rank``; returns that seed.

    The per-rank offset gives each rank its own noise and coin flips. Model weights need not agree
    across ranks at construction: both engines broadcast rank 0's weights when they wrap a model.
    """
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % (1 << 32))
    torch.manual_seed(value)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(value)
    return value
