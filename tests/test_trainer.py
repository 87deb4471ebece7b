"""The Trainer in one process: learning, exact resumption, atomic checkpoints, validation metrics,
the gene-masked loss, the FLOP count behind MFU, and the pretraining mode.

Multi-process launches (torchrun, the deepspeed launcher, faults) are in test_launch.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import PERTS, build_train_store, quiet
from perturbdiff.config import DiffusionConfig, ModelConfig, load_config, resolve_paths
from perturbdiff.diffusion import SetDiffusion
from perturbdiff.eval.metrics import pearson_delta, pseudobulk, set_mmd
from perturbdiff.models import build_model
from perturbdiff import distributed as pdist
from perturbdiff.foundation import load_foundation
from perturbdiff.train.checkpoint import latest_step, list_steps
from perturbdiff.train.monitor import mmdit_forward_flops
from perturbdiff.train.run import apply_mode, build_trainer, model_vocabularies

@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return build_train_store(tmp_path_factory.mktemp("trainer"))


def make_cfg(store: Path, out: Path, *overrides: str):
    base = [f"out_dir={out}", f"data.store={store}", "data.set_size=8", "data.sets_per_batch=2", "data.panel.kind=all",
            "data.run_cells=1", "data.split.random_val_fraction=0.3", "model.size=tiny", "diffusion.kme_impl=torch",
            "diffusion.steps=100", "train.max_steps=10", "train.log_every=100", "train.val_every=0",
            "train.sample_every=0", "train.ckpt_every=0", "train.progress=false", "train.optim.warmup_steps=2",
            "train.optim.ema_every=2"]
    return resolve_paths(load_config([], [*base, *overrides]))


def trainer_for(cfg, mode="finetune", init=None):
    info = pdist.init_distributed()
    pdist.seed_everything(cfg.train.seed, info.rank)
    apply_mode(cfg, mode, quiet)
    return build_trainer(cfg, mode, init, info, log=quiet)


def losses(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


# ---------------------------------------------------------------------------------------------
# Learning and resumption
# ---------------------------------------------------------------------------------------------


def test_loss_decreases_on_synthetic_data(store, tmp_path):
    cfg = make_cfg(store, tmp_path, "train.max_steps=120", "train.optim.lr=2e-3", "train.optim.warmup_steps=10",
                   "train.val_batches=4", "diffusion.p_self_cond=0")
    t = trainer_for(cfg)
    before = t.validate()["val/loss"]
    t.fit()
    after = t.validate()["val/loss"]
    t.close()
    train = [loss for _, loss in losses(tmp_path)]
    assert len(train) == 120 and all(math.isfinite(v) for v in train)
    assert np.mean(train[-20:]) < 0.7 * np.mean(train[:10])
    assert after < 0.75 * before  # on held-out (context, perturbation) pairs


def test_resume_equals_uninterrupted(store, tmp_path):
    full = make_cfg(store, tmp_path / "full", "train.ckpt_every=4")
    t = trainer_for(full)
    t.fit()
    t.export_foundation(tmp_path / "full" / "foundation")
    t.close()

    part = make_cfg(store, tmp_path / "part", "train.ckpt_every=4")
    t = trainer_for(part)
    t.fit(until=6)  # stops after step 6: checkpoints at 4 and 6
    t.close()
    assert [s for s, _ in list_steps(tmp_path / "part" / "checkpoints")] == [4, 6]
    # restart from step 4 (as after a crash at step 6): the later records are rewritten
    t = trainer_for(part)
    t.resume(list_steps(tmp_path / "part" / "checkpoints")[0][1])
    assert t.step == 4
    t.fit()
    t.export_foundation(tmp_path / "part" / "foundation")
    t.close()

    assert losses(tmp_path / "part") == losses(tmp_path / "full")  # bitwise, every step
    a = load_foundation(tmp_path / "full" / "foundation").state_dict
    b = load_foundation(tmp_path / "part" / "foundation").state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA included
    extra = load_foundation(tmp_path / "full" / "foundation").manifest["extra"]
    assert extra["control_perturbations"] == ["control"]  # predict inverts the controls under it
    assert set(extra["control_numeric"]) == set(extra["numeric_in_data"])


def test_crash_during_save_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    cfg = make_cfg(store, tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.keep_last=1")
    t = trainer_for(cfg)
    t.fit(until=2)
    good = latest_step(tmp_path / "checkpoints")
    files = sorted(p.name for p in good.iterdir())

    def broken(directory, client_state=None):
        (Path(directory) / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(t.engine, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        t.fit()  # step 3, then the save at step 4 fails
    t.close()
    assert latest_step(tmp_path / "checkpoints") == good
    assert sorted(p.name for p in good.iterdir()) == files
    # a new trainer clears the half-written temporary and resumes from the good checkpoint
    t = trainer_for(cfg)
    assert not list((tmp_path / "checkpoints").glob(".*"))
    t.resume(good)
    assert t.step == 2
    t.fit()
    t.close()
    assert latest_step(tmp_path / "checkpoints").name.endswith("4")


def _two_steps_checkpoint(store, tmp_path):
    """(config, trainer, newest checkpoint) after 2 training steps."""
    cfg = make_cfg(store, tmp_path, "train.max_steps=2")
    t = trainer_for(cfg)
    t.fit()
    t.close()
    return cfg, t, latest_step(tmp_path / "checkpoints")


def test_resume_refuses_another_world_size(store, tmp_path):
    cfg, t, ckpt = _two_steps_checkpoint(store, tmp_path)
    client = json.loads((ckpt / "client_state.json").read_text())
    client["world"] = 2
    (ckpt / "client_state.json").write_text(json.dumps(client))
    t = trainer_for(cfg)
    with pytest.raises(ValueError, match="written by 2 ranks"):
        t.resume(ckpt)
    t.close()


# ---------------------------------------------------------------------------------------------
# Validation metrics, logging
# ---------------------------------------------------------------------------------------------


def test_validation_and_sampling_metrics_are_logged(store, tmp_path):
    cfg = make_cfg(store, tmp_path, "train.max_steps=4", "train.val_every=2", "train.sample_every=4",
                   "train.sample_steps=3", "train.val_batches=2")
    t = trainer_for(cfg)
    again = [t.validate()["val/loss"], t.validate()["val/loss"]]
    assert again[0] == again[1]  # fixed held-out sets, noise and coin flips
    t.fit()
    t.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows)
    for key in ("train/loss", "train/mse", "train/mmd", "train/lr", "train/grad_norm", "perf/cells_per_s",
                "val/loss", "val/mse", "val/mmd", "val/pearson_delta", "val/mmd_sampled"):
        assert key in keys, key
    sampled = [r for r in rows if "val/pearson_delta" in r]
    assert len(sampled) == 1 and -1 <= sampled[0]["val/pearson_delta"] <= 1 and sampled[0]["val/mmd_sampled"] >= 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/loss", "train/lr", "val/loss", "val/pearson_delta"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_pearson_delta_and_set_mmd_known_answers():
    g = torch.Generator().manual_seed(0)
    real, ctrl = torch.rand(3, 10, 7, generator=g, dtype=torch.float64), torch.rand(3, 9, 7, generator=g, dtype=torch.float64)
    mask, cmask = torch.rand(3, 10, generator=g) > 0.3, torch.ones(3, 9, dtype=torch.bool)
    pred = torch.rand(3, 5, 7, generator=g, dtype=torch.float64)
    pm = torch.ones(3, 5, dtype=torch.bool)
    r = pearson_delta(pred, pm, real, mask, ctrl, cmask)
    for b in range(3):
        base = ctrl[b].mean(0).numpy()
        want = np.corrcoef(pred[b].mean(0).numpy() - base, real[b][mask[b]].mean(0).numpy() - base)[0, 1]
        assert r[b].item() == pytest.approx(want, abs=1e-12)
    # a prediction whose delta is an affine map of the real delta scores exactly 1
    shifted = pseudobulk(real, mask)[:, None, :] * 2 - pseudobulk(ctrl, cmask)[:, None, :] + 0.0
    assert torch.allclose(pearson_delta(shifted, pm[:, :1], real, mask, ctrl, cmask), torch.ones(3, dtype=torch.float64))
    # identical populations: MMD^2 = 0; gene mask = restriction to the measured genes
    assert set_mmd(real, mask, real, mask, impl="torch").abs().max() < 1e-5
    gm = torch.zeros(3, 7, dtype=torch.bool)
    gm[:, :4] = True
    masked = set_mmd(pred, pm, real, mask, impl="torch", gene_mask=gm)
    sub = set_mmd(pred[..., :4], pm, real[..., :4], mask, impl="torch")
    torch.testing.assert_close(masked, sub, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Gene-masked loss, FLOPs, pretraining mode
# ---------------------------------------------------------------------------------------------


def test_gene_masked_errors_equal_the_measured_sub_panel():
    diff = SetDiffusion(DiffusionConfig(kme_impl="torch"))
    g = torch.Generator().manual_seed(1)
    pred, real = torch.rand(2, 6, 10, generator=g), torch.rand(2, 6, 10, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    gm = torch.ones(2, 10, dtype=torch.bool)
    gm[0, 7:] = False  # set 0 measures genes 0..6, set 1 all of them
    real_garbage = real.clone()
    real_garbage[0, :, 7:] = 1e3  # unmeasured values never matter
    mse, mmd = diff.set_errors(pred, real_garbage, mask, gm)
    mse0, mmd0 = diff.set_errors(pred[:1, :, :7], real[:1, :, :7], mask[:1])
    mse1, mmd1 = diff.set_errors(pred[1:], real[1:], mask[1:])
    torch.testing.assert_close(mse, torch.cat([mse0, mse1]))
    torch.testing.assert_close(mmd, torch.cat([mmd0, mmd1]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("self_condition", [True, False])
def test_mfu_flop_count_matches_torch_flop_counter(self_condition):
    model = build_model(ModelConfig(size="tiny", self_condition=self_condition), 48, {"context": 3})
    B, M, C, G = 2, 12, 9, 48
    x, ctrl = torch.rand(B, M, G), torch.rand(B, C, G)
    kwargs = dict(mask=torch.ones(B, M, dtype=torch.bool), ctrl=ctrl, ctrl_mask=torch.ones(B, C, dtype=torch.bool),
                  cov={"context": torch.zeros(B, dtype=torch.long)},
                  self_cond=torch.zeros(B, M, G) if self_condition else None)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.rand(B), **kwargs)
    counted = counter.get_total_flops()
    ours = B * mmdit_forward_flops(model, M, C)
    assert ours == pytest.approx(counted, rel=0.05)  # the rest: embeddings of t and the covariates


def test_pretrain_mode_forces_a_marginal_model(store, tmp_path):
    cfg = make_cfg(store, tmp_path, "model.numeric_covariates=[dose]", "diffusion.p_drop_control=0.2")
    said = []
    apply_mode(cfg, "pretrain", said.append)
    assert cfg.data.include_controls and cfg.diffusion.p_drop_control == 1.0 and cfg.model.numeric_covariates == []
    assert "p_drop_control=1.0" in said[0]
    t = trainer_for(cfg, "pretrain")
    assert "perturbation" not in t.vocabularies and set(t.vocabularies) == {"context", "batch"}
    assert t.engine.module.cov_encoder.branch_names == ["context", "batch"]
    assert model_vocabularies(t.train_loader, "finetune")["perturbation"] == sorted(PERTS)
    t.close()


def test_truncated_resumable_checkpoint_is_a_clear_error(store, tmp_path):
    cfg, t, ckpt = _two_steps_checkpoint(store, tmp_path)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    t = trainer_for(cfg)
    with pytest.raises(ValueError, match="model.safetensors: unreadable safetensors file, truncated"):
        t.resume(ckpt)
    t.close()


def test_the_saved_config_is_the_one_that_trained(store, tmp_path):
    """run() writes config.yaml after --init has replaced the architecture (and the data have removed
    covariates they lack): the saved model section is the trained model's, not the command line's."""
    from helpers import random_foundation
    from perturbdiff.config import SplitConfig
    from perturbdiff.train.run import run

    found = random_foundation(store, tmp_path / "found", SplitConfig())  # a tiny foundation
    cfg = make_cfg(store, tmp_path / "run", "model.size=small", "train.max_steps=1", "model.numeric_covariates=[dose]")
    run(cfg, "finetune", str(found), log=quiet)
    saved = load_config([str(tmp_path / "run" / "config.yaml")])
    assert saved.model.size == "tiny" and saved.model.numeric_covariates == []
    assert load_foundation(tmp_path / "run" / "foundation").model_cfg.size == "tiny"
