"""Kernel mean embeddings and MMD between batched, ragged cell sets: the plain-torch specification.

Written for clarity, not speed (it materialises [B, N, M, D] differences): the fast paths in
perturbdiff/ops/kme.py (torch) and kernels/kme.py (Triton) are tested against it in float64.

Shape legend: B sets, N cells in X, M cells in Y, D features (genes).

A set X_b = {x_i} is embedded by its kernel mean embedding mu_X = (1/n) sum_i k(x_i, .). This file
gives the obviously-correct reference:

- ``kme(x, y)``: mu_X evaluated at the points of Y: out[b, j] = mean_i k(x_bi, y_bj)        [B, M]
- ``mmd2(x, y)``: ||mu_X - mu_Y||^2 in the RKHS                                          [B]
    biased (V-statistic):   mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j)
    unbiased (U-statistic): the same with the i = i' and j = j' terms left out of the first two means

Kernels (``bandwidths`` is a list; Gaussian and Laplacian sum over it):
    energy     k(x, y) = -||x - y||            (the paper's choice; its MMD^2 is the energy distance)
    gaussian   k(x, y) = sum_s exp(-||x - y||^2 / (2 s^2))
    laplacian  k(x, y) = sum_s exp(-||x - y|| / s)

Ragged sets are padded and come with boolean masks ([B, N], [B, M]; True = real cell) or integer
lengths ([B]; the first n_b rows are real). Padded cells never contribute. A set with no real cell has an undefined
embedding: kme gives 0 there and mmd2
gives NaN; the U-statistic also needs two real cells in each set (NaN otherwise).
"""

from __future__ import annotations

from typing import Sequence

import torch

KERNELS = ("energy", "gaussian", "laplacian")


def _safe_norm(d2: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) gradient at 0, where coincident points meet."""
    pos = d2 > 0
    return torch.where(pos, d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt(), torch.zeros_like(d2))


def check_kernel(kernel: str, bandwidths: Sequence[float]) -> None:
    """A known kernel name, and positive bandwidths where the kernel uses them (every implementation)."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}: use one of {KERNELS}")
    if kernel != "energy" and (not bandwidths or any(s <= 0 for s in bandwidths)):
        raise ValueError(f"{kernel} kernel needs positive bandwidths, got {list(bandwidths)}")


def pairwise_kernel(x: torch.Tensor, y: torch.Tensor, kernel: str = "energy",
                    bandwidths: Sequence[float] = (1.0,)) -> torch.Tensor:
    """k(x_bi, y_bj) for all pairs: [B, N, D] x [B, M, D] -> [B, N, M], computed in x's dtype."""
    check_kernel(kernel, bandwidths)
    diff = x[:, :, None, :] - y[:, None, :, :]  # [B, N, M, D]
    d2 = (diff * diff).sum(-1)  # [B, N, M]; exact (no |x|^2 + |y|^2 - 2xy cancellation)
    if kernel == "energy":
        return -_safe_norm(d2)
    if kernel == "gaussian":
        return sum(torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths)
    dist = _safe_norm(d2)
    return sum(torch.exp(-dist / s) for s in bandwidths)


def as_mask(mask_or_lengths: torch.Tensor | None, x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """A bool [B, N] mask for x [B, N, D] from None (all real), a [B, N] mask, or [B] integer lengths."""
    B, N = x.shape[:2]
    if mask_or_lengths is None:
        return torch.ones(B, N, dtype=torch.bool, device=x.device)
    m = mask_or_lengths
    if m.dim() == 1 and not m.dtype.is_floating_point and m.dtype != torch.bool:  # lengths
        if m.shape[0] != B or bool((m < 0).any()) or bool((m > N).any()):
            raise ValueError(f"{name} lengths must be [B={B}] integers in 0..{N}, got {m.tolist()}")
        return torch.arange(N, device=x.device)[None, :] < m.to(x.device)[:, None]
    if tuple(m.shape) != (B, N):
        raise ValueError(f"{name} mask must be [B, N] = [{B}, {N}] (or [B] lengths), got {tuple(m.shape)}")
    return m.bool()


def _masked(x: torch.Tensor, y: torch.Tensor, x_mask, y_mask):
    """Masks as bool (from masks or lengths), and padded rows zeroed so garbage there (even NaN)
    reaches no value or gradient."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x [B, N, D] and y [B, M, D], got {tuple(x.shape)} and {tuple(y.shape)}")
    xm, ym = as_mask(x_mask, x, "x"), as_mask(y_mask, y, "y")
    x = torch.where(xm[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    y = torch.where(ym[..., None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    return x, y, xm, ym


def kme(x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
        kernel: str = "energy", bandwidths: Sequence[float] = (1.0,)) -> torch.Tensor:
    """The embedding of each X_b evaluated at the points of Y_b: [B, M] (0 at padded y or empty X)."""
    x, y, xm, ym = _masked(x, y, x_mask, y_mask)
    k = pairwise_kernel(x, y, kernel, bandwidths)  # [B, N, M]
    w = xm.to(k.dtype)
    n = w.sum(1).clamp_min(1.0)  # [B]
    out = (k * w[:, :, None]).sum(1) / n[:, None]  # [B, M]
    return out * ym.to(out.dtype)


def _mean_pairs(k: torch.Tensor, a: torch.Tensor, b: torch.Tensor, drop_diagonal: bool) -> torch.Tensor:
    """Mean of k[b, i, j] over real pairs (a_i and b_j), optionally without i == j."""
    w = a.to(k.dtype)[:, :, None] * b.to(k.dtype)[:, None, :]  # [B, N, M]
    if drop_diagonal:
        w = w * (1.0 - torch.eye(k.shape[1], k.shape[2], dtype=k.dtype, device=k.device))
    count = w.sum((1, 2))
    total = (k * w).sum((1, 2))
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, float("nan")))


def mmd2(x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
         kernel: str = "energy", bandwidths: Sequence[float] = (1.0,), unbiased: bool = False) -> torch.Tensor:
    """Squared MMD between each X_b and Y_b: [B]. Biased (V) by default, unbiased (U) on request."""
    x, y, xm, ym = _masked(x, y, x_mask, y_mask)
    kxx = _mean_pairs(pairwise_kernel(x, x, kernel, bandwidths), xm, xm, unbiased)
    kyy = _mean_pairs(pairwise_kernel(y, y, kernel, bandwidths), ym, ym, unbiased)
    kxy = _mean_pairs(pairwise_kernel(x, y, kernel, bandwidths), xm, ym, False)
    return kxx + kyy - 2.0 * kxy
