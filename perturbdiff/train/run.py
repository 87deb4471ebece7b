"""A training job from a config: what ``launch/pretrain.py`` and ``launch/finetune.py`` run.

    deepspeed --num_gpus 8 launch/pretrain.py --config configs/pretrain.yaml [key=value ...]
    torchrun --nproc_per_node 4 launch/finetune.py --init runs/pretrain/foundation \\
        --config configs/finetune.yaml [key=value ...]

Both join the process group the launcher describes (or run as one plain process), build the
loaders, the model and the engine, resume from the newest checkpoint under ``<out_dir>/checkpoints``
if there is one (``train.resume``), train, export the consolidated foundation checkpoint to
``<out_dir>/foundation`` and tear the process group down, also on errors.

Modes:
- ``pretrain`` (marginal pretraining): sets of cells given their context only. The control stream is
  always dropped (``diffusion.p_drop_control = 1``), no perturbation label or dose enters the model,
  and control cells are targets too (``data.include_controls``). ``data.stores`` lists several
  stores to pretrain on their union gene vocabulary.
- ``finetune``: the full conditional model. With ``--init`` the architecture comes from the
  foundation and its weights are carried over by ``init_from_foundation`` (gene panel swap,
  covariate rows by name, new branches through zero weights), which reports what it did.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..config import ConfigError, RunConfig, load_config, resolve_paths, save_config, validate_config
from ..data.loader import build_loader
from ..errors import run_main
from ..outputs import OutputLock, check_output, read_marker, write_marker
from ..threads import configure_threads
from .. import distributed as pdist
from ..foundation import FOUNDATION_DIR, load_foundation
from .checkpoint import latest_step

PRETRAIN, FINETUNE = "pretrain", "finetune"
MODES = (PRETRAIN, FINETUNE)
# ModelConfig fields a fine-tune takes from its foundation (the backbone must match)
ARCH_FIELDS = ("size", "depth", "width", "heads", "mlp_ratio", "qk_norm", "self_condition", "cov_dim",
               "output_activation")


def apply_mode(cfg: RunConfig, mode: str, log=print) -> RunConfig:
    """Force the settings a mode implies (in place), saying which ones changed."""
    if mode not in MODES:
        raise ConfigError(f"unknown training mode {mode!r}; valid: {', '.join(MODES)}")
    if mode != PRETRAIN:
        return cfg
    changed = []
    if not cfg.data.include_controls:
        cfg.data.include_controls = True
        changed.append("data.include_controls=true")
    if cfg.diffusion.p_drop_control != 1.0:
        cfg.diffusion.p_drop_control = 1.0
        changed.append("diffusion.p_drop_control=1.0")
    if cfg.model.numeric_covariates:
        cfg.model.numeric_covariates = []
        changed.append("model.numeric_covariates=[]")
    if cfg.model.perturbation_encoding != "id":
        cfg.model.perturbation_encoding, cfg.model.perturbation_table = "id", None
        changed.append("model.perturbation_encoding=id")
    if changed:
        log(f"marginal pretraining: {', '.join(changed)}")
    return cfg


def model_vocabularies(loader, mode: str) -> dict[str, list[str]]:
    """The covariate vocabularies the model embeds (pretraining: no perturbation label)."""
    vocabs = {k: [str(c) for c in v] for k, v in loader.vocabularies.items()}
    if mode == PRETRAIN:
        vocabs.pop("perturbation", None)
    return vocabs


def resume_path(cfg: RunConfig) -> Path | None:
    how = cfg.train.resume
    if how == "never":
        return None
    if how == "auto":
        return latest_step(Path(cfg.out_dir) / "checkpoints")
    path = Path(how)
    if not path.is_dir():
        raise ConfigError(f"train.resume={how}: no such checkpoint directory")
    return path


def build_trainer(cfg: RunConfig, mode: str, init: str | None, info: pdist.DistInfo, log=print):
    """Loaders, model (fresh or from a foundation), engine and Trainer for this rank."""
    from ..models import build_model, load_perturbation_table
    from .engine import create_engine
    from .trainer import Trainer
    from .transfer import init_from_foundation

    quiet = log if info.rank == 0 else (lambda *a, **k: None)
    train = build_loader(cfg.data, "train", log=quiet)
    val = build_loader(cfg.data, "val", log=lambda *a, **k: None)
    genes, vocabs = [str(g) for g in train.gene_ids], model_vocabularies(train, mode)
    in_data = set(getattr(train, "numeric_names", None) or getattr(train, "group_numeric", {}))
    absent = [c for c in cfg.model.numeric_covariates if c not in in_data]
    if absent:  # no branch for a number the data do not have (it would only ever see its null token)
        cfg.model.numeric_covariates = [c for c in cfg.model.numeric_covariates if c not in absent]
        quiet(f"model.numeric_covariates: {absent} not in the data's numeric columns: no branch built for "
              f"{'it' if len(absent) == 1 else 'them'}")
    features = None
    if cfg.model.perturbation_encoding == "table":
        if not cfg.model.perturbation_table:
            raise ConfigError("model.perturbation_encoding=table needs model.perturbation_table")
        features = load_perturbation_table(cfg.model.perturbation_table, vocabs["perturbation"])
    if init:
        found = load_foundation(init)
        arch = {f: getattr(found.model_cfg, f) for f in ARCH_FIELDS}
        changed = [f"model.{f} {getattr(cfg.model, f)} -> {v}" for f, v in arch.items() if getattr(cfg.model, f) != v]
        cfg.model = dataclasses.replace(cfg.model, **arch)
        quiet(f"initialising from the foundation {init} ({found.mode or '?'}, "
              f"{found.model_cfg.size}, {len(found.genes)} genes); the backbone comes from it"
              + (f": {', '.join(changed)}" if changed else ""))
        model, _ = init_from_foundation(found, cfg.model, genes, vocabs, features, log=quiet)
    else:
        model = build_model(cfg.model, len(genes), {k: len(v) for k, v in vocabs.items()}, features)
    quiet(f"model: {cfg.model.size} MM-DiT, {model.num_parameters() / 1e6:.1f}M parameters, {len(genes)} genes; "
          f"engine {cfg.train.engine.backend}"
          + (f" ZeRO-{cfg.train.engine.zero_stage}" if cfg.train.engine.backend == "deepspeed" else "")
          + f" on {info.world} x {info.device.type}")
    engine = create_engine(model, cfg.train.engine, cfg.train.optim, cfg.train.max_steps, info.device,
                           micro_batch_sets=cfg.data.sets_per_batch)
    return Trainer(cfg, engine, train, val, genes=genes, vocabularies=vocabs, mode=mode, log=log)


def run(cfg: RunConfig, mode: str, init: str | None = None, log=print) -> dict:
    """The whole job on this rank; returns the training summary (rank 0's figures)."""
    apply_mode(cfg, mode, log)
    validate_config(cfg)  # also when the config was built in code, not loaded
    info = pdist.init_distributed(timeout_s=cfg.train.dist_timeout_s)
    configure_threads()  # the node's cores shared by its ranks (LOCAL_WORLD_SIZE; OMP_NUM_THREADS wins)
    trainer = lock = None
    try:
        pdist.seed_everything(cfg.train.seed, info.rank)
        if info.rank == 0:
            lock = claim_run_dir(cfg, init)
        trainer = build_trainer(cfg, mode, init, info, log)
        if info.rank == 0:  # after build_trainer: --init's architecture and the data's covariates are in cfg
            save_config(cfg, cfg.out_dir)
        path = resume_path(cfg)
        if path is not None:
            trainer.resume(path)
        summary = trainer.fit()
        if cfg.train.export:
            trainer.export_foundation(Path(cfg.out_dir) / FOUNDATION_DIR)
        return summary
    finally:
        if trainer is not None:
            trainer.close()
        if lock is not None:
            lock.release()
        pdist.cleanup()


def claim_run_dir(cfg: RunConfig, init: str | None) -> OutputLock:
    """Rank 0, before any work: ``out_dir`` must be new, empty or an earlier run (which is resumed),
    never an input (perturbdiff.outputs); it is marked as a run and locked for this job."""
    stores = cfg.data.stores or [cfg.data.store]  # data.store is unused when data.stores is given
    out = check_output(cfg.out_dir, "run", inputs=[*stores, init], replaces=False)
    lock = OutputLock(out, "training run directory").acquire()
    if read_marker(out) is None:
        write_marker(out, "run")
    return lock


def main(mode: str, argv: list[str] | None = None) -> int:
    """Command-line entry of the launch scripts; returns the exit status."""
    parser = argparse.ArgumentParser(prog=f"launch/{mode}.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="YAML preset (repeatable, merged in order)")
    if mode == FINETUNE:
        parser.add_argument("--init", default=None, help="foundation checkpoint directory to start from")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher (LOCAL_RANK is read from the environment)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    result: dict = {}

    def job() -> None:
        cfg = resolve_paths(load_config(args.config, args.overrides))
        result.update(run(cfg, mode, getattr(args, "init", None)), out_dir=cfg.out_dir)

    status = run_main(mode, job)
    if status == 0 and pdist.get_rank() == 0:
        print(f"{mode}: {result['step']} steps in {result['seconds']:.1f}s, {result['cells_per_s']:,.0f} cells/s "
              f"on this rank; outputs in {result['out_dir']}")
    return status
