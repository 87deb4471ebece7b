"""Output safety (perturbdiff.outputs): no command deletes or overwrites what perturbdiff did not write,
bad output paths are refused before any work, one writer per output, torn logs do not block a resume,
and a full disk is one clear error with nothing half-written left in place.

Each case first builds the situation a user met (their files in the output directory, the output
pointing at the input's directory, a second job on the same directory, a full disk), then checks
the command refuses or fails cleanly and that every file it did not write is still there, unchanged.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import build_h5ad, build_train_store, h5ad_cfg, quiet
from data_sharding.convert import convert
from perturbdiff.cli import main as cli
from perturbdiff.data.schema import DataError
from perturbdiff.outputs import (MARKER, OutputLock, Staging, check_output, lock_path, read_jsonl, remove_output,
                                 repair_jsonl, write_marker)
from perturbdiff.train.monitor import Monitor

ROOT = Path(__file__).resolve().parents[1]


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (what must survive a refused command)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_files(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("my notes")
    (d / "sub").mkdir(exist_ok=True)
    (d / "sub" / "data.csv").write_text("a,b\n1,2\n")
    return d


@pytest.fixture(scope="module")
def h5ad_src(tmp_path_factory) -> Path:
    return build_h5ad(tmp_path_factory.mktemp("safety") / "in" / "cells.h5ad", n_cells=120, n_genes=20).path


# ---------------------------------------------------------------------------------------------
# 1. Data loss: shard, and every other command that replaces a directory
# ---------------------------------------------------------------------------------------------


def test_shard_refuses_a_directory_of_user_files_before_any_work(h5ad_src, tmp_path):
    mine = user_files(tmp_path / "mine")
    before = snapshot(mine)
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a perturbdiff output") as err:
            convert(h5ad_cfg(h5ad_src, mine), log=quiet, overwrite=overwrite)
        assert str(mine) in str(err.value)
        assert snapshot(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no <out>.tmp, no <out>.work


def test_shard_refuses_the_directory_holding_its_input(h5ad_src, tmp_path):
    src = tmp_path / "data"
    src.mkdir()
    (src / "cells.h5ad").write_bytes(h5ad_src.read_bytes())
    before = snapshot(tmp_path)
    for out in (src, tmp_path, src / "cells.h5ad"):
        with pytest.raises(DataError, match="input"):
            convert(h5ad_cfg(src / "cells.h5ad", out), log=quiet, overwrite=True)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("what", ["file", "symlink", "dot", "work_sibling", "tmp_sibling"])
def test_shard_refuses_bad_out_paths_before_converting(h5ad_src, tmp_path, monkeypatch, what):
    out = tmp_path / "store.zarr"
    if what == "file":
        out.write_text("not a directory")
    elif what == "symlink":
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    elif what == "dot":
        monkeypatch.chdir(tmp_path)
        out = Path(".")
    else:
        user_files(tmp_path / f"store.zarr.{what.split('_')[0]}")
    before = snapshot(tmp_path)
    with pytest.raises(DataError, match="refusing this output path"):
        convert(h5ad_cfg(h5ad_src, out), log=quiet)
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob("*.zarr.*")) or what in ("work_sibling", "tmp_sibling")
    # the same through the command line: one line, exit 2
    assert cli(["shard", "shard.source=h5ad", f"shard.inputs=[{h5ad_src}]", f"shard.out={out}"]) == 2


def test_shard_overwrite_replaces_only_its_own_store(h5ad_src, tmp_path, capsys):
    out = tmp_path / "store.zarr"
    first = convert(h5ad_cfg(h5ad_src, out), log=quiet)
    assert convert(h5ad_cfg(h5ad_src, out), log=quiet) == first  # nothing to do without --overwrite
    rebuilt = convert(h5ad_cfg(h5ad_src, out, dataset="again"), log=quiet, overwrite=True)
    assert rebuilt.dataset == "again" and json.loads((out / "manifest.json").read_text())["dataset"] == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.zarr"]  # .work and .tmp are gone


def test_remove_and_replace_only_what_is_ours(tmp_path):
    mine = user_files(tmp_path / "mine")
    with pytest.raises(DataError, match="refusing to remove"):
        remove_output(mine, "run")
    ours = tmp_path / "ours"
    write_marker(ours, "run")
    (ours / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(DataError, match="refusing to remove"):
        remove_output(ours, "predict")  # ours, but another kind
    assert remove_output(ours, "run") and not ours.exists()
    stage = Staging(mine, "predict")
    stage.open()
    (stage.path / "pred.h5ad").write_text("x")
    with pytest.raises(DataError, match="refusing to replace"):
        stage.commit(["pred.h5ad"])
    assert snapshot(mine) == {"notes.txt": b"my notes", "sub/data.csv": b"a,b\n1,2\n"}


def test_training_refuses_an_out_dir_of_user_files(tmp_path, capsys):
    from perturbdiff.train.run import main as train_main

    store = build_train_store(tmp_path / "s", cells=300)
    mine = user_files(tmp_path / "mine")
    (mine / "config.yaml").write_text("my config")
    before = snapshot(mine)
    args = [f"out_dir={mine}", f"data.store={store}", "data.set_size=8", "data.sets_per_batch=2",
            "data.panel.kind=all", "model.size=tiny",
            "train.max_steps=2", "train.progress=false", "diffusion.kme_impl=torch"]
    assert train_main("finetune", args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a perturbdiff output" in err and str(mine) in err
    assert snapshot(mine) == before
    assert train_main("finetune", [*args[1:], f"out_dir={store}"]) == 2  # the store is an input
    assert "input" in capsys.readouterr().err


def test_every_writer_refuses_a_user_directory(h5ad_src, tmp_path):
    """predict, evaluate, export-wds and the pipeline's synthetic source, with and without --overwrite."""
    from data_sharding.wds_export import export_wds
    from perturbdiff.config import DataConfig, WdsConfig
    from perturbdiff.eval.evaluate import evaluate_files
    from perturbdiff.pipeline import prepare_synth_dir
    from perturbdiff.predict import write_prediction

    mine = user_files(tmp_path / "mine")
    before = snapshot(mine)
    called = []
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a perturbdiff output"):
            write_prediction(mine, lambda d: called.append(d) or [], overwrite=overwrite)
        with pytest.raises(DataError, match="not a perturbdiff output"):
            evaluate_files(h5ad_src, h5ad_src, mine, overwrite=overwrite)
        with pytest.raises(DataError, match="not a perturbdiff output"):
            export_wds(DataConfig(store=str(tmp_path / "s.zarr")), WdsConfig(out=str(mine)), log=quiet,
                       overwrite=overwrite)
        with pytest.raises(DataError, match="not a perturbdiff output"):
            prepare_synth_dir(str(mine), overwrite)
    assert not called and snapshot(mine) == before
    with pytest.raises(DataError, match="holds the input"):
        evaluate_files(h5ad_src, h5ad_src, h5ad_src.parent.parent, overwrite=True)


# ---------------------------------------------------------------------------------------------
# 6. One writer per output
# ---------------------------------------------------------------------------------------------


def test_a_held_lock_is_refused_and_a_stale_one_taken_over(tmp_path):
    out = tmp_path / "run"
    with OutputLock(out, "run directory"):
        assert lock_path(out).is_file()
        with pytest.raises(DataError, match="in use by another perturbdiff process .*pid"):
            OutputLock(out, "run directory").acquire()
    assert not lock_path(out).exists()  # released and removed
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from perturbdiff.outputs import OutputLock; "
                               f"OutputLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=f"pid {holder.pid}"):
            OutputLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).is_file()  # a killed holder leaves its file: stale, so it is taken over
    with OutputLock(out):
        pass


def test_two_trainings_into_one_out_dir(tmp_path):
    """The second job fails at once, naming the holder; the first runs on undisturbed."""
    store = build_train_store(tmp_path / "s", cells=300)
    out = tmp_path / "run"
    args = [f"out_dir={out}", f"data.store={store}", "data.set_size=8", "data.sets_per_batch=2",
            "data.panel.kind=all", "model.size=tiny",
            "train.progress=false", "diffusion.kme_impl=torch", "train.log_every=1", "train.val_every=0",
            "train.sample_every=0", "train.ckpt_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen([sys.executable, "launch/finetune.py", *args, "train.max_steps=100000"], cwd=ROOT,
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").is_file(), first.stderr.read() if first.poll() is not None else "no start"
        t0 = time.time()
        second = subprocess.run([sys.executable, "launch/finetune.py", *args, "train.max_steps=3"], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "in use by another perturbdiff process" in second.stderr and f"pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and time.time() - t0 < 60
        assert first.poll() is None  # undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    records, dropped = read_jsonl(out / "metrics.jsonl")
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == sorted(set(steps)) and dropped <= 1  # one writer: in order, no duplicates


# ---------------------------------------------------------------------------------------------
# 5. Torn append-only files
# ---------------------------------------------------------------------------------------------


def test_a_torn_metrics_tail_does_not_block_a_resume(tmp_path):
    m = tmp_path / "metrics.jsonl"
    good = "".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 6))
    for torn in ('{"step": 6, "train/lo', '{"step": 6}\n\x00\x00\x00\x00\n', '{"step": 6, "tr\n'):
        m.write_text(good + torn)
        mon = Monitor(tmp_path, True, tensorboard=False, progress=False, log=quiet)
        mon.scalars(6, {"train/loss": 0.5})
        records, dropped = read_jsonl(m)
        assert dropped == 0 and [r["step"] for r in records][-1] == 6
        assert all(line for line in m.read_text().splitlines())
    m.write_text(good + '{"step": 9, "x"')
    mon = Monitor(tmp_path, True, tensorboard=False, progress=False, log=quiet)
    m.write_text(good + '{"step": 9, "x"')  # torn again after the start: truncate_after tolerates it
    mon.truncate_after(4)
    assert [r["step"] for r in read_jsonl(m)[0]] == [1, 2, 3, 4]
    assert repair_jsonl(m) == 0


def test_training_resumes_past_a_torn_metrics_line(tmp_path):
    from perturbdiff.train.run import main as train_main

    store = build_train_store(tmp_path / "s", cells=300)
    out = tmp_path / "run"
    args = [f"out_dir={out}", f"data.store={store}", "data.set_size=8", "data.sets_per_batch=2",
            "data.panel.kind=all", "model.size=tiny",
            "train.progress=false", "diffusion.kme_impl=torch", "train.log_every=1", "train.val_every=0",
            "train.sample_every=0", "train.ckpt_every=2", "train.optim.warmup_steps=1"]
    assert train_main("finetune", [*args, "train.max_steps=4"]) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/loss": 0.')  # power lost during the next append
    assert train_main("finetune", [*args, "train.max_steps=6"]) == 0
    records, dropped = read_jsonl(out / "metrics.jsonl")
    assert dropped == 0 and [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------
# 3. A full disk: one clear error, nothing half-written in place
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a 400 KiB filesystem (tmpfs; needs root) or, where mounting is not allowed, a
    per-file size limit (RLIMIT_FSIZE) that fails writes the same way; yields (dir, preexec_fn)."""
    d = tmp_path / "disk"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(d)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False

    def limit():
        if not mounted:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    yield d, limit
    if mounted:
        subprocess.run(["umount", str(d)], check=False)


def test_predict_on_a_full_disk(tahoe_store, tmp_path, small_disk):
    from helpers import random_foundation
    from perturbdiff.config import HoldoutRule, SplitConfig

    import pandas as pd
    import yaml

    disk, limit = small_disk
    perts = sorted(pd.read_parquet(tahoe_store / "conditions.parquet")["perturbation"].unique())
    split = SplitConfig(test=[HoldoutRule(perturbations=[p for p in perts if "DMSO" not in p][:2])])
    found = random_foundation(tahoe_store, tmp_path / "found", split)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"store": str(tahoe_store), "split": {"test": [
        {"perturbations": split.test[0].perturbations}]}}}))
    out = disk / "pred"
    res = subprocess.run([sys.executable, "-m", "perturbdiff.cli", "predict", "--checkpoint", str(found), "--config",
                          str(cfg), "--out", str(out), "--n-samples", "3", "--sample-steps", "2"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "out of disk space" in err[0] and str(out) in err[0] and "Traceback" not in res.stderr
    assert not out.exists() and [p.name for p in disk.iterdir() if not p.name.startswith(".pred.lock")] == []
    assert cli(["evaluate", "--dir", str(out)]) == 2  # nothing that looks complete to score


def test_evaluate_requires_every_file_of_the_prediction(tmp_path):
    d = tmp_path / "predict"
    stage = Staging(d, "predict")
    stage.open()
    for name in ("pred.h5ad", "real.h5ad", "train.h5ad"):
        (stage.path / name).write_bytes(b"x" * 10)
    stage.commit(["pred.h5ad", "real.h5ad", "train.h5ad"])
    assert (d / MARKER).is_file()
    (d / "train.h5ad").unlink()
    assert cli(["evaluate", "--dir", str(d)]) == 2
    assert check_output(tmp_path / "new", "eval") == tmp_path / "new"
