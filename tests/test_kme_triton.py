"""The Triton forward kernel (kernels/kme_fwd.py) against the float64 torch reference.

Runs in Triton's CPU interpreter when no GPU is present (tests/conftest.py sets TRITON_INTERPRET=1).
Tolerances: fp32 inputs 2e-4 relative (fp32 accumulation of |x|^2 + |y|^2 - 2 x.y); fp16 / bf16
inputs are compared with the reference on the same rounded inputs, so only accumulation differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from perturbdiff.ops.kme import mmd2, pairwise_kernel
from perturbdiff_kernels.kme_fwd import kernel_colsums

BANDWIDTHS = (0.8, 2.5)
TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (5e-3, 5e-3)}


def _reference(x, y, xm, kernel, skip_diag):
    k = pairwise_kernel(x.double(), y.double(), kernel, BANDWIDTHS)  # [B, N, M]
    w = xm.double()[:, :, None].expand_as(k).clone()
    if skip_diag:
        w = w * (1 - torch.eye(k.shape[1], k.shape[2], dtype=torch.float64))
    return (k * w).sum(1)


@pytest.mark.parametrize("kernel", ["energy", "gaussian", "laplacian"])
@pytest.mark.parametrize("shape", [(2, 37, 29, 19), (1, 70, 130, 67), (3, 1, 5, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_colsums_match_reference(kernel, shape, dtype):
    B, N, M, D = shape
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    x = (torch.randn(B, N, D, generator=gen) * 0.5).to(dtype)
    y = (torch.randn(B, M, D, generator=gen) * 0.5 + 0.3).to(dtype)
    xm = torch.rand(B, N, generator=gen) < 0.8
    got = kernel_colsums(x, y, xm, kernel, BANDWIDTHS)
    want = _reference(x, y, xm, kernel, False)
    rtol, atol = TOL[dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("kernel", ["energy", "gaussian"])
def test_skip_diagonal_and_mmd_from_colsums(kernel):
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    x = torch.randn(2, 45, 33, generator=gen)
    y = torch.randn(2, 38, 33, generator=gen) + 0.2
    xm = torch.arange(45)[None] < torch.tensor([[45], [30]])
    ym = torch.arange(38)[None] < torch.tensor([[20], [38]])
    xmf, ymf = xm.float(), ym.float()
    n, m = xmf.sum(1), ymf.sum(1)
    for unbiased in (False, True):
        sxx = kernel_colsums(x, x, xm, kernel, BANDWIDTHS, skip_diagonal=unbiased)
        syy = kernel_colsums(y, y, ym, kernel, BANDWIDTHS, skip_diagonal=unbiased)
        sxy = kernel_colsums(x, y, xm, kernel, BANDWIDTHS)
        dx, dy = (n * (n - 1), m * (m - 1)) if unbiased else (n * n, m * m)
        got = (sxx * xmf).sum(1) / dx + (syy * ymf).sum(1) / dy - 2 * (sxy * ymf).sum(1) / (n * m)
        want = mmd2(x.double(), y.double(), xm, ym, kernel, BANDWIDTHS, unbiased)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_empty_x_gives_zero_sums():
    x, y = torch.randn(1, 6, 3), torch.randn(1, 4, 3)
    got = kernel_colsums(x, y, torch.zeros(1, 6, dtype=torch.bool), "energy", BANDWIDTHS)
    assert (got == 0).all()
