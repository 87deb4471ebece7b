"""Triton forward kernel: masked kernel column sums between batched cell sets (never an N x M matrix).

    S[b, j] = sum_i  x_mask[b, i] * k(x_bi, y_bj)        (optionally without the i == j term)

Everything the forward pass of perturbdiff/ops/kme.py needs is a masked mean of S: the embedding
kme = S / n_b, and MMD^2 = mean_j S(x, x) / n + mean_j S(y, y) / m - 2 mean_j S(x, y) / n (U-statistic:
the diagonal dropped and n(n-1) in the denominators). Backward kernels are still to come (issue 3).

Tiling: one program per (set b, tile of BLOCK_M points of Y); it loops over tiles of BLOCK_N points
of X and over the features in tiles of BLOCK_D, accumulating squared distances in fp32 as
|x|^2 + |y|^2 - 2 x.y (tl.dot, IEEE fp32), clamped at 0. Inputs may be fp32, fp16 or bf16; they are
upcast right after loading (the CPU interpreter cannot do bf16 arithmetic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

KERNEL_IDS = {"energy": 0, "gaussian": 1, "laplacian": 2}
MAX_BANDWIDTHS = 8


@triton.jit
def _colsum_kernel(
    X, Y,  # [B, N, D], [B, M, D] inputs
    XM, YM,  # [B, N], [B, M] int8 masks (1 = real cell)
    BW,  # [NUM_BW] fp32 bandwidths (gaussian: 1 / (2 s^2); laplacian: 1 / s)
    OUT,  # [B, M] fp32 column sums
    N, M, D,  # sizes
    sxb, sxn, sxd,  # strides of X
    syb, sym, syd,  # strides of Y
    smxb, smyb,  # batch strides of the masks
    KERNEL: tl.constexpr, NUM_BW: tl.constexpr, SKIP_DIAG: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        xw = tl.load(XM + b * smxb + offs_n, mask=in_n, other=0).to(tl.float32)  # [BLOCK_N]
        dot = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        yy = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            x = tl.load(X + b * sxb + offs_n[:, None] * sxn + offs_d[None, :] * sxd,
                        mask=in_n[:, None] & in_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_N, BLOCK_D]
            y = tl.load(Y + b * syb + offs_m[:, None] * sym + offs_d[None, :] * syd,
                        mask=in_m[:, None] & in_d[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_D]
            dot += tl.dot(x, tl.trans(y), input_precision="ieee")
            xx += tl.sum(x * x, axis=1)
            yy += tl.sum(y * y, axis=1)
        d2 = tl.maximum(xx[:, None] + yy[None, :] - 2.0 * dot, 0.0)  # [BLOCK_N, BLOCK_M]
        if KERNEL == 0:
            kv = -tl.sqrt(d2)
        else:
            kv = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            for s in tl.static_range(NUM_BW):
                c = tl.load(BW + s)
                if KERNEL == 1:
                    kv += tl.exp(-d2 * c)
                else:
                    kv += tl.exp(-tl.sqrt(d2) * c)
        w = xw[:, None] + tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        if SKIP_DIAG:
            w = tl.where(offs_n[:, None] == offs_m[None, :], 0.0, w)
        acc += tl.sum(kv * w, axis=0)
    tl.store(OUT + b * M + offs_m, acc, mask=in_m)


def kernel_colsums(x: torch.Tensor, y: torch.Tensor, x_mask: torch.Tensor, kernel: str,
                   bandwidths, skip_diagonal: bool = False) -> torch.Tensor:
    """S[b, j] = sum_i x_mask[b, i] k(x_bi, y_bj) in fp32: [B, M]. Checks, allocates, launches."""
    if kernel not in KERNEL_IDS:
        raise ValueError(f"unknown kernel {kernel!r}: use one of {tuple(KERNEL_IDS)}")
    B, N, D = x.shape
    M = y.shape[1]
    bw = [float(s) for s in bandwidths] if kernel != "energy" else [1.0]
    if not 1 <= len(bw) <= MAX_BANDWIDTHS:
        raise ValueError(f"between 1 and {MAX_BANDWIDTHS} bandwidths are supported, got {len(bw)}")
    consts = [1.0 / (2.0 * s * s) for s in bw] if kernel == "gaussian" else [1.0 / s for s in bw]
    bw_t = torch.tensor(consts, dtype=torch.float32, device=x.device)
    out = torch.empty(B, M, dtype=torch.float32, device=x.device)
    if B == 0 or M == 0:
        return out
    xm = x_mask.to(torch.int8).contiguous()
    ym = torch.ones(B, M, dtype=torch.int8, device=x.device)
    small = x.device.type == "cpu"  # interpreter: few, large blocks; GPU: tiles that fit registers
    block_n = 64 if small else 32
    block_m = 64 if small else 64
    block_d = 64 if small else 32
    grid = (B, triton.cdiv(M, block_m))
    _colsum_kernel[grid](
        x, y, xm, ym, bw_t, out, N, M, D,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
        xm.stride(0), ym.stride(0),
        KERNEL=KERNEL_IDS[kernel], NUM_BW=len(bw), SKIP_DIAG=bool(skip_diagonal),
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d,
    )
    return out
