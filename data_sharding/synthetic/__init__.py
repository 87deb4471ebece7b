"""The synthetic Tahoe-format dataset with known answers (``perturbdiff synth``).

    dataset.py   generate(cfg), load_ground_truth(dir): the files, the ground truth, resuming
    biology.py   the model the cells are drawn from (parameters, dose responses, count sampling)
    h5ad.py      write_h5ad(dir, path): the same cells as an AnnData file

Command line: ``python -m data_sharding.synthetic out_dir=runs/synth num_cells=100000 num_workers=2``.
"""

from .dataset import generate, load_ground_truth
from .h5ad import write_h5ad

__all__ = ["generate", "load_ground_truth", "write_h5ad"]
