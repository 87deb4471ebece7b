"""The end-to-end job: data -> store -> pretrain -> fine-tune -> predict -> evaluate -> report.

    perturbdiff demo     [--config F ...] [key=value ...]   synthesise a dataset first (the main job)
    perturbdiff pipeline [--config F ...] [key=value ...]   any data preset (configs/data/*.yaml)

Everything lands under ``out_dir``:

    source/            (demo) the synthetic Tahoe-format parquet files and their ground truth
    store.zarr/        the sharded store (built from ``shard.inputs`` when it does not exist yet)
    pretrain/          marginal pretraining run: metrics.jsonl, tensorboard/, foundation/
    finetune/          fine-tuning run from the pretrained foundation, same layout
    predict/           pred.h5ad, real.h5ad (the test split's truth), train.h5ad (for the baselines)
    eval/              metrics.csv, aggregated.csv, scores.csv, calibration.csv, summary.json
    report/index.html  the report (one self-contained page) and its PNGs

Both training stages run in this process (plain torch, one device: a GPU when there is one). At
scale the same stages are the launchers (``deepspeed launch/pretrain.py``, ``torchrun
launch/finetune.py``) followed by ``perturbdiff predict / evaluate / report`` (see the README).
Each stage is restartable: a finished training run resumes at its last step (nothing to do), and
``--overwrite`` starts the training stages afresh (and rebuilds the store and the synthetic source).
predict/, eval/ and report/ are remade on every run. Only directories the pipeline marked as its
own are ever removed or replaced, and one pipeline at a time may write an out_dir
(perturbdiff.outputs).

This module and ``cli.py`` are the application layer: the only parts of ``perturbdiff`` that call
into ``data_sharding``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .config import ConfigError, HoldoutRule, RunConfig, save_config, validate_config
from .outputs import OutputLock, check_output, read_marker, remove_output, write_marker


class Stages:
    """Numbered stage headers with the elapsed time: ``[3/7] pretrain ...  (+41s)``."""

    def __init__(self, total: int, log=print):
        self.total, self.k, self.t0, self.log = total, 0, time.time(), log

    def __call__(self, text: str) -> None:
        self.k += 1
        self.log(f"[{self.k}/{self.total}] {text}  (t+{time.time() - self.t0:.0f}s)")


def demo_holdout(source: Path) -> tuple[HoldoutRule, HoldoutRule]:
    """(test, val) rules for the synthetic data: the 4 strongest drug-dose effects in one cell line
    are held out for testing (a context x perturbation split in the paper's style), the 2 strongest
    in another cell line for validation, whatever the synthetic size settings."""
    import pandas as pd

    cond = pd.read_parquet(source / "ground_truth" / "conditions.parquet")
    lines = sorted(cond["cell_line_id"].unique())

    def strongest(line, k):
        top = cond[cond["cell_line_id"] == line].sort_values("effect_norm", ascending=False).head(k)
        return HoldoutRule(contexts=[str(line)], perturbations=[str(p) for p in top["drugname_drugconc"]])

    return strongest(lines[-1], 4), strongest(lines[0], 2)


def prepare_synth_dir(out_dir: str, overwrite: bool) -> None:
    """The synthetic source directory: new, empty or an earlier synthetic source (continued, or
    with ``overwrite`` removed first); marked as ours."""
    check_output(out_dir, "synth", replaces=False)
    if overwrite:
        remove_output(out_dir, "synth")
    if read_marker(out_dir) is None:
        write_marker(out_dir, "synth")


def synthesise(cfg: RunConfig, overwrite: bool, stage: Stages) -> bool:
    """[demo] write the synthetic source; returns whether it was (re)generated."""
    from data_sharding.synthetic import generate

    stage(f"synthesise {cfg.synth.num_cells:,} cells x {cfg.synth.num_genes:,} genes (Tahoe-100M parquet "
          f"schema, known drug effects) -> {cfg.synth.out_dir}")
    prepare_synth_dir(cfg.synth.out_dir, overwrite)
    try:
        summary = generate(cfg.synth)
    except ValueError as err:
        raise ConfigError(f"{err} (pass --overwrite to replace it, or choose another out_dir=...)") from None
    if not cfg.data.split.test and not cfg.data.split.val:
        test, val = demo_holdout(Path(cfg.synth.out_dir))
        cfg.data.split.test, cfg.data.split.val = [test], [val]
        print(f"      held out for testing: {len(test.perturbations)} drug-dose conditions in {test.contexts[0]} "
              f"(validation: {len(val.perturbations)} in {val.contexts[0]})")
    if not cfg.shard.inputs:
        cfg.shard.inputs = [cfg.synth.out_dir]
    return summary["num_written"] > 0


def build_store(cfg: RunConfig, overwrite: bool, stage: Stages, sources: str | None = None) -> None:
    """Shard ``shard.inputs`` into ``data.store`` unless a complete store is there; verify it."""
    from data_sharding.convert import convert
    from .data.integrity import verify

    store = Path(cfg.data.store)
    if (store / "manifest.json").is_file() and not overwrite:
        stage(f"store {store} exists: verify it")
    else:
        if not cfg.shard.inputs:
            raise ConfigError(f"no store at {store} and shard.inputs is empty: give the source files, "
                              "e.g. shard.inputs=[path/to/data.h5ad]")
        stage(f"shard {', '.join(map(str, cfg.shard.inputs))} -> {store}")
        if Path(cfg.shard.out) != store:
            raise ConfigError(f"shard.out ({cfg.shard.out}) and data.store ({store}) differ: the pipeline "
                              "trains on the store it builds")
        convert(cfg.shard, overwrite=overwrite)
        save_config(cfg, cfg.shard.out)
    summary = verify(str(store), sources, log=lambda s: None)
    print(f"      ok: {summary['num_cells']:,} cells, {summary['num_groups']:,} groups, "
          f"{summary['arrays_checked']} checksums verified")


def check_split(cfg: RunConfig, store, labels: np.ndarray) -> None:
    """The held-out protocol, checked on the store BEFORE any training: the test split has cells,
    every test context has control cells (prediction is conditioned on them), and training keeps some
    perturbed groups. Prints what is held out, and which test contexts are unseen in training.
    ``labels``: the split of every group of ``store`` (perturbdiff.data.splits.assign_splits)."""
    from .data.splits import TEST, TRAIN

    cond = store.conditions
    nonempty = (cond["n"] > 0).to_numpy()
    test = cond[(labels == TEST) & nonempty]
    if test.empty:
        raise ConfigError(f"data.split.test matches no cells of {cfg.data.store}: check the rules' labels "
                          f"(contexts there: {sorted(cond['context'].unique())[:10]}, perturbations: "
                          f"{sorted(cond.loc[~cond['is_control'], 'perturbation'].unique())[:10]})")
    ctrl_ctx = set(cond.loc[cond["is_control"].to_numpy() & nonempty, "context"])
    lacking = sorted(set(test["context"]) - ctrl_ctx)
    if lacking:
        raise ConfigError(f"test context(s) {lacking} have no control cells in {cfg.data.store}: prediction is "
                          "conditioned on a context's controls")
    train = cond[(labels == TRAIN) & nonempty & ~cond["is_control"].to_numpy()]
    if train.empty:
        raise ConfigError("data.split leaves no perturbed cells for training")
    unseen = sorted(set(test["context"]) - set(train["context"]))
    new_perts = sorted(set(test["perturbation"]) - set(train["perturbation"]))
    print(f"      test split: {len(test)} group(s), {int(test['n'].sum()):,} cells in context(s) "
          f"{sorted(test['context'].unique())[:6]}; training: {len(train)} perturbed group(s)"
          + (f"; unseen in training: context(s) {unseen}" if unseen else "")
          + (f"; perturbation(s) without training cells: {new_perts[:6]}" if new_perts else ""))


def training_panel(cfg: RunConfig, out: Path, store, labels: np.ndarray, cells_per_group: int = 500,
                   log=print) -> None:
    """``data.panel`` kind hvg: the top ``num_genes`` highly variable genes of the TRAINING and control
    cells (up to ``cells_per_group`` of each group, seeded), not of every cell of the store, so the
    held-out cells do not choose the genes. Written to ``out/panel_genes.txt`` (vocabulary order) and
    used as ``data.panel`` kind=file; the shard's flavour (seurat_v3 on counts, dispersion else)."""
    from data_sharding import hvg
    from data_sharding.parts import gene_stats
    from .config import PanelConfig
    from .data.schema import VALUES_COUNTS
    from .data.splits import CONTROL, TRAIN

    k = min(cfg.data.panel.num_genes, store.num_genes)
    cond = store.conditions
    keep = cond[np.isin(labels, [TRAIN, CONTROL]) & (cond["n"] > 0).to_numpy()]
    rng = np.random.default_rng([cfg.data.seed, 43])
    rows = np.sort(np.concatenate([rng.choice(np.arange(s, s + n), min(n, cells_per_group), replace=False)
                                   for s, n in zip(keep["start"], keep["n"])]))
    flavor = cfg.shard.hvg.flavor if store.value_kind == VALUES_COUNTS else "dispersion"
    chunks = [rows[i:i + 4096] for i in range(0, len(rows), 4096)]
    stats = hvg.combine_stats([gene_stats(*store.read_csr(c), store.num_genes, store.value_kind, flavor)
                               for c in chunks])
    clipped = None
    if flavor == "seurat_v3":
        clipped = hvg.ClippedMoments(stats)
        for c in chunks:
            _, indices, data = store.read_csr(c)
            clipped.update(indices, data)
    _, ranking = hvg.select(flavor, stats, clipped, cfg.shard.hvg.num_bins)
    genes = np.asarray(store.gene_ids)[np.sort(ranking[:k])]
    path = out / "panel_genes.txt"
    path.write_text("".join(f"{g}\n" for g in genes))
    cfg.data.panel = PanelConfig(kind="file", num_genes=k, genes_file=str(path))
    log(f"      gene panel: the {k:,} most variable genes ({flavor}) of {len(rows):,} training/control cells "
        f"-> {path}")


def _stage_config(cfg: RunConfig, name: str, steps: int, lr: float | None) -> RunConfig:
    sub = copy.deepcopy(cfg)
    sub.out_dir = str(Path(cfg.out_dir) / name)
    sub.train.max_steps = steps
    if lr is not None:
        sub.train.optim.lr = lr
    sub.train.optim.warmup_steps = min(sub.train.optim.warmup_steps, max(1, steps // 10))
    return sub


def train_stages(cfg: RunConfig, overwrite: bool, stage: Stages) -> Path:
    """Pretrain (marginal) then fine-tune from its foundation; returns the fine-tuned foundation."""
    from .foundation import FOUNDATION_DIR
    from .train.run import FINETUNE, PRETRAIN, run

    p = cfg.pipeline
    init = None
    for name, mode, steps, lr in ((PRETRAIN, PRETRAIN, p.pretrain_steps, p.pretrain_lr),
                                  (FINETUNE, FINETUNE, p.finetune_steps, None)):
        if steps <= 0:  # pretraining skipped (finetune_steps >= 1 is a config rule)
            continue
        sub = _stage_config(cfg, name, steps, lr)
        if overwrite:
            remove_output(sub.out_dir, "run")
        what = ("marginal pretraining (sets given their context; no control stream, no perturbation label)"
                if mode == PRETRAIN else "fine-tuning the conditional model" + (f" from {init}" if init else ""))
        stage(f"{what}: {steps} steps of {cfg.data.sets_per_batch} sets x {cfg.data.set_size} cells -> {sub.out_dir}")
        summary = run(sub, mode, init)
        print(f"      {summary['step']} steps in {summary['seconds']:.1f}s ({summary['cells_per_s']:,.0f} cells/s); "
              f"last train loss {(summary.get('last') or {}).get('train/loss', float('nan')):.4f}")
        init = str(Path(sub.out_dir) / FOUNDATION_DIR)
    return Path(init)


def predict_stage(cfg: RunConfig, foundation: Path, labels: np.ndarray, stage: Stages) -> Path:
    from .heldout import predict_heldout
    from .predict import predict_split
    from .foundation import load_foundation

    p = cfg.pipeline
    out = Path(cfg.out_dir) / "predict"
    opts = replace(cfg.predict, seed=cfg.train.seed)  # the predict section, seeded like the whole run
    what = f"the conditions of {p.test_h5ad}" if p.test_h5ad else "the held-out (test) conditions"
    stage(f"predict {what}: {opts.n_samples} population(s) each, "
          f"{opts.sample_steps or cfg.diffusion.sample_steps} DDIM steps -> {out}")
    t0 = time.time()

    def log(s: str) -> None:
        if not s.startswith("  predicted"):
            print(f"      {s.strip()}")

    found = load_foundation(foundation)
    if p.test_h5ad:
        paths = predict_heldout(found, cfg, labels, out, opts, log=log, overwrite=True)
    else:  # the pipeline's own stage output, remade every run
        paths = predict_split(found, cfg.data.store, cfg.data.split, "test", out, opts, log=log, overwrite=True)
    print(f"      wrote {', '.join(q.name for q in paths)} in {time.time() - t0:.1f}s")
    return out


def evaluate_stage(cfg: RunConfig, pred_dir: Path, stage: Stages) -> Path:
    from .eval.evaluate import evaluate_files, format_table, prediction_files

    out = Path(cfg.out_dir) / "eval"
    stage(f"evaluate against the truth beside the baselines (cell-eval 0.6.6 metrics, MMD, energy distance, "
          f"calibration) -> {out}")
    files = prediction_files(pred_dir)  # the whole prediction, or an error saying what is missing
    ev = evaluate_files(files["pred"], files["real"], out, files["train"],
                        replace(cfg.evaluate, seed=cfg.train.seed),
                        log=lambda s: print(f"      {s.strip()}"), overwrite=True)
    print("\n".join(f"      {line}" for line in format_table(ev).splitlines()))
    return out


def report_stage(cfg: RunConfig, eval_dir: Path, stage: Stages) -> Path | None:
    from .eval.report import write_report

    out = Path(cfg.out_dir) / "report"
    stage(f"report -> {out}")
    runs = [d for d in (Path(cfg.out_dir) / "pretrain", Path(cfg.out_dir) / "finetune")
            if (d / "metrics.jsonl").is_file()]
    return write_report(eval_dir, out=out, run_dir=runs or None, overwrite=True)


def run_pipeline(cfg: RunConfig, overwrite: bool = False, synthetic: bool = False) -> Path | None:
    """The whole job; returns the report (or the evaluation directory without a report)."""
    t0 = time.time()
    stage = Stages(int(synthetic) + 1 + int(cfg.pipeline.pretrain_steps > 0) + 3 + int(cfg.pipeline.report))
    validate_config(cfg)  # also when the config was built in code, not loaded
    out = check_output(cfg.out_dir, "pipeline", replaces=False, inputs=[*cfg.shard.inputs, cfg.shard.metadata_dir,
                                                                              cfg.pipeline.test_h5ad])
    with OutputLock(out, "pipeline directory"):
        if read_marker(out) is None:
            write_marker(out, "pipeline")
        return _run_pipeline(cfg, out, overwrite, synthetic, stage, t0)


def _run_pipeline(cfg: RunConfig, out: Path, overwrite: bool, synthetic: bool, stage: Stages, t0: float) -> Path:
    from .data.splits import assign_splits
    from .data.store import CellStore

    sources = None
    if synthetic:
        overwrite = synthesise(cfg, overwrite, stage) or overwrite
        sources = cfg.synth.out_dir
    if not cfg.data.split.test and not cfg.pipeline.test_h5ad:
        raise ConfigError("data.split.test is empty: name the held-out conditions to predict and evaluate, "
                          "e.g. data.split.test=[{contexts: [U87MG], perturbations: [MAPK1]}], or give their "
                          "truth in a second file, pipeline.test_h5ad=held_out.h5ad")
    save_config(cfg, out)
    build_store(cfg, overwrite, stage, sources)
    store = CellStore(cfg.data.store)
    labels = assign_splits(store.conditions, cfg.data.split, log=lambda *a: None)
    if cfg.pipeline.test_h5ad:  # the truth from a second h5ad; data.split.test rules only hold groups out
        from .heldout import check_heldout

        check_heldout(cfg, store, labels)
    else:
        check_split(cfg, store, labels)  # an empty or unpredictable test split fails here, not after training
    if cfg.pipeline.panel_from_training and cfg.data.panel.kind == "hvg":
        training_panel(cfg, out, store, labels)
        save_config(cfg, out)  # the config that trains names the panel file
    foundation = train_stages(cfg, overwrite, stage)
    pred_dir = predict_stage(cfg, foundation, labels, stage)
    eval_dir = evaluate_stage(cfg, pred_dir, stage)
    report = report_stage(cfg, eval_dir, stage) if cfg.pipeline.report else None
    print(f"done in {time.time() - t0:.0f}s. Report: {report or eval_dir}")
    return report or eval_dir

