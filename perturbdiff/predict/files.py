"""The prediction directory: pred.h5ad beside the truth (real.h5ad) and the baselines' training
cells (train.h5ad), written as one unit.

``predict_split`` predicts every group of a store split; ``write_prediction`` runs a prediction
body on every rank and puts its files in place together (a completion marker with their sizes);
``write_real`` / ``real_from_store`` / ``train_from_store`` write the real cells, each followed by the
same control cells as the prediction where the evaluation needs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import distributed as pdist
from ..conditions import normalise_conditions
from ..config import NormalizeConfig
from ..data.h5ad_writer import StreamingH5ad
from ..data.schema import DataError
from ..outputs import OutputLock, Staging, check_output, out_of_space, space_error
from ..predict_options import PredictOptions
from .controls import ControlPool, controls_from_store, gene_map, read_store_rows, sample_rows
from .sampling import append_controls, predict

BLOCK = 4096  # store rows read and appended at a time


def store_cells(store_path: str, groups: pd.DataFrame, genes: list[str], normalize: NormalizeConfig, rows_of):
    """(x [n, G] normalised as in training, group) for the store rows ``rows_of(group)`` of every row of
    ``groups`` (a conditions table), in order, read ``BLOCK`` rows at a time."""
    from ..data.store import CellStore

    store = CellStore(store_path)
    panel_map, _ = gene_map(store.gene_ids, genes, "zero", str(store_path))
    for _, g in groups.iterrows():
        rows = rows_of(g)
        for lo in range(0, len(rows), BLOCK):
            yield read_store_rows(store, rows[lo:lo + BLOCK], panel_map, len(genes), normalize)[0], g


def _group_rows(g) -> np.ndarray:
    return np.arange(int(g["start"]), int(g["start"]) + int(g["n"]))


def write_real(out_path: str | Path, genes: list[str], blocks, pool: ControlPool, normalize: NormalizeConfig,
               opts: PredictOptions, **uns) -> Path:
    """real.h5ad: the real cells ``blocks`` yields as (x [n, G] normalised as in training,
    perturbation, context, batch), then the same controls as the prediction; ``uns``: recorded too."""
    writer = StreamingH5ad(out_path, genes)
    try:
        for x, perturbation, context, batch in blocks:
            writer.append(x * normalize.scale, perturbation, context, batch, -1, False)
        append_controls(writer, pool, normalize, opts)
        return writer.close(uns={"perturbdiff": {"control_label": opts.control_label, **uns}})
    except BaseException:
        writer.abort()
        raise


def real_from_store(store_path: str, groups: pd.DataFrame, genes: list[str], normalize: NormalizeConfig,
                    pool: ControlPool, out_path: str | Path, opts: PredictOptions) -> Path:
    """The real cells of the conditions' store groups plus the same controls as the prediction."""
    blocks = ((x, g["perturbation"], g["context"], g["batch"])
              for x, g in store_cells(store_path, groups, genes, normalize, _group_rows))
    return write_real(out_path, genes, blocks, pool, normalize, opts)


def train_from_store(store_path: str, groups: pd.DataFrame, genes: list[str], normalize: NormalizeConfig,
                     out_path: str | Path, opts: PredictOptions) -> Path:
    """Training cells for the baselines: at most ``opts.train_cells`` cells of every group in
    ``groups`` (seeded), control groups labelled ``opts.control_label``. The baselines only need
    pseudobulk means, so a sample per group bounds the file for a store of any size."""
    rng = np.random.default_rng([opts.seed, 31])
    writer = StreamingH5ad(out_path, genes)
    try:
        for x, g in store_cells(store_path, groups, genes, normalize,
                                lambda g: sample_rows(_group_rows(g), opts.train_cells, rng)):
            label = opts.control_label if bool(g["is_control"]) else g["perturbation"]
            writer.append(x * normalize.scale, label, g["context"], g["batch"], -1, bool(g["is_control"]))
        return writer.close(uns={"perturbdiff": {"control_label": opts.control_label,
                                                 "cells_per_group": opts.train_cells}})
    except BaseException:
        writer.abort()
        raise


def write_prediction(out_dir: str | Path, body, *, inputs=(), overwrite: bool = False) -> tuple[Path, ...]:
    """Run ``body(stage_dir) -> [written paths]`` on every rank and put its files in place as one unit.

    Rank 0 checks ``out_dir`` before any work (perturbdiff.outputs: never an input, a file or a
    directory that is not an earlier prediction; an earlier one only with ``overwrite``), holds its
    lock, and opens a staging directory beside it (the same on every rank). When ``body`` is done,
    rank 0 records the files with their sizes in the completion marker and renames the staging
    directory to ``out_dir``: a reader sees every file of the call or none (``evaluate --dir``
    requires the marker). On any failure the staging directory is removed; a full disk is one
    DataError naming ``out_dir``. Returns the final paths on rank 0, () elsewhere."""
    rank, world = pdist.get_rank(), pdist.get_world_size()
    out_dir = Path(out_dir)
    stage = Staging(out_dir, "predict", shared=world > 1)
    lock = None
    try:
        if rank == 0:
            check_output(out_dir, "predict", inputs=inputs, overwrite=overwrite)
            lock = OutputLock(out_dir, "prediction directory").acquire()
            stage.open(processes=world)
        if world > 1:
            pdist.barrier()  # the staging directory exists
        written = body(stage.path)
        if rank != 0:
            return ()
        names = [Path(w).name for w in written]
        stage.commit(names)
        return tuple(out_dir / n for n in names)
    except BaseException as err:
        if rank == 0:
            stage.abort()
        if out_of_space(err):
            raise space_error(out_dir, err) from None
        raise
    finally:
        if lock is not None:
            lock.release()


def predict_split(found, store_path: str, split_cfg, split: str, out_dir: str | Path, opts: PredictOptions,
                  log=print, overwrite: bool = False) -> tuple[Path, ...]:
    """Predict every group of ``split`` in a store (one condition per group, its size in cells) and
    write the truth beside it: (pred.h5ad, real.h5ad[, train.h5ad]), as one unit (``write_prediction``).
    With ``opts.train_cells`` > 0 a sample of the training groups (and the controls) goes to
    train.h5ad, for the baselines."""
    from ..data.splits import assign_splits
    from ..data.store import CellStore

    store = CellStore(store_path)
    cond = store.conditions
    labels = assign_splits(cond, split_cfg, log=lambda *a: None)
    groups = cond[(labels == split) & (cond["n"] > 0)].reset_index(drop=True)
    if groups.empty:
        raise DataError(store_path, f"split {split!r} has no conditions to predict")
    # the store's numeric covariates; one it lacks is unknown (NaN), as in training on this store
    numeric = {c: groups[c] if c in groups.columns else np.nan for c in found.model_cfg.numeric_covariates}
    conditions = normalise_conditions(groups[["perturbation", "context", "batch"]].assign(
        **numeric, n_cells=groups["n"], n_samples=opts.n_samples), opts, source=store_path)
    genes = found.genes
    normalize = found.normalize

    def body(stage: Path) -> list[Path]:
        pool = controls_from_store(store_path, genes, normalize, sorted(conditions["context"].unique()), opts)
        log(f"predicting {len(conditions)} {split} condition(s), {int(conditions['n_cells'].sum()):,} cells x "
            f"{opts.n_samples} population(s)")
        pred = predict(found, conditions, pool, stage / "pred.h5ad", opts, log)
        if pred is None:  # not rank 0 of a multi-process prediction: rank 0 writes the rest
            return []
        written = [pred, real_from_store(store_path, groups, genes, normalize, pool, stage / "real.h5ad", opts)]
        if opts.train_cells > 0:
            keep = ((labels == "train") | (labels == "control")) & (cond["n"] > 0).to_numpy()
            log(f"sampling up to {opts.train_cells} cells of each of {int(keep.sum())} training/control group(s) "
                "for the baselines -> train.h5ad")
            written.append(train_from_store(store_path, cond[keep].reset_index(drop=True), genes, normalize,
                                            stage / "train.h5ad", opts))
        return written

    return write_prediction(out_dir, body, inputs=[store_path], overwrite=overwrite)
