"""``perturbdiff report``: an evaluation directory as one self-contained HTML page with its PNGs.

    perturbdiff report --eval EVAL_OUT [--run RUN_DIR] [--condition CONTEXT/PERTURBATION ...] [--out DIR]

Reads what ``perturbdiff evaluate`` wrote (metrics.csv, aggregated.csv, scores.csv, summary.json,
calibration.csv when present) and, for the cell-level plots, the pred / real h5ad files that
summary.json names. Sections of ``index.html``:

    header        inputs, conditions, contexts, K sampled populations, the evaluation's notes
    metrics       headline means per method with the normalised score (best non-ceiling value
                  marked), every metric in a collapsible table, per-condition values per method
    deltas        model vs real pseudobulk log-fold-change (mean perturbed - mean control) per gene
    cells         PCA of real vs predicted cells (fitted on the context's real cells), and each
                  sampled population beside each real replicate batch in the same coordinates
    calibration   coverage vs nominal and the rank (PIT) histogram (when calibration.csv exists)
    training      the metrics.jsonl curves of each run directory given
    footer        versions and the metric reference

Every figure is written as a PNG next to index.html and embedded in it as a data URI, so the page
alone can be shared. Figures are drawn (by ``.plots``, the plotting API) on matplotlib's Agg
canvas directly (``Figure`` + ``FigureCanvasAgg``, no pyplot), so importing this module changes no
global matplotlib state. Cells are subsampled (at most ``MAX_CELLS`` per plotted group, seeded) to
keep large inputs fast. ``.inputs`` reads the cells and runs and chooses the conditions;
``.page`` assembles the page, which is built in a temporary directory that replaces ``out`` only when complete.
"""

from .inputs import resolve_conditions
from .page import best_methods, write_report
from .plots import format_value

__all__ = ["best_methods", "format_value", "resolve_conditions", "write_report"]
