"""Stream exported training sets from WebDataset shards (local paths or any URL webdataset opens).

Shards are split by node (rank) and by DataLoader worker, shuffled at shard level and in a buffer,
decoded into the batch of ``perturbdiff.data.batch`` with the same on-read normalisation as
``SetLoader``; the batch differs from SetLoader's only where that module's table says (no rows /
ctrl_rows; an ``epoch`` per set).
"""

from __future__ import annotations

import io
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from perturbdiff.config import NormalizeConfig

from .batch import CODES, numeric_key
from .schema import DataError
from .store import to_dense

WDS_MANIFEST = "manifest.json"
WDS_VERSION = 1


def read_wds_manifest(path: str | Path) -> dict:
    p = Path(path) / WDS_MANIFEST
    if not p.is_file():
        raise DataError(path, f"not a WebDataset export: {WDS_MANIFEST} is missing")
    manifest = json.loads(p.read_text())
    if manifest.get("version") != WDS_VERSION:
        raise DataError(path, f"unknown WebDataset export version {manifest.get('version')!r}")
    return manifest


def _decode(sample: dict, num_panel: int, set_size: int, normalize: NormalizeConfig, value_kind: str) -> dict:
    meta = json.loads(sample["json"])
    identity = np.arange(num_panel)
    out = {}
    for name in ("x", "ctrl"):
        with np.load(io.BytesIO(sample[f"{name}.npz"])) as z:
            indptr, indices, data, total = z["indptr"], z["indices"], z["data"], z["total"]
        n = len(indptr) - 1
        # values are on the panel only: normalise by each cell's stored total over ALL genes
        dense = to_dense(indptr, indices, data, identity, num_panel, normalize, value_kind, totals=total)
        padded = np.zeros((set_size, num_panel), dtype=np.float32)
        padded[:n] = dense
        mask = np.zeros(set_size, dtype=bool)
        mask[:n] = True
        out[name], out[f"{name}_mask" if name == "ctrl" else "mask"] = padded, mask
    out.update(zip(CODES, meta["codes"]))
    out.update(group=meta["group"], index=meta["index"], epoch=meta["epoch"])
    for name, value in meta.get("numeric", {}).items():
        out[numeric_key(name)] = np.float32(value)
    return out


def _collate(samples: list[dict]) -> dict[str, torch.Tensor]:
    out = {}
    for key in samples[0]:
        if key.startswith("__"):  # webdataset bookkeeping (__key__, __url__)
            continue
        values = [s[key] for s in samples]
        if isinstance(values[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(values))
        elif isinstance(values[0], np.floating):
            out[key] = torch.tensor(np.array(values, dtype=np.float32))
        else:
            out[key] = torch.tensor(values, dtype=torch.int64)
    return out


def wds_loader(path: str | Path, *, sets_per_batch: int, normalize: NormalizeConfig | None = None,
               num_workers: int = 0, shuffle_buffer: int = 64, seed: int = 0,
               urls: list[str] | None = None) -> tuple[torch.utils.data.DataLoader, dict]:
    """A DataLoader over an export; returns (loader, manifest). Batches: perturbdiff.data.batch."""
    manifest = read_wds_manifest(path)
    normalize = normalize or NormalizeConfig()
    urls = urls or [str(Path(path) / s) for s in manifest["shards"]]
    num_panel, set_size, kind = len(manifest["panel_gene_ids"]), manifest["set_size"], manifest["value_kind"]
    dataset = (
        wds.WebDataset(urls, shardshuffle=len(urls) if shuffle_buffer else False, seed=seed,
                       nodesplitter=wds.split_by_node, empty_check=False)
        .shuffle(shuffle_buffer)
        .map(partial(_decode, num_panel=num_panel, set_size=set_size, normalize=normalize, value_kind=kind))
        .batched(sets_per_batch, collation_fn=_collate, partial=True)
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers)
    return loader, manifest
