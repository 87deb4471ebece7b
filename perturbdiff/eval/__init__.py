"""Evaluation: predicted populations against real ones.

- ``evaluate``: the ``perturbdiff evaluate`` command (``evaluate_files``): the model and the baselines
  scored on the same cells, written to an evaluation directory.
- ``schema``: the methods, the metric groups and ``EvalDir``, the one class that writes and reads an
  evaluation directory.
- ``inputs``: the AnnData inputs: reading in the evaluation layout, the checks, rows and group means.
- ``suite``: ``evaluate(real, pred)``, the cell-eval metric suite per condition, aggregated and per
  context, plus CellFlow's R^2.
- ``de``: vectorised Wilcoxon rank-sum (tie and continuity corrected, exact for small groups) and
  Benjamini-Hochberg, as cell-eval / pdex run them.
- ``baselines``, ``latent``, ``transfer``: control mean, perturbation mean (cell-eval's), linear
  (Ahlmann-Eltze et al. 2024), scGen-style latent shift, split-half ceiling.
- ``score``: cell-eval's normalised score against a baseline.
- ``fidelity``: do predicted cells look like measured cells (zeros, sub-count values, spread, size).
- ``distribution``: MMD^2 and energy distance per condition, and the calibration of sampled
  populations against real replicate batches.
- ``report``: ``perturbdiff report``, an evaluation directory as an HTML page with its figures.
- ``metrics``: tensor helpers used during training (pseudobulk, Pearson delta, set MMD).
"""
