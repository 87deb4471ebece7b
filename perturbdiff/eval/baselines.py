"""Reference predictors scored beside the model: no effect, mean effect, linear, and the split-half ceiling.

Every predictor takes the TRAINING real cells, the held-out conditions and the real control cells
the caller evaluates with, and returns a predicted AnnData in the evaluation layout (the layout of
``perturbdiff.predict``):

    .X      log-normalised expression (CSR when ``controls.X`` is sparse, dense otherwise), float32
    .obs    perturbation, context, batch, sample (population index; -1 for real cells), is_control
    .var    the genes of ``train`` (``controls`` must have the same genes in the same order)
    .uns    ["baseline"]: name, parameters and ``notes`` (fallbacks taken, in words)

Per held-out condition (context, perturbation, n_cells[, n_samples]) there are ``n_samples``
populations of ``n_cells`` predicted cells; then ALL of ``controls`` are appended unchanged
(sample -1, is_control True). Passing the real AnnData's own control cells as ``controls`` makes the
controls of the prediction and of the truth the same cells, so a baseline (or a model) cannot gain
on the delta metrics by moving its controls.

Predictors (same signature: ``predict_<name>(train, conditions, controls, rng=None, **options)``):

- ``predict_control_mean``: "no effect". Each predicted cell is a real control cell of the
  condition's context, drawn without replacement (with replacement only when ``n_cells`` exceeds the
  context's controls). The predicted pseudobulk delta is zero up to resampling.
- ``predict_perturbation_mean``: cell-eval's baseline (``cell-eval baseline``, ``build_base_mean_adata``
  in cell-eval 0.6.6 to 0.8.1). cell-eval sets EVERY predicted cell to one constant vector: the mean
  of the per-group pseudobulks, each perturbation group weighted equally and the control group
  counted as one more group (``mean(mu_ctrl, mu_p1, ..., mu_pn)``), with the real controls kept. We
  follow that definition (``mode="cell_eval"``, the default) with two deliberate differences, both
  recorded in the notes: the group means are taken over the TRAINING cells (cell-eval builds them
  from the evaluation AnnData itself, i.e. from the held-out cells), and per context
  (``scope="context"``; ``scope="global"`` pools every training condition). Written through deltas,
  the constant is ``mu_ctrl_c + n_c / (n_c + 1) * mean_p(mu_{c,p} - mu_ctrl_c)``, so a context with
  no training perturbation (a fully held-out context) uses its control mean (from ``controls``) and
  the pooled mean delta of all training conditions. ``mode="shift"`` is the cell-level variant
  (cell-eval's ``as_delta`` mean delta applied to cells): the context's resampled control cells plus
  ``mean_p(mu_{c,p} - mu_ctrl_c)``, clipped at 0.
- ``predict_linear``: the linear model of Ahlmann-Eltze, Huber & Anders (2024), fitted to the
  pseudobulk CHANGES of the training conditions, ``Y[:, j] = mu_{c,p} - mu_ctrl_c`` (genes x
  training conditions):

      Y ~ G W P_j^T + b        b = row means of Y (the mean effect)
      G = first K principal components of Y (genes x K: left singular vectors of Y - b times their
          singular values)
      P = perturbation embedding (perturbations x K'): principal-component scores of the
          per-perturbation changes averaged over contexts, Ybar - b; P_j = the row of condition j's
          perturbation. With ``perturbation_embedding`` (a DataFrame indexed by perturbation),
          that embedding, centred on its mean over the training conditions, replaces the PCA.
      W = (G^T G + l_G I)^-1 G^T (Y - b) P_j (P_j^T P_j + l_P I)^-1     (two-sided ridge)
      l_G = ridge * trace(G^T G),  l_P = ridge * trace(P_j^T P_j)   (scale-free ridge; default 0.01)

  A held-out (context, perturbation) is predicted as ``G W P[p] + b``: a perturbation seen in
  other contexts uses its embedding from those contexts (the model has no context term: a
  perturbation gets the same predicted change in every context). A perturbation absent from
  training (and from ``perturbation_embedding``) falls back to the mean effect ``b`` (noted).
  Predicted cells = the context's resampled control cells + the predicted change, clipped at 0.
  ``context_offset=True`` (our extension, off by default) makes b per context, Y ~ b_c + G W P^T,
  fitted by alternating the offsets and the low-rank part (see ``fit_linear``); a prediction in
  context c adds b_c (the pooled b for a context with no training condition, noted). It recovers
  additive context effects exactly where the plain model cannot (tested).
- ``predict_ceiling``: the split-half ceiling (as cell-eval's ``--ceiling``, without its bootstrap
  to 2n): the REAL held-out cells of each condition are split at random into two halves; one half
  (floor(n/2) cells, sample 0) is the "prediction", the other (ceil(n/2) cells) the truth. Returns
  ``(pred, real_half)``, both with the same control cells appended.

The AnnData helpers and input checks are ``perturbdiff.eval.inputs``; cell-eval's normalised score
is ``perturbdiff.eval.score``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..data.schema import DataError
from .inputs import (KEY, as_conditions, dense_rows, group_rows, keyed_means, obs_str, require_obs,
                     require_same_genes)

OBS_COLUMNS = ("perturbation", "context", "batch", "sample", "is_control")
PRED_BATCH = "pred"  # obs batch of predicted cells

def _rng(rng) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _draw(rows: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n of ``rows``: without replacement when there are enough, with replacement otherwise."""
    return rng.choice(rows, size=n, replace=n > len(rows))


# ---------------------------------------------------------------------------------------------
# Training statistics
# ---------------------------------------------------------------------------------------------


class _Inputs:
    """Validated inputs: conditions, control rows per context, training deltas per condition."""

    def __init__(self, name: str, train: ad.AnnData, conditions, controls: ad.AnnData, control_label: str,
                 need_deltas: bool = True):
        require_obs(train, ("perturbation", "context"), "train")
        require_obs(controls, ("perturbation", "context"), "controls")
        require_same_genes(train, controls, "train", "controls")
        self.name, self.train, self.controls, self.control_label = name, train, controls, control_label
        self.notes: list[str] = []
        self.conditions = as_conditions(conditions)
        is_ctrl = self.conditions["perturbation"] == control_label
        if is_ctrl.any():
            bad = [tuple(r) for r in self.conditions.loc[is_ctrl, list(KEY)].to_numpy()]
            raise DataError(None, f"condition(s) {bad[:10]} are controls ({control_label!r}): controls are appended, "
                            "not predicted")
        c_pert = obs_str(controls, "perturbation")
        if (c_pert != control_label).any():
            raise DataError(None, f"controls must hold only control cells (perturbation == {control_label!r}); "
                            f"found {sorted(set(c_pert[c_pert != control_label]))[:5]}")
        self.ctrl_rows = {k[0]: v for k, v in group_rows(controls, keys=("context",)).items()}
        missing = sorted(set(self.conditions["context"]) - set(self.ctrl_rows))
        if missing:
            raise DataError(None, f"controls have no cells of context(s) {missing}, needed by the conditions")
        t_pert = obs_str(train, "perturbation")
        in_train = set(group_rows(train, t_pert != control_label))
        present = [k for k in map(tuple, self.conditions[list(KEY)].to_numpy()) if k in in_train]
        if present:
            self.notes.append(f"{len(present)} requested condition(s) also have training cells, e.g. {present[0]}")
        if need_deltas:
            self._deltas(t_pert)

    def _deltas(self, t_pert: np.ndarray) -> None:
        """deltas [n_train_conditions, G] = mu_{c,p} - mu_ctrl_c; ctrl_mean_train {context: mu_ctrl}."""
        train, control_label = self.train, self.control_label
        keys, means = keyed_means(train.X, group_rows(train, t_pert != control_label))
        ckeys, cmeans = keyed_means(train.X, group_rows(train, t_pert == control_label, keys=("context",)))
        ctrl = {k[0]: m for k, m in zip(ckeys, cmeans)}
        self.ctrl_mean_train = dict(ctrl)
        lacking = sorted({c for c, _ in keys if c not in ctrl})
        if lacking:
            fill = [c for c in lacking if c in self.ctrl_rows]
            if fill:
                _, m = keyed_means(self.controls.X, {(c,): self.ctrl_rows[c] for c in fill})
                ctrl.update(zip(fill, m))
                self.notes.append(f"training context(s) {fill} have no training control cells: their deltas are "
                                  "taken against the passed controls")
            skip = [c for c in lacking if c not in ctrl]
            if skip:
                self.notes.append(f"training context(s) {skip} have no control cells anywhere: their perturbed "
                                  "cells are left out of the training deltas")
        use = [i for i, (c, _) in enumerate(keys) if c in ctrl]
        self.keys = [keys[i] for i in use]
        self.deltas = (np.stack([means[i] - ctrl[keys[i][0]] for i in use]) if use
                       else np.zeros((0, train.n_vars)))
        if not self.keys:
            raise DataError(None, f"{self.name}: train has no perturbed cells (perturbation != {control_label!r}) "
                            "with control cells in their context")

    def control_mean(self, context: str) -> np.ndarray:
        _, m = keyed_means(self.controls.X, {(context,): self.ctrl_rows[context]})
        return m[0]

    def iter_populations(self, n_samples: int):
        """(row of conditions, sample index) for every population to predict."""
        for _, row in self.conditions.iterrows():
            k = int(row["n_samples"]) if "n_samples" in row.index else n_samples
            for s in range(k):
                yield row, s


# ---------------------------------------------------------------------------------------------
# Output assembly
# ---------------------------------------------------------------------------------------------


def _obs_block(n: int, perturbation, context, batch, sample, is_control) -> pd.DataFrame:
    return pd.DataFrame({"perturbation": np.broadcast_to(np.asarray(perturbation, dtype=object), (n,)),
                         "context": np.broadcast_to(np.asarray(context, dtype=object), (n,)),
                         "batch": np.broadcast_to(np.asarray(batch, dtype=object), (n,)),
                         "sample": np.broadcast_to(np.asarray(sample, dtype=np.int64), (n,)),
                         "is_control": np.broadcast_to(np.asarray(is_control, dtype=bool), (n,))})


def _control_obs(controls: ad.AnnData, control_label: str) -> pd.DataFrame:
    n = controls.n_obs
    batch = obs_str(controls, "batch", default="")
    obs = _obs_block(n, control_label, obs_str(controls, "context"), batch, -1, True)
    obs.index = controls.obs_names.astype(str)
    return obs


def _assemble(name: str, blocks: list[tuple[np.ndarray | sp.spmatrix, pd.DataFrame]], controls: ad.AnnData,
              var: pd.DataFrame, control_label: str, uns: dict, prefix: str | None = None,
              keep_index: bool = False) -> ad.AnnData:
    """Predicted blocks then all of ``controls``; X sparse iff controls.X is sparse. Predicted cells are
    named ``<prefix or name>-<i>`` unless ``keep_index`` (then the blocks' own obs names are kept)."""
    sparse = sp.issparse(controls.X)
    xs, obs = [], []
    start = 0
    for x, o in blocks:
        o = o.copy()
        if not keep_index:
            o.index = [f"{prefix or name}-{i}" for i in range(start, start + len(o))]
        start += len(o)
        xs.append(sp.csr_matrix(x, dtype=np.float32) if sparse else np.asarray(x, dtype=np.float32))
        obs.append(o)
    cx = controls.X
    xs.append(sp.csr_matrix(cx, dtype=np.float32) if sparse else np.asarray(cx, dtype=np.float32))
    obs.append(_control_obs(controls, control_label))
    X = sp.vstack(xs, format="csr") if sparse else np.concatenate(xs, axis=0)
    obs_df = pd.concat(obs, axis=0)
    for c in ("perturbation", "context", "batch"):
        obs_df[c] = obs_df[c].astype(str).astype("category")
    obs_df["sample"] = obs_df["sample"].astype(np.int64)
    obs_df["is_control"] = obs_df["is_control"].astype(bool)
    out = ad.AnnData(X=X, obs=obs_df, var=pd.DataFrame(index=pd.Index(var.index.astype(str), name=var.index.name)))
    if not out.obs_names.is_unique:
        out.obs_names_make_unique()
    out.uns["baseline"] = {"name": name, "control_label": control_label, **uns}
    return out


def _notes(notes: list[str]) -> list[str]:
    return list(notes) if notes else ["none"]


def _shifted_controls(inp: _Inputs, delta_of: Callable[[str, str], np.ndarray], n_samples: int,
                      rng: np.random.Generator, clip: bool = True) -> list:
    """Blocks of the context's resampled control cells + delta_of(context, perturbation)."""
    blocks = []
    for row, s in inp.iter_populations(n_samples):
        c, p, n = row["context"], row["perturbation"], int(row["n_cells"])
        x = dense_rows(inp.controls.X, _draw(inp.ctrl_rows[c], n, rng))
        d = delta_of(c, p)
        if d is not None:
            x = x + d[None, :]
            if clip:
                np.maximum(x, 0.0, out=x)
        blocks.append((x, _obs_block(n, p, c, PRED_BATCH, s, False)))
    return blocks


# ---------------------------------------------------------------------------------------------
# Predictors
# ---------------------------------------------------------------------------------------------


def predict_control_mean(train: ad.AnnData, conditions, controls: ad.AnnData, rng=None, *,
                         control_label: str = "control", n_samples: int = 1) -> ad.AnnData:
    """No effect: each predicted cell is a resampled real control cell of the condition's context."""
    inp = _Inputs("control_mean", train, conditions, controls, control_label, need_deltas=False)
    blocks = _shifted_controls(inp, lambda c, p: None, n_samples, _rng(rng))
    return _assemble("control_mean", blocks, controls, train.var, control_label, {"notes": _notes(inp.notes)})


def _mean_deltas(inp: _Inputs, scope: str) -> tuple[dict[str, tuple[np.ndarray, int]], tuple[np.ndarray, int]]:
    """Per-context and pooled (mean delta over training conditions, number of conditions)."""
    pooled = (inp.deltas.mean(0), len(inp.keys))
    per_ctx: dict[str, tuple[np.ndarray, int]] = {}
    if scope == "context":
        ctx = np.array([c for c, _ in inp.keys])
        for c in np.unique(ctx):
            sel = ctx == c
            per_ctx[c] = (inp.deltas[sel].mean(0), int(sel.sum()))
    return per_ctx, pooled


def predict_perturbation_mean(train: ad.AnnData, conditions, controls: ad.AnnData, rng=None, *,
                              control_label: str = "control", mode: str = "cell_eval", scope: str = "context",
                              n_samples: int = 1) -> ad.AnnData:
    """cell-eval's perturbation-mean baseline on the training cells (see the module docstring).

    mode="cell_eval": every predicted cell = mean(mu_ctrl_c, mu_{c,p1}, ..., mu_{c,pn}) over the
    context's training groups, each group weighted equally (cell-eval's constant vector).
    mode="shift": the context's resampled control cells + mean_p(mu_{c,p} - mu_ctrl_c), clipped at 0.
    scope="context" averages over the context's training perturbations (falling back to all training
    conditions for a context without any); scope="global" always pools all training conditions."""
    if mode not in ("cell_eval", "shift"):
        raise ValueError(f"mode must be 'cell_eval' or 'shift', got {mode!r}")
    if scope not in ("context", "global"):
        raise ValueError(f"scope must be 'context' or 'global', got {scope!r}")
    inp = _Inputs("perturbation_mean", train, conditions, controls, control_label)
    per_ctx, pooled = _mean_deltas(inp, scope)
    fallback = sorted(set(inp.conditions["context"]) - set(per_ctx)) if scope == "context" else []
    if fallback:
        inp.notes.append(f"context(s) {fallback} have no training perturbations: the pooled mean delta of all "
                         f"{pooled[1]} training conditions is used")

    def stats(c: str) -> tuple[np.ndarray, int]:
        return per_ctx.get(c, pooled)

    rng = _rng(rng)
    if mode == "shift":
        blocks = _shifted_controls(inp, lambda c, p: stats(c)[0], n_samples, rng)
    else:
        blocks = []
        const: dict[str, np.ndarray] = {}
        for row, s in inp.iter_populations(n_samples):
            c, p, n = row["context"], row["perturbation"], int(row["n_cells"])
            if c not in const:
                d, k = stats(c)
                base = inp.ctrl_mean_train.get(c)
                if base is None:
                    base = inp.control_mean(c)
                const[c] = base + d * (k / (k + 1.0))  # = mean of (ctrl, n perturbation) group means
            blocks.append((np.broadcast_to(const[c], (n, const[c].size)), _obs_block(n, p, c, PRED_BATCH, s, False)))
        inp.notes.append("cell_eval mode: group means from the TRAINING cells of each context (cell-eval builds "
                         "them from the evaluated AnnData); control counted as one group, as in cell-eval")
    return _assemble("perturbation_mean", blocks, controls, train.var, control_label,
                     {"mode": mode, "scope": scope, "notes": _notes(inp.notes)})


def _scores(z: np.ndarray, k: int) -> np.ndarray:
    """[n, k] principal-component scores of the rows of centred ``z`` [n, m] (columns beyond the rank are 0):
    U_k S_k of the SVD, from the eigen-decomposition of the smaller Gram matrix (float64; the top
    components only, so squaring the condition number does not matter). Signs are arbitrary, as in SVD."""
    n, m = z.shape
    out = np.zeros((n, k))
    if z.size == 0:
        return out
    small = z.T @ z if m <= n else z @ z.T
    w, v = np.linalg.eigh(small)
    order = np.argsort(w)[::-1][:k]
    w, v = np.clip(w[order], 0.0, None), v[:, order]
    keep = w > w[0] * 1e-20 if w.size and w[0] > 0 else np.zeros(w.size, dtype=bool)
    r = int(keep.sum())
    out[:, :r] = z @ v[:, :r] if m <= n else v[:, :r] * np.sqrt(w[:r])
    return out


def _ridge(a: np.ndarray, ridge: float) -> np.ndarray:
    """(A + l I)^-1 with l = ridge * trace(A) (l = ridge when A is zero): relative to the total variance,
    so components beyond the data's rank (zero columns) do not change the penalty."""
    scale = float(np.trace(a)) if a.size else 0.0
    lam = ridge * (scale if scale > 0 else 1.0)
    return np.linalg.pinv(a + lam * np.eye(a.shape[0]), hermitian=True)


def fit_linear(deltas: np.ndarray, perturbations: Sequence[str], n_components: int = 10, ridge: float = 0.01,
               perturbation_embedding: pd.DataFrame | None = None, notes: list[str] | None = None,
               contexts: Sequence[str] | None = None, offset_iterations: int = 20):
    """Fit the Ahlmann-Eltze linear model to training deltas [n_conditions, G] (one row per training
    condition, ``perturbations[j]`` its perturbation). Returns ``predict(perturbation, context=None) ->
    (delta [G], how)``, ``how`` "embedding", or "mean" (no embedding: the offset alone).

    With ``contexts`` (the context of each training condition) the offset b is per context: Y ~
    b_c(j) + G W P_j^T, fitted by alternating the two parts ``offset_iterations`` times (b_c starts at
    the mean change of c's training conditions; each round refits G, P, W on Y minus the offsets, then
    sets b_c to the mean residual of c's conditions). A prediction in c adds b_c (the pooled b for a
    context without training conditions); ``predict.contexts`` lists the contexts with their own b_c."""
    notes = notes if notes is not None else []
    perturbations = [str(p) for p in perturbations]
    ctx = None if contexts is None else np.array([str(c) for c in contexts])
    if perturbation_embedding is not None:
        emb_index = set(perturbation_embedding.index.astype(str))
        keep = np.array([p in emb_index for p in perturbations])
        if not keep.all():
            notes.append(f"training perturbation(s) {sorted(set(np.array(perturbations)[~keep]))[:5]} lack an "
                         "embedding and are left out of the linear fit")
        deltas, perturbations = deltas[keep], [p for p, k in zip(perturbations, keep) if k]
        ctx = None if ctx is None else ctx[keep]
        if not perturbations:
            raise DataError(None, "perturbation_embedding covers none of the training perturbations")
    Y = deltas.T  # [G, n]
    b = Y.mean(1)
    n = Y.shape[1]
    k = max(1, min(n_components, n, Y.shape[0]))
    uniq = sorted(set(perturbations))
    col = {p: i for i, p in enumerate(uniq)}
    j_of = np.array([col[p] for p in perturbations])
    E = None
    if perturbation_embedding is not None:
        E = perturbation_embedding.copy()
        E.index = E.index.astype(str)
        E = E.astype(np.float64)

    def fit(Yc: np.ndarray):
        """G, the embeddings, their centre and W for offset-free training changes Yc [G, n]."""
        G = _scores(Yc, k)  # [genes, K]
        if E is None:
            Ybar = np.stack([Yc[:, j_of == i].mean(1) for i in range(len(uniq))], axis=1)  # [G, perts]
            P_all = _scores(Ybar.T, min(k, len(uniq)))  # [perts, K']
            emb = {p: P_all[col[p]] for p in uniq}
            center = np.zeros(P_all.shape[1])
        else:
            center = E.loc[perturbations].to_numpy().mean(0)
            emb = {p: E.loc[p].to_numpy() for p in E.index}
        Pj = np.stack([emb[p] - center for p in perturbations])  # [n, K']
        W = _ridge(G.T @ G, ridge) @ G.T @ Yc @ Pj @ _ridge(Pj.T @ Pj, ridge)
        return G, emb, center, W, G @ W @ Pj.T

    offsets: dict[str, np.ndarray] = {}
    if ctx is None:
        G, emb, center, W, _ = fit(Y - b[:, None])
    else:
        # Additive context offsets and the low-rank perturbation part, fitted alternately (the offsets
        # start at the context means; an unbalanced design biases those, the alternation removes it).
        groups = {c: ctx == c for c in np.unique(ctx)}
        offsets = {c: Y[:, m].mean(1) for c, m in groups.items()}
        for _ in range(max(1, int(offset_iterations))):
            offset_of_cell = np.empty_like(Y)
            for c, m in groups.items():
                offset_of_cell[:, m] = offsets[c][:, None]
            G, emb, center, W, fitted = fit(Y - offset_of_cell)
            offsets = {c: (Y[:, m] - fitted[:, m]).mean(1) for c, m in groups.items()}

    def predict(p: str, context: str | None = None) -> tuple[np.ndarray, str]:
        off = offsets.get(str(context), b)
        e = emb.get(str(p))
        if e is None:
            return off.copy(), "mean"
        return G @ W @ (e - center) + off, "embedding"

    predict.contexts = sorted(offsets)
    return predict


def predict_linear(train: ad.AnnData, conditions, controls: ad.AnnData, rng=None, *, control_label: str = "control",
                   n_components: int = 10, ridge: float = 0.01, perturbation_embedding: pd.DataFrame | None = None,
                   context_offset: bool = False, context_from_controls: bool = False,
                   n_samples: int = 1) -> ad.AnnData:
    """Ahlmann-Eltze et al. (2024) linear model on pseudobulk changes (see the module docstring):
    predicted cells = the context's resampled control cells + G W P[p] + b, clipped at 0. A perturbation
    with no training cells and no row in ``perturbation_embedding`` gets the mean effect b (noted).

    ``context_offset=True`` (an extension, not in Ahlmann-Eltze): b is per context (the mean change of
    the context's training conditions; the pooled b for a context without any, noted), which helps
    when a held-out context's other perturbations are in training. ``context_from_controls=True``
    (with ``context_offset``): a context without training conditions is represented by its own
    control cells, as a convex combination of the training contexts (perturbdiff.eval.transfer), and
    predicted with the same combination of their changes."""
    from .transfer import ContextTransfer

    inp = _Inputs("linear", train, conditions, controls, control_label)
    model = fit_linear(inp.deltas, [p for _, p in inp.keys], n_components, ridge, perturbation_embedding, inp.notes,
                       contexts=[c for c, _ in inp.keys] if context_offset else None)
    cache: dict[tuple, np.ndarray] = {}
    fallback: set[str] = set()
    transfer, weights = None, {}
    if context_offset and context_from_controls:
        own = [c for c in model.contexts if c in inp.ctrl_mean_train]
        transfer = ContextTransfer({c: inp.ctrl_mean_train[c] for c in own},
                                   {k: d for k, d in zip(inp.keys, inp.deltas) if k[0] in own}, model)
        for c in sorted(set(inp.conditions["context"]) - set(model.contexts)):  # once per unseen context
            weights[c] = transfer.weights(inp.control_mean(c))
            inp.notes.append(f"context {c!r} (no training conditions) represented by its control cells as "
                             + ", ".join(f"{v:.2f} x {k}" for k, v in weights[c].items() if v > 0.005))

    def delta_of(c: str, p: str) -> np.ndarray:
        key = (c if context_offset else None, p)
        if key not in cache and c in weights:
            cache[key] = transfer.delta(p, weights[c])
        if key not in cache:
            cache[key], how = model(p, key[0])
            if how == "mean":
                fallback.add(p)
        return cache[key]

    blocks = _shifted_controls(inp, delta_of, n_samples, _rng(rng))
    if fallback:
        fb = sorted(fallback)
        inp.notes.append(f"perturbation(s) {fb[:10]}{' ...' if len(fb) > 10 else ''} ({len(fb)}) have no embedding "
                         "(no training cells, or no row in perturbation_embedding): predicted with the mean effect "
                         f"over the training conditions{' of the context' if context_offset else ''}")
    if context_offset and transfer is None:
        no_own = sorted(set(inp.conditions["context"]) - set(model.contexts))
        if no_own:
            inp.notes.append(f"context(s) {no_own} have no training conditions: the pooled offset is used")
    return _assemble("linear", blocks, controls, train.var, control_label,
                     {"n_components": int(n_components), "ridge": float(ridge),
                      "embedding": "given" if perturbation_embedding is not None else "pca",
                      "context_offset": bool(context_offset), "context_from_controls": transfer is not None,
                      "notes": _notes(inp.notes)})


def predict_ceiling(real: ad.AnnData, conditions=None, controls: ad.AnnData | None = None, rng=None, *,
                    control_label: str = "control") -> tuple[ad.AnnData, ad.AnnData]:
    """Split-half ceiling: per condition, the real cells in two random halves; returns ``(pred, real_half)``.

    ``pred`` holds floor(n/2) cells (sample 0) and ``real_half`` the other ceil(n/2) (sample -1); the
    halves partition the condition's cells. ``conditions`` defaults to every non-control condition of
    ``real`` (only its context/perturbation columns are used); ``controls`` defaults to the control
    cells of ``real``; both outputs get the same controls. A condition with fewer than 2 cells is
    left out (noted)."""
    require_obs(real, ("perturbation", "context"), "real")
    pert = obs_str(real, "perturbation")
    is_real = np.ones(real.n_obs, dtype=bool)
    if "sample" in real.obs.columns:
        is_real = real.obs["sample"].to_numpy().astype(np.int64) < 0
    groups = group_rows(real, (pert != control_label) & is_real)
    if conditions is None:
        conds = pd.DataFrame(list(groups), columns=list(KEY))
    else:
        conds = as_conditions(conditions, need=())
        unknown = [k for k in map(tuple, conds[list(KEY)].to_numpy()) if k not in groups]
        if unknown:
            raise DataError(None, f"real has no cells of condition(s) {unknown[:10]}")
    if controls is None:
        controls = real[(pert == control_label) & is_real]
    require_obs(controls, ("perturbation", "context"), "controls")
    require_same_genes(real, controls, "real", "controls")
    rng = _rng(rng)
    notes: list[str] = []
    pred_blocks, real_blocks = [], []
    batch = obs_str(real, "batch", default="")
    for c, p in map(tuple, conds[list(KEY)].to_numpy()):
        rows = groups[(c, p)]
        if len(rows) < 2:
            notes.append(f"condition {(c, p)} has {len(rows)} cell(s): left out")
            continue
        perm = rng.permutation(rows)
        half = len(rows) // 2
        for blocks, part, s in ((pred_blocks, perm[:half], 0), (real_blocks, perm[half:], -1)):
            part = np.sort(part)
            o = _obs_block(len(part), p, c, batch[part], s, False)
            o.index = real.obs_names.to_numpy()[part].astype(str)  # the real cells keep their names
            blocks.append((dense_rows(real.X, part, np.float32), o))
    uns = {"notes": _notes(notes)}
    pred = _assemble("ceiling", pred_blocks, controls, real.var, control_label, uns, keep_index=True)
    truth = _assemble("ceiling", real_blocks, controls, real.var, control_label, uns, keep_index=True)
    return pred, truth


BASELINES: dict[str, Callable[..., ad.AnnData]] = {
    "control_mean": predict_control_mean,
    "perturbation_mean": predict_perturbation_mean,
    "linear": predict_linear,
}
