"""The options of a prediction (``perturbdiff predict``'s flags, the pipeline's predict stage), in a
module of their own so that the command line reads their defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from .config import BASELINE_TRAIN_CELLS


@dataclass
class PredictOptions:
    n_cells: int = 256  # per population, when a condition does not say
    n_samples: int = 1  # populations per condition, when a condition does not say
    sets_per_batch: int = 16
    sample_steps: int | None = None  # None: the checkpoint's diffusion.sample_steps
    guidance: float | None = None
    max_controls: int = 2_000  # real control cells per context appended to the outputs
    train_cells: int = BASELINE_TRAIN_CELLS  # > 0: predict_split also samples this many cells per training group
    # (train.h5ad, for the baselines); 0: none
    max_cells: int = 5_000_000  # generated cells per call, over all conditions (a bound on typos like 1e9)
    missing_genes: str = "error"  # error | zero
    # counts: every generated cell decoded to attainable values (integer counts at a library size of its
    # context's control cells, normalised as the data; perturbdiff.decode); continuous: the paper's output
    decode: str = "counts"
    start: str | None = None  # controls | noise (None: the checkpoint's diffusion.start)
    control_label: str = "control"
    seed: int = 0
    device: str = "auto"
