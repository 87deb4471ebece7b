"""Triton kernels for batched kernel mean embeddings and MMD, forward and backward.

Shape legend: B sets; A set "a" of N points and a set "b" of M points per batch entry; D features.
Everything the KME / MMD ops need (perturbdiff/ops/kme.py) is one weighted kernel column sum

    S[b, j] = sum_i  w[b, i] * k(a_bi, b_bj)                                       [B, M]

and its gradients. With h_ij = 2 f'(d2_ij) w_i g_j (k = f(d2), d2 = |a_i - b_j|^2, g = dL/dS):

    dL/da_i = sum_j h_ij (a_i - b_j) = a_i rowsum_j(h) - (h @ b)_i
    dL/db_j = sum_i h_ij (b_j - a_i)   (the same form with the roles of a, b and of w, g swapped)

so the backward is one "pair gradient" kernel launched twice. For a self pair (S of a set with
itself, the MMD's within-set terms) both roles fall on the same points: h_ij = 2 f' (w_i g_j + g_i w_j)
in a single launch, and the i == j terms are exact: k(a_i, a_i) = f(0) in the forward pass
(or left out for the U-statistic) and no gradient, whatever the rounding of |a|^2 + |a|^2 - 2 a.a.

Never is an N x M matrix written to memory. Tiling:
- forward: one program per (set, tile of BLOCK_M points of b); loops over tiles of a and over D,
  squared distances as |a|^2 + |b|^2 - 2 a.b with tl.dot, clamped at 0;
- backward: one program per (set, tile of BLOCK_N rows of the gradient); for each tile of b it
  builds the distances, then h, then adds h @ b into its own rows of the fp32 output, which it alone
  owns (so no atomics; a barrier orders each read-modify-write pass). Distances are recomputed
  once per pair in the backward (never stored), and not again per tile of D.

Accumulation is fp32 (fp64 for fp64 inputs, which exist for gradcheck). fp32 inputs use IEEE fp32
dots (distances by |a|^2 + |b|^2 - 2 a.b need them). fp16 / bf16 inputs feed their 16-bit tiles to
tl.dot (exact products, fp32 accumulation: tensor cores) and the backward's h @ b uses TF32; in
the CPU interpreter, which cannot compute in bf16, bf16 tiles are upcast right after loading.

Kernels (c_s are per-bandwidth constants prepared by ``_constants``):
    energy     f = -sqrt(d2)                    2 f' = -1 / r                (r = sqrt(d2); 0 at r = 0)
    gaussian   f = sum_s exp(-c_s d2)           2 f' = sum_s -2 c_s exp(-c_s d2)      c_s = 1 / (2 s^2)
    laplacian  f = sum_s exp(-c_s r)            2 f' = sum_s -c_s exp(-c_s r) / r     c_s = 1 / s
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

KERNEL_IDS = {"energy": 0, "gaussian": 1, "laplacian": 2}
MAX_BANDWIDTHS = 8
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# GPU: tiles that fit registers, tuned per size. The CPU interpreter: one config of large blocks
# (each launch there runs the block program in numpy, so fewer, bigger blocks are much faster).
if INTERPRETED:
    _CONFIGS = [triton.Config({"BLOCK_N": 64, "BLOCK_M": 64, "BLOCK_D": 64})]
else:
    _CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                for bn, bm, bd, w, s in [(64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (128, 64, 32, 8, 3),
                                         (64, 128, 32, 8, 3), (32, 64, 64, 4, 2), (128, 128, 32, 8, 2)]]


@triton.jit
def _kernel_values(d2, BW, KERNEL: tl.constexpr, NUM_BW: tl.constexpr):
    """k = f(d2) elementwise."""
    if KERNEL == 0:
        return -tl.sqrt(d2)
    kv = tl.zeros_like(d2)
    for s in tl.static_range(NUM_BW):
        c = tl.load(BW + s).to(d2.dtype)
        if KERNEL == 1:
            kv += tl.exp(-d2 * c)
        else:
            kv += tl.exp(-tl.sqrt(d2) * c)
    return kv


@triton.jit
def _kernel_slopes(d2, BW, KERNEL: tl.constexpr, NUM_BW: tl.constexpr):
    """2 f'(d2) elementwise; 0 where d2 == 0 for the kernels that are not smooth there."""
    pos = d2 > 0
    r = tl.sqrt(tl.where(pos, d2, 1.0))
    if KERNEL == 0:
        return tl.where(pos, -1.0 / r, 0.0)
    out = tl.zeros_like(d2)
    for s in tl.static_range(NUM_BW):
        c = tl.load(BW + s).to(d2.dtype)
        if KERNEL == 1:
            out += -2.0 * c * tl.exp(-d2 * c)
        else:
            out += tl.where(pos, -c * tl.exp(-r * c) / r, 0.0)
    return out


@triton.jit
def _sq_distances(A, Bp, offs_n, offs_m, in_n, in_m, D, san, sad, sbm, sbd, ACC: tl.constexpr, LOWP: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """|a_i - b_j|^2 for a [BLOCK_N] x [BLOCK_M] tile, accumulated over D in ACC precision.

    LOWP (16-bit inputs, compiled): the dot runs on the 16-bit tiles with ACC accumulation, on tensor
    cores. Products of two 16-bit floats are exact in fp32, so this is as exact as upcasting first."""
    dot = tl.zeros((offs_n.shape[0], offs_m.shape[0]), dtype=ACC)
    aa = tl.zeros((offs_n.shape[0],), dtype=ACC)
    bb = tl.zeros((offs_m.shape[0],), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        a = tl.load(A + offs_n[:, None] * san + offs_d[None, :] * sad,
                    mask=in_n[:, None] & in_d[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        b = tl.load(Bp + offs_m[:, None] * sbm + offs_d[None, :] * sbd,
                    mask=in_m[:, None] & in_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        if LOWP:
            dot += tl.dot(a, tl.trans(b), out_dtype=ACC)
            a, b = a.to(ACC), b.to(ACC)
        else:
            a, b = a.to(ACC), b.to(ACC)
            dot += tl.dot(a, tl.trans(b), input_precision="ieee", out_dtype=ACC)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
    return tl.maximum(aa[:, None] + bb[None, :] - 2.0 * dot, 0.0)


@triton.autotune(configs=_CONFIGS, key=["N", "M", "D", "KERNEL", "NUM_BW", "SELF", "ACC", "LOWP"])
@triton.jit
def _colsum_kernel(
    A, Bp, W, BW, OUT,  # a [B, N, D], b [B, M, D], weights [B, N] (ACC dtype), constants, out [B, M]
    N, M, D, sab, san, sad, sbb, sbm, sbd,
    KERNEL: tl.constexpr, NUM_BW: tl.constexpr, SELF: tl.constexpr, SKIP_DIAG: tl.constexpr,
    ACC: tl.constexpr, LOWP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    A += pid_b * sab
    Bp += pid_b * sbb
    acc = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_n = offs_n < N
        w = tl.load(W + pid_b * N + offs_n, mask=in_n, other=0.0)  # [BLOCK_N]
        d2 = _sq_distances(A, Bp, offs_n, offs_m, in_n, in_m, D, san, sad, sbm, sbd, ACC, LOWP, BLOCK_D)
        kv = _kernel_values(d2, BW, KERNEL, NUM_BW)  # [BLOCK_N, BLOCK_M]
        if SELF:
            diag = offs_n[:, None] == offs_m[None, :]
            if SKIP_DIAG:
                kv = tl.where(diag, 0.0, kv)
            else:
                kv = tl.where(diag, _kernel_values(tl.zeros_like(d2), BW, KERNEL, NUM_BW), kv)
        acc += tl.sum(kv * w[:, None], axis=0)
    tl.store(OUT + pid_b * M + offs_m, acc, mask=in_m)


@triton.autotune(configs=_CONFIGS, key=["N", "M", "D", "KERNEL", "NUM_BW", "SELF", "ACC", "LOWP"])
@triton.jit
def _pair_grad_kernel(
    A, Bp, U, V, BW, OUT,  # a [B, N, D], b [B, M, D], u [B, N], v [B, M] (ACC), constants, out [B, N, D] (ACC)
    N, M, D, sab, san, sad, sbb, sbm, sbd,
    KERNEL: tl.constexpr, NUM_BW: tl.constexpr, SELF: tl.constexpr,
    ACC: tl.constexpr, LOWP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out_i = sum_j h_ij (a_i - b_j) with h_ij = 2 f'(d2_ij) u_i v_j (SELF: a = b, u_i v_j + v_i u_j, i != j)."""
    pid_b = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_n = offs_n < N
    A += pid_b * sab
    Bp += pid_b * sbb
    OUT += pid_b * N * D
    u = tl.load(U + pid_b * N + offs_n, mask=in_n, other=0.0)  # [BLOCK_N]
    if SELF:
        v_own = tl.load(V + pid_b * M + offs_n, mask=in_n, other=0.0)
    for d0 in range(0, D, BLOCK_D):  # this program's rows of OUT start at zero
        offs_d = d0 + tl.arange(0, BLOCK_D)
        tl.store(OUT + offs_n[:, None] * D + offs_d[None, :], tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC),
                 mask=in_n[:, None] & (offs_d < D)[None, :])
    rowsum = tl.zeros((BLOCK_N,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        in_m = offs_m < M
        v = tl.load(V + pid_b * M + offs_m, mask=in_m, other=0.0)  # [BLOCK_M]
        d2 = _sq_distances(A, Bp, offs_n, offs_m, in_n, in_m, D, san, sad, sbm, sbd, ACC, LOWP, BLOCK_D)
        wij = u[:, None] * v[None, :]
        if SELF:
            u_col = tl.load(U + pid_b * N + offs_m, mask=in_m, other=0.0)
            wij += v_own[:, None] * u_col[None, :]
        h = _kernel_slopes(d2, BW, KERNEL, NUM_BW) * wij  # [BLOCK_N, BLOCK_M]
        if SELF:
            h = tl.where(offs_n[:, None] == offs_m[None, :], 0.0, h)
        rowsum += tl.sum(h, axis=1)
        tl.debug_barrier()  # the previous pass's stores to OUT are visible to every thread
        for d0 in range(0, D, BLOCK_D):  # OUT[i] -= (h @ b)_i, tile by tile of D
            offs_d = d0 + tl.arange(0, BLOCK_D)
            in_d = offs_d < D
            b = tl.load(Bp + offs_m[:, None] * sbm + offs_d[None, :] * sbd,
                        mask=in_m[:, None] & in_d[None, :], other=0.0).to(ACC)  # [BLOCK_M, BLOCK_D]
            ptrs = OUT + offs_n[:, None] * D + offs_d[None, :]
            io = in_n[:, None] & in_d[None, :]
            prev = tl.load(ptrs, mask=io, other=0.0)
            if LOWP:  # 16-bit inputs: h rounded to TF32 (10-bit mantissa; b is exact in it) on tensor cores
                hb = tl.dot(h, b, input_precision="tf32", out_dtype=ACC)
            else:
                hb = tl.dot(h, b, input_precision="ieee", out_dtype=ACC)
            tl.store(ptrs, prev - hb, mask=io)
    tl.debug_barrier()
    for d0 in range(0, D, BLOCK_D):  # OUT[i] += a_i rowsum_i
        offs_d = d0 + tl.arange(0, BLOCK_D)
        in_d = offs_d < D
        io = in_n[:, None] & in_d[None, :]
        a = tl.load(A + offs_n[:, None] * san + offs_d[None, :] * sad, mask=io, other=0.0).to(ACC)
        ptrs = OUT + offs_n[:, None] * D + offs_d[None, :]
        tl.store(ptrs, tl.load(ptrs, mask=io, other=0.0) + a * rowsum[:, None], mask=io)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _lowp(x: torch.Tensor) -> bool:
    """Dot products on the 16-bit tiles themselves: fp16 always, bf16 when compiled (the CPU
    interpreter computes bf16 dots wrongly)."""
    return x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and not INTERPRETED)


def _constants(kernel: str, bandwidths, device) -> torch.Tensor:
    if kernel not in KERNEL_IDS:
        raise ValueError(f"unknown kernel {kernel!r}: use one of {tuple(KERNEL_IDS)}")
    bw = [1.0] if kernel == "energy" else [float(s) for s in bandwidths]
    if not 1 <= len(bw) <= MAX_BANDWIDTHS:
        raise ValueError(f"between 1 and {MAX_BANDWIDTHS} bandwidths are supported, got {len(bw)}")
    if any(s <= 0 for s in bw):
        raise ValueError(f"{kernel} kernel needs positive bandwidths, got {bw}")
    consts = [1.0 / (2.0 * s * s) for s in bw] if kernel == "gaussian" else [1.0 / s for s in bw]
    return torch.tensor(consts, dtype=torch.float64, device=device)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[2]:
        raise ValueError(f"expected a [B, N, D] and b [B, M, D], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"a and b differ in dtype or device: {a.dtype}/{a.device} vs {b.dtype}/{b.device}")


def _setup(a: torch.Tensor, b: torch.Tensor | None, kernel: str, bandwidths):
    """What both launchers need: b (a for a self pair), the accumulation dtype, the kernel constants
    and the compile-time arguments shared by both kernels."""
    self_pair = b is None
    b = a if self_pair else b
    _check(a, b)
    acc = _acc_dtype(a)
    consts = _constants(kernel, bandwidths, a.device).to(acc)
    meta = dict(KERNEL=KERNEL_IDS[kernel], NUM_BW=consts.numel(), SELF=self_pair, ACC=_tl_acc(acc), LOWP=_lowp(a))
    return b, self_pair, acc, consts, meta


def colsums(a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor, kernel: str, bandwidths=(1.0,),
            skip_diagonal: bool = False) -> torch.Tensor:
    """S[b, j] = sum_i w[b, i] k(a_bi, b_bj): [B, M] in fp32 (fp64 for fp64 inputs). b=None: b is a."""
    b, self_pair, acc, consts, meta = _setup(a, b, kernel, bandwidths)
    if skip_diagonal and not self_pair:
        raise ValueError("skip_diagonal needs a self pair (b=None)")
    B, N, D = a.shape
    M = b.shape[1]
    if B == 0 or M == 0 or N == 0:
        return torch.zeros(B, M, dtype=acc, device=a.device)
    out = torch.empty(B, M, dtype=acc, device=a.device)  # every column is stored by the kernel

    def grid(launch):
        return (B, triton.cdiv(M, launch["BLOCK_M"]))

    _colsum_kernel[grid](a, b, w.to(acc).contiguous(), consts, out, N, M, D, *a.stride(), *b.stride(),
                         SKIP_DIAG=bool(skip_diagonal), **meta)
    return out


def pair_grad(a: torch.Tensor, b: torch.Tensor | None, u: torch.Tensor, v: torch.Tensor, kernel: str,
              bandwidths=(1.0,)) -> torch.Tensor:
    """out[b, i] = sum_j 2 f'(|a_i - b_j|^2) u_i v_j (a_i - b_j): [B, N, D] in fp32 (fp64 for fp64).

    b=None is a self pair: the weight is u_i v_j + v_i u_j and the i == j terms are left out."""
    b, _, acc, consts, meta = _setup(a, b, kernel, bandwidths)
    B, N, D = a.shape
    M = b.shape[1]
    if B == 0 or M == 0 or N == 0 or D == 0:
        return torch.zeros(B, N, D, dtype=acc, device=a.device)
    out = torch.empty(B, N, D, dtype=acc, device=a.device)  # the kernel zeroes its own rows first

    def grid(launch):
        return (B, triton.cdiv(N, launch["BLOCK_N"]))

    _pair_grad_kernel[grid](a, b, u.to(acc).contiguous(), v.to(acc).contiguous(), consts, out, N, M, D,
                            *a.stride(), *b.stride(), **meta)
    return out


class KernelColsums(torch.autograd.Function):
    """Differentiable S[b, j] = sum_i w[b, i] k(a_bi, b_bj) (w carries no gradient). b=None: b is a."""

    @staticmethod
    def forward(ctx, a, b, w, kernel, bandwidths, skip_diagonal):
        ctx.save_for_backward(a, b, w)
        ctx.kernel, ctx.bandwidths = kernel, tuple(bandwidths)
        return colsums(a, b, w, kernel, bandwidths, skip_diagonal)

    @staticmethod
    def backward(ctx, g):
        a, b, w = ctx.saved_tensors
        g = g.contiguous()
        grad_a = grad_b = None
        if b is None:  # self pair: both roles in one launch (the diagonal is skipped / constant either way)
            if ctx.needs_input_grad[0]:
                grad_a = pair_grad(a, None, w, g, ctx.kernel, ctx.bandwidths).to(a.dtype)
            return grad_a, None, None, None, None, None
        if ctx.needs_input_grad[0]:
            grad_a = pair_grad(a, b, w, g, ctx.kernel, ctx.bandwidths).to(a.dtype)
        if ctx.needs_input_grad[1]:
            grad_b = pair_grad(b, a, g, w, ctx.kernel, ctx.bandwidths).to(b.dtype)
        return grad_a, grad_b, None, None, None, None


def kernel_colsums(a: torch.Tensor, b: torch.Tensor | None, w: torch.Tensor, kernel: str = "energy",
                   bandwidths=(1.0,), skip_diagonal: bool = False) -> torch.Tensor:
    """The autograd entry point used by perturbdiff.ops.kme (impl="triton")."""
    return KernelColsums.apply(a, b, w, kernel, tuple(bandwidths), bool(skip_diagonal))
