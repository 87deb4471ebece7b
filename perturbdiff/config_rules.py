"""The rule every config value must follow, checked when a config is loaded.

Why: a bad value used to surface only when the code reading it ran, sometimes after training had
started (keep_last=0 failed at the first checkpoint rotation), or never (max_steps=-5 exported an
untrained model, lr=0 trained nothing). ``load_config`` runs :func:`validate_config` on the merged
result, and code that builds a RunConfig by hand can call it too, so every such value is one
ConfigError line naming the dotted key, the value and the rule before any work starts, e.g.
``train.max_steps=-5: must be an integer >= 1``.

- ``RULES``: dotted key -> rule, for every numeric or fixed-choice leaf of RunConfig. Each bound
  follows the field's meaning (see its comment in config.py): sizes, steps and counts >= 1, the
  "0 = off / never" fields >= 0, probabilities in [0, 1], and so on.
- ``FREE``: the leaves that take any value of their type (names, paths, labels, column names).
  tests/test_config_rules.py walks every leaf of RunConfig and fails on one in neither, so a new
  field cannot go unchecked by accident. Booleans need neither: their type is their rule.
- ``CROSS_RULES``: the cheap checks that relate two fields (sample_steps <= diffusion.steps, ...).

An ``Optional[...]`` field may be None; its rule applies to any other value. The rules are pure
Python (no torch, no zarr): the choices that mirror a constant of a heavier module (model sizes,
kernels, compressors, ...) are checked against it by a test instead of imported here.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .config import EVAL_METHODS, STARTS, ConfigError, HoldoutRule, RunConfig
from .data.schema import VALUE_KINDS

# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def show(value: Any) -> str:
    """A value as the error line writes it: strings quoted, everything else as Python prints it."""
    return repr(value) if isinstance(value, str) else str(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Rule:
    """A check of one value; ``problems`` yields ``(suffix, value, rule text)`` for each violation
    (the suffix is "" for the value itself, "[i]" for a list element)."""

    def problems(self, value: Any) -> Iterator[tuple[str, Any, str]]:
        raise NotImplementedError


@dataclass(frozen=True)
class Integer(Rule):
    """An int (not a bool) in [lo, hi]; None leaves that side open."""

    lo: int | None = None
    hi: int | None = None

    def text(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"an integer in [{self.lo}, {self.hi}]"
        if self.lo is not None:
            return f"an integer >= {self.lo}"
        return f"an integer <= {self.hi}" if self.hi is not None else "an integer"

    def problems(self, value):
        ok = _is_int(value) and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)
        if not ok:
            yield "", value, f"must be {self.text()}"


@dataclass(frozen=True)
class Number(Rule):
    """A finite int or float between lo and hi, each bound closed unless marked open."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def text(self) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            return f"a number in {'(' if self.lo_open else '['}{lo:g}, {hi:g}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"a number {'>' if self.lo_open else '>='} {lo:g}"
        if hi is not None:
            return f"a number {'<' if self.hi_open else '<='} {hi:g}"
        return "a finite number"

    def problems(self, value):
        ok = _is_number(value)
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            yield "", value, f"must be {self.text()}"


@dataclass(frozen=True)
class Choice(Rule):
    """One of a fixed set of values (compared with their type: True is not the stage 1)."""

    values: tuple[Any, ...]

    def problems(self, value):
        if not any(type(value) is type(c) and value == c for c in self.values):
            yield "", value, "must be one of " + " | ".join(str(c) for c in self.values)


@dataclass(frozen=True)
class Text(Rule):
    """A non-empty string (a path or a name that an empty string would silently turn into '.')."""

    what: str = "string"

    def problems(self, value):
        if not isinstance(value, str) or not value.strip():
            yield "", value, f"must be a non-empty {self.what}"


@dataclass(frozen=True)
class Each(Rule):
    """A list whose every element follows ``item``; optionally of a fixed length, or distinct."""

    item: Rule
    length: int | None = None
    distinct: bool = False

    def problems(self, value):
        if not isinstance(value, (list, tuple)):
            yield "", value, "must be a list"
            return
        if self.length is not None and len(value) != self.length:
            yield "", list(value), f"must be a list of {self.length} values"
            return
        for i, element in enumerate(value):
            for suffix, bad, text in self.item.problems(element):
                yield f"[{i}]{suffix}", bad, text
        if self.distinct:
            seen = set()
            for i, element in enumerate(value):
                if element in seen:
                    yield f"[{i}]", element, "must not repeat an earlier element"
                seen.add(element)


@dataclass(frozen=True)
class NamesSomething(Rule):
    """A holdout rule with at least one non-empty list: an empty one would hold out every group."""

    def problems(self, value):
        if not isinstance(value, HoldoutRule):
            yield "", value, "must be a holdout rule {contexts, batches, perturbations}"
        elif not (value.contexts or value.batches or value.perturbations):
            yield "", {}, "must name at least one context, batch or perturbation (an empty rule holds out everything)"


# Shorthands for the table below.
POSITIVE_INT = Integer(1)  # sizes, steps, counts
COUNT = Integer(0)  # counts where 0 means "none" / "off" / "never"
SEED = Integer(0)  # numpy generators reject negative seeds
POSITIVE = Number(0, lo_open=True)
NON_NEGATIVE = Number(0)
PROBABILITY = Number(0, 1)
FRACTION = Number(0, 1, hi_open=True)  # [0, 1): 1 would leave nothing on the other side
SPLIT_NAME = Choice(("train", "val", "test"))

# Choices that mirror a constant elsewhere (tests/test_config_rules.py keeps them equal):
MODEL_SIZES = ("tiny", "small", "paper", "large", "xl")  # perturbdiff/models/presets.py PRESETS
COMPRESSORS = ("none", "lz4", "zstd")  # data_sharding/writer.py COMPRESSORS
SCHEDULES = ("linear", "cosine")  # perturbdiff/diffusion/schedule.py
KERNELS = ("energy", "gaussian", "laplacian")  # perturbdiff/ops/kme_reference.py
KME_IMPLS = ("auto", "triton", "torch")  # perturbdiff/ops/kme.py IMPLS
ENCODINGS = ("id", "table")  # perturbdiff/models/covariates.py
OUTPUT_ACTIVATIONS = ("relu", "none")  # perturbdiff/models/mmdit.py
BACKENDS = ("ddp", "deepspeed")  # perturbdiff/train/engine.py BACKEND_NAMES
PRECISIONS = ("auto", "fp32", "bf16")  # perturbdiff/train/engine.py
PROFILES = ("full", "paper", "vcc", "minimal")  # perturbdiff/eval/schema.py PROFILES
DECODES = ("counts", "continuous")  # perturbdiff/decode.py DECODES
SHARD_SOURCES = ("tahoe", "h5ad")  # data_sharding/convert.py SOURCES
HVG_FLAVORS = ("seurat_v3", "dispersion")  # data_sharding/hvg.py FLAVORS
SAMPLINGS = ("proportional", "balanced")  # perturbdiff/data/sampler.py SAMPLINGS
EMPTY_POOL_POLICIES = ("error", "same_context", "none")  # perturbdiff/data/sampler.py EMPTY_POOL_POLICIES
PANEL_KINDS = ("hvg", "all", "file")  # perturbdiff/data/store.py PANEL_KINDS
RESPACINGS = ("uniform", "released")  # perturbdiff/diffusion/schedule.py RESPACINGS
MISSING_GENES = ("error", "zero")  # perturbdiff/predict/controls.py MISSING_GENES

RULES: dict[str, Rule] = {
    # run
    "out_dir": Text("path"),
    # synth: a synthetic Tahoe-format dataset
    "synth.num_cells": POSITIVE_INT,
    "synth.num_genes": POSITIVE_INT,
    "synth.num_cell_lines": POSITIVE_INT,
    "synth.num_drugs": COUNT,  # 0: a controls-only dataset
    "synth.doses": Each(POSITIVE, distinct=True),  # the control has dose 0
    "synth.num_plates": POSITIVE_INT,
    "synth.num_programs": POSITIVE_INT,
    "synth.control_wells_per_plate": COUNT,
    "synth.cells_per_file": POSITIVE_INT,
    "synth.row_group_size": POSITIVE_INT,
    "synth.mean_library_size": POSITIVE,
    "synth.library_size_sigma": NON_NEGATIVE,  # a log-normal spread
    "synth.dispersion": POSITIVE,  # negative-binomial theta
    "synth.effect_scale": NON_NEGATIVE,
    "synth.plate_shift_scale": NON_NEGATIVE,  # standard deviations
    "synth.well_shift_scale": NON_NEGATIVE,
    "synth.seed": SEED,
    "synth.num_workers": POSITIVE_INT,
    # shard: conversion into a store
    "shard.source": Choice(SHARD_SOURCES),
    "shard.values": Choice(("auto", *VALUE_KINDS)),
    "shard.max_count": POSITIVE,
    "shard.cells_per_part": POSITIVE_INT,
    "shard.part_nnz": POSITIVE_INT,
    "shard.num_workers": POSITIVE_INT,
    "shard.chunk_nnz": POSITIVE_INT,
    "shard.shard_nnz": POSITIVE_INT,
    "shard.chunk_cells": POSITIVE_INT,
    "shard.block_cells": POSITIVE_INT,
    "shard.block_nnz": POSITIVE_INT,
    "shard.compressor": Choice(COMPRESSORS),
    "shard.hvg.num_top_genes": POSITIVE_INT,
    "shard.hvg.flavor": Choice(HVG_FLAVORS),
    "shard.hvg.num_bins": POSITIVE_INT,
    # data: reading sets
    "data.set_size": POSITIVE_INT,
    "data.sets_per_batch": POSITIVE_INT,
    "data.sampling": Choice(SAMPLINGS),
    "data.sets_per_group": POSITIVE_INT,
    "data.run_cells": POSITIVE_INT,
    "data.empty_control_pool": Choice(EMPTY_POOL_POLICIES),
    "data.split.test": Each(NamesSomething()),
    "data.split.val": Each(NamesSomething()),
    "data.split.random_val_fraction": FRACTION,
    "data.split.seed": SEED,
    "data.panel.kind": Choice(PANEL_KINDS),
    "data.panel.num_genes": POSITIVE_INT,
    "data.normalize.target_sum": POSITIVE,
    "data.normalize.scale": POSITIVE,
    "data.num_workers": COUNT,  # 0: load in the main process
    "data.seed": SEED,
    # wds / stream
    "wds.split": SPLIT_NAME,
    "wds.epochs": POSITIVE_INT,
    "wds.sets_per_shard": POSITIVE_INT,
    "stream.num_batches": POSITIVE_INT,
    "stream.split": SPLIT_NAME,
    # model
    "model.size": Choice(MODEL_SIZES),
    "model.depth": POSITIVE_INT,
    "model.width": POSITIVE_INT,
    "model.heads": POSITIVE_INT,
    "model.mlp_ratio": POSITIVE,
    "model.dropout": FRACTION,
    "model.cov_dim": POSITIVE_INT,
    "model.perturbation_encoding": Choice(ENCODINGS),
    "model.numeric_covariates": Each(Text("name"), distinct=True),
    "model.output_activation": Choice(OUTPUT_ACTIVATIONS),
    # diffusion
    "diffusion.schedule": Choice(SCHEDULES),
    "diffusion.steps": Integer(2),  # NoiseSchedule needs two timesteps
    "diffusion.beta_start": Number(0, 1, lo_open=True, hi_open=True),
    "diffusion.beta_end": Number(0, 1, lo_open=True, hi_open=True),
    "diffusion.p_self_cond": PROBABILITY,
    "diffusion.p_drop_cond": PROBABILITY,
    "diffusion.p_drop_control": PROBABILITY,
    "diffusion.mmd_weight": NON_NEGATIVE,  # 0: the MMD term is off
    "diffusion.kernel": Choice(KERNELS),
    "diffusion.bandwidths": Each(POSITIVE),
    "diffusion.kme_impl": Choice(KME_IMPLS),
    "diffusion.sample_steps": POSITIVE_INT,
    "diffusion.respacing": Choice(RESPACINGS),
    "diffusion.start": Choice(STARTS),
    "diffusion.guidance": NON_NEGATIVE,  # w = 0: the conditional model alone
    "diffusion.cutoff": NON_NEGATIVE,  # expression is non-negative
    "diffusion.x0_max": POSITIVE,  # None: from data.normalize (the largest attainable value)
    # train
    "train.max_steps": POSITIVE_INT,
    "train.log_every": POSITIVE_INT,
    "train.val_every": COUNT,  # 0 = never
    "train.val_batches": POSITIVE_INT,
    "train.sample_every": COUNT,  # 0 = never
    "train.sample_batches": POSITIVE_INT,
    "train.sample_steps": POSITIVE_INT,
    "train.ckpt_every": COUNT,  # 0 = only at the end
    "train.keep_last": POSITIVE_INT,
    "train.resume": Text("value (auto, never or a checkpoint directory)"),
    "train.dist_timeout_s": POSITIVE,
    "train.seed": SEED,
    "train.optim.lr": POSITIVE,
    "train.optim.betas": Each(FRACTION, length=2),
    "train.optim.weight_decay": NON_NEGATIVE,
    "train.optim.warmup_steps": COUNT,
    "train.optim.min_lr_ratio": PROBABILITY,
    "train.optim.grad_clip": NON_NEGATIVE,  # 0 = off
    "train.optim.ema_decay": FRACTION,  # the EMA rejects 1 (its average would never move)
    "train.optim.ema_every": COUNT,  # 0 = no EMA
    "train.engine.backend": Choice(BACKENDS),
    "train.engine.zero_stage": Choice((1, 2, 3)),
    "train.engine.precision": Choice(PRECISIONS),
    "train.engine.grad_accum": POSITIVE_INT,
    # pipeline
    "pipeline.pretrain_steps": COUNT,  # 0 = fine-tune from scratch
    "pipeline.finetune_steps": POSITIVE_INT,
    "pipeline.pretrain_lr": POSITIVE,
    # predict (perturbdiff predict, the pipeline's predict stage)
    "predict.n_cells": POSITIVE_INT,
    "predict.n_samples": POSITIVE_INT,
    "predict.sets_per_batch": POSITIVE_INT,
    "predict.sample_steps": POSITIVE_INT,
    "predict.guidance": NON_NEGATIVE,
    "predict.max_controls": POSITIVE_INT,
    "predict.train_cells": COUNT,  # 0: no training cells for the baselines
    "predict.max_cells": POSITIVE_INT,
    "predict.missing_genes": Choice(MISSING_GENES),
    "predict.decode": Choice(DECODES),
    "predict.start": Choice(STARTS),
    "predict.seed": SEED,
    # evaluate (perturbdiff evaluate, the pipeline's evaluate stage)
    "evaluate.profile": Choice(PROFILES),
    "evaluate.de_fdr": Number(0, 1, lo_open=True),
    "evaluate.methods": Each(Choice(EVAL_METHODS), distinct=True),
    "evaluate.cap": POSITIVE_INT,
    "evaluate.seed": SEED,
}

# Leaves that take any value of their type: names, paths, labels, column names.
FREE: frozenset[str] = frozenset({
    "name", "synth.out_dir",
    "shard.inputs", "shard.metadata_dir", "shard.out", "shard.dataset", "shard.perturbation_col",
    "shard.context_col", "shard.batch_col", "shard.control_label", "shard.cell_id_col", "shard.extra_obs",
    "shard.gene_symbol_col", "shard.control_drug",
    "data.store", "data.stores", "data.panel.genes_file", "pipeline.test_h5ad",
    "predict.control_label", "predict.device", "evaluate.control_label", "evaluate.pert_col", "evaluate.context_col",
    "evaluate.batch_col",
    "wds.out", "model.perturbation_table",
})


# ---------------------------------------------------------------------------------------------
# Cross-field rules: each takes the config and yields one error line per violation
# ---------------------------------------------------------------------------------------------


def _sample_steps_within_steps(cfg: RunConfig) -> Iterator[str]:
    """A sampler visits at most diffusion.steps timesteps (respaced_timesteps)."""
    steps = cfg.diffusion.steps
    for key, value in (("diffusion.sample_steps", cfg.diffusion.sample_steps),
                       ("train.sample_steps", cfg.train.sample_steps),
                       ("predict.sample_steps", cfg.predict.sample_steps)):
        if _is_int(value) and _is_int(steps) and value > steps:
            yield f"{key}={value}: must be <= diffusion.steps ({steps})"


def _betas_ordered(cfg: RunConfig) -> Iterator[str]:
    """The linear schedule runs from beta_start up to beta_end; the scaled end must stay below 1."""
    d = cfg.diffusion
    if not (_is_number(d.beta_start) and _is_number(d.beta_end)):
        return
    if d.beta_start >= d.beta_end:
        yield f"diffusion.beta_start={d.beta_start}: must be < diffusion.beta_end ({d.beta_end})"
    elif d.schedule == "linear" and _is_int(d.steps) and d.steps >= 2 and d.beta_end * 1000 / d.steps >= 1:
        yield (f"diffusion.beta_end={d.beta_end}: the linear schedule scales betas by 1000 / diffusion.steps "
               f"({d.steps}), so it must be < {d.steps / 1000:g}")


def _named_inputs(cfg: RunConfig) -> Iterator[str]:
    """Options that read a file need that file named."""
    if cfg.data.panel.kind == "file" and not cfg.data.panel.genes_file:
        yield f"data.panel.genes_file={show(cfg.data.panel.genes_file)}: must be set when data.panel.kind=file"
    if cfg.model.perturbation_encoding == "table" and not cfg.model.perturbation_table:
        yield (f"model.perturbation_table={show(cfg.model.perturbation_table)}: must be set when "
               "model.perturbation_encoding=table")


def _kernel_bandwidths(cfg: RunConfig) -> Iterator[str]:
    """The Gaussian and Laplacian kernels sum over bandwidths; the energy kernel has none."""
    d = cfg.diffusion
    if d.kernel in ("gaussian", "laplacian") and isinstance(d.bandwidths, (list, tuple)) and not d.bandwidths:
        yield f"diffusion.bandwidths=[]: must not be empty when diffusion.kernel={d.kernel}"


def _model_shape(cfg: RunConfig) -> Iterator[str]:
    """Attention splits the width over the heads (checked here when both are given explicitly;
    resolve_size checks a preset's value against an explicit one)."""
    m = cfg.model
    if _is_int(m.width) and _is_int(m.heads) and m.heads >= 1 and m.width % m.heads:
        yield f"model.width={m.width}: must be divisible by model.heads ({m.heads})"


def _engine(cfg: RunConfig) -> Iterator[str]:
    """CPU optimizer offload is a ZeRO feature."""
    e = cfg.train.engine
    if e.offload_optimizer and e.backend != "deepspeed":
        yield ("train.engine.offload_optimizer=True: needs train.engine.backend=deepspeed (ZeRO-Offload), "
               f"not {e.backend}")


def _synth_wells(cfg: RunConfig) -> Iterator[str]:
    """Drugs need doses, and every synthetic plate needs at least one well."""
    s = cfg.synth
    if not (_is_int(s.num_drugs) and _is_int(s.control_wells_per_plate) and isinstance(s.doses, (list, tuple))):
        return
    if s.num_drugs > 0 and not s.doses:
        yield f"synth.doses=[]: must not be empty when synth.num_drugs={s.num_drugs}"
    elif s.num_drugs * len(s.doses) + s.control_wells_per_plate < 1:
        yield "synth.control_wells_per_plate=0: must be >= 1 when synth.num_drugs=0 (a plate needs a well)"


CROSS_RULES: tuple[Callable[[RunConfig], Iterator[str]], ...] = (
    _sample_steps_within_steps, _betas_ordered, _named_inputs, _kernel_bandwidths, _model_shape, _engine,
    _synth_wells,
)


# ---------------------------------------------------------------------------------------------
# Walking the config
# ---------------------------------------------------------------------------------------------


def leaf_fields(schema: type = RunConfig, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> type hint of every leaf of the dataclass ``schema`` (nested dataclasses are
    walked; a list of dataclasses, like data.split.test, is one leaf)."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        hint = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            out.update(leaf_fields(hint, key + "."))
        else:
            out[key] = hint
    return out


def is_optional(hint: Any) -> bool:
    """Whether the type hint admits None (``Optional[X]``, ``X | None``)."""
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


LEAVES: dict[str, Any] = leaf_fields(RunConfig)


def get_value(cfg: Any, key: str) -> Any:
    """The value at a dotted key."""
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def config_problems(cfg: RunConfig) -> list[str]:
    """One line per violated rule: ``<key>=<value>: <rule>``, in table order, then the cross rules
    (which only run when every single-field rule holds, so they can trust the types and bounds)."""
    problems = []
    for key, rule in RULES.items():
        value = get_value(cfg, key)
        if value is None and is_optional(LEAVES[key]):
            continue
        problems += [f"{key}{suffix}={show(bad)}: {text}" for suffix, bad, text in rule.problems(value)]
    if problems:
        return problems
    return [line for check in CROSS_RULES for line in check(cfg)]


def validate_config(cfg: RunConfig) -> RunConfig:
    """Check every value of ``cfg`` against RULES and CROSS_RULES; returns cfg.

    Raises:
        ConfigError: one line naming every bad key with its value and rule, e.g.
            ``train.max_steps=-5: must be an integer >= 1`` (several are joined by "; ").
    """
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg
