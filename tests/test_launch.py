"""The launch scripts under real launchers, 2 processes on gloo: torchrun fine-tuning with a rank
killed mid-run and resumed, a 2-"node" job over loopback, and deepspeed ZeRO-3 pretraining on two
stores -> foundation export -> torchrun fine-tuning from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, build_train_store
from perturbdiff.outputs import MARKER
from perturbdiff import distributed as pdist

TIMEOUT = 300
COMMON = ["data.set_size=8", "data.sets_per_batch=2", "data.panel.kind=all", "data.run_cells=1",
          "data.split.random_val_fraction=0.3", "model.size=tiny", "diffusion.kme_impl=torch", "diffusion.steps=100",
          "train.log_every=1", "train.val_every=4", "train.val_batches=2", "train.sample_every=0",
          "train.optim.warmup_steps=2", "train.optim.ema_every=2", "train.dist_timeout_s=60"]


def env(**extra: str) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PERTURBDIFF_DS_SHM_COMM="0", DS_ACCELERATOR="cpu",
             PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    e.update(extra)
    return e


def torchrun(script: str, args: list[str], *, nproc: int = 2, extra_env: dict | None = None,
             node: tuple[int, int, int] | None = None, wait: bool = True):
    """``torchrun --standalone --nproc_per_node N script args``; ``node=(rank, nodes, port)`` makes one
    node of a multi-node job over loopback instead."""
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if node is None:
        cmd += ["--standalone"]
    else:
        rank, nodes, port = node
        cmd += ["--nnodes", str(nodes), "--node_rank", str(rank), "--master_addr", "127.0.0.1",
                "--master_port", str(port)]
    cmd += ["--nproc_per_node", str(nproc), f"launch/{script}.py", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return finish(proc) if wait else proc


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"launcher hung for {TIMEOUT}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, res.stdout[-6000:]
    return res.stdout


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    a = build_train_store(root, "a", genes=32, seed=0, dataset="dsA")
    b = build_train_store(root, "b", genes=32, seed=1, dataset="dsB", first_gene=16)  # G016..G047
    return a, b


@pytest.fixture(scope="module")
def uninterrupted(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    ok(torchrun("finetune", [*COMMON, f"data.store={stores[0]}", f"out_dir={out}", "train.max_steps=8",
                             "train.ckpt_every=3"]))
    return losses(out)


def test_killed_rank_stops_the_job_and_the_restart_continues_exactly(stores, uninterrupted, tmp_path):
    args = [*COMMON, f"data.store={stores[0]}", f"out_dir={tmp_path}", "train.max_steps=8", "train.ckpt_every=3"]
    t0 = time.monotonic()
    res = torchrun("finetune", args, extra_env={"PERTURBDIFF_FAULT_TRAIN": "1:5"})  # rank 1: SIGKILL before step 5
    assert res.returncode != 0, res.stdout[-3000:]
    assert time.monotonic() - t0 < 120
    steps = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert steps == ["step_000000003"], steps  # the last good checkpoint, nothing half-written
    out = ok(torchrun("finetune", args))
    assert "resumed from" in out and "step_000000003" in out
    assert losses(tmp_path) == uninterrupted  # bitwise: steps 1..3 before the crash, 4..8 after it
    assert [s for s, _ in uninterrupted] == list(range(1, 9))


def test_two_nodes_over_loopback_equal_one_node_with_two_processes(stores, uninterrupted, tmp_path):
    args = [*COMMON, f"data.store={stores[0]}", f"out_dir={tmp_path}", "train.max_steps=8", "train.ckpt_every=3"]
    port = pdist.free_port()
    nodes = [torchrun("finetune", args, nproc=1, node=(r, 2, port), wait=False) for r in (0, 1)]
    outs = [finish(p) for p in nodes]
    for res in outs:
        ok(res)
    assert losses(tmp_path) == uninterrupted


def test_srun_tasks_without_a_launcher_equal_torchrun(stores, uninterrupted, tmp_path):
    """Two processes started as srun starts tasks (SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / the
    node list, no RANK): they form one 2-rank job whose losses equal torchrun's bitwise, instead of two
    independent rank-0 runs writing one directory."""
    args = [*COMMON, f"data.store={stores[0]}", f"out_dir={tmp_path}", "train.max_steps=8", "train.ckpt_every=3"]
    port = pdist.free_port()
    tasks = []
    for rank in (0, 1):
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
                 "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "localhost",
                 "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": str(port)}
        tasks.append(subprocess.Popen([sys.executable, "launch/finetune.py", *args], cwd=REPO, env=env(**slurm),
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [ok(finish(t)) for t in tasks]
    assert "on 2 x cpu" in outs[0]
    assert losses(tmp_path) == uninterrupted


def test_zero3_pretraining_on_two_stores_exports_a_foundation_that_fine_tunes(stores, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not importable")
    pre, fin = tmp_path / "pretrain", tmp_path / "finetune"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(pdist.free_port()), "launch/pretrain.py",
           *COMMON, f"data.stores=[{stores[0]},{stores[1]}]", f"out_dir={pre}", "train.max_steps=4",
           "train.ckpt_every=2", "train.engine.backend=deepspeed", "train.engine.zero_stage=3"]
    out = ok(finish(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)))
    assert "marginal pretraining" in out and "ZeRO-3 on 2 x cpu" in out
    manifest = json.loads((pre / "foundation" / "manifest.json").read_text())
    assert manifest["genes"] == [f"G{i:03d}" for i in range(48)]  # the union, first store's order first
    assert manifest["vocabularies"]["dataset"] == ["dsA", "dsB"]
    assert "perturbation" not in manifest["vocabularies"] and manifest["extra"]["mode"] == "pretrain"
    # the foundation loads on one device without DeepSpeed (and without unpickling)
    probe = ("import sys, torch; from perturbdiff.foundation import load_foundation; "
             f"m = load_foundation({str(pre / 'foundation')!r}).build(); "
             "assert 'deepspeed' not in sys.modules; "
             "print(sum(p.numel() for p in m.parameters()))")
    res = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env(), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert res.returncode == 0 and int(res.stdout.strip()) > 0, res.stderr[-3000:]

    # fine-tune on store B's own 32 genes, with perturbation labels and controls
    out = ok(torchrun("finetune", ["--init", str(pre / "foundation"), *COMMON, f"data.store={stores[1]}",
                                   f"out_dir={fin}", "train.max_steps=3", "model.size=small"]))
    assert "gene panel differs from the foundation's: 32 genes kept, 0 new" in out and "16 dropped" in out
    assert "model.size small -> tiny" in out
    assert "covariate branches new to the model: ['perturbation'" in out
    tuned = json.loads((fin / "foundation" / "manifest.json").read_text())
    assert tuned["genes"] == [f"G{i:03d}" for i in range(16, 48)] and tuned["extra"]["mode"] == "finetune"
    assert "perturbation" in tuned["vocabularies"]


def test_predict_on_two_processes_equals_one(tmp_path):
    """torchrun launch/predict.py on 2 ranks (each streams its block of sets to a part file, rank 0
    joins them and appends the controls) writes the same pred.h5ad as one process, and rank 0 alone
    writes real.h5ad and train.h5ad."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from helpers import data_cfg, random_foundation
    from perturbdiff.config import HoldoutRule, RunConfig, SplitConfig, save_config

    store = build_train_store(tmp_path, genes=24, cells=500)
    split = SplitConfig(test=[HoldoutRule(contexts=["B_cell"], perturbations=["IL2", "TNF"])])
    found = random_foundation(store, tmp_path / "found", split)
    save_config(RunConfig(data=data_cfg(store, split=split)), tmp_path)
    args = ["--checkpoint", str(found), "--config", str(tmp_path / "config.yaml"), "--split", "test",
            "--n-samples", "3", "--sets-per-batch", "2", "--sample-steps", "3", "--train-cells", "16"]
    one = subprocess.run([sys.executable, "launch/predict.py", *args, "--out", str(tmp_path / "one")], cwd=REPO,
                         env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("predict", [*args, "--out", str(tmp_path / "two")])
    assert two.returncode == 0, two.stdout[-3000:]
    assert "predicting on 2 processes" in two.stdout
    for name in ("pred", "real", "train"):
        a, b = ad.read_h5ad(tmp_path / "one" / f"{name}.h5ad"), ad.read_h5ad(tmp_path / "two" / f"{name}.h5ad")
        pd.testing.assert_frame_equal(a.obs, b.obs)
        # float32 rounding differs with the batch composition (~1e-4 here); another seed differs by O(10)
        np.testing.assert_allclose(a.X.toarray(), b.X.toarray(), rtol=1e-3, atol=2e-3)
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert written == sorted([MARKER, "pred.h5ad", "real.h5ad", "train.h5ad"])
