"""Named MM-DiT sizes: one registry of (depth, width, heads), and the rule that resolves a ModelConfig.

``paper`` is the released PerturbDiff configuration (depth 8, width 512, 8 heads: about 80M
parameters at 2,000 genes). ``tiny`` exists for CPU tests. The explicit ``depth`` / ``width`` /
``heads`` fields of :class:`~perturbdiff.config.ModelConfig` override the preset one by one.
"""

from __future__ import annotations

from typing import NamedTuple

from perturbdiff.config import ModelConfig


class Preset(NamedTuple):
    depth: int  # MM-DiT blocks
    width: int  # hidden size W of every token
    heads: int  # attention heads (head dim = width // heads)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(2, 64, 4),  # CPU tests
    "small": Preset(4, 256, 4),
    "paper": Preset(8, 512, 8),  # the released checkpoint's config
    "large": Preset(16, 1024, 16),
    "xl": Preset(24, 1536, 24),
}


def resolve_size(cfg: ModelConfig) -> Preset:
    """The (depth, width, heads) of ``cfg``: its named preset with any explicit override applied.

    Raises:
        ValueError: an unknown preset name (the valid ones are listed), a non-positive value, or a
            width that the number of heads does not divide.
    """
    if cfg.size not in PRESETS:
        raise ValueError(f"unknown model size '{cfg.size}'; valid sizes: {', '.join(PRESETS)}")
    base = PRESETS[cfg.size]
    depth = base.depth if cfg.depth is None else int(cfg.depth)
    width = base.width if cfg.width is None else int(cfg.width)
    heads = base.heads if cfg.heads is None else int(cfg.heads)
    for name, value in (("depth", depth), ("width", width), ("heads", heads)):
        if value <= 0:
            raise ValueError(f"model.{name} must be positive, got {value}")
    if width % heads:
        raise ValueError(f"model.width ({width}) must be divisible by model.heads ({heads})")
    return Preset(depth, width, heads)
