"""Shared fixtures: one tiny Tahoe source and its converted store per session (read-only for tests)."""

from __future__ import annotations

import os
import sys

import torch

# Triton kernels run in the CPU interpreter when there is no GPU; this must be set before anything
# imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import build_h5ad, build_tahoe, quiet, shard_cfg  # noqa: E402

from data_sharding.convert import convert  # noqa: E402


@pytest.fixture(scope="session")
def tahoe_src(tmp_path_factory):
    """The shared Tahoe parquet source. Tests must not modify it (copy it first)."""
    return build_tahoe(tmp_path_factory.mktemp("tahoe_src") / "tahoe")


@pytest.fixture(scope="session")
def tahoe_store(tahoe_src, tmp_path_factory):
    """The shared Tahoe source converted with small parts / blocks / chunks (num_workers=1)."""
    out = tmp_path_factory.mktemp("tahoe_store") / "store.zarr"
    convert(shard_cfg(tahoe_src.root, out), log=quiet)
    return out


@pytest.fixture(scope="session")
def h5ad_counts_src(tmp_path_factory):
    return build_h5ad(tmp_path_factory.mktemp("h5ad_counts") / "counts.h5ad", kind="counts")


@pytest.fixture(scope="session")
def h5ad_lognorm_src(tmp_path_factory):
    return build_h5ad(tmp_path_factory.mktemp("h5ad_lognorm") / "lognorm.h5ad", kind="lognorm", seed=2)
