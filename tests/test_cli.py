"""The `perturbdiff` command end to end: the main job at tiny scale, saved configs, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd

from perturbdiff.config import RunConfig, load_config
from perturbdiff.outputs import MARKER

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perturbdiff.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


TINY = ("synth.num_cells=3000", "synth.num_genes=200", "synth.cells_per_file=1000", "synth.num_workers=1",
        "shard.cells_per_part=1000", "shard.num_workers=1", "shard.hvg.num_top_genes=64", "data.panel.num_genes=64",
        "data.set_size=16", "data.sets_per_batch=2", "data.num_workers=0")


def test_demo_main_job_tiny(tmp_path):
    """The main job end to end at toy scale: every stage runs and leaves its outputs."""
    out = tmp_path / "run"
    res = run_cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), f"out_dir={out}", *TINY,
                  "pipeline.pretrain_steps=4", "pipeline.finetune_steps=6", "predict.n_samples=2",
                  "predict.sample_steps=4", "predict.train_cells=32", "train.val_every=3", "train.sample_every=6",
                  "train.log_every=2")
    assert res.returncode == 0, res.stderr[-3000:]
    for k in range(1, 8):
        assert f"[{k}/7]" in res.stdout, (k, res.stdout[-3000:])
    assert "done in" in res.stdout and f"Report: {out / 'report' / 'index.html'}" in res.stdout
    assert (out / "store.zarr" / "manifest.json").is_file()
    for stage in ("pretrain", "finetune"):
        assert (out / stage / "foundation" / "model.safetensors").is_file()
        assert (out / stage / "metrics.jsonl").stat().st_size > 0
    assert {p.name for p in (out / "predict").iterdir()} == {"pred.h5ad", "real.h5ad", "train.h5ad", MARKER}
    metrics = pd.read_csv(out / "eval" / "metrics.csv")
    assert set(metrics["method"]) == {"model", "control_mean", "perturbation_mean", "linear", "latent_shift", "ceiling"}
    # the held-out conditions recorded in the saved config are exactly the ones evaluated
    cfg = load_config([str(out / "config.yaml")])
    assert isinstance(cfg, RunConfig) and cfg.synth.num_cells == 3000 and cfg.data.set_size == 16
    rule = cfg.data.split.test[0]
    model = metrics[metrics["method"] == "model"]
    assert set(model["context"]) == set(rule.contexts)
    assert set(model["perturbation"]) == set(rule.perturbations)
    html = (out / "report" / "index.html").read_text()
    assert "data:image/png;base64," in html and "finetune" in html
    # a second run finds everything done: the store is verified, training resumes at its last step
    res2 = run_cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), f"out_dir={out}", *TINY,
                   "pipeline.pretrain_steps=4", "pipeline.finetune_steps=6", "predict.n_samples=2",
                   "predict.sample_steps=4", "predict.train_cells=32", "pipeline.report=false")
    assert res2.returncode == 0, res2.stderr[-3000:]
    assert "exists: verify it" in res2.stdout and "[6/6]" in res2.stdout
    # evaluate reads the evaluate section of a config and key=value overrides; a flag given wins
    conf = tmp_path / "eval.yaml"
    conf.write_text("evaluate:\n  profile: paper\n  methods: [model, control_mean]\n  seed: 5\n")
    res3 = run_cli("evaluate", "--dir", str(out / "predict"), "--out", str(tmp_path / "ev"), "--config", str(conf),
                   "evaluate.de_fdr=0.1", "--seed", "7")
    assert res3.returncode == 0, res3.stderr[-3000:]
    options = json.loads((tmp_path / "ev" / "summary.json").read_text())["options"]
    assert (options["profile"], options["methods"], options["de_fdr"], options["seed"]) == \
        ("paper", ["model", "control_mean"], 0.1, 7)


def test_predict_and_evaluate_keys_moved_out_of_pipeline(tmp_path):
    """The predict / evaluate settings are their sections' keys; an old pipeline.* key says where it went."""
    res = run_cli("pipeline", f"out_dir={tmp_path}", "pipeline.decode=counts")
    assert res.returncode == 2
    assert "'pipeline.decode' is now 'predict.decode'" in res.stderr
    res = run_cli("evaluate", "--pred", "p.h5ad", "--real", "r.h5ad", "evaluate.profile=everything")
    assert res.returncode == 2 and "evaluate.profile='everything': must be one of" in res.stderr


def test_pipeline_needs_a_test_split(tmp_path):
    res = run_cli("pipeline", f"out_dir={tmp_path}", "data.split.test=[]")
    assert res.returncode == 2
    assert "data.split.test is empty" in res.stderr


def test_pipeline_checks_the_split_before_training(tmp_path):
    """A test rule that matches no cells of the store fails after sharding, before any training."""
    out = tmp_path / "run"
    res = run_cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), f"out_dir={out}", *TINY,
                  "data.split.test=[{contexts: [no_such_line], perturbations: [no_such_drug]}]",
                  "data.split.strict=false", "pipeline.pretrain_steps=4", "pipeline.finetune_steps=6")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "data.split.test matches no cells" in res.stderr and "contexts there:" in res.stderr
    assert (out / "store.zarr" / "manifest.json").is_file()
    assert not (out / "pretrain").exists() and not (out / "finetune").exists()


def test_unknown_key_is_a_clear_error(tmp_path):
    res = run_cli("stream", f"out_dir={tmp_path}", "data.set_sise=3")
    assert res.returncode == 2
    assert "unknown config key 'data.set_sise'" in res.stderr and "data.set_size" in res.stderr


def test_verify_detects_damage(tmp_path):
    out = tmp_path / "run"
    res = run_cli("synth", f"out_dir={out}", "synth.num_cells=1500", "synth.num_genes=100",
                  "synth.cells_per_file=1500", "synth.num_workers=1")
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("shard", f"out_dir={out}", f"shard.inputs=[{out / 'source'}]", "shard.num_workers=1",
                  "shard.hvg.num_top_genes=50")
    assert res.returncode == 0, res.stderr[-3000:]
    chunk = next(p for p in sorted((out / "store.zarr" / "X" / "data" / "c").rglob("*")) if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    res = run_cli("verify", str(out / "store.zarr"))
    assert res.returncode == 2
    assert "X/data checksum mismatch" in res.stderr
