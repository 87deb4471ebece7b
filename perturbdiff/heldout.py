"""The truth from a second h5ad (``pipeline.test_h5ad``): a held-out file that is neither sharded nor
trained on, e.g. an unseen cell type or a replicate measured apart.

Its perturbed cells are the conditions to predict, one per (perturbation, context, batch[, numeric
covariates]) group with the group's real cell count, and the truth they are scored against. Its
control cells condition the prediction of their context; a context without controls in the file
takes the store's. The same controls go into pred.h5ad and real.h5ad, as for a split of the store,
and train.h5ad samples the store's training groups for the baselines. The file is read with the
shard's column names (``shard.perturbation_col``, ``context_col``, ``batch_col``, ``control_label``;
a column set to null gives every cell the shard's implicit label), its genes are matched to the
checkpoint's by var_names, and its values (counts or log-normalised, detected) are normalised like
the training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import ConfigError, NormalizeConfig, RunConfig
from .data.schema import IMPLICIT_LABEL, DataError
from .errors import one_line

GROUP_KEYS = ["perturbation", "context", "batch"]


@dataclass
class HeldOutFile:
    """A held-out h5ad opened backed (X stays on disk): its cells' labels and its genes."""

    path: str
    adata: object  # anndata.AnnData, backed="r"
    obs: pd.DataFrame  # perturbation, context, batch (str), is_control, and the numeric obs columns

    @classmethod
    def open(cls, path: str, cfg: RunConfig) -> "HeldOutFile":
        import anndata as ad

        shard = cfg.shard
        if not Path(path).is_file():
            raise DataError(path, "pipeline.test_h5ad: file not found")
        try:
            adata = ad.read_h5ad(path, backed="r")
        except Exception as err:  # noqa: BLE001 - h5py / anndata raise many kinds for a damaged file
            raise DataError(path, f"pipeline.test_h5ad: cannot read the h5ad (truncated or damaged?): "
                            f"{one_line(err)}") from None
        src = adata.obs
        obs = pd.DataFrame(index=np.arange(adata.n_obs))
        for want, col, key in (("perturbation", shard.perturbation_col, "shard.perturbation_col"),
                               ("context", shard.context_col, "shard.context_col"),
                               ("batch", shard.batch_col, "shard.batch_col")):
            if col is None:
                obs[want] = IMPLICIT_LABEL
                continue
            if col not in src.columns:
                raise DataError(path, f"obs has no column {col!r} ({key}; columns: {list(src.columns)[:10]})")
            if src[col].isna().any():
                raise DataError(path, f"obs column {col!r} ({key}) has {int(src[col].isna().sum())} missing label(s)")
            obs[want] = src[col].astype(str).to_numpy()
        for col in src.columns:
            if col not in obs.columns and pd.api.types.is_numeric_dtype(src[col]):
                obs[col] = src[col].to_numpy()
        obs["is_control"] = obs["perturbation"].to_numpy() == shard.control_label
        if obs["is_control"].all():
            raise DataError(path, f"pipeline.test_h5ad: no perturbed cells (every obs[{shard.perturbation_col!r}] "
                            f"is the control label {shard.control_label!r})")
        return cls(str(path), adata, obs)

    def groups(self, numeric: list[str] = ()) -> pd.DataFrame:
        """The perturbed groups: GROUP_KEYS, the ``numeric`` covariates the file has (NaN where it has
        none), n (cells) and rows (sorted row indices)."""
        have = [c for c in numeric if c in self.obs.columns]
        pert = self.obs[~self.obs["is_control"]]
        out = []
        for key, g in pert.groupby(GROUP_KEYS + have, sort=True, dropna=False):
            row = dict(zip(GROUP_KEYS + have, key if isinstance(key, tuple) else (key,)))
            out.append({**row, **{c: np.nan for c in numeric if c not in have}, "n": len(g),
                        "rows": g.index.to_numpy()})
        return pd.DataFrame(out)

    def control_contexts(self) -> set[str]:
        return set(self.obs.loc[self.obs["is_control"], "context"])

    def close(self) -> None:
        self.adata.file.close()


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def check_heldout(cfg: RunConfig, store, labels: np.ndarray) -> None:
    """The held-out file checked BEFORE any training: it is not a training input, it has perturbed
    cells and genes of the store, every context to predict has control cells (in the file or the
    store), and training keeps some perturbed groups. Prints what is held out."""
    from .data.splits import TRAIN

    path = cfg.pipeline.test_h5ad
    if any(_same_file(path, p) for p in cfg.shard.inputs):
        raise ConfigError(f"pipeline.test_h5ad {path} is also in shard.inputs: its cells would be trained on; "
                          "hold conditions of one file out with data.split.test instead")
    held = HeldOutFile.open(path, cfg)
    try:
        groups = held.groups()
        shared = int(np.isin(held.adata.var_names.to_numpy().astype(str), np.asarray(store.gene_ids)).sum())
        if shared == 0:
            raise DataError(path, f"no gene (var_names) in common with the store {cfg.data.store} "
                            f"(e.g. {list(held.adata.var_names[:3])} vs {list(store.gene_ids[:3])})")
        cond = store.conditions
        nonempty = (cond["n"] > 0).to_numpy()
        in_file = held.control_contexts()
        in_store = set(cond.loc[cond["is_control"].to_numpy() & nonempty, "context"])
        lacking = sorted(set(groups["context"]) - in_file - in_store)
        if lacking:
            raise DataError(path, f"context(s) {lacking[:6]} have no control cells in this file nor in the store: "
                            "prediction is conditioned on a context's controls")
        train = cond[(labels == TRAIN) & nonempty & ~cond["is_control"].to_numpy()]
        if train.empty:
            raise ConfigError("data.split leaves no perturbed cells of the store for training")
        contexts = sorted(groups["context"].unique())
        unseen = sorted(set(contexts) - set(train["context"]))
        from_store = sorted(set(contexts) - in_file)
        print(f"      held-out file {path}: {len(groups)} perturbed group(s), {int(groups['n'].sum()):,} cells in "
              f"context(s) {contexts[:6]}; {shared:,} of its genes in the store; training: {len(train)} perturbed "
              "group(s) of the store" + (f"; controls from the store for {from_store[:6]}" if from_store else "")
              + (f"; unseen in training: context(s) {unseen[:6]}" if unseen else ""))
    finally:
        held.close()


def _pool(held: HeldOutFile, cfg: RunConfig, genes: list[str], normalize: NormalizeConfig, contexts: list[str],
          opts):
    """The controls of each context: the file's where it has them, else the store's, as one pool."""
    from .predict import ControlPool, controls_from_h5ad, controls_from_store, pool_libraries

    shard = cfg.shard
    in_file = held.control_contexts()
    own = [c for c in contexts if c in in_file]
    rest = [c for c in contexts if c not in own]
    parts = []
    if own:  # context_col null: one implicit context; batch_col null: the shard's implicit batch
        parts.append(controls_from_h5ad(held.path, genes, normalize, own, opts, pert_col=shard.perturbation_col,
                                        context_col=shard.context_col, batch_col=shard.batch_col,
                                        only_context=None if shard.context_col else IMPLICIT_LABEL,
                                        no_batch=IMPLICIT_LABEL))
    if rest:
        parts.append(controls_from_store(cfg.data.store, genes, normalize, rest, opts))
    if len(parts) == 1:
        return parts[0]
    return ControlPool(np.concatenate([p.x for p in parts]), np.concatenate([p.context for p in parts]),
                       np.concatenate([p.batch for p in parts]), f"{held.path} + {cfg.data.store}",
                       [n for p in parts for n in p.notes], pool_libraries([p.libraries for p in parts]))


def _real(held: HeldOutFile, groups: pd.DataFrame, genes: list[str], normalize: NormalizeConfig, pool,
          out_path: Path, opts) -> Path:
    """The held-out file's cells of ``groups`` plus the same controls as the prediction."""
    from .predict import gene_map, h5ad_rows, write_real

    panel_map, _ = gene_map(held.adata.var_names.to_numpy(), genes, "zero", held.path)

    def blocks():
        kind = None  # detected on the first block, as for the controls
        for _, g in groups.iterrows():
            rows = g["rows"]  # sorted: the groups keep the file's row order
            for s in range(0, len(rows), 4096):
                x, _, kind = h5ad_rows(held.adata, held.path, rows[s:s + 4096], panel_map, len(genes), normalize,
                                       kind, f"condition ({g['context']}, {g['perturbation']})")
                yield x, g["perturbation"], g["context"], g["batch"]

    return write_real(out_path, genes, blocks(), pool, normalize, opts, truth=held.path)


def predict_heldout(found, cfg: RunConfig, labels: np.ndarray, out_dir: str | Path, opts, log=print,
                    overwrite: bool = False) -> tuple[Path, ...]:
    """Predict every perturbed group of ``pipeline.test_h5ad`` and write (pred.h5ad, real.h5ad[,
    train.h5ad]) as one unit (perturbdiff.predict.write_prediction). ``labels``: the store's split."""
    from .conditions import normalise_conditions
    from .data.splits import CONTROL, TRAIN
    from .data.store import CellStore
    from .predict import predict, train_from_store, write_prediction

    path = cfg.pipeline.test_h5ad
    numeric = list(found.model_cfg.numeric_covariates)
    normalize = found.normalize
    genes = found.genes

    def body(stage: Path) -> list[Path]:
        held = HeldOutFile.open(path, cfg)
        try:
            groups = held.groups(numeric)
            conditions = normalise_conditions(groups[GROUP_KEYS + numeric].assign(
                n_cells=groups["n"], n_samples=opts.n_samples), opts, source=path)
            pool = _pool(held, cfg, genes, normalize, sorted(conditions["context"].unique()), opts)
            log(f"predicting the {len(conditions)} condition(s) of {path}, {int(conditions['n_cells'].sum()):,} "
                f"cells x {opts.n_samples} population(s)")
            pred = predict(found, conditions, pool, stage / "pred.h5ad", opts, log)
            if pred is None:  # not rank 0 of a multi-process prediction
                return []
            written = [pred, _real(held, groups, genes, normalize, pool, stage / "real.h5ad", opts)]
        finally:
            held.close()
        if opts.train_cells > 0:
            cond = CellStore(cfg.data.store).conditions
            keep = np.isin(labels, [TRAIN, CONTROL]) & (cond["n"] > 0).to_numpy()
            written.append(train_from_store(cfg.data.store, cond[keep].reset_index(drop=True), genes, normalize,
                                            stage / "train.h5ad", opts))
        return written

    return write_prediction(out_dir, body, inputs=[path, cfg.data.store], overwrite=overwrite)
