"""The training loop: one ``Trainer`` over any ``Engine`` (torch DDP or DeepSpeed ZeRO 1/2/3).

A step takes ``train.engine.grad_accum`` loader batches on every rank (each ``data.sets_per_batch``
sets), scores them with the diffusion loss and lets the engine average, clip and step. Around it:

- EMA of the weights (rank 0 keeps the fp32 shadow; under ZeRO-3 the update runs inside
  ``engine.full_parameters()``, which every rank enters);
- every step: train/loss, train/mse, train/mmd (means over ranks), train/lr, train/grad_norm,
  perf/cells_per_s (target cells per device per second, data loading included), perf/mfu on GPUs
  with a known peak, to TensorBoard and metrics.jsonl; a progress line with ETA every ``log_every``;
- every ``val_every``: the loss on the held-out (val) split, same coin flips and noise every time;
- every ``sample_every``: whole populations sampled for a fixed validation subset, scored by the
  Pearson r of pseudobulk deltas (against the set's control cells) and the MMD^2 to the real cells;
- every ``ckpt_every``: a resumable checkpoint (engine state: weights, optimizer, LR schedule, step;
  plus the loader position, every rank's RNG states and the EMA), written by all ranks into one
  temporary directory and renamed into place by rank 0 only when complete, then rotated to the
  newest ``keep_last``. Checkpoint directories must be on a filesystem every rank sees.

Every evaluation pass runs the same number of forwards on every rank (the minimum over ranks), as
ZeRO-3 needs. Resuming from a checkpoint continues the exact sequence: on CPU with a fixed seed the
loss of every later step equals an uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..config import RunConfig
from ..diffusion import SetDiffusion
from ..data.batch import covariates_of
from ..diffusion.sampler import sample_sets
from ..eval.metrics import pearson_delta, set_mmd
from .. import distributed as pdist
from ..outputs import commit_directory
from .checkpoint import latest_step, rotate, step_dir
from .engine import Engine
from .monitor import Monitor, mmdit_train_flops, peak_flops
from .optim import EMA

FAULT_ENV = "PERTURBDIFF_FAULT_TRAIN"  # "<rank>:<step>": that rank SIGKILLs itself before that step (fault tests)
EMA_FILE, RNG_FILE = "ema.safetensors", "rng_rank{rank}.safetensors"
CKPT_DIR = "checkpoints"


class Trainer:
    """Runs ``train.max_steps`` optimizer steps of ``engine`` on ``train_loader``; see the module doc.

    Args:
        cfg: the run config (train.*, diffusion.* and data.* are read).
        engine: the wrapped model (``create_engine``).
        train_loader / val_loader: SetLoader-like (iterable, ``len``, ``state_dict``); val may be None.
        genes / vocabularies: the model's gene panel and covariate vocabularies (for the export).
        mode: "pretrain" or "finetune", recorded in checkpoints and the export.
    """

    def __init__(self, cfg: RunConfig, engine: Engine, train_loader, val_loader=None, *, genes: list[str],
                 vocabularies: dict[str, list[str]], mode: str = "finetune", log=print):
        self.cfg, self.tcfg, self.engine = cfg, cfg.train, engine
        self.diffusion = SetDiffusion(cfg.diffusion)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.genes, self.vocabularies, self.mode = list(genes), dict(vocabularies), mode
        self.rank, self.world, self.device = engine.rank, engine.world, engine.device
        self.main = self.rank == 0
        self.log = log if self.main else (lambda *a, **k: None)
        self.out = Path(cfg.out_dir)
        self.ckpt_root = self.out / CKPT_DIR
        self.monitor = Monitor(self.out, self.main, progress=self.tcfg.progress, log=log)
        gen_device = self.device if self.device.type == "cuda" else "cpu"
        self.gen = torch.Generator(device=gen_device).manual_seed(int(self.tcfg.seed) * 1009 + self.rank)
        self.ema = None
        optim = self.tcfg.optim
        if optim.ema_every > 0:
            with engine.full_parameters():
                if self.main:
                    self.ema = EMA(engine.module, optim.ema_decay, optim.ema_every, optim.ema_warmup)
        self._batches = None
        self._terms: list[torch.Tensor] = []
        self.peak = peak_flops(self.device, engine.precision)
        self.last: dict = {}  # the latest step's scalars
        if self.main:
            for stale in self.ckpt_root.glob(".step_*"):  # a save interrupted by a crash
                shutil.rmtree(stale, ignore_errors=True)

    @property
    def step(self) -> int:
        return self.engine.step

    # ---- data ---------------------------------------------------------------------------------

    def _stream(self):
        while True:
            yielded = False
            for batch in self.train_loader:
                yielded = True
                yield batch
            if not yielded:
                raise RuntimeError("the training loader produced no batch in a whole epoch")

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _min_over_ranks(self, n: int) -> int:
        return int(pdist.all_reduce_floats([float(n)], self.device, "min")[0])

    # ---- the loop -----------------------------------------------------------------------------

    def _loss(self, model, batch):
        terms = self.diffusion.loss(model, batch, self.gen)
        self._terms.append(torch.stack([terms.mse.mean(), terms.mmd.mean()]).detach().float())
        return terms

    def _maybe_fault(self, step: int) -> None:
        spec = os.environ.get(FAULT_ENV)
        if spec and spec == f"{self.rank}:{step}":
            self.log(f"{FAULT_ENV}: rank {self.rank} kills itself before step {step}")
            os.kill(os.getpid(), signal.SIGKILL)

    def fit(self, until: int | None = None) -> dict:
        """Train to ``train.max_steps`` (from wherever a resume left off), or stop early after step
        ``until`` (the schedule still ends at max_steps); returns a summary."""
        max_steps = self.tcfg.max_steps
        stop = max_steps if until is None else min(int(until), max_steps)
        if self._min_over_ranks(len(self.train_loader)) == 0:
            raise ValueError(f"the training split has no complete batch of {self.cfg.data.sets_per_batch} sets on "
                             f"every one of the {self.world} rank(s); lower data.sets_per_batch or add data")
        if self._batches is None:
            self._batches = self._stream()
        self.monitor.start(self.step)
        self_cond = self.diffusion.cfg.p_self_cond > 0 and self.engine.module.self_condition
        t_run, cells_total = time.perf_counter(), 0
        last_saved = self.step if latest_step(self.ckpt_root) == step_dir(self.ckpt_root, self.step) else None
        while self.step < stop:
            self._maybe_fault(self.step + 1)
            t0 = time.perf_counter()
            micro = [self._to_device(next(self._batches)) for _ in range(self.engine.grad_accum)]
            cells = sum(int(mb["mask"].sum()) for mb in micro)
            self._terms = []
            out = self.engine.train_step(self._loss, micro)
            every = self.tcfg.optim.ema_every
            if every > 0 and self.step % every == 0:  # every rank: a ZeRO-3 gather is collective
                with self.engine.full_parameters():
                    if self.ema is not None:
                        self.ema.step(self.engine.module, self.step)
            mse, mmd = pdist.all_reduce_floats(torch.stack(self._terms).mean(0).tolist(), self.device)
            dt = time.perf_counter() - t0
            cells_total += cells
            values = {"train/loss": out["loss"], "train/mse": mse / self.world, "train/mmd": mmd / self.world,
                      "train/lr": out["lr"], "train/grad_norm": out["grad_norm"],
                      "perf/cells_per_s": cells / dt, "perf/step_s": dt}
            if self.peak:
                B, M = micro[0]["x"].shape[:2]
                flops = len(micro) * B * mmdit_train_flops(self.engine.module, M, micro[0]["ctrl"].shape[1], self_cond)
                values["perf/mfu"] = flops / dt / self.peak
            self.monitor.scalars(self.step, values)
            self.last = {"step": self.step, **values}
            step = self.step
            if step % max(1, self.tcfg.log_every) == 0 or step == max_steps:
                self.monitor.progress_line(step, max_steps, values)
            if self.tcfg.val_every and step % self.tcfg.val_every == 0:
                self.validate()
            if self.tcfg.sample_every and step % self.tcfg.sample_every == 0:
                self.sample_metrics()
            if self.tcfg.ckpt_every and step % self.tcfg.ckpt_every == 0:
                self.save_checkpoint()
                last_saved = step
        if last_saved != self.step:
            self.save_checkpoint()
        wall = time.perf_counter() - t_run
        return {"step": self.step, "seconds": wall, "cells_per_s": cells_total / wall if wall > 0 else 0.0,
                "last": self.last}

    # ---- evaluation ---------------------------------------------------------------------------

    def _eval_batches(self, limit: int):
        """The first ``limit`` validation batches, the same count on every rank (None: no val data)."""
        if self.val_loader is None:
            return None
        n = self._min_over_ranks(min(len(self.val_loader), limit))
        if n == 0:
            return None
        self.val_loader.set_epoch(0)
        out = []
        for i, batch in enumerate(self.val_loader):
            if i >= n:
                break
            out.append(batch)
        self.val_loader.set_epoch(0)
        return out

    @contextmanager
    def _evaluating(self, stream: int):
        """(model in eval mode, a generator fixed per (seed, stream, rank)) under no_grad and autocast."""
        model = self.engine.module
        was_training = model.training
        model.eval()
        gen = torch.Generator(device=self.gen.device)
        gen.manual_seed((int(self.tcfg.seed) * 7919 + stream) * 1_000_003 + self.rank)
        try:
            with torch.no_grad(), self.engine.autocast():
                yield model, gen
        finally:
            model.train(was_training)

    def validate(self) -> dict:
        """Mean diffusion loss (and its terms) per held-out set, with fixed noise and coin flips."""
        batches = self._eval_batches(self.tcfg.val_batches)
        if batches is None:
            return {}
        sums = [0.0, 0.0, 0.0, 0.0]
        with self._evaluating(stream=1) as (model, gen):
            for batch in batches:
                terms = self.diffusion.loss(model, self._to_device(batch), gen)
                per_set = terms.mse + self.diffusion.cfg.mmd_weight * terms.mmd
                sums = [sums[0] + float(per_set.sum()), sums[1] + float(terms.mse.sum()),
                        sums[2] + float(terms.mmd.sum()), sums[3] + per_set.numel()]
        loss, mse, mmd, n = pdist.all_reduce_floats(sums, self.device)
        values = {"val/loss": loss / n, "val/mse": mse / n, "val/mmd": mmd / n}
        self.monitor.scalars(self.step, values)
        self.log(f"step {self.step}: val loss {values['val/loss']:.4f} (mse {values['val/mse']:.4f}, "
                 f"mmd {values['val/mmd']:.4f}) over {int(n)} held-out sets")
        return values

    def sample_metrics(self) -> dict:
        """Sample one population per fixed validation set; Pearson delta and MMD^2 to the real cells."""
        batches = self._eval_batches(self.tcfg.sample_batches)
        if batches is None:
            return {}
        sums = [0.0, 0.0, 0.0, 0.0]
        marginal = self.diffusion.cfg.p_drop_control >= 1.0  # trained without controls: sample without
        with self._evaluating(stream=2) as (model, gen):
            for batch in batches:
                b = self._to_device(batch)
                x, mask, gm = b["x"], b["mask"].bool(), b.get("gene_mask")
                ctrl_mask = b["ctrl_mask"].bool()
                pred = sample_sets(model, self.diffusion, ctrl=b["ctrl"],
                                   ctrl_mask=torch.zeros_like(ctrl_mask) if marginal else ctrl_mask,
                                   cov=covariates_of(b), num_cells=x.shape[1], num_samples=1,
                                   sample_steps=self.tcfg.sample_steps, generator=gen)[:, 0].float()
                full = torch.ones_like(mask)
                r = pearson_delta(pred, full, x, mask, b["ctrl"], ctrl_mask, gm)
                d = set_mmd(pred, full, x, mask, self.diffusion.cfg.kernel, tuple(self.diffusion.cfg.bandwidths),
                            self.diffusion.cfg.kme_impl, gm)
                r, d = r[torch.isfinite(r)], d[torch.isfinite(d)]
                sums = [sums[0] + float(r.sum()), sums[1] + r.numel(), sums[2] + float(d.sum()), sums[3] + d.numel()]
        r_sum, r_n, d_sum, d_n = pdist.all_reduce_floats(sums, self.device)
        values = {"val/pearson_delta": r_sum / r_n if r_n else float("nan"),
                  "val/mmd_sampled": d_sum / d_n if d_n else float("nan")}
        self.monitor.scalars(self.step, values)
        self.log(f"step {self.step}: sampled {int(d_n)} held-out populations ({self.tcfg.sample_steps} DDIM steps): "
                 f"pearson delta {values['val/pearson_delta']:.3f}, MMD^2 {values['val/mmd_sampled']:.4f}")
        return values

    # ---- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<n>`` atomically (collective); keep the newest ``train.keep_last``."""
        final = step_dir(self.ckpt_root, self.step)
        tmp = self.ckpt_root / f".{final.name}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        pdist.barrier()
        client = {"step": self.step, "mode": self.mode, "world": self.world, "loader": self.train_loader.state_dict()}
        if self.ema is not None:
            client["ema"] = {"decay": self.ema.decay, "every": self.ema.every, "num_updates": self.ema.num_updates,
                             "warmup": self.ema.warmup}
        self.engine.save(tmp, client)
        rng = {"generator": self.gen.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(rng, str(tmp / RNG_FILE.format(rank=self.rank)))
        if self.ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.ema.shadow.items()}, str(tmp / EMA_FILE))
        pdist.barrier()
        if self.main:
            commit_directory(tmp, final)
            rotate(self.ckpt_root, self.tcfg.keep_last)
            self.log(f"step {self.step}: checkpoint {final}")
        pdist.barrier()
        return final

    def resume(self, path: str | Path) -> dict:
        """Restore everything ``save_checkpoint`` wrote (call before ``fit``; collective)."""
        path = Path(path)
        client = self.engine.load(path)
        if client.get("world") != self.world:
            raise ValueError(f"{path} was written by {client.get('world')} ranks; this job has {self.world}. "
                             "Resume with the same number of processes (the data order depends on it)")
        self.train_loader.load_state_dict(client["loader"])
        rng_file = path / RNG_FILE.format(rank=self.rank)
        if not rng_file.is_file():
            raise FileNotFoundError(f"{rng_file} is missing: the checkpoint is incomplete")
        rng = load_file(str(rng_file))
        self.gen.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        if self.ema is not None:
            if not (path / EMA_FILE).is_file():
                raise FileNotFoundError(f"{path / EMA_FILE} is missing but EMA is on (train.optim.ema_every > 0)")
            shadow = load_file(str(path / EMA_FILE), device=str(self.device))
            self.ema.load_state_dict({**client["ema"], "shadow": shadow})
        self.monitor.truncate_after(self.step)
        self.log(f"resumed from {path} at step {self.step}")
        return client

    def export_foundation(self, path: str | Path) -> Path | None:
        """The consolidated foundation checkpoint (EMA weights when EMA is on); collective, rank 0 writes."""
        from ..foundation import save_foundation

        state = self.engine.consolidated_state_dict()
        out = None
        if self.main:
            if self.ema is not None:
                state.update({k: v.detach().float().cpu() for k, v in self.ema.shadow.items()})
            extra = {"mode": self.mode, "step": self.step, "ema": self.ema is not None,
                     "datasets": self.vocabularies.get("dataset", []), "set_size": self.cfg.data.set_size,
                     "normalize": dataclasses.asdict(self.cfg.data.normalize),
                     "diffusion": dataclasses.asdict(self.cfg.diffusion),
                     # the perturbation labels of control cells (predict inverts controls under them)
                     "control_perturbations": list(getattr(self.train_loader, "control_perturbations", [])),
                     "control_numeric": dict(getattr(self.train_loader, "control_numeric", {})),
                     # numeric covariates the training data had (predict requires them of conditions)
                     "numeric_in_data": sorted(getattr(self.train_loader, "numeric_names", None)
                                               or getattr(self.train_loader, "group_numeric", {}))}
            out = save_foundation(path, state, model_cfg=self.engine.module.cfg, genes=self.genes,
                                  vocabularies=self.vocabularies, extra=extra)
            self.log(f"foundation checkpoint: {out} ({len(self.genes)} genes, "
                     f"{'EMA' if self.ema is not None else 'final'} weights)")
        pdist.barrier()
        return out

    def close(self) -> None:
        self.monitor.close()
