"""One training-engine interface over torch DDP and DeepSpeed ZeRO 1/2/3.

The trainer only ever calls ``create_engine``, ``train_step``, ``save``, ``load`` and
``consolidated_state_dict``; which runtime sits underneath is ``EngineConfig.backend``:

- ``TorchEngine`` ("ddp"): DistributedDataParallel when world > 1, the plain module otherwise; bf16
  through ``torch.autocast`` (fp32 weights); accumulation under ``no_sync``; checkpoints written by
  rank 0 as safetensors + JSON (DDP state is replicated), so loading never unpickles and a
  checkpoint loads at any world size.
- ``DeepSpeedEngine`` ("deepspeed"): the DeepSpeed JSON is generated from our config
  (``generate_deepspeed_config``), never hand-written; our AdamW (``optim.build_optimizer``) and LR
  schedule are passed as client objects; checkpoints are DeepSpeed's own (pickles, see ``save``).

Both broadcast rank 0's weights when wrapping, so ranks may build their models with different seeds.
"""

from __future__ import annotations

import abc
import copy
import importlib
import json
import math
import os
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import EngineConfig, OptimConfig
from .. import distributed as pdist
from .optim import build_optimizer, build_scheduler

BACKEND_NAMES = ("ddp", "deepspeed")
PRECISIONS = ("auto", "fp32", "bf16")
DS_TAG = "deepspeed"  # DeepSpeed's sub-directory ("tag") inside a checkpoint directory
STATE_FILE, CLIENT_FILE = "engine_state.json", "client_state.json"
MODEL_FILE, OPTIM_FILE = "model.safetensors", "optimizer.safetensors"
FORMAT_VERSION = 1
SHM_ENV = "PERTURBDIFF_DS_SHM_COMM"  # "0": no DeepSpeed shared-memory comm op on CPU (skips its JIT build)

LossFn = Callable[[nn.Module, Any], Any]  # (model, micro_batch) -> LossTerms (with .loss) or a scalar tensor
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


# ---------------------------------------------------------------------------------------------
# Config helpers (pure)
# ---------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device_type: str) -> str:
    """The precision to train in: "auto" is bf16 on CUDA and fp32 elsewhere; "fp32" and "bf16" stay
    as given (fp16 is not supported: DeepSpeed refuses it on CPU and bf16 needs no loss scaling)."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.engine.precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def validate_engine_config(cfg: EngineConfig) -> None:
    """Raise ValueError naming the bad field of ``train.engine``."""
    if cfg.backend not in BACKEND_NAMES:
        raise ValueError(f"unknown train.engine.backend '{cfg.backend}'; valid: {', '.join(BACKEND_NAMES)}")
    if cfg.backend == "deepspeed" and cfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"train.engine.zero_stage must be 1, 2 or 3, got {cfg.zero_stage}")
    if int(cfg.grad_accum) < 1:
        raise ValueError(f"train.engine.grad_accum must be >= 1, got {cfg.grad_accum}")
    if cfg.offload_optimizer and cfg.backend != "deepspeed":
        raise ValueError("train.engine.offload_optimizer needs backend=deepspeed (ZeRO-Offload)")
    resolve_precision(cfg.precision, "cpu")


def _deep_update(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def generate_deepspeed_config(engine_cfg: EngineConfig, optim_cfg: OptimConfig, micro_batch_sets: int, world: int,
                              device_type: str, overrides: dict | None = None) -> dict:
    """The DeepSpeed config dict for our engine / optimiser settings (no optimizer or scheduler
    section: ours are passed to ``deepspeed.initialize`` as client objects).

    ``overrides`` is deep-merged last, for DeepSpeed knobs our config does not model (e.g.
    ``{"zero_optimization": {"stage3_param_persistence_threshold": 0}}``).
    """
    cfg = copy.copy(engine_cfg)
    cfg.backend = "deepspeed"
    validate_engine_config(cfg)
    if micro_batch_sets < 1 or world < 1:
        raise ValueError(f"micro_batch_sets and world must be >= 1, got {micro_batch_sets} and {world}")
    precision = resolve_precision(engine_cfg.precision, device_type)
    gas = int(engine_cfg.grad_accum)
    zero: dict[str, Any] = {"stage": int(engine_cfg.zero_stage)}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": int(micro_batch_sets),
        "gradient_accumulation_steps": gas,
        "train_batch_size": int(micro_batch_sets) * gas * int(world),
        "gradient_clipping": float(optim_cfg.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        # our AdamW is torch's; other client optimizers (tests use SGD) are fine with ZeRO too
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if engine_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
        # keep our client AdamW instead of DeepSpeed's CPU Adam (which JIT-compiles a C++ op)
        config["zero_force_ds_cpu_optimizer"] = False
    return _deep_update(config, overrides or {})


# ---------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each MM-DiT block in the backward pass instead of storing its activations.

    Wraps every ``model.blocks[i].forward`` in ``torch.utils.checkpoint(use_reentrant=False)``
    (only while gradients are enabled; no-grad passes run plainly). Idempotent; returns the number
    of blocks wrapped.
    """
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
        raise ValueError(f"activation checkpointing needs a model with a non-empty .blocks ModuleList; "
                         f"{type(model).__name__} has none")
    for block in blocks:
        if getattr(block, "_activation_checkpointing", False):
            continue
        inner = block.forward

        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        block.forward = forward  # type: ignore[method-assign]
        block._activation_checkpointing = True  # type: ignore[assignment]
    return len(blocks)


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


def _loss_tensor(out: Any) -> torch.Tensor:
    loss = getattr(out, "loss", out)
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor or an object with .loss, got {type(out).__name__}")
    return loss.reshape(())


def _mean_across_ranks(value: float, device: torch.device) -> float:
    return pdist.all_reduce_floats([value], device)[0] / pdist.get_world_size()


def _persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for mod_name, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = buf
    return out


class Engine(abc.ABC):
    """A model being trained across ``world`` processes. Every method is collective unless noted:
    call it on every rank.

    Attributes:
        module: the unwrapped ``nn.Module`` (for inspection and evaluation forwards).
        rank / world / device: this process's place in the job.
        precision: "fp32" or "bf16" (``EngineConfig.precision`` resolved for the device).
        step: optimizer steps taken (restored by ``load``).
    """

    module: nn.Module
    rank: int
    world: int
    device: torch.device
    precision: str
    grad_accum: int
    step: int

    def _check_micro_batches(self, micro_batches: Sequence[Any]) -> None:
        if len(micro_batches) != self.grad_accum:
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches but train.engine.grad_accum is "
                             f"{self.grad_accum}")

    @abc.abstractmethod
    def train_step(self, loss_fn: LossFn, micro_batches: Sequence[Any]) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches (this rank's share of the batch).

        ``loss_fn(model, micro_batch)`` must call ``model`` (the wrapped forward) and return a
        ``LossTerms`` or a scalar tensor: the mean loss over the micro-batch. Gradients are averaged
        over micro-batches and ranks, clipped to ``optim_cfg.grad_clip``, then the optimizer and LR
        schedule step. Returns floats: "loss" (mean over micro-batches and ranks), "grad_norm"
        (before clipping) and "lr" (the rate this step used).
        """

    @abc.abstractmethod
    def save(self, directory: str | Path, client_state: dict | None = None) -> None:
        """Write the resumable state (weights, optimizer, LR schedule, step) and ``client_state``
        (JSON-serialisable) into ``directory``; renaming and rotation are the caller's."""

    @abc.abstractmethod
    def load(self, directory: str | Path) -> dict:
        """Restore what ``save`` wrote (call on a freshly created engine); returns the client_state."""

    @abc.abstractmethod
    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full fp32 weights (a plain ``state_dict``, on CPU) on rank 0; None on other ranks."""

    def autocast(self) -> AbstractContextManager:
        """The mixed-precision context for forwards outside ``train_step`` (validation, sampling):
        bf16 autocast for the torch engine in bf16; DeepSpeed's bf16 module needs none. Local."""
        return nullcontext()

    def full_parameters(self) -> AbstractContextManager:
        """A context in which ``module``'s parameters are whole on every rank (ZeRO-3 gathers them,
        and re-shards on exit; changes made inside are discarded). For EMA updates and inspection;
        elsewhere a no-op. Collective."""
        return nullcontext()

    @property
    @abc.abstractmethod
    def lr(self) -> float:
        """The learning rate the next step will use (first parameter group)."""

    def _write_client_state(self, directory: Path, client_state: dict | None, extra: dict) -> None:
        try:
            client_text = json.dumps(client_state or {}, indent=1, sort_keys=True)
        except TypeError as err:
            raise TypeError(f"client_state must be JSON-serialisable: {err}") from None
        (directory / CLIENT_FILE).write_text(client_text)
        (directory / STATE_FILE).write_text(json.dumps(extra, indent=1, sort_keys=True))

    @staticmethod
    def _read_json(directory: Path, name: str) -> dict:
        path = directory / name
        if not path.is_file():
            raise FileNotFoundError(f"not an engine checkpoint: {path} is missing")
        return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# torch DDP / single process
# ---------------------------------------------------------------------------------------------


class _DDP(nn.parallel.DistributedDataParallel):
    """DDP that falls back to the wrapped module's attributes (e.g. ``model.self_condition``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)


def _flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state_dict as (tensors for safetensors, JSON-able structure naming them)."""
    tensors: dict[str, torch.Tensor] = {}
    per_param: dict[str, dict] = {}
    for pid, entries in state["state"].items():
        out: dict[str, Any] = {}
        for key, value in entries.items():
            if torch.is_tensor(value):
                name = f"state.{pid}.{key}"
                tensors[name] = value.detach().to("cpu").contiguous()
                out[key] = {"__tensor__": name}
            else:
                out[key] = value
        per_param[str(pid)] = out
    return tensors, {"state": per_param, "param_groups": state["param_groups"]}


def _unflatten_optimizer_state(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict] = {}
    for pid, entries in structure["state"].items():
        state[int(pid)] = {k: tensors[v["__tensor__"]] if isinstance(v, dict) and "__tensor__" in v else v
                           for k, v in entries.items()}
    groups = []
    for group in structure["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def _read_tensors(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """A safetensors file, or a ValueError naming it (missing, truncated, not safetensors)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path}: unreadable safetensors file, truncated or damaged ({err})") from None


class TorchEngine(Engine):
    """torch.nn.parallel.DistributedDataParallel (world > 1) or the plain module (world 1)."""

    def __init__(self, model: nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig, max_steps: int,
                 device: torch.device, optimizer_factory: OptimizerFactory | None = None) -> None:
        self.rank, self.world = pdist.get_rank(), pdist.get_world_size()
        self.device = device
        self.precision = resolve_precision(engine_cfg.precision, device.type)
        self.grad_accum, self.grad_clip = int(engine_cfg.grad_accum), float(optim_cfg.grad_clip)
        self.step = 0
        self.module = model.to(device)
        if self.world > 1:
            # DDP broadcasts rank 0's parameters and buffers at construction
            ids = [device.index] if device.type == "cuda" else None
            self.wrapped: nn.Module = _DDP(self.module, device_ids=ids)
        else:
            self.wrapped = self.module
        factory = optimizer_factory or (lambda m: build_optimizer(m, optim_cfg))
        self.optimizer = factory(self.module)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def autocast(self) -> AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, loss_fn: LossFn, micro_batches: Sequence[Any]) -> dict[str, float]:
        self._check_micro_batches(micro_batches)
        self.module.train()
        self.optimizer.zero_grad(set_to_none=True)
        n, total = len(micro_batches), 0.0
        for i, micro in enumerate(micro_batches):
            sync = i == n - 1 or not isinstance(self.wrapped, nn.parallel.DistributedDataParallel)
            with nullcontext() if sync else self.wrapped.no_sync():  # type: ignore[operator]
                with self.autocast():
                    loss = _loss_tensor(loss_fn(self.wrapped, micro))
                (loss.float() / n).backward()
            total += float(loss.detach())
        params = [p for p in self.module.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm)) if params else 0.0
        lr = self.lr
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        return {"loss": _mean_across_ranks(total / n, self.device), "grad_norm": grad_norm, "lr": lr}

    def save(self, directory: str | Path, client_state: dict | None = None) -> None:
        """Rank 0 writes model.safetensors, optimizer.safetensors (tensors) and engine_state.json
        (optimizer structure and scalars, LR schedule, step) plus client_state.json; the others wait."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            model_state = {k: v.detach().to("cpu").contiguous().clone() for k, v in self.module.state_dict().items()}
            save_file(model_state, str(directory / MODEL_FILE))
            tensors, structure = _flatten_optimizer_state(self.optimizer.state_dict())
            save_file(tensors, str(directory / OPTIM_FILE))
            extra = {"format": FORMAT_VERSION, "backend": "ddp", "world": self.world, "step": self.step,
                     "optimizer": structure, "scheduler": self.scheduler.state_dict()}
            self._write_client_state(directory, client_state, extra)
        pdist.barrier()

    def load(self, directory: str | Path) -> dict:
        """Every rank reads the files (a shared filesystem across nodes); nothing is unpickled.
        Loads at any world size (DDP state is replicated)."""

        directory = Path(directory)
        extra = self._read_json(directory, STATE_FILE)
        if extra.get("backend") != "ddp":
            raise ValueError(f"{directory} holds a '{extra.get('backend')}' engine checkpoint, not a ddp one")
        model_state = _read_tensors(directory / MODEL_FILE, self.device)
        try:
            self.module.load_state_dict(model_state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{directory / MODEL_FILE} does not fit this model (another config or gene panel?): "
                             f"{str(err).splitlines()[0]}") from None
        tensors = _read_tensors(directory / OPTIM_FILE, self.device)
        self.optimizer.load_state_dict(_unflatten_optimizer_state(tensors, extra["optimizer"]))
        self.scheduler.load_state_dict(extra["scheduler"])
        self.step = int(extra["step"])
        client = self._read_json(directory, CLIENT_FILE)
        pdist.barrier()
        return client

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.rank != 0:
            return None
        return {k: (v.detach().float() if v.is_floating_point() else v.detach()).to("cpu").clone()
                for k, v in self.module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# DeepSpeed ZeRO 1/2/3
# ---------------------------------------------------------------------------------------------


def import_deepspeed() -> Any:
    """``import deepspeed`` with an error that says how to get it."""
    try:
        return importlib.import_module("deepspeed")
    except ImportError as err:
        raise ImportError(f"train.engine.backend=deepspeed needs the deepspeed package, which cannot be imported "
                          f"({err}); install it after torch (pip install deepspeed) or use backend=ddp") from err


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with a generated config and our optimizer / schedule as client objects.

    ZeRO-3 constraint: every forward of a sharded module all-gathers its weights, so all ranks must
    run the same sequence of module forwards in a micro-step. A data-dependent extra pass (e.g. a
    self-conditioning pass taken only when some local set drew the coin) desynchronises the ranks:
    gloo aborts on mismatched gathers, NCCL may hang. Decide such passes identically on every rank.
    """

    def __init__(self, model: nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig, max_steps: int,
                 device: torch.device, micro_batch_sets: int = 1, optimizer_factory: OptimizerFactory | None = None,
                 ds_overrides: dict | None = None) -> None:
        deepspeed = import_deepspeed()
        if device.type == "cpu" and os.environ.get(SHM_ENV, "1") == "0":
            # DeepSpeed JIT-compiles a shared-memory all-reduce op (~25 s, needs a C++ compiler) on
            # its first CPU init; marking it incompatible falls back to plain torch.distributed.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        if not pdist.is_initialized():  # a single process without a launcher: a one-rank group
            for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(pdist.free_port()))):
                os.environ.setdefault(key, value)
        backend = "nccl" if device.type == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
        self.rank, self.world = pdist.get_rank(), pdist.get_world_size()
        self.device = device
        self.precision = resolve_precision(engine_cfg.precision, device.type)
        self.grad_accum, self.zero_stage = int(engine_cfg.grad_accum), int(engine_cfg.zero_stage)
        self.step = 0
        self.config = generate_deepspeed_config(engine_cfg, optim_cfg, micro_batch_sets, self.world, device.type,
                                                ds_overrides)
        model = model.to(device)
        if self.world > 1:  # DeepSpeed broadcasts for stages 1/2, but ZeRO-3 would shard unequal copies
            with torch.no_grad():
                for tensor in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(tensor.data, src=0)
        optimizer = optimizer_factory(model) if optimizer_factory else build_optimizer(model, optim_cfg)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config,
            lr_scheduler=lambda opt: build_scheduler(opt, optim_cfg, max_steps))
        self.module = self.ds.module

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    def train_step(self, loss_fn: LossFn, micro_batches: Sequence[Any]) -> dict[str, float]:
        """``engine.backward`` (scaled by 1 / grad_accum inside DeepSpeed) and ``engine.step`` per
        micro-batch; DeepSpeed steps the optimizer, clips and steps the schedule at the boundary."""
        self._check_micro_batches(micro_batches)
        self.ds.train()
        lr, total = self.lr, 0.0
        for i, micro in enumerate(micro_batches):
            loss = _loss_tensor(loss_fn(self.ds, micro))
            self.ds.backward(loss)
            if (i == len(micro_batches) - 1) != self.ds.is_gradient_accumulation_boundary():
                raise RuntimeError("DeepSpeed's micro-step counter is out of step with train_step; do not call "
                                   "the DeepSpeed engine's backward / step directly")
            self.ds.step()
            total += float(loss.detach())
        self.step += 1
        norm = self.ds.get_global_grad_norm()
        return {"loss": _mean_across_ranks(total / len(micro_batches), self.device),
                "grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}

    def save(self, directory: str | Path, client_state: dict | None = None) -> None:
        """``save_checkpoint(directory, tag="deepspeed")``: DeepSpeed writes one model / optimizer
        file per rank with ``torch.save`` (pickles); rank 0 adds engine_state.json and
        client_state.json. ``load`` therefore unpickles (DeepSpeed calls ``torch.load`` with
        ``weights_only=False`` and offers no switch): load only checkpoints you trust, and use
        ``consolidated_state_dict`` (plain tensors) to hand weights to others."""
        directory = Path(directory)
        if self.rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
        pdist.barrier()
        self.ds.save_checkpoint(str(directory), tag=DS_TAG, client_state={"engine_step": self.step},
                                save_latest=False)
        if self.rank == 0:
            extra = {"format": FORMAT_VERSION, "backend": "deepspeed", "world": self.world, "step": self.step,
                     "zero_stage": self.zero_stage, "precision": self.precision}
            self._write_client_state(directory, client_state, extra)
        pdist.barrier()

    def load(self, directory: str | Path) -> dict:
        """Full ``load_checkpoint`` (module, optimizer, schedule) at the same world size and ZeRO stage.

        Never ``load_module_only`` under ZeRO-3: it silently keeps the fresh weights. Call on a newly
        created engine (DeepSpeed needs an untouched ZeRO-3 module)."""
        directory = Path(directory)
        extra = self._read_json(directory, STATE_FILE)
        if extra.get("backend") != "deepspeed":
            raise ValueError(f"{directory} holds a '{extra.get('backend')}' engine checkpoint, not a deepspeed one")
        if int(extra["world"]) != self.world or int(extra["zero_stage"]) != self.zero_stage:
            raise ValueError(f"{directory} was saved by {extra['world']} ranks at ZeRO stage {extra['zero_stage']}; "
                             f"this job has {self.world} ranks at stage {self.zero_stage}. DeepSpeed cannot re-shard "
                             "optimizer state: resume with the same layout, or start from consolidated weights")
        path, _ = self.ds.load_checkpoint(str(directory), tag=DS_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {directory / DS_TAG}")
        self.step = int(extra["step"])
        client = self._read_json(directory, CLIENT_FILE)
        pdist.barrier()
        return client

    def full_parameters(self) -> AbstractContextManager:
        if self.zero_stage != 3:
            return nullcontext()
        return import_deepspeed().zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Gathers the fp32 master weights (``safe_get_full_fp32_param``: an all-reduce of the shards
        under ZeRO 1/2/3, never the module's possibly-empty ZeRO-3 tensors). Collective."""
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        for name, param in self.module.named_parameters():
            full = safe_get_full_fp32_param(param)
            if full is None:  # a parameter the optimizer does not own (frozen)
                if hasattr(param, "ds_id"):
                    with import_deepspeed().zero.GatheredParameters([param], modifier_rank=None):
                        full = param.detach().clone()
                else:
                    full = param.detach()
            if self.rank == 0:
                out[name] = full.detach().float().to("cpu").clone()
        if self.rank != 0:
            return None
        for name, buf in _persistent_buffers(self.module).items():
            out[name] = (buf.detach().float() if buf.is_floating_point() else buf.detach()).to("cpu").clone()
        return out


def create_engine(model: nn.Module, engine_cfg: EngineConfig, optim_cfg: OptimConfig, max_steps: int,
                  device: torch.device | str, *, micro_batch_sets: int = 1,
                  optimizer_factory: OptimizerFactory | None = None, ds_overrides: dict | None = None) -> Engine:
    """Wrap ``model`` for training on the backend ``engine_cfg.backend`` names.

    Args:
        model: the network (moved to ``device`` here).
        max_steps: optimizer steps of the run (the cosine schedule ends there).
        micro_batch_sets: sets per micro-batch per rank (DeepSpeed's batch bookkeeping).
        optimizer_factory: replaces ``build_optimizer(model, optim_cfg)`` (e.g. plain SGD in tests).
        ds_overrides: deep-merged into the generated DeepSpeed config (deepspeed backend only).

    Raises:
        ValueError: a bad ``train.engine`` field (unknown backend, zero_stage not in 1..3, ...).
        ImportError: backend "deepspeed" without the deepspeed package.
    """
    validate_engine_config(engine_cfg)
    device = torch.device(device)
    if engine_cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    if engine_cfg.backend == "deepspeed":
        return DeepSpeedEngine(model, engine_cfg, optim_cfg, max_steps, device, micro_batch_sets=micro_batch_sets,
                               optimizer_factory=optimizer_factory, ds_overrides=ds_overrides)
    return TorchEngine(model, engine_cfg, optim_cfg, max_steps, device, optimizer_factory=optimizer_factory)
