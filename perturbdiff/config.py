"""Typed configuration: dataclass schemas, YAML presets from configs/, command-line dotlist overrides.

``load_config(["configs/demo.yaml"], ["data.set_size=64"])`` merges, in order, the dataclass
defaults, each YAML file, then the overrides, in OmegaConf struct mode, so an unknown or misspelled
key is an error that names it; then every value is checked against its rule (config_rules.py), so a
bad one (``train.max_steps=-5``) is an error naming the key before anything runs. Library code
receives plain dataclasses (``RunConfig``), never a ``DictConfig``. Strings are literal: OmegaConf
interpolation (``${...}``) and its missing-value marker (``???``) are not interpreted in user input,
so a label may be any text. ``save_config`` writes the resolved config next to an output.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

# ---------------------------------------------------------------------------------------------
# Synthetic data (the embedded default)
# ---------------------------------------------------------------------------------------------


@dataclass
class SynthConfig:
    """A synthetic Tahoe-format dataset with known effects (see data_sharding/synthetic/)."""

    out_dir: Optional[str] = None  # default: <run out_dir>/source
    num_cells: int = 20_000
    num_genes: int = 2_000
    num_cell_lines: int = 6
    num_drugs: int = 12
    doses: list[float] = field(default_factory=lambda: [0.05, 0.5, 5.0])
    num_plates: int = 3
    num_programs: int = 16  # gene programs (co-regulated gene modules)
    control_wells_per_plate: int = 4  # DMSO_TF wells on every plate
    cells_per_file: int = 5_000  # one parquet shard per this many cells
    row_group_size: int = 1_024
    mean_library_size: float = 2_500.0  # mean total UMI per cell
    library_size_sigma: float = 0.35  # log-normal spread of library sizes
    dispersion: float = 4.0  # negative-binomial inverse dispersion (theta)
    effect_scale: float = 1.0  # drug effect size on the log scale
    plate_shift_scale: float = 0.25  # hidden plate-level shift of program activities
    well_shift_scale: float = 0.1  # hidden well-level shift
    seed: int = 0
    num_workers: int = 1
    write_h5ad: bool = False  # also write synthetic.h5ad with the same cells


# ---------------------------------------------------------------------------------------------
# Conversion to the store
# ---------------------------------------------------------------------------------------------


@dataclass
class HVGConfig:
    num_top_genes: int = 2_000
    flavor: str = "seurat_v3"  # seurat_v3 (raw-count variance after loess fit) | dispersion (seurat)
    num_bins: int = 20  # dispersion flavor: mean bins


@dataclass
class ShardConfig:
    """Conversion of a source dataset into a PerturbDiff store."""

    source: str = "tahoe"  # tahoe | h5ad
    inputs: list[str] = field(default_factory=list)  # parquet directory / files, or h5ad files
    metadata_dir: Optional[str] = None  # tahoe: directory with gene/sample metadata (default inputs/../metadata)
    out: Optional[str] = None  # the store directory (default: <run out_dir>/store.zarr)
    dataset: str = "dataset"  # dataset name recorded in the manifest
    # h5ad column mapping (tahoe uses its fixed schema)
    perturbation_col: str = "perturbation"
    context_col: Optional[str] = "cell_type"  # None: one context for the whole file
    batch_col: Optional[str] = None  # None: one batch for the whole file
    control_label: str = "control"
    cell_id_col: Optional[str] = None  # None: obs_names
    extra_obs: list[str] = field(default_factory=list)  # further obs columns to keep
    gene_symbol_col: Optional[str] = None  # var column with symbols (None: var_names)
    values: str = "auto"  # auto | counts | lognorm
    max_count: float = 1.0e7  # a raw count above this (one gene in one cell) is implausible: an error
    # tahoe
    control_drug: str = "DMSO_TF"
    # layout
    # Conversion unit, bounding memory per worker: a part holds at most cells_per_part cells and
    # (beyond its first row group / row) part_nnz nonzeros.
    cells_per_part: int = 200_000
    part_nnz: int = 1 << 24
    num_workers: int = 2
    chunk_nnz: int = 1 << 15  # Zarr chunk of X/indices and X/data (~ a run of cells; see data.run_cells)
    shard_nnz: int = 1 << 24  # Zarr shard (file) of X/indices and X/data
    chunk_cells: int = 1 << 16  # Zarr chunk of per-cell arrays
    block_cells: int = 1 << 18  # cells assembled per merge step (bounds merge memory) ...
    block_nnz: int = 1 << 25  # ... and nonzeros per merge step
    # X and per-cell arrays: none reads fastest (exact byte ranges, ~40x the reference's per-row
    # HDF5 reads); lz4 halves the store for ~4x; zstd is smallest. See docs/benchmarks.md.
    compressor: str = "none"
    hvg: HVGConfig = field(default_factory=HVGConfig)
    keep_work: bool = False  # keep the per-part intermediates after success


# ---------------------------------------------------------------------------------------------
# Reading: splits, sampling, normalisation, loader
# ---------------------------------------------------------------------------------------------


@dataclass
class HoldoutRule:
    """Groups matching every non-empty field are held out (an empty list matches anything).

    PBMC protocol: batches=[Donor1, ...], perturbations=[62 cytokines]. Tahoe: contexts=[5 lines],
    perturbations=[...]. Unseen perturbation: perturbations only. Unseen context: contexts only.
    Held-out batch: batches only.
    """

    contexts: list[str] = field(default_factory=list)
    batches: list[str] = field(default_factory=list)
    perturbations: list[str] = field(default_factory=list)


@dataclass
class SplitConfig:
    test: list[HoldoutRule] = field(default_factory=list)
    val: list[HoldoutRule] = field(default_factory=list)
    # Also hold out this fraction of the remaining (context, perturbation) pairs at random, for val.
    random_val_fraction: float = 0.0
    seed: int = 0
    # A rule naming a context / batch / perturbation absent from the store is an error (typos);
    # with strict=false it is only reported (paper lists applied to a subset of the data).
    strict: bool = True


@dataclass
class NormalizeConfig:
    """On-read normalisation: x -> log1p(x / total_counts * target_sum) / scale."""

    target_sum: float = 1e4
    log1p: bool = True
    scale: float = 10.0


@dataclass
class PanelConfig:
    kind: str = "hvg"  # hvg (top num_genes of the store's ranking) | all | file
    num_genes: int = 2_000
    genes_file: Optional[str] = None  # kind=file: one gene id or symbol per line


@dataclass
class DataConfig:
    store: Optional[str] = None  # default: shard.out
    # Several stores trained as one (marginal pretraining over datasets): the union of their gene
    # panels is the model's gene vocabulary, genes a dataset lacks are masked out of the loss, and
    # the covariate vocabularies are merged (see perturbdiff/data/multi.py). Empty: just ``store``.
    stores: list[str] = field(default_factory=list)
    set_size: int = 256  # m cells per set (perturbed), and m control cells
    sets_per_batch: int = 4
    sampling: str = "proportional"  # proportional (every cell once per epoch) | balanced
    sets_per_group: int = 2  # balanced: sets drawn from every group each epoch
    # Sets (and control sets) are drawn as random runs of this many store-adjacent cells. The
    # converter shuffles cells within each group, so a run is a random sample of its group; runs
    # make a set a few contiguous reads instead of m scattered ones. 1 = fully independent cells.
    run_cells: int = 32
    # control groups are also targets (forced in marginal pretraining). On by default in fine-tuning too: the
    # model then learns every context's "no perturbation" population from its controls, so a context without
    # training perturbations (an unseen cell type) is still met in fine-tuning. Off, the devel h5ad's unseen
    # U87MG came out shrunk to other lines' level (mae 0.37 vs 0.14 on, docs/benchmarks.md)
    include_controls: bool = True
    empty_control_pool: str = "same_context"  # error | same_context | none (zero-size, masked)
    split: SplitConfig = field(default_factory=SplitConfig)
    panel: PanelConfig = field(default_factory=PanelConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    num_workers: int = 0
    drop_last: bool = True  # equal sets per rank (avoids end-of-epoch collective hangs)
    # Full checksum pass over the store(s) before training or streaming (every array re-hashed
    # against the manifest: ~20M nonzeros/s, so hours at Tahoe scale). Cheap structural checks run
    # at every open and every read regardless (perturbdiff/data/integrity.py).
    verify_on_open: bool = False
    seed: int = 0


@dataclass
class WdsConfig:
    out: Optional[str] = None  # default: <run out_dir>/wds
    split: str = "train"
    epochs: int = 1  # sampler epochs exported
    sets_per_shard: int = 64


@dataclass
class StreamConfig:
    """The throughput check of the main job."""

    num_batches: int = 50
    split: str = "train"


# ---------------------------------------------------------------------------------------------
# Model and diffusion
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The MM-DiT denoiser. ``size`` picks a preset (perturbdiff/models/presets.py); the explicit
    depth / width / heads below override it when set."""

    size: str = "tiny"  # tiny | small | paper | large | xl
    depth: Optional[int] = None
    width: Optional[int] = None
    heads: Optional[int] = None
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    dropout: float = 0.0
    cov_dim: int = 128  # width of each covariate branch before they are combined
    # Perturbation representation: "id" (a learned embedding per perturbation in the vocabulary) or
    # "table" (a fixed feature vector per perturbation from perturbation_table, projected by an MLP,
    # so perturbations unseen in training but present in the table can be predicted).
    perturbation_encoding: str = "id"
    perturbation_table: Optional[str] = None  # .parquet: a "perturbation" column + numeric feature columns
    numeric_covariates: list[str] = field(default_factory=lambda: ["dose"])  # batch keys num_<name>
    log_numeric: bool = True  # numeric covariates enter as log1p(value) (doses span orders of magnitude)
    output_activation: str = "relu"  # relu | none
    self_condition: bool = True  # gene input is [x_t, previous x0] (2G wide)


STARTS = ("controls", "noise")  # diffusion.start


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear (betas beta_start..beta_end, scaled by 1000/T) | cosine
    steps: int = 1000  # T
    beta_start: float = 1e-4
    beta_end: float = 0.02
    p_self_cond: float = 0.5  # per set
    # covariates dropped for classifier-free guidance, per set. The paper's 0.5 collapsed the responses at
    # CPU budgets (docs/benchmarks.md: pearson_delta 0.12 at 0.5 vs 0.26 at 0.1, 600 steps)
    p_drop_cond: float = 0.1
    p_drop_control: float = 0.0  # control stream dropped, per set (1.0 for marginal pretraining)
    mmd_weight: float = 1.0  # lambda
    kernel: str = "energy"  # energy | gaussian | laplacian
    bandwidths: list[float] = field(default_factory=lambda: [1.0])  # gaussian / laplacian, in RMS-per-gene units
    mmd_unbiased: bool = False
    kme_impl: str = "auto"  # auto | triton | torch
    # Sampling
    sample_steps: int = 100  # K respaced DDIM steps from t = T
    respacing: str = "uniform"  # uniform (T-1 .. 0 over K steps) | released (the released code's t = K-1 .. 0)
    # w: eps = (1 + w) eps_cond - w eps_uncond (0: plain conditional sampling, one forward per step).
    # 0.5 decided on the quality benchmark (docs/benchmarks.md; from the controls, 4 splits x 3 seeds):
    # higher normalised score and pearson_delta on 3 of 4 splits (equal on the 4th), response size nearer the real one,
    # energy distance mixed. From noise the paper's w = 1 made responses 1.8-1.9x too large.
    guidance: float = 0.5
    # where a generated population starts: controls = each cell a real control cell of its context plus
    # the model's response for it (a diffusion bridge, diffusion/sampler.py); noise = pure noise (the paper)
    start: str = "controls"
    cutoff: float = 1e-4  # predicted x0 below this is set to 0
    # predicted x0 above this is set to it (the model's scale); None: the largest value the data's
    # normalisation can produce, log1p(target_sum) / scale (one gene holding all of a cell's counts)
    x0_max: Optional[float] = None


# ---------------------------------------------------------------------------------------------
# Training runtime
# ---------------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    weight_decay: float = 0.01  # never on norms, biases and embeddings
    warmup_steps: int = 200
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio at train.max_steps
    grad_clip: float = 1.0  # 0 = off
    ema_decay: float = 0.99
    ema_every: int = 10  # optimizer steps between EMA updates (0 = no EMA)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) at the n-th update (see train/optim.py)


@dataclass
class EngineConfig:
    """How the model is trained across processes; the DeepSpeed JSON is generated from this."""

    backend: str = "ddp"  # ddp (torch DistributedDataParallel, or plain on one process) | deepspeed
    zero_stage: int = 2  # deepspeed: 1, 2 or 3
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    grad_accum: int = 1  # micro-batches per optimizer step
    activation_checkpointing: bool = False
    offload_optimizer: bool = False  # deepspeed: optimizer state on the CPU


@dataclass
class TrainConfig:
    """The training loop (perturbdiff/train/trainer.py). A step is one optimizer step over
    ``engine.grad_accum`` loader batches of ``data.sets_per_batch`` sets on every rank."""

    max_steps: int = 1_000  # optimizer steps
    log_every: int = 10  # TensorBoard scalars, progress line and metrics.jsonl
    val_every: int = 500  # validation loss on the held-out split (0 = never)
    val_batches: int = 8  # batches per rank per validation (at most; equal on every rank)
    sample_every: int = 1_000  # sampling metrics on a fixed validation subset (0 = never)
    sample_batches: int = 1  # batches per rank of that subset
    sample_steps: int = 20  # DDIM steps while validating (diffusion.sample_steps is for prediction)
    ckpt_every: int = 500  # resumable checkpoint (0 = only at the end)
    keep_last: int = 3  # resumable checkpoints kept
    resume: str = "auto"  # auto (latest checkpoint under out_dir/checkpoints, if any) | never | <checkpoint dir>
    export: bool = True  # write the consolidated foundation checkpoint (out_dir/foundation) at the end
    dist_timeout_s: float = 600.0  # a collective waiting longer (a dead peer) fails instead of hanging
    progress: bool = True  # a progress line with ETA on rank 0
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# training cells per group sampled to train.h5ad for the baselines (predict.train_cells)
BASELINE_TRAIN_CELLS = 256
# the evaluation's methods (perturbdiff/eval/schema.py METHODS is this tuple)
EVAL_METHODS = ("model", "control_mean", "perturbation_mean", "linear", "latent_shift", "ceiling")


@dataclass
class PredictConfig:
    """Prediction: ``perturbdiff predict`` (its flags are aliases of these keys: --n-samples is
    predict.n_samples) and the pipeline's predict stage. The pipeline seeds it with train.seed."""

    n_cells: int = 256  # per population, when a condition does not say
    n_samples: int = 3  # populations per condition, when a condition does not say (calibration needs >= 2)
    sets_per_batch: int = 16
    sample_steps: Optional[int] = None  # DDIM steps; None: the checkpoint's diffusion.sample_steps
    guidance: Optional[float] = None  # None: the checkpoint's diffusion.guidance
    max_controls: int = 2_000  # real control cells per context appended to the outputs
    train_cells: int = BASELINE_TRAIN_CELLS  # > 0: with a split, this many cells per training group go to
    # train.h5ad (for the baselines); 0: none
    max_cells: int = 5_000_000  # generated cells per call, over all conditions (a bound on typos like 1e9)
    missing_genes: str = "error"  # error | zero
    # counts: every generated cell decoded to attainable values (integer counts at a library size of its
    # context's control cells, normalised as the data; perturbdiff.decode); continuous: the paper's output
    decode: str = "counts"
    start: Optional[str] = None  # controls | noise (None: the checkpoint's diffusion.start)
    control_label: str = "control"
    seed: int = 0
    device: str = "auto"


@dataclass
class EvaluateConfig:
    """Evaluation: ``perturbdiff evaluate`` (its flags are aliases of these keys) and the pipeline's
    evaluate stage. The pipeline seeds it with train.seed."""

    control_label: str = "control"
    profile: str = "full"  # full | paper | vcc | minimal
    de_fdr: float = 0.05
    methods: list[str] = field(default_factory=lambda: list(EVAL_METHODS))  # those needing train are skipped
    # (noted) without one
    distances: bool = True
    calibration: bool = True
    cap: int = 2_000  # cells per side for the distances
    seed: int = 0
    # the user's obs columns (renamed to the evaluation layout on read); context_col None: one context
    pert_col: str = "perturbation"
    context_col: Optional[str] = "context"
    batch_col: Optional[str] = "batch"


@dataclass
class PipelineConfig:
    """The end-to-end job after the store (``perturbdiff pipeline``, the main job's second half):
    pretrain -> fine-tune -> predict the test split (the ``predict`` section) -> evaluate with
    baselines (the ``evaluate`` section) -> report. Both training stages take data / model /
    diffusion / train from this config; these set what differs."""

    # the CPU budget of configs/cpu.yaml and the quality benchmark (docs/benchmarks.md)
    pretrain_steps: int = 150  # marginal pretraining steps (0 = fine-tune from scratch)
    finetune_steps: int = 1500
    pretrain_lr: Optional[float] = None  # None: train.optim.lr
    # the truth from a second h5ad (perturbdiff/heldout.py): its perturbed groups are predicted and
    # scored, its controls condition them; None: the store's data.split.test groups
    test_h5ad: Optional[str] = None
    # data.panel kind hvg: the genes chosen on the training and control cells only (the test cells take no part)
    panel_from_training: bool = True
    report: bool = True


# keys that moved to another section: an old config names its key and the new one
MOVED_KEYS = {"pipeline.n_samples": "predict.n_samples", "pipeline.sample_steps": "predict.sample_steps",
              "pipeline.train_cells": "predict.train_cells", "pipeline.decode": "predict.decode",
              "pipeline.profile": "evaluate.profile"}


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs/demo"
    synth: SynthConfig = field(default_factory=SynthConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wds: WdsConfig = field(default_factory=WdsConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


# ---------------------------------------------------------------------------------------------
# Loading and saving
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type, missing value, or a value that breaks its rule."""


def _suggest(key: str, schema: Any) -> str:
    parts = key.split(".")
    node = schema
    for part in parts[:-1]:
        try:
            node = node[part]
        except Exception:  # noqa: BLE001 - just a hint
            return ""
    try:
        names = list(node.keys())
    except Exception:  # noqa: BLE001
        return ""
    close = difflib.get_close_matches(parts[-1], names, n=1)
    return f" (did you mean '{'.'.join(parts[:-1] + close)}'?)" if close else ""


def _yaml_loader() -> Any:
    """OmegaConf's own YAML loader, so files and override values parse exactly as OmegaConf.load and
    OmegaConf.from_dotlist parse them (1e-4 is a float, duplicate keys are errors, aliases are
    bounded). It is private API; it moved from omegaconf._utils (2.3) to omegaconf._yaml (2.4)."""
    try:
        from omegaconf._yaml import get_yaml_loader
    except ImportError:  # omegaconf 2.3
        from omegaconf._utils import get_yaml_loader
    return get_yaml_loader()


def _yaml_dumper() -> Any:
    """OmegaConf's YAML dumper (private API): it quotes the strings its loader would otherwise read
    as numbers or booleans ('1e4', 'true'), so a saved config loads back to the same values."""
    from omegaconf._utils import get_omega_conf_dumper

    return get_omega_conf_dumper()


class _Literals:
    """Keeps user strings literal on their way through OmegaConf.

    OmegaConf reads any string containing "${" as an interpolation (a perturbation named
    "${oc.env:HOME}" became a home path; "a ${b" aborted the load) and the string "???" as a
    missing value. The project uses neither, so every such string is swapped for a placeholder
    before it reaches OmegaConf, and swapped back in the loaded dataclass and in error messages.
    A placeholder holds a random token, so no user string can be mistaken for one; a placeholder
    that lands in a field of another type fails that field's type check, as the string would.
    """

    def __init__(self) -> None:
        self._token = secrets.token_hex(8)
        self._originals: dict[str, str] = {}

    def protect(self, data: Any) -> Any:
        """``data`` (plain YAML values) with every string OmegaConf would interpret replaced."""
        if isinstance(data, str):
            if "${" not in data and data != "???":
                return data
            placeholder = f"<literal {self._token} {len(self._originals)}>"
            self._originals[placeholder] = data
            return placeholder
        if isinstance(data, dict):
            return {key: self.protect(value) for key, value in data.items()}
        if isinstance(data, list):
            return [self.protect(value) for value in data]
        return data

    def restore(self, obj: Any) -> Any:
        """``obj`` (the loaded dataclass, in place) with every placeholder back to its string."""
        if not self._originals:
            return obj
        if isinstance(obj, str):
            return self._originals.get(obj, obj)
        if isinstance(obj, list):
            return [self.restore(value) for value in obj]
        if isinstance(obj, dict):
            return {key: self.restore(value) for key, value in obj.items()}
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            for f in dataclasses.fields(obj):
                setattr(obj, f.name, self.restore(getattr(obj, f.name)))
        return obj

    def text(self, message: Any) -> str:
        """The first line of an error message (OmegaConf appends lines repeating the key and the
        object type), with the user's strings in place of the placeholders."""
        message = (str(message).strip().splitlines() or [""])[0]
        for placeholder, original in self._originals.items():
            message = message.replace(placeholder, original)
        return message


def _read_file(path: str, literals: _Literals) -> Any:
    if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_yaml_loader())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:  # an empty file (or only comments)
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: must hold a mapping of config sections, not a {type(data).__name__}")
    try:
        return OmegaConf.create(literals.protect(data))
    except OmegaConfBaseException as err:
        raise ConfigError(f"config file {path}: {literals.text(err)}") from None


# A dotted key, optionally with list indices: data.split.test, data.split.test[0].contexts
_OVERRIDE_KEY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*|\[\w+\])*\Z")


def _parse_override(override: str, literals: _Literals) -> Any:
    """``key=value`` as OmegaConf.from_dotlist reads it (the value parsed as YAML, the key a dotted
    path), with the value's strings kept literal."""
    key, _, text = override.partition("=")
    try:
        value = yaml.load(text, Loader=_yaml_loader())
    except yaml.YAMLError as err:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                          "flow mappings need a space after each colon, e.g. "
                          "'data.split.test=[{contexts: [U87MG], perturbations: [MAPK1]}]'") from None
    conf = OmegaConf.create()
    try:
        OmegaConf.update(conf, key, literals.protect(value))
    except (OmegaConfBaseException, KeyError, ValueError) as err:
        raise ConfigError(f"override {override!r}: {literals.text(err)}") from None
    return conf


def load_config(files: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = (),
                schema: type = RunConfig) -> Any:
    """Merge dataclass defaults, YAML presets and ``key=value`` overrides; return the dataclass,
    checked against config_rules.py when it is a RunConfig.

    Raises:
        ConfigError: an unknown key (named, with a suggestion), a value of the wrong type, a file
            that does not exist or is not YAML, or a value that breaks its rule (named, with the rule).
    """
    base = OmegaConf.structured(schema)
    literals = _Literals()
    sources: list[tuple[str, Any]] = [(f, _read_file(f, literals)) for f in files]
    bad = [o for o in overrides if not _OVERRIDE_KEY.match(o.partition("=")[0]) or "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value with a dotted config key, got: {bad}")
    sources += [("command line", _parse_override(o, literals)) for o in overrides]
    merged = base
    for where, src in sources:
        try:
            merged = OmegaConf.merge(merged, src)
        except (ConfigKeyError, ConfigAttributeError) as err:
            key = literals.text(getattr(err, "full_key", None) or err)
            if str(key) in MOVED_KEYS:
                raise ConfigError(f"{where}: '{key}' is now '{MOVED_KEYS[str(key)]}'") from None
            raise ConfigError(f"{where}: unknown config key '{key}'{_suggest(str(key), base)}") from None
        except ValidationError as err:
            raise ConfigError(f"{where}: bad value for '{err.full_key}': {literals.text(err.msg)}") from None
        except (OmegaConfBaseException, TypeError) as err:  # TypeError: a list merged into a mapping, ...
            raise ConfigError(f"{where}: {literals.text(err)}") from None
    try:
        cfg = literals.restore(merged_to_object(merged))
    except ConfigError as err:
        raise ConfigError(literals.text(err)) from None
    if isinstance(cfg, RunConfig):
        validate_config(cfg)
    return cfg


def validate_config(cfg: RunConfig) -> RunConfig:
    """Check every value of a RunConfig against its rule (perturbdiff/config_rules.py); returns cfg.
    load_config runs it; code that builds or edits a RunConfig by hand can call it.

    Raises:
        ConfigError: one line naming each bad key, its value and the rule, e.g.
            ``train.max_steps=-5: must be an integer >= 1``.
    """
    from .config_rules import validate_config as validate  # config_rules imports this module

    return validate(cfg)


def merged_to_object(merged: Any) -> Any:
    try:
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"config is incomplete or invalid: {(str(err).splitlines() or [''])[0]}") from None


def to_yaml(cfg: Any) -> str:
    """The dataclass ``cfg`` as YAML that load_config reads back to an equal dataclass. Dumped from
    plain values, not through OmegaConf nodes, which would read "${" in a label as an interpolation."""
    return yaml.dump(dataclasses.asdict(cfg), Dumper=_yaml_dumper(), default_flow_style=False,
                     allow_unicode=True, sort_keys=False)


def save_config(cfg: Any, out_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config as YAML next to an output; returns the path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
    return path


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Fill the unset output paths from ``cfg.out_dir`` (in place); returns cfg."""
    out = Path(cfg.out_dir)
    if cfg.synth.out_dir is None:
        cfg.synth.out_dir = str(out / "source")
    if cfg.shard.out is None:
        cfg.shard.out = str(out / "store.zarr")
    if cfg.data.store is None:
        cfg.data.store = cfg.shard.out
    if cfg.wds.out is None:
        cfg.wds.out = str(out / "wds")
    return cfg
