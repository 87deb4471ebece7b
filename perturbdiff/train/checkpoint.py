"""Resumable training checkpoints on disk: ``step_<n>`` directories and their rotation.

The consolidated foundation checkpoint, which prediction loads without the training package, is
perturbdiff/foundation.py. Every checkpoint directory is written through ``perturbdiff.outputs``'
atomic directories (a hidden temporary sibling, fsynced, renamed into place), so a crash during a
save never damages the last good checkpoint. ``rotate`` keeps the newest N ``step_<n>`` directories.
"""

from __future__ import annotations

import shutil
from pathlib import Path

STEP_PREFIX = "step_"


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
