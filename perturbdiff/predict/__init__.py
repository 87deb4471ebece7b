"""Prediction: sampled populations for a list of conditions, as an AnnData in cell-eval's layout.

    perturbdiff predict --checkpoint RUN/foundation --store STORE.zarr --split test --out OUT
    perturbdiff predict --checkpoint RUN/foundation --controls ctrl.h5ad --conditions conds.csv --out OUT

For every condition (perturbation, context, batch, n_cells, n_samples, dose) the model draws
``n_samples`` independent populations of ``n_cells`` cells. A population is generated in sets of the
training set size, each conditioned on its own draw of real control cells of the condition's context
(and batch, when the pool has it). Output, written as it is generated (the matrix is never whole in
memory), to ``OUT/pred.h5ad`` and, when the truth is known (``--store`` with a split), ``OUT/real.h5ad``:

    .X      log-normalised expression, log1p(normalize_total) (the training scale undone), CSR
    .obs    perturbation, context, batch, sample (population index; -1 for real cells), is_control
    .var    the checkpoint's gene vocabulary

The SAME real control cells (up to ``max_controls`` per context, seeded) are appended to both files,
so a shifted prediction of the controls cannot game the delta metrics. Files are written under a
temporary name and renamed when complete.

Modules: ``controls`` (the control cells, from a store or a user's h5ad), ``sampling`` (``predict``:
the populations, streamed into pred.h5ad), ``files`` (the truth and the training cells beside it,
``predict_split`` and ``write_prediction``); the h5ad writer is ``perturbdiff.data.h5ad_writer``.

Users' own controls (``--controls`` h5ad) are aligned to the checkpoint's genes by name: the overlap
is reported, and ``missing_genes`` says what to do with checkpoint genes the file lacks ("error", or
"zero": fill with zeros, reported). Raw counts vs log-normalised values are detected (integral
values are counts) and normalised like the training data.
"""

from ..predict_options import PredictOptions
from .controls import ControlPool, controls_from_h5ad, controls_from_store, gene_map, h5ad_rows, pool_libraries
from .files import predict_split, real_from_store, train_from_store, write_prediction, write_real
from .sampling import attainable_max, control_covariates, predict

__all__ = ["ControlPool", "PredictOptions", "attainable_max", "control_covariates", "controls_from_h5ad",
           "controls_from_store", "gene_map", "h5ad_rows", "pool_libraries", "predict", "predict_split",
           "real_from_store", "train_from_store", "write_prediction", "write_real"]
