"""Shared pieces of the engine tests, and the scenarios run in spawned ranks (importable functions).

The loss is the real ``SetDiffusion`` loss on the tiny MM-DiT, made independent of how sets are
split across ranks and micro-batches: each set is scored on its own with a generator seeded by the
set's global id, and the micro-batch loss is the mean over its sets. So a 2-rank step (DDP or
ZeRO) and a 1-process step on the same global batch compute the same gradient up to rounding.

Each scenario runs several engines in one pair of processes (process start-up and DeepSpeed's
import dominate the cost) and writes ``<name>_rank<r>.pt`` for the test to check.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from perturbdiff.config import DiffusionConfig, EngineConfig, ModelConfig, OptimConfig
from perturbdiff.diffusion import SetDiffusion
from perturbdiff.models import build_model
from perturbdiff.distributed import cleanup, init_distributed
from perturbdiff.train.engine import Engine, create_engine

SETS, M, G = 4, 6, 16  # global batch: sets, cells per set, genes
VOCAB = {"context": 2, "perturbation": 6}
Z3 = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}  # really shard the tiny model
# p_self_cond=1: every set takes the no-grad self-conditioning pass. Under ZeRO-3 each forward of a
# sharded module is a collective, so ranks must run the same number of forwards; a per-set coin flip
# that decides whether the extra pass runs desynchronises them (gloo aborts on mismatched gathers).
DIFFUSION = SetDiffusion(DiffusionConfig(kme_impl="torch", p_self_cond=1.0))


def global_batch(step: int, sets: int = SETS) -> dict[str, torch.Tensor]:
    """The global batch of optimizer step ``step`` (ragged sets; "seed" = a global id per set)."""
    g = torch.Generator().manual_seed(1000 + step)
    sizes = torch.randint(3, M + 1, (sets,), generator=g)
    mask = torch.arange(M)[None] < sizes[:, None]
    return {"x": torch.rand(sets, M, G, generator=g) * mask[..., None], "mask": mask,
            "ctrl": torch.rand(sets, M, G, generator=g), "ctrl_mask": torch.ones(sets, M, dtype=torch.bool),
            "context": torch.randint(0, 2, (sets,), generator=g),
            "perturbation": torch.randint(0, 6, (sets,), generator=g),
            "num_dose": torch.rand(sets, generator=g), "seed": 100 * step + torch.arange(sets)}


def shard(batch: dict[str, torch.Tensor], rank: int, world: int, accum: int) -> list[dict[str, torch.Tensor]]:
    """This rank's contiguous share of the sets, cut into ``accum`` equal micro-batches."""
    n = batch["x"].shape[0]
    per_rank, per_micro = n // world, n // world // accum
    assert per_micro * accum * world == n
    start = rank * per_rank
    return [{k: v[start + i * per_micro: start + (i + 1) * per_micro] for k, v in batch.items()} for i in range(accum)]


def loss_fn(model: torch.nn.Module, micro: dict[str, torch.Tensor]) -> torch.Tensor:
    losses = []
    for i in range(micro["x"].shape[0]):
        one = {k: v[i:i + 1] for k, v in micro.items()}
        losses.append(DIFFUSION.loss(model, one, torch.Generator().manual_seed(int(micro["seed"][i]))).loss)
    return torch.stack(losses).mean()


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(ModelConfig(size="tiny"), G, VOCAB)


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """params -= grad (lr 1, no momentum): the step reveals the averaged gradient exactly."""
    return torch.optim.SGD(model.parameters(), lr=1.0)


def make_engine(backend: str, seed: int, *, stage: int = 2, accum: int = 1, plain_sgd: bool = False,
                precision: str = "fp32", checkpointing: bool = False, offload: bool = False,
                overrides: dict | None = None, max_steps: int = 20) -> Engine:
    ecfg = EngineConfig(backend=backend, zero_stage=stage, precision=precision, grad_accum=accum,
                        activation_checkpointing=checkpointing, offload_optimizer=offload)
    if plain_sgd:
        ocfg = OptimConfig(lr=1.0, warmup_steps=0, grad_clip=0.0, weight_decay=0.0)
    else:
        ocfg = OptimConfig(lr=1e-3, warmup_steps=2, grad_clip=0.5)
    if stage == 3 and backend == "deepspeed":
        overrides = {**Z3, **(overrides or {})}
    return create_engine(make_model(seed), ecfg, ocfg, max_steps, "cpu", micro_batch_sets=SETS // 2 // accum,
                         optimizer_factory=sgd if plain_sgd else None, ds_overrides=overrides)


def full_params(engine: Engine) -> dict[str, torch.Tensor]:
    """Every parameter in full on this rank (gathered under ZeRO-3), as fp32 CPU copies."""
    with engine.full_parameters():
        return {n: p.detach().float().cpu().clone() for n, p in engine.module.named_parameters()}


def train(engine: Engine, steps: range, accum: int = 1) -> list[dict[str, float]]:
    return [engine.train_step(loss_fn, shard(global_batch(s), engine.rank, engine.world, accum)) for s in steps]


def resume_check(backend: str, ckpt: Path, stage: int = 2) -> dict[str, Any]:
    """Uninterrupted 4 steps vs 2 steps, save, a fresh engine (other init) loads, 2 more steps."""
    a = make_engine(backend, 0, stage=stage)
    train(a, range(2))
    a.save(ckpt, {"next_step": 2, "note": "x"})
    train(a, range(2, 4))
    b = make_engine(backend, 7, stage=stage)
    fresh = full_params(b)
    client = b.load(ckpt)
    out = {"client": client, "step": b.step, "lr_a": a.lr, "lr_b_loaded": b.lr}
    train(b, range(2, 4))
    out.update(uninterrupted=full_params(a), resumed=full_params(b), fresh=fresh, lr_b=b.lr)
    return out


# ---------------------------------------------------------------------------------------------
# Scenarios (each rank runs one and saves its results)
# ---------------------------------------------------------------------------------------------


def scenario_ddp(out_dir: Path, rank: int, world: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    eng = make_engine("ddp", seed=rank)  # different seeds per rank: the engine must broadcast rank 0's
    res["init"] = full_params(eng)
    res["metrics"] = train(eng, range(3))
    res["params"] = full_params(eng)
    eng = make_engine("ddp", seed=rank, plain_sgd=True)
    train(eng, range(1))
    res["sgd"] = full_params(eng)
    eng = make_engine("ddp", seed=rank, plain_sgd=True, accum=2)
    train(eng, range(1), accum=2)
    res["sgd_accum2"] = full_params(eng)
    res["resume"] = resume_check("ddp", out_dir / "ckpt_ddp")
    return res


def scenario_deepspeed(out_dir: Path, rank: int, world: int) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for stage in (1, 2, 3):
        eng = make_engine("deepspeed", seed=rank, stage=stage)
        r: dict[str, Any] = {"sharded": any(p.numel() == 0 for p in eng.module.parameters()),
                             "cons_init": eng.consolidated_state_dict()}
        r["metrics"] = train(eng, range(3))
        r["params"] = full_params(eng)
        r["cons"] = eng.consolidated_state_dict()
        res[f"z{stage}"] = r
    for stage, accum, ckpt in ((2, 2, False), (3, 1, True)):
        eng = make_engine("deepspeed", seed=rank, stage=stage, accum=accum, plain_sgd=True, checkpointing=ckpt)
        train(eng, range(1), accum=accum)
        res[f"sgd_z{stage}"] = full_params(eng)
    eng = make_engine("deepspeed", seed=rank, stage=2, offload=True, precision="bf16")
    res["offload_bf16"] = {"metrics": train(eng, range(2)), "dtype": str(next(eng.module.parameters()).dtype),
                           "cons": eng.consolidated_state_dict()}
    res["resume_z3"] = resume_check("deepspeed", out_dir / "ckpt_z3", stage=3)
    return res


def scenario_deepspeed_single(out_dir: Path, rank: int, world: int) -> dict[str, Any]:
    """No launcher variables: the engine forms its own one-rank group."""
    eng = make_engine("deepspeed", seed=0, stage=2, plain_sgd=True)
    res = {"world": eng.world, "metrics": train(eng, range(1))}
    res["sgd"] = full_params(eng)
    return res


SCENARIOS = {"ddp": scenario_ddp, "deepspeed": scenario_deepspeed, "deepspeed_single": scenario_deepspeed_single}


def run_rank(rank: int, world: int, port: int | None, out_dir: str, name: str) -> None:
    """Entry point of a spawned rank: join a gloo group through the launcher variables (none when
    ``port`` is None: a lone process), run the scenario, save its results."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(var, None)
    if port is not None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    # no 25 s JIT build of DeepSpeed's CPU shared-memory comm op
    os.environ.update(DS_ACCELERATOR="cpu", PERTURBDIFF_DS_SHM_COMM="0")
    torch.set_num_threads(1)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    info = init_distributed(timeout_s=120)
    assert (info.rank, info.world, info.device.type) == (rank, world, "cpu")
    try:
        result = SCENARIOS[name](Path(out_dir), rank, world)
        torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
    finally:
        cleanup()
