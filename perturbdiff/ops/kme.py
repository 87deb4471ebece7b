"""Kernel mean embeddings and MMD between batched, ragged cell sets: the ops the model trains with.

Same definitions and signatures as the specification in kme_reference.py (read that first), with a
choice of implementation:

    impl = "triton"  fused Triton kernels (kernels/kme.py): no N x M matrix in memory, forward and backward
    impl = "torch"   plain torch through a Gram matrix: [B, N, M] in memory, autograd for the backward
    impl = "auto"    Triton on CUDA (when triton is installed), torch otherwise

Both reduce to one primitive, the weighted kernel column sum S[b, j] = sum_i w_i k(a_bi, b_bj):

    kme(x, y)  = S(x -> y) with w = mask_x / n
    mmd2(x, y) = sum_j w'_j S(x -> x)_j + sum_j w'_j S(y -> y)_j - 2 sum_j (mask_y / m)_j S(x -> y)_j

where the within-set sums are self pairs (their diagonal is exact, or left out for the U-statistic,
with w' = mask / (n - 1) instead of mask / n). Values are computed in fp32 (fp64 for fp64 inputs),
outside any autocast region, and returned in that precision.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .kme_reference import _masked, check_kernel

IMPLS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_impl(impl: str, device: torch.device) -> str:
    """The implementation ``impl`` means on ``device``: "triton" or "torch"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown kme impl {impl!r}: use one of {IMPLS}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise RuntimeError("kme impl='triton' needs triton (pip install perturbdiff[gpu]); use impl='torch'")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"kme impl='triton' on {device.type} needs TRITON_INTERPRET=1 set before triton "
                               "is imported (the CPU interpreter, slow; for tests); use impl='torch' on CPU")
    return impl


def _torch_colsums(a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor, kernel: str,
                   bandwidths: Sequence[float], skip_diagonal: bool = False) -> torch.Tensor:
    """S[b, j] = sum_i w_i k(a_bi, b_bj) through a [B, N, M] Gram matrix (b=None: a self pair)."""
    self_pair = b is None
    b = a if self_pair else b
    # One fused pass per step over the [B, N, M] matrices; they dominate the cost, not the bmm.
    d2 = torch.baddbmm((a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :], a, b.transpose(1, 2),
                       alpha=-2.0)  # [B, N, M]
    eye = None
    if self_pair:
        eye = torch.eye(a.shape[1], dtype=torch.bool, device=a.device)
        d2 = d2.masked_fill(eye, 0.0)  # exact zeros on the diagonal, whatever the rounding
    # Clamping at the smallest normal float keeps sqrt finite and gives coincident points a zero
    # gradient (clamp's gradient is 0 below the floor), as _safe_norm does in the specification.
    if kernel == "energy":
        k = -d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt()
    elif kernel == "gaussian":
        d2 = d2.clamp_min(0.0)
        k = sum(torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths)
    else:
        r = d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt()
        k = sum(torch.exp(-r / s) for s in bandwidths)
    if skip_diagonal:
        k = k.masked_fill(eye, 0.0)
    return torch.einsum("bn,bnm->bm", w, k)


def _colsums_fn(impl: str):
    if impl == "triton":
        from perturbdiff_kernels.kme import kernel_colsums
        return kernel_colsums
    return _torch_colsums


def _prepare(x, y, x_mask, y_mask, kernel, bandwidths, impl):
    """Validated, padding-zeroed inputs in the accumulation dtype, masks as floats, the column-sum function."""
    check_kernel(kernel, bandwidths)
    impl = resolve_impl(impl, x.device)
    x, y, xm, ym = _masked(x, y, x_mask, y_mask)
    common = torch.promote_types(x.dtype, y.dtype)  # never round one side down to the other's dtype
    acc = torch.float64 if common == torch.float64 else torch.float32
    if impl == "torch":  # Triton upcasts while loading; torch needs the upcast up front
        x, y = x.to(acc), y.to(acc)
    else:
        x, y = x.to(common), y.to(common)
    return x, y, xm.to(acc), ym.to(acc), _colsums_fn(impl), tuple(float(s) for s in bandwidths)


def kme(x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
        kernel: str = "energy", bandwidths: Sequence[float] = (1.0,), impl: str = "auto") -> torch.Tensor:
    """The embedding of each X_b evaluated at the points of Y_b: [B, M] (0 at padded y or empty X)."""
    with torch.autocast(x.device.type, enabled=False):
        x, y, xm, ym, colsums, bw = _prepare(x, y, x_mask, y_mask, kernel, bandwidths, impl)
        n = xm.sum(1, keepdim=True).clamp_min(1.0)
        return colsums(x, y, xm / n, kernel, bw) * ym


def mmd2(x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor | None = None, y_mask: torch.Tensor | None = None,
         kernel: str = "energy", bandwidths: Sequence[float] = (1.0,), unbiased: bool = False,
         impl: str = "auto") -> torch.Tensor:
    """Squared MMD between each X_b and Y_b: [B]. Biased (V) by default, unbiased (U) on request.

    NaN for a set with no real cell (or fewer than two for the U-statistic), as in the reference."""
    with torch.autocast(x.device.type, enabled=False):
        x, y, xm, ym, colsums, bw = _prepare(x, y, x_mask, y_mask, kernel, bandwidths, impl)
        n, m = xm.sum(1), ym.sum(1)  # [B]
        nan = torch.full_like(n, float("nan"))
        n1, m1 = n.clamp_min(1.0)[:, None], m.clamp_min(1.0)[:, None]
        if unbiased:
            outer_x = xm / (n - 1.0).clamp_min(1.0)[:, None]
            outer_y = ym / (m - 1.0).clamp_min(1.0)[:, None]
            valid = (n >= 2) & (m >= 2)
        else:
            outer_x, outer_y = xm / n1, ym / m1
            valid = (n >= 1) & (m >= 1)
        kxx = (colsums(x, None, xm / n1, kernel, bw, unbiased) * outer_x).sum(1)
        kyy = (colsums(y, None, ym / m1, kernel, bw, unbiased) * outer_y).sum(1)
        kxy = (colsums(x, y, xm / n1, kernel, bw) * (ym / m1)).sum(1)
        return torch.where(valid, kxx + kyy - 2.0 * kxy, nan)
