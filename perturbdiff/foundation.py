"""The foundation checkpoint: a directory anyone can load on one device, without DeepSpeed, without
unpickling anything, and without the training package:

    <dir>/model.safetensors   the full fp32 weights (consolidated from whatever sharding trained them)
    <dir>/manifest.json       format + version, code and store-schema versions, the model config, the
                              gene vocabulary (the panel, in order), the covariate vocabularies, the
                              name / shape / dtype of every tensor and the sha256 of the weights file,
                              and what prediction needs of the training run (``extra``: normalisation,
                              diffusion settings, set size, mode, control labels)

``load_foundation`` checks all of it and says what is wrong (a truncated or altered weights file, a
newer format, a tensor missing or of another shape, an unknown setting) instead of failing deep inside
torch; the run settings come back as typed fields of ``Foundation``. The directory is written
atomically (perturbdiff.outputs), and a run exports it as ``<out_dir>/FOUNDATION_DIR``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import DataConfig, DiffusionConfig, ModelConfig, NormalizeConfig
from .data.schema import SCHEMA_VERSION, file_sha256
from .outputs import atomic_directory

FORMAT = "perturbdiff-foundation"
FORMAT_VERSION = 2  # 2: the manifest's own content is checksummed (content_sha256)
WEIGHTS, MANIFEST = "model.safetensors", "manifest.json"
FOUNDATION_DIR = "foundation"  # a training run exports its foundation to <out_dir>/foundation
MODES = ("pretrain", "finetune")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


@dataclass
class Foundation:
    model_cfg: ModelConfig
    genes: list[str]  # the gene panel, in input/output order
    vocabularies: dict[str, list[str]]  # covariate name -> categories, in id order
    state_dict: dict[str, torch.Tensor]
    manifest: dict
    # what prediction needs of the run that trained it (the manifest's "extra", checked at load)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    set_size: int = DataConfig.set_size  # cells per set in training
    mode: str | None = None  # pretrain | finetune (None: not recorded)
    control_perturbations: list[str] | None = None  # the control cells' perturbation labels (None: not recorded)
    control_numeric: dict[str, float] = field(default_factory=dict)  # the control cells' numeric covariates
    numeric_in_data: list[str] | None = None  # numeric covariates the training data had (None: not recorded)

    def build(self, perturbation_features: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        """The MMDiT with these weights (strict: every tensor must fit)."""
        from .models import build_model

        vocab_sizes = {k: len(v) for k, v in self.vocabularies.items()}
        if self.model_cfg.perturbation_encoding == "table" and perturbation_features is None:
            perturbation_features = self.state_dict.get("cov_encoder.perturbation_features")
        model = build_model(self.model_cfg, len(self.genes), vocab_sizes, perturbation_features)
        own = model.state_dict()
        missing = sorted(set(own) - set(self.state_dict))
        unexpected = sorted(set(self.state_dict) - set(own))
        shapes = [f"{k} {list(self.state_dict[k].shape)} vs {list(v.shape)}" for k, v in own.items()
                  if k in self.state_dict and self.state_dict[k].shape != v.shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"checkpoint weights do not fit the model built from its own manifest "
                                  f"({len(self.genes)} genes): missing {missing[:5]}, unexpected {unexpected[:5]}, "
                                  f"shapes (checkpoint vs model) {shapes[:3]}")
        model.load_state_dict(self.state_dict)
        return model.to(device)


def save_foundation(path: str | Path, state_dict: Mapping[str, torch.Tensor], *, model_cfg: ModelConfig,
                    genes: list[str], vocabularies: Mapping[str, list[str]], extra: Mapping | None = None) -> Path:
    """Write a foundation checkpoint directory atomically; returns its path."""
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
               for k, v in state_dict.items()}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "code_version": __version__,
        "schema_version": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": dataclasses.asdict(model_cfg), "genes": [str(g) for g in genes],
        "vocabularies": {k: [str(c) for c in v] for k, v in vocabularies.items()},
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")} for k, v in tensors.items()},
        "extra": dict(extra or {}),
    }
    with atomic_directory(path, kind="foundation") as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        manifest["weights_sha256"] = file_sha256(tmp / WEIGHTS)
        manifest["content_sha256"] = content_sha256(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return Path(path)


def _model_config(manifest: dict, where: Path) -> ModelConfig:
    if not isinstance(manifest.get("model"), dict):
        raise CheckpointError(f"{where}: the manifest has no model config")
    return _settings(ModelConfig, manifest["model"], where, "model config")


def _settings(cls, raw, where: Path, what: str, **defaults):
    """``cls(**defaults, **raw)`` for a config section of the manifest (``what``: its name in errors);
    None: the defaults; a key this code version does not know is an error."""
    if raw is None:
        return cls(**defaults)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: {what} is not a mapping")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise CheckpointError(f"{where}: {what} keys {unknown} are unknown to this code version ({__version__}); "
                              "the checkpoint needs a newer perturbdiff")
    try:
        return cls(**{**defaults, **raw})
    except TypeError as err:
        raise CheckpointError(f"{where}: {what}: {err}") from None


def _run_settings(manifest: dict, where: Path) -> dict:
    """The typed run settings of ``Foundation`` from the manifest's extra (absent ones: their defaults;
    a checkpoint from before the diffusion bridge records no diffusion.start: it sampled from noise)."""
    extra = manifest.get("extra") or {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: extra is not a mapping")
    set_size = extra.get("set_size", DataConfig.set_size)
    if not isinstance(set_size, int) or isinstance(set_size, bool) or set_size < 1:
        raise CheckpointError(f"{where}: extra.set_size must be a positive integer, got {set_size!r}")
    mode = extra.get("mode")
    if mode is not None and mode not in MODES:
        raise CheckpointError(f"{where}: extra.mode must be one of {MODES}, got {mode!r}")
    controls, numeric = extra.get("control_perturbations"), extra.get("numeric_in_data")
    for key, value in (("control_perturbations", controls), ("numeric_in_data", numeric)):
        if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise CheckpointError(f"{where}: extra.{key} must be a list of names, got {value!r}")
    control_numeric = extra.get("control_numeric") or {}
    if not isinstance(control_numeric, dict):
        raise CheckpointError(f"{where}: extra.control_numeric is not a mapping")
    return {"normalize": _settings(NormalizeConfig, extra.get("normalize"), where, "extra.normalize"),
            "diffusion": _settings(DiffusionConfig, extra.get("diffusion"), where, "extra.diffusion", start="noise"),
            "set_size": set_size, "mode": mode, "control_perturbations": controls,
            "control_numeric": {str(k): float(v) for k, v in control_numeric.items()}, "numeric_in_data": numeric}


def content_sha256(manifest: Mapping) -> str:
    """The sha256 of a manifest's content (all of it but this digest), as canonical JSON: the gene
    order, vocabularies, config and weight digest cannot change without it changing."""
    body = {k: v for k, v in manifest.items() if k != "content_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / MANIFEST
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; {path} is not a foundation checkpoint "
                              f"(a resumable step_* checkpoint? export one with the trainer)")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{file}: format version {version} is newer than this code reads "
                              f"({FORMAT_VERSION}); upgrade perturbdiff")
    if version >= 2 and manifest.get("content_sha256") != content_sha256(manifest):
        raise CheckpointError(f"{file}: its content does not match its checksum (content_sha256): the gene list, "
                              "vocabularies or config were altered after it was written")
    if version < 2:
        warnings.warn(f"{file}: a format-{version} foundation has no manifest checksum, so an edit of its genes or "
                      "vocabularies cannot be detected; re-export it with this perturbdiff", stacklevel=2)
    return manifest


def load_foundation(path: str | Path, verify: bool = True) -> Foundation:
    """Read and check a foundation checkpoint (no pickle anywhere); weights on the CPU."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    if verify:
        digest = file_sha256(weights)
        if digest != manifest.get("weights_sha256"):
            raise CheckpointError(f"{weights}: sha256 {digest[:12]}... does not match the manifest's "
                                  f"{str(manifest.get('weights_sha256'))[:12]}... (truncated or altered file)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{weights}: unreadable safetensors file ({err})") from None
    expected = manifest.get("tensors", {})
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{weights}: tensors differ from the manifest: missing {missing[:5]}, extra {extra[:5]}")
    for name, spec in expected.items():
        if list(tensors[name].shape) != spec["shape"]:
            raise CheckpointError(f"{weights}: tensor {name} has shape {list(tensors[name].shape)}, "
                                  f"the manifest says {spec['shape']}")
    genes = manifest.get("genes")
    if not isinstance(genes, list) or not genes:
        raise CheckpointError(f"{path / MANIFEST}: no gene vocabulary")
    return Foundation(model_cfg=_model_config(manifest, path / MANIFEST), genes=genes,
                      vocabularies={k: list(v) for k, v in manifest.get("vocabularies", {}).items()},
                      state_dict=tensors, manifest=manifest, **_run_settings(manifest, path / MANIFEST))
