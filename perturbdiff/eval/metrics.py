"""Population metrics on tensors, shared by training-time validation and evaluation.

Shape legend: B sets, M cells per set, G genes.

- ``pseudobulk``: the mean expression of each set's real cells.
- ``pearson_delta``: Pearson correlation, per set, between the predicted and the real pseudobulk
  deltas against the same control pseudobulk (cell-eval's ``pearson_delta``: mean(pred) - mean(ctrl)
  vs mean(real) - mean(ctrl)).
- ``set_mmd``: MMD^2 between predicted and real cells per set, on the training loss's per-gene scale
  (cells / sqrt(G)), through the KME op; energy kernel by default.
"""

from __future__ import annotations

import math

import torch

from ..ops.kme import mmd2


def pseudobulk(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, M, G], [B, M] -> [B, G]: the mean of the real cells (NaN for an empty set)."""
    w = mask.to(torch.float64)[..., None]
    return (x.to(torch.float64) * w).sum(1) / w.sum(1)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, gene_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Pearson correlation of a[i] and b[i] over genes (where gene_mask [B, G] is True); [B] float64.
    NaN where either row is constant."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    w = torch.ones_like(a) if gene_mask is None else gene_mask.to(torch.float64)
    n = w.sum(-1)
    am = a - (a * w).sum(-1, keepdim=True) / n[:, None]
    bm = b - (b * w).sum(-1, keepdim=True) / n[:, None]
    cov = (am * bm * w).sum(-1)
    return cov / ((am * am * w).sum(-1).sqrt() * (bm * bm * w).sum(-1).sqrt())


def pearson_delta(pred: torch.Tensor, pred_mask: torch.Tensor, real: torch.Tensor, real_mask: torch.Tensor,
                  ctrl: torch.Tensor, ctrl_mask: torch.Tensor, gene_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-set Pearson r of (pred - ctrl) and (real - ctrl) pseudobulks; [B] float64."""
    base = pseudobulk(ctrl, ctrl_mask)
    return pearson_rows(pseudobulk(pred, pred_mask) - base, pseudobulk(real, real_mask) - base, gene_mask)


def set_mmd(pred: torch.Tensor, pred_mask: torch.Tensor, real: torch.Tensor, real_mask: torch.Tensor,
            kernel: str = "energy", bandwidths: tuple[float, ...] = (1.0,), impl: str = "auto",
            gene_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-set MMD^2 (V-statistic) between predicted and real cells, cells scaled by 1 / sqrt(genes); [B]."""
    pred, real = pred.float(), real.float()
    if gene_mask is None:
        scale = torch.full((pred.shape[0], 1, 1), 1.0 / math.sqrt(pred.shape[-1]), device=pred.device)
    else:
        gm = gene_mask.to(device=pred.device, dtype=torch.float32)[:, None, :]
        scale = gm / gm.sum(-1, keepdim=True).clamp_min(1.0).sqrt()
    return mmd2(pred * scale, real * scale, pred_mask, real_mask, kernel, tuple(bandwidths), False, impl=impl)
