"""scGen-style latent arithmetic as a baseline (Lotfollahi et al. 2019), with a PCA in place of the VAE.

    latent      z = (x - m) V            m, V [G, K]: mean and top-K principal axes of the training cells AND
                                         the passed control cells (scGen trains its VAE on the target
                                         context's control cells too; only its perturbed cells are held out)
    shift       dz_p = mean over the TRAINING contexts c where p was measured of
                       (mean z of (c, p) cells) - (mean z of c's control cells)  =  (mu_{c,p} - mu_ctrl_c) V
    prediction  x_hat = max(0, m + (z_ctrl + dz_p) V^T)   for resampled control cells of the target context

so an unseen context is represented by its OWN control cells, moved along the perturbation's mean
latent shift from the other contexts and decoded. A perturbation without training cells gets the mean
shift of all training conditions (noted). Because the decoder is linear, the latent shift is the
training pseudobulk change projected onto the K axes; what the decoding adds over a mean shift is the
denoising of each control cell onto the training manifold (``residual=True`` keeps each control cell's
off-manifold part, i.e. x_ctrl + dz_p V^T clipped at 0). The axes come from at most ``max_fit_cells``
cells (a seeded subsample), which bounds the cost on large training sets.

Same signature and output layout as the predictors of ``baselines``.
"""

from __future__ import annotations

import anndata as ad
import numpy as np

from .baselines import PRED_BATCH, _assemble, _draw, _Inputs, _notes, _obs_block, _rng
from .inputs import dense_rows


def _principal_axes(xs: list, k: int, max_cells: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(mean [G], axes [G, k']) of the rows of the matrices ``xs`` (dense or sparse), k' = min(k, rank);
    at most ``max_cells`` rows, drawn from each matrix in proportion to its size."""
    total = sum(x.shape[0] for x in xs)
    parts = []
    for x in xs:
        n = x.shape[0]
        take = n if total <= max_cells else max(1, int(round(max_cells * n / total)))
        rows = np.sort(rng.choice(n, size=take, replace=False)) if take < n else np.arange(n)
        parts.append(dense_rows(x, rows))
    d = np.concatenate(parts, axis=0)
    m = d.mean(0)
    d -= m
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    keep = int(min(k, (s > s[0] * 1e-10).sum() if s.size and s[0] > 0 else 0))
    return m, vt[:keep].T


def predict_latent_shift(train: ad.AnnData, conditions, controls: ad.AnnData, rng=None, *,
                         control_label: str = "control", n_components: int = 50, residual: bool = False,
                         max_fit_cells: int = 20_000, n_samples: int = 1) -> ad.AnnData:
    """scGen-style latent arithmetic on a training-cell PCA (see the module docstring)."""
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1, got {n_components}")
    inp = _Inputs("latent_shift", train, conditions, controls, control_label)
    rng = _rng(rng)
    m, V = _principal_axes([train.X, inp.controls.X], n_components, max_fit_cells, rng)
    dz = inp.deltas @ V                                   # [n_train_conditions, K] latent shifts
    perts = np.array([p for _, p in inp.keys])
    pooled = dz.mean(0)
    fallback: set[str] = set()
    cache: dict[str, np.ndarray] = {}

    def step_of(p: str) -> np.ndarray:
        """[1, G]: the perturbation's mean latent shift, decoded (the pooled shift without training cells)."""
        if p not in cache:
            rows = perts == p
            if not rows.any():
                fallback.add(p)
            cache[p] = ((dz[rows].mean(0) if rows.any() else pooled) @ V.T)[None, :]
        return cache[p]

    blocks = []
    for row, s in inp.iter_populations(n_samples):
        c, p, n = row["context"], row["perturbation"], int(row["n_cells"])
        x = dense_rows(inp.controls.X, _draw(inp.ctrl_rows[c], n, rng))
        step = step_of(p)
        if residual:
            x = x + step
        else:
            x = m + ((x - m) @ V) @ V.T + step
        np.maximum(x, 0.0, out=x)
        blocks.append((x, _obs_block(n, p, c, PRED_BATCH, s, False)))
    if fallback:
        fb = sorted(fallback)
        inp.notes.append(f"perturbation(s) {fb[:10]}{' ...' if len(fb) > 10 else ''} ({len(fb)}) have no training "
                         "cells: shifted by the mean latent shift of all training conditions")
    return _assemble("latent_shift", blocks, controls, train.var, control_label,
                     {"n_components": int(V.shape[1]), "residual": bool(residual), "notes": _notes(inp.notes)})
