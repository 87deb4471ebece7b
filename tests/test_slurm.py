"""SLURM: an srun task's variables mapped to torch.distributed's (perturbdiff.distributed.slurm_variables).

The 2-process run under a fake srun environment is in test_launch.py (it equals torchrun bitwise)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO
from perturbdiff import distributed as pdist


def srun_env(rank: int = 1, world: int = 4, **extra: str) -> dict:
    return {"SLURM_JOB_ID": "123456", "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
            "SLURM_STEP_NUM_TASKS": str(world), "SLURM_LOCALID": str(rank % 2), "SLURM_STEP_ID": "0",
            "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]", **extra}


@pytest.mark.parametrize("nodelist, host", [
    ("node12", "node12"), ("gpu[003-005,9],cpu1", "gpu003"), ("gpu[9,003-005]", "gpu9"),
    ("rack[1-2]-n[07,9]", "rack1-n07"), ("a,b[1-3]", "a"), ("c-[01-04]", "c-01"),
])
def test_first_host_of_a_node_list(nodelist, host):
    assert pdist.first_host(nodelist) == host


def test_first_host_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        pdist.first_host("gpu[01-02")


def test_an_srun_task_maps_to_its_rank():
    assert pdist.slurm_variables(srun_env()) == {
        "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(pdist.SLURM_PORT_BASE + 123456 % pdist.SLURM_PORT_SPAN)}
    # the step's task count and node list win over the job's (a step may use part of the job)
    env = srun_env(world=4, SLURM_NTASKS="8", SLURM_JOB_NODELIST="cpu[1-9]")
    assert pdist.slurm_variables(env)["WORLD_SIZE"] == "4" and pdist.slurm_variables(env)["MASTER_ADDR"] == "gpu007"
    # a user's MASTER_ADDR / MASTER_PORT are kept
    got = pdist.slurm_variables(srun_env(MASTER_ADDR="10.0.0.5", MASTER_PORT="29999"))
    assert (got["MASTER_ADDR"], got["MASTER_PORT"]) == ("10.0.0.5", "29999")


def test_nothing_to_map():
    assert pdist.slurm_variables({}) == {}  # not under SLURM
    assert pdist.slurm_variables(srun_env(RANK="3")) == {}  # torchrun / deepspeed inside the step set RANK
    assert pdist.slurm_variables(srun_env(rank=0, world=1)) == {}  # a one-task step: a single process
    no_step = {k: v for k, v in srun_env(rank=0, world=1).items() if k != "SLURM_STEP_ID"}
    assert pdist.slurm_variables(no_step) == {}  # a one-task batch script (e.g. one that runs torchrun)


@pytest.mark.parametrize("edit, message", [
    ({"SLURM_STEP_ID": None}, "batch script of a 4-task SLURM job"),
    ({"SLURM_STEP_ID": "batch"}, "batch script of a 4-task SLURM job"),
    ({"SLURM_LOCALID": None}, "SLURM_LOCALID is not"),
    ({"SLURM_PROCID": "x"}, "SLURM_PROCID must be an integer, got 'x'"),
    ({"SLURM_PROCID": "7"}, r"SLURM_PROCID=7 is not in \[0, 4\)"),
    ({"SLURM_STEP_NODELIST": None, "SLURM_JOB_NODELIST": None}, "no SLURM node list"),
    ({"SLURM_JOB_ID": None}, "SLURM_JOB_ID is not"),
])
def test_an_unusable_slurm_environment_is_refused(edit, message):
    env = srun_env()
    for key, value in edit.items():
        if value is None:
            env.pop(key)
        else:
            env[key] = value
    with pytest.raises(ValueError, match=message):
        pdist.slurm_variables(env)


def test_the_batch_script_of_a_multi_task_job_fails_in_one_line(tmp_path):
    """`python launch/pretrain.py` run by the batch script itself (not under srun) would wait forever
    for tasks that never start: it stops at once, saying how to start the job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    env.update(srun_env(rank=0, world=2), OMP_NUM_THREADS="1")
    env.pop("SLURM_STEP_ID")
    res = subprocess.run([sys.executable, "launch/pretrain.py", f"out_dir={tmp_path / 'run'}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "batch script of a 2-task SLURM job" in lines[0] and "srun" in lines[0], res.stderr
    assert not (tmp_path / "run").exists()
