"""Checkpoints on disk: the consolidated foundation checkpoint, atomic directories, rotation.

A foundation checkpoint is a directory that anyone can load on one device, without DeepSpeed and
without unpickling anything:

    <dir>/model.safetensors   the full fp32 weights (consolidated from whatever sharding trained them)
    <dir>/manifest.json       format + version, code and store-schema versions, the model config, the
                              gene vocabulary (the panel, in order), the covariate vocabularies, the
                              name / shape / dtype of every tensor and the sha256 of the weights file

``load_foundation`` checks all of it and says what is wrong (a truncated or altered weights file, a
newer format, a tensor missing or of another shape) instead of failing deep inside torch.

Every checkpoint directory (foundation or resumable) is written through ``perturbdiff.outputs``'
atomic directories: into a hidden temporary sibling, fsynced, then renamed into place, so a crash
during a save never damages the last good checkpoint (and an existing directory is replaced only
when it is a foundation checkpoint). ``rotate`` keeps the newest N ``step_<n>`` directories.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..config import ModelConfig
from ..data.schema import SCHEMA_VERSION, file_sha256
from ..outputs import atomic_directory

FORMAT = "perturbdiff-foundation"
FORMAT_VERSION = 2  # 2: the manifest's own content is checksummed (content_sha256)
WEIGHTS, MANIFEST = "model.safetensors", "manifest.json"
STEP_PREFIX = "step_"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------
# Step directories and rotation
# ---------------------------------------------------------------------------------------------


def step_dir(parent: str | Path, step: int) -> Path:
    return Path(parent) / f"{STEP_PREFIX}{step:09d}"


def list_steps(parent: str | Path) -> list[tuple[int, Path]]:
    """Complete ``step_<n>`` checkpoints under ``parent``, oldest first (temporaries are ignored)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    out = []
    for p in parent.iterdir():
        if p.is_dir() and p.name.startswith(STEP_PREFIX) and p.name[len(STEP_PREFIX):].isdigit():
            out.append((int(p.name[len(STEP_PREFIX):]), p))
    return sorted(out)


def latest_step(parent: str | Path) -> Path | None:
    steps = list_steps(parent)
    return steps[-1][1] if steps else None


def rotate(parent: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints; returns what was deleted."""
    if keep_last < 1:
        raise ValueError(f"train.keep_last must be >= 1, got {keep_last}")
    doomed = [p for _, p in list_steps(parent)[:-keep_last]]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


# ---------------------------------------------------------------------------------------------
# The foundation checkpoint
# ---------------------------------------------------------------------------------------------


@dataclass
class Foundation:
    model_cfg: ModelConfig
    genes: list[str]  # the gene panel, in input/output order
    vocabularies: dict[str, list[str]]  # covariate name -> categories, in id order
    state_dict: dict[str, torch.Tensor]
    manifest: dict

    def build(self, perturbation_features: torch.Tensor | None = None, device: str | torch.device = "cpu"):
        """The MMDiT with these weights (strict: every tensor must fit)."""
        from ..models import build_model

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
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    raw = manifest.get("model")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: the manifest has no model config")
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise CheckpointError(f"{where}: model config keys {unknown} are unknown to this code version "
                              f"({__version__}); the checkpoint needs a newer perturbdiff")
    return ModelConfig(**raw)


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
                      state_dict=tensors, manifest=manifest)
