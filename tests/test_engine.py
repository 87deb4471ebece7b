"""The training engines: DDP and DeepSpeed ZeRO 1/2/3 over 2 gloo ranks on CPU, and one process.

Two spawned pairs of ranks (one DDP, one DeepSpeed; ``engine_workers.py``) run every multi-process
check; the tests below read what they saved. Gradient equality uses plain SGD with lr 1 (params -=
grad), so the parameters after one step expose the averaged gradient, compared with one process
stepping on the whole global batch. Everything else (config generation, errors, accumulation,
single-process resume, activation checkpointing) runs in the test process.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as tmp

import engine_workers as ew
from perturbdiff.config import EngineConfig, OptimConfig
from perturbdiff import distributed as pdist
from perturbdiff.train.engine import (DeepSpeedEngine, TorchEngine, create_engine, enable_activation_checkpointing,
                                      generate_deepspeed_config, resolve_precision)

WORLD = 2
TOL = 1e-6  # fp32, a few ulps of parameters O(0.1..1)


def spawn(name: str, out_dir: Path, world: int = WORLD) -> list[dict]:
    """Run scenario ``name`` on ``world`` gloo ranks (1: a lone process without launcher variables);
    returns each rank's saved results."""
    for attempt in range(2):
        port = pdist.free_port() if world > 1 else None
        try:
            tmp.start_processes(ew.run_rank, args=(world, port, str(out_dir), name), nprocs=world, join=True,
                                start_method="spawn")
            break
        except tmp.ProcessRaisedException as err:  # the free-port pick can race with another process
            if attempt or "address already in use" not in str(err).lower():
                raise
    return [torch.load(out_dir / f"{name}_rank{r}.pt", weights_only=True) for r in range(world)]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_ddp")


@pytest.fixture(scope="module")
def ddp_runs(ddp_dir):
    return spawn("ddp", ddp_dir)


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="deepspeed is not importable: the ZeRO engine tests need it")
    return spawn("deepspeed", tmp_path_factory.mktemp("engine_ds"))


@pytest.fixture(scope="module")
def reference():
    """One process, the whole global batch: the initial weights and the weights after one SGD step."""
    engine = ew.make_engine("ddp", 0, plain_sgd=True)
    init = ew.full_params(engine)
    metrics = ew.train(engine, range(1))
    return {"init": init, "sgd": ew.full_params(engine), "metrics": metrics}


# ---------------------------------------------------------------------------------------------
# DDP, 2 ranks
# ---------------------------------------------------------------------------------------------


def test_ddp_two_ranks_train_and_stay_identical(ddp_runs, reference):
    r0, r1 = ddp_runs
    assert max_diff(r0["init"], reference["init"]) == 0.0  # rank 1 built other weights; rank 0's won
    assert max_diff(r0["init"], r1["init"]) == 0.0
    assert max_diff(r0["params"], r1["params"]) == 0.0
    assert max_diff(r0["params"], r0["init"]) > 1e-4
    for m0, m1 in zip(r0["metrics"], r1["metrics"]):
        assert math.isfinite(m0["loss"]) and m0 == m1  # loss is the mean over ranks, norm global
    assert [m["lr"] for m in r0["metrics"]] == pytest.approx([5e-4, 1e-3, 1e-3])  # 2 warm-up steps


@pytest.mark.parametrize("key", ["sgd", "sgd_accum2"])
def test_ddp_two_rank_gradient_equals_one_rank(ddp_runs, reference, key):
    for r in ddp_runs:
        assert max_diff(r[key], reference["sgd"]) < TOL
    assert max_diff(reference["sgd"], reference["init"]) > 1e-2  # the step moved the weights


def test_ddp_two_rank_resume_equals_uninterrupted(ddp_runs):
    for r in ddp_runs:
        res = r["resume"]
        assert res["client"] == {"next_step": 2, "note": "x"} and res["step"] == 2
        assert max_diff(res["resumed"], res["uninterrupted"]) == 0.0
        assert max_diff(res["fresh"], res["uninterrupted"]) > 1e-2  # the load really replaced the weights
        assert res["lr_b"] == res["lr_a"]


def test_two_rank_ddp_checkpoint_loads_in_one_process(ddp_runs, ddp_dir):
    """DDP state is replicated, so a 2-rank checkpoint resumes at world 1 (same batches, same math)."""
    ckpt = ddp_dir / "ckpt_ddp"
    assert sorted(p.name for p in ckpt.iterdir()) == ["client_state.json", "engine_state.json",
                                                      "model.safetensors", "optimizer.safetensors"]
    assert json.loads((ckpt / "engine_state.json").read_text())["world"] == WORLD
    engine = ew.make_engine("ddp", 5)
    assert engine.load(ckpt)["next_step"] == 2
    ew.train(engine, range(2, 4))
    assert max_diff(ew.full_params(engine), ddp_runs[0]["resume"]["uninterrupted"]) < 1e-5


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO, 2 ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_ranks_agree(ds_runs, ddp_runs, stage):
    r0, r1 = (r[f"z{stage}"] for r in ds_runs)
    assert r0["sharded"] == r1["sharded"] == (stage == 3)  # ZeRO-3 really partitions the weights
    assert max_diff(r0["params"], r1["params"]) == 0.0
    for m in r0["metrics"]:
        assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])
    # the same AdamW, schedule and clipping as the DDP run: the same trajectory up to rounding
    assert [m["loss"] for m in r0["metrics"]] == pytest.approx([m["loss"] for m in ddp_runs[0]["metrics"]], rel=1e-5)
    assert [m["grad_norm"] for m in r0["metrics"]] == pytest.approx(
        [m["grad_norm"] for m in ddp_runs[0]["metrics"]], rel=1e-5)
    assert [m["lr"] for m in r0["metrics"]] == pytest.approx([5e-4, 1e-3, 1e-3])
    assert max_diff(r0["params"], ddp_runs[0]["params"]) < 1e-5


@pytest.mark.parametrize("key", ["sgd_z2", "sgd_z3"])  # z2 with 2 accumulation steps; z3 with activation ckpt
def test_zero_two_rank_gradient_equals_one_rank(ds_runs, reference, key):
    for r in ds_runs:
        assert max_diff(r[key], reference["sgd"]) < TOL


def test_zero3_consolidated_weights_are_the_trained_ones(ds_runs):
    r0, r1 = (r["z3"] for r in ds_runs)
    assert r1["cons"] is None and r1["cons_init"] is None  # rank 0 only
    cons = r0["cons"]
    assert set(r0["params"]) <= set(cons) and all(v.dtype == torch.float32 for v in cons.values())
    assert max_diff({k: cons[k] for k in r0["params"]}, r0["params"]) == 0.0
    assert max_diff(cons, r0["cons_init"]) > 1e-4  # not the initial weights


def test_zero3_resume_equals_uninterrupted(ds_runs):
    for r in ds_runs:
        res = r["resume_z3"]
        assert res["client"] == {"next_step": 2, "note": "x"} and res["step"] == 2
        assert max_diff(res["resumed"], res["uninterrupted"]) == 0.0
        assert max_diff(res["fresh"], res["uninterrupted"]) > 1e-2
        assert res["lr_b"] == res["lr_a"]


def test_zero2_offload_bf16_trains(ds_runs):
    res = ds_runs[0]["offload_bf16"]
    assert res["dtype"] == "torch.bfloat16"  # DeepSpeed's bf16 mode holds bf16 module weights ...
    assert all(v.dtype == torch.float32 for v in res["cons"].values())  # ... and exports fp32 masters
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for m in res["metrics"])


def test_deepspeed_in_one_process_without_a_launcher(reference, tmp_path):
    pytest.importorskip("deepspeed", reason="deepspeed is not importable: the ZeRO engine tests need it")
    (res,) = spawn("deepspeed_single", tmp_path, world=1)
    assert res["world"] == 1
    assert max_diff(res["sgd"], reference["sgd"]) < TOL


def test_deepspeed_load_refuses_another_world_size(tmp_path):
    (tmp_path / "engine_state.json").write_text(json.dumps({"backend": "deepspeed", "world": 2, "zero_stage": 3}))
    engine = DeepSpeedEngine.__new__(DeepSpeedEngine)  # only the layout check runs before DeepSpeed is touched
    engine.world, engine.zero_stage = 1, 3
    with pytest.raises(ValueError, match="saved by 2 ranks at ZeRO stage 3; this job has 1 ranks"):
        engine.load(tmp_path)


# ---------------------------------------------------------------------------------------------
# One process
# ---------------------------------------------------------------------------------------------


def test_gradient_accumulation_equals_full_batch(reference):
    engine = ew.make_engine("ddp", 0, plain_sgd=True, accum=2)
    metrics = ew.train(engine, range(1), accum=2)
    assert max_diff(ew.full_params(engine), reference["sgd"]) < TOL
    assert metrics[0]["loss"] == pytest.approx(reference["metrics"][0]["loss"], rel=1e-6)
    assert metrics[0]["grad_norm"] == pytest.approx(reference["metrics"][0]["grad_norm"], rel=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(reference):
    engine = ew.make_engine("ddp", 0, plain_sgd=True, checkpointing=True)
    assert all(getattr(b, "_activation_checkpointing", False) for b in engine.module.blocks)
    assert enable_activation_checkpointing(engine.module) == len(engine.module.blocks)  # idempotent
    ew.train(engine, range(1))
    assert max_diff(ew.full_params(engine), reference["sgd"]) < TOL
    with pytest.raises(ValueError, match="blocks"):
        enable_activation_checkpointing(torch.nn.Linear(2, 2))


def test_single_process_resume_equals_uninterrupted(tmp_path):
    res = ew.resume_check("ddp", tmp_path / "ckpt")
    assert res["client"] == {"next_step": 2, "note": "x"} and res["step"] == 2
    assert max_diff(res["resumed"], res["uninterrupted"]) == 0.0
    assert max_diff(res["fresh"], res["uninterrupted"]) > 1e-2
    with pytest.raises(ValueError, match="not a ddp one"):
        (tmp_path / "ds").mkdir()
        (tmp_path / "ds" / "engine_state.json").write_text(json.dumps({"backend": "deepspeed"}))
        ew.make_engine("ddp", 0).load(tmp_path / "ds")
    with pytest.raises(FileNotFoundError, match="engine_state.json"):
        ew.make_engine("ddp", 0).load(tmp_path / "nothing")


def test_client_state_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="JSON"):
        ew.make_engine("ddp", 0).save(tmp_path, {"bad": torch.zeros(1)})


def test_bf16_autocast_on_cpu_keeps_fp32_weights():
    engine = ew.make_engine("ddp", 0, precision="bf16")
    assert engine.precision == "bf16"
    metrics = ew.train(engine, range(1))[0]
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])
    assert all(p.dtype == torch.float32 for p in engine.module.parameters())
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "cuda") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", "cpu")


def test_consolidated_state_dict_single_process():
    engine = ew.make_engine("ddp", 0)
    state = engine.consolidated_state_dict()
    assert state.keys() == engine.module.state_dict().keys()
    assert all(v.device.type == "cpu" for v in state.values())


def test_train_step_checks_the_micro_batch_count():
    engine = ew.make_engine("ddp", 0, accum=2)
    with pytest.raises(ValueError, match="got 1 micro-batches but train.engine.grad_accum is 2"):
        engine.train_step(ew.loss_fn, ew.shard(ew.global_batch(0), 0, 1, 1))
    with pytest.raises(TypeError, match="scalar tensor"):
        engine.train_step(lambda m, b: "nope", ew.shard(ew.global_batch(0), 0, 1, 2))


# ---------------------------------------------------------------------------------------------
# Config generation and errors
# ---------------------------------------------------------------------------------------------


def test_generate_deepspeed_config():
    ocfg = OptimConfig(grad_clip=0.7)
    cfg = generate_deepspeed_config(EngineConfig(backend="deepspeed", zero_stage=3, grad_accum=4), ocfg, 2, 8, "cuda")
    assert cfg["zero_optimization"] == {"stage": 3}
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    assert cfg["gradient_accumulation_steps"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["train_batch_size"] == 2 * 4 * 8 and cfg["gradient_clipping"] == 0.7
    assert "optimizer" not in cfg and "scheduler" not in cfg  # ours are client objects
    json.dumps(cfg)

    cpu = generate_deepspeed_config(EngineConfig(zero_stage=1, offload_optimizer=True), ocfg, 1, 2, "cpu",
                                    overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}})
    assert cpu["bf16"] == {"enabled": False}  # auto = fp32 on CPU
    assert cpu["zero_optimization"] == {"stage": 1, "offload_optimizer": {"device": "cpu", "pin_memory": False},
                                        "stage3_param_persistence_threshold": 0}
    assert cpu["zero_force_ds_cpu_optimizer"] is False  # keep our AdamW under ZeRO-Offload
    forced = generate_deepspeed_config(EngineConfig(precision="bf16"), ocfg, 1, 1, "cpu")
    assert forced["bf16"] == {"enabled": True} and "zero_force_ds_cpu_optimizer" not in forced


@pytest.mark.parametrize("changes, match", [
    ({"backend": "horovod"}, "unknown train.engine.backend 'horovod'; valid: ddp, deepspeed"),
    ({"backend": "deepspeed", "zero_stage": 0}, "zero_stage must be 1, 2 or 3, got 0"),
    ({"backend": "deepspeed", "zero_stage": 4}, "zero_stage must be 1, 2 or 3, got 4"),
    ({"grad_accum": 0}, "grad_accum must be >= 1"),
    ({"offload_optimizer": True}, "offload_optimizer needs backend=deepspeed"),
    ({"precision": "fp16"}, "precision must be one of auto, fp32, bf16"),
])
def test_engine_config_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        create_engine(ew.make_model(0), EngineConfig(**changes), OptimConfig(), 10, "cpu")


def test_zero_stage_error_from_config_generation():
    with pytest.raises(ValueError, match="zero_stage must be 1, 2 or 3, got 5"):
        generate_deepspeed_config(EngineConfig(zero_stage=5), OptimConfig(), 1, 1, "cpu")


def test_missing_deepspeed_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    with pytest.raises(ImportError, match="needs the deepspeed package.*backend=ddp"):
        create_engine(ew.make_model(0), EngineConfig(backend="deepspeed"), OptimConfig(), 10, "cpu")


def test_ddp_backend_in_one_process_is_the_plain_module():
    engine = ew.make_engine("ddp", 0)
    assert isinstance(engine, TorchEngine) and engine.wrapped is engine.module
    assert (engine.rank, engine.world, engine.device.type, engine.precision) == (0, 1, "cpu", "fp32")


def test_init_distributed_without_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert tuple(pdist.init_distributed()) == (0, 1, 0, torch.device("cpu"))
    assert not pdist.is_initialized() and pdist.is_main() and pdist.get_world_size() == 1
    pdist.barrier()
    pdist.cleanup()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"RANK=3 is not in \[0, WORLD_SIZE=2\)"):
        pdist.init_distributed()
    with pytest.raises(ValueError, match="unknown distributed backend"):
        pdist.init_distributed("mpi")


def test_seed_everything_offsets_by_rank():
    pdist.seed_everything(3, rank=0)
    a = torch.rand(3)
    pdist.seed_everything(3, rank=1)
    b = torch.rand(3)
    assert pdist.seed_everything(3, rank=0) == 3 and torch.equal(torch.rand(3), a) and not torch.equal(a, b)
    assert 0 < pdist.free_port() < 65536
