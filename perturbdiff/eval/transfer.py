"""An unseen context represented by its own control cells (the linear baseline's context transfer).

A context with no training perturbation (an unseen cell type) has nothing of its own for a
pseudobulk model to fit; what it does have is its control cells. We write its control mean as a
convex combination of the training contexts' control means (a synthetic control),

    w = argmin_w || sum_c w_c mu_ctrl_c - mu_ctrl_target ||^2    w >= 0, sum_c w_c = 1

and predict its change under perturbation p as the same combination of the training contexts'
changes, ``sum_c w_c D(c, p)``, where D(c, p) is the measured training change mu_{c,p} - mu_ctrl_c
when (c, p) is in training and the fitted model's prediction for c otherwise. A target that looks
like one training context takes that context's responses; one between two takes a blend; a
training context itself gets w = its own indicator (and is not transferred: its own fit is used).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import nnls


def simplex_weights(basis: np.ndarray, target: np.ndarray) -> np.ndarray:
    """[k] weights on the simplex minimising ||basis.T @ w - target|| for ``basis`` [k, G] (float64).

    Non-negative least squares with the sum-to-one constraint as a heavily weighted extra row, then
    renormalised (exact on the simplex up to ~1e-9 of the residual)."""
    basis = np.asarray(basis, np.float64)
    target = np.asarray(target, np.float64)
    k = basis.shape[0]
    if k == 1:
        return np.ones(1)
    scale = max(float(np.abs(basis).max()), float(np.abs(target).max()), 1e-12) * 1e3
    a = np.vstack([basis.T, np.full((1, k), scale)])
    b = np.concatenate([target, [scale]])
    w, _ = nnls(a, b, maxiter=50 * k)
    total = w.sum()
    return w / total if total > 0 else np.full(k, 1.0 / k)


class ContextTransfer:
    """Changes for contexts without training conditions, from the training contexts' changes.

    ``ctrl_means`` {context: control mean [G]} of the training contexts (those with training
    conditions), ``observed`` {(context, perturbation): measured change [G]}, ``model(p, c)`` the
    fitted model's change for p in training context c."""

    def __init__(self, ctrl_means: dict[str, np.ndarray], observed: dict[tuple[str, str], np.ndarray], model):
        self.contexts = sorted(ctrl_means)
        self.basis = np.stack([ctrl_means[c] for c in self.contexts]) if self.contexts else None
        self.observed, self.model = observed, model

    def weights(self, target_ctrl_mean: np.ndarray) -> dict[str, float]:
        """{training context: weight} of a target context's control mean."""
        return dict(zip(self.contexts, simplex_weights(self.basis, target_ctrl_mean).tolist()))

    def delta(self, perturbation: str, weights: dict[str, float]) -> np.ndarray:
        """[G] the weighted change under ``perturbation`` (measured where trained, else the model's)."""
        out = 0.0
        for c, w in weights.items():
            if w <= 0:
                continue
            d = self.observed.get((c, perturbation))
            if d is None:
                d = self.model(perturbation, c)[0]
            out = out + w * d
        return np.asarray(out, np.float64)
