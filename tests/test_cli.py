"""The `perturbdiff` command end to end: the main job at tiny scale, saved configs, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from perturbdiff.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perturbdiff.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_demo_main_job_tiny(tmp_path):
    out = tmp_path / "run"
    res = run_cli("demo", "--config", str(ROOT / "configs" / "demo.yaml"), f"out_dir={out}",
                  "synth.num_cells=3000", "synth.num_genes=200", "synth.cells_per_file=1000",
                  "shard.cells_per_part=1000", "shard.hvg.num_top_genes=100", "data.panel.num_genes=100",
                  "data.set_size=16", "data.sets_per_batch=2", "data.num_workers=0", "stream.num_batches=5",
                  "wds.epochs=1", "wds.sets_per_shard=8")
    assert res.returncode == 0, res.stderr[-3000:]
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]", "sets/s", "done in"):
        assert step in res.stdout, (step, res.stdout[-2000:])
    assert (out / "store.zarr" / "manifest.json").is_file()
    assert list((out / "wds").glob("sets-*.tar"))
    # the resolved config is saved next to the outputs and loads back to the same run
    cfg = load_config([str(out / "config.yaml")])
    assert isinstance(cfg, RunConfig) and cfg.synth.num_cells == 3000 and cfg.data.set_size == 16
    assert (out / "store.zarr" / "config.yaml").is_file() and (out / "wds" / "config.yaml").is_file()
    # a second run reuses the finished store
    res2 = run_cli("verify", str(out / "store.zarr"), "--sources", str(out / "source"))
    assert res2.returncode == 0 and "verified" in res2.stdout


def test_unknown_key_is_a_clear_error(tmp_path):
    res = run_cli("stream", f"out_dir={tmp_path}", "data.set_sise=3")
    assert res.returncode == 2
    assert "unknown config key 'data.set_sise'" in res.stderr and "data.set_size" in res.stderr


def test_verify_detects_damage(tmp_path):
    out = tmp_path / "run"
    res = run_cli("demo", f"out_dir={out}", "synth.num_cells=1500", "synth.num_genes=100",
                  "synth.cells_per_file=1500", "synth.num_workers=1", "shard.num_workers=1",
                  "shard.hvg.num_top_genes=50", "data.panel.num_genes=50", "data.set_size=8",
                  "data.num_workers=0", "stream.num_batches=2", "wds.epochs=1")
    assert res.returncode == 0, res.stderr[-3000:]
    chunk = next(p for p in sorted((out / "store.zarr" / "X" / "data" / "c").rglob("*")) if p.is_file())
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    res = run_cli("verify", str(out / "store.zarr"))
    assert res.returncode == 2
    assert "X/data checksum mismatch" in res.stderr
