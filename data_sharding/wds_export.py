"""Export ready-made training sets (perturbed set + matched control set + covariates) to WebDataset.

    perturbdiff export-wds --config configs/demo.yaml wds.epochs=4

Every sample is one set drawn by the same SetSampler the loader uses, so a stream of exported
epochs is the sampler's epochs. Samples of all exported epochs are shuffled together at write
time (shuffled across shards), then written into tar shards of ``sets_per_shard`` samples. Values
are the raw store values on the gene panel, as CSR, plus each cell's total over ALL genes, so the
reader normalises exactly as the store loader does (see perturbdiff/data/wds.py).

Sample keys:  <key>.x.npz  <key>.ctrl.npz  (indptr, indices [panel positions], data, total)
              <key>.json   (group, context, batch, perturbation, codes, epoch, index)
The output directory is staged beside <out> and renamed into place when complete (perturbdiff.outputs).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds

from perturbdiff.config import DataConfig, WdsConfig
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.store import CellStore
from perturbdiff.data.wds import WDS_MANIFEST, WDS_VERSION
from perturbdiff.outputs import OutputLock, Staging, check_output


def _csr_payload(store: CellStore, rows: np.ndarray, panel_map: np.ndarray) -> bytes:
    indptr, indices, data = store.read_csr(rows)
    row = np.repeat(np.arange(len(rows)), np.diff(indptr))
    total = np.bincount(row, weights=data.astype(np.float64), minlength=len(rows)).astype(np.float32)
    col = panel_map[indices]
    keep = col >= 0
    new_ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row[keep], minlength=len(rows)), out=new_ptr[1:])
    buf = io.BytesIO()
    np.savez(buf, indptr=new_ptr, indices=col[keep].astype(np.int32), data=data[keep].astype(np.float32),
             total=total)
    return buf.getvalue()


def export_wds(data_cfg: DataConfig, cfg: WdsConfig, log: Callable[[str], None] = print,
               overwrite: bool = False) -> dict:
    """Write the WebDataset export of ``cfg.split`` to ``cfg.out`` (an earlier export there is
    replaced only with ``overwrite``; any other existing directory is refused)."""
    if not cfg.out:
        raise ValueError("wds.out is not set")
    out = check_output(cfg.out, "wds", inputs=[data_cfg.store], overwrite=overwrite)
    with OutputLock(out, "WebDataset export"):
        stage = Staging(out, "wds")
        try:
            manifest = _export(data_cfg, cfg, stage.open(), log)
            stage.commit([WDS_MANIFEST, *manifest["shards"]])
        except BaseException:
            stage.abort()
            raise
    log(f"wrote {len(manifest['shards'])} shard(s) to {out}")
    return manifest


def _export(data_cfg: DataConfig, cfg: WdsConfig, tmp: Path, log) -> dict:
    out = Path(cfg.out)
    loader = SetLoader(data_cfg, cfg.split, rank=0, world=1, log=log)
    store, sampler = loader.store, loader.sampler
    panel_map = store.panel_map(loader.panel)
    cond = store.conditions

    todo = []  # (epoch, position)
    for epoch in range(cfg.epochs):
        todo += [(epoch, int(p)) for p in range(sampler.num_sets(epoch))]
    order = np.random.default_rng([data_cfg.seed, 7]).permutation(len(todo))
    log(f"exporting {len(todo):,} sets ({cfg.epochs} epoch(s) of split {cfg.split!r}) to {out}")

    pattern = str(tmp / "sets-%06d.tar")
    epoch_sets = {e: sampler.epoch_sets(e) for e in range(cfg.epochs)}
    with wds.ShardWriter(pattern, maxcount=cfg.sets_per_shard, verbose=0) as sink:
        for n_done, i in enumerate(order):
            epoch, pos = todo[i]
            group, k = epoch_sets[epoch]
            s = sampler.materialize(epoch, pos, group[pos], k[pos])
            row = cond.iloc[s.group]
            meta = {"group": s.group, "context": row.context, "batch": row.batch,
                    "perturbation": row.perturbation, "codes": loader.group_codes[s.group].tolist(),
                    "epoch": epoch, "index": pos, "n": len(s.rows), "n_ctrl": len(s.ctrl_rows),
                    "numeric": {c: float(v[s.group]) for c, v in loader.group_numeric.items()},
                    "rows": s.rows.tolist(), "ctrl_rows": s.ctrl_rows.tolist()}
            sink.write({"__key__": f"e{epoch:04d}_s{pos:09d}",
                        "x.npz": _csr_payload(store, s.rows, panel_map),
                        "ctrl.npz": _csr_payload(store, s.ctrl_rows, panel_map),
                        "json": json.dumps(meta).encode()})
            if (n_done + 1) % 1000 == 0:
                log(f"  {n_done + 1:,}/{len(todo):,} sets")
    shards = sorted(p.name for p in tmp.glob("sets-*.tar"))
    manifest = {"version": WDS_VERSION, "store": str(store.path), "split": cfg.split, "epochs": cfg.epochs,
                "num_sets": len(todo), "shards": shards, "set_size": data_cfg.set_size,
                "value_kind": store.value_kind, "panel_gene_ids": loader.gene_ids.tolist(),
                "categories": {c: store.categories(c).tolist() for c in ("context", "batch", "perturbation")}}
    (tmp / WDS_MANIFEST).write_text(json.dumps(manifest))
    return manifest
