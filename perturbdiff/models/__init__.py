"""Networks: the MM-DiT denoiser (mmdit.py), its covariate encoder (covariates.py), size presets.

The network knows nothing of the noise schedule: ``model(x_t, t, mask=..., ctrl=..., ctrl_mask=...,
cov=...)`` returns the predicted clean set x0; perturbdiff.diffusion does the noising and losses.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from perturbdiff.config import ModelConfig

from .covariates import CovariateEncoder, load_perturbation_table
from .mmdit import MMDiT
from .presets import PRESETS, Preset, resolve_size

__all__ = ["PRESETS", "CovariateEncoder", "MMDiT", "Preset", "build_model", "load_perturbation_table",
           "resolve_size"]


def build_model(cfg: ModelConfig, num_genes: int, vocab_sizes: Mapping[str, int],
                perturbation_features: Tensor | None = None) -> MMDiT:
    """Build the denoiser. With ``cfg.perturbation_encoding == "table"`` pass the features, e.g.
    ``load_perturbation_table(cfg.perturbation_table, perturbation_vocabulary)``."""
    return MMDiT(cfg, num_genes, vocab_sizes, perturbation_features)
