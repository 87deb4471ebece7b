"""Evaluation: predicted populations against real ones.

- ``metrics``: tensor helpers used during training (pseudobulk, Pearson delta, set MMD).
- ``de``: vectorised Wilcoxon rank-sum (tie and continuity corrected, exact for small groups) and
  Benjamini-Hochberg, as cell-eval / pdex run them.
- ``suite``: ``evaluate(real, pred)``, the cell-eval metric suite per condition, aggregated and per
  context, plus CellFlow's R^2.
- ``baselines``: control mean, perturbation mean (cell-eval's), linear (Ahlmann-Eltze et al. 2024),
  split-half ceiling, and cell-eval's normalised score.
- ``distribution``: MMD^2 and energy distance per condition, and the calibration of sampled
  populations against real replicate batches.
"""
