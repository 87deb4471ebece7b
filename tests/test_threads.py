"""Torch threads per process from the available cores (perturbdiff.threads)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from perturbdiff.threads import available_cores, threads_per_process


def test_share_of_the_cores_and_explicit_settings_win(monkeypatch):
    for var in ("PERTURBDIFF_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    cores = available_cores()
    assert threads_per_process(1)[0] == cores
    assert threads_per_process(cores * 4)[0] == 1          # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads_per_process()[0] == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads_per_process()[0] == 3
    monkeypatch.setenv("PERTURBDIFF_THREADS", "1")
    assert threads_per_process() == (1, "PERTURBDIFF_THREADS=1")
    monkeypatch.setenv("PERTURBDIFF_THREADS", "two")
    with pytest.raises(ValueError, match="PERTURBDIFF_THREADS='two'"):
        threads_per_process()
    monkeypatch.setenv("PERTURBDIFF_THREADS", "0")
    with pytest.raises(ValueError, match="at least 1"):
        threads_per_process()


def test_the_cli_sets_torch_threads_for_a_rank_of_a_local_group():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PERTURBDIFF_THREADS")}
    env["LOCAL_WORLD_SIZE"] = str(available_cores() * 2)   # more ranks than cores: 1 thread each
    code = ("import torch; from perturbdiff.threads import configure_threads; "
            "torch.set_num_threads(4); print(configure_threads(), torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]
