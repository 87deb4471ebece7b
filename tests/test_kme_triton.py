"""The Triton kernels (kernels/kme.py) against the float64 torch specification (perturbdiff/ops/kme_reference.py).

Runs in Triton's CPU interpreter when no GPU is present (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported); on a GPU the same tests run the compiled kernels. Inputs are fresh random
draws every run, their seed printed (KME_TEST_SEED replays one). Tolerances, relative to the largest reference magnitude:
    fp64 inputs  1e-10  (fp64 accumulation)
    fp32 inputs  2e-4   (fp32 accumulation of |a|^2 + |b|^2 - 2 a.b)
    fp16 / bf16  2e-3 / 5e-3 against the reference on the SAME rounded inputs (only accumulation differs);
                 fp16 runs the 16-bit-dot path (tensor cores on a GPU), bf16 the upcast path here
"""

from __future__ import annotations

import pytest
import torch

from helpers import fresh_seed
from perturbdiff.ops.kme_reference import KERNELS, pairwise_kernel
from perturbdiff_kernels.kme import colsums, kernel_colsums, pair_grad

BANDWIDTHS = (0.8, 2.5)
TOL = {torch.float64: 1e-10, torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 5e-3}
SHAPES = [(2, 37, 29, 19), (1, 70, 130, 67), (3, 1, 5, 4), (2, 65, 1, 3)]  # non-powers of two, one-cell sets


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(fresh_seed())


def _inputs(shape, dtype, gen):
    B, N, M, D = shape
    a = (torch.randn(B, N, D, generator=gen) * 0.5).to(dtype)
    b = (torch.randn(B, M, D, generator=gen) * 0.5 + 0.3).to(dtype)
    w = torch.rand(B, N, generator=gen) * (torch.rand(B, N, generator=gen) < 0.8)  # weights with zeros (masks)
    return a, b, w


def _ref_colsums(a, b, w, kernel, self_pair=False, skip_diag=False):
    """sum_i w_i k(a_i, b_j) in float64 from the specification's pairwise kernel."""
    b = a if self_pair else b
    k = pairwise_kernel(a.double(), b.double(), kernel, BANDWIDTHS)  # [B, N, M]
    if self_pair:  # the exact diagonal: k(a, a) = f(0)
        eye = torch.eye(k.shape[1], dtype=torch.bool)
        f0 = 0.0 if kernel == "energy" else float(len(BANDWIDTHS))
        k = k.masked_fill(eye, 0.0 if skip_diag else f0)
    return torch.einsum("bn,bnm->bm", w.double(), k)


def _close(got, want, dtype):
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * scale)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_colsums_match_reference(kernel, shape, dtype):
    a, b, w = _inputs(shape, dtype, _gen())
    _close(colsums(a, b, w, kernel, BANDWIDTHS), _ref_colsums(a, b, w, kernel), dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("skip_diag", [False, True])
def test_self_pair_colsums_have_an_exact_diagonal(kernel, skip_diag):
    a, _, w = _inputs((2, 53, 1, 21), torch.float32, _gen())
    a = a * 20  # large norms: |a|^2 + |a|^2 - 2 a.a is far from 0 in fp32 rounding, the diagonal is not
    got = colsums(a, None, w, kernel, BANDWIDTHS, skip_diagonal=skip_diag)
    _close(got, _ref_colsums(a, None, w, kernel, self_pair=True, skip_diag=skip_diag), torch.float32)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_gradients_match_reference(kernel, shape, dtype):
    gen = _gen()
    a, b, w = _inputs(shape, dtype, gen)
    g = torch.randn(shape[0], shape[2], generator=gen)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    (kernel_colsums(a1, b1, w, kernel, BANDWIDTHS) * g).sum().backward()
    assert a1.grad.dtype == dtype and b1.grad.dtype == dtype
    a2, b2 = a.double().requires_grad_(), b.double().requires_grad_()
    (_ref_colsums(a2, b2, w, kernel) * g.double()).sum().backward()
    _close(a1.grad, a2.grad, dtype)
    _close(b1.grad, b2.grad, dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("skip_diag", [False, True])
def test_self_pair_gradient_matches_reference(kernel, skip_diag):
    gen = _gen()
    a, _, w = _inputs((2, 41, 1, 13), torch.float32, gen)
    g = torch.randn(2, 41, generator=gen)
    a1 = a.clone().requires_grad_()
    (kernel_colsums(a1, None, w, kernel, BANDWIDTHS, skip_diag) * g).sum().backward()
    a2 = a.double().requires_grad_()
    (_ref_colsums(a2, None, w, kernel, self_pair=True, skip_diag=skip_diag) * g.double()).sum().backward()
    _close(a1.grad, a2.grad, torch.float32)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_float64(kernel):
    gen = _gen()
    a = torch.randn(2, 4, 3, dtype=torch.float64, generator=gen).requires_grad_()
    b = torch.randn(2, 3, 3, dtype=torch.float64, generator=gen).requires_grad_()
    w = torch.rand(2, 4, dtype=torch.float64, generator=gen)
    # Full Jacobians for the cross pair; fast mode (random projections) for the self pairs.
    assert torch.autograd.gradcheck(lambda a, b: kernel_colsums(a, b, w, kernel, BANDWIDTHS), (a, b))
    for skip in (False, True):
        assert torch.autograd.gradcheck(lambda a, skip=skip: kernel_colsums(a, None, w, kernel, BANDWIDTHS, skip), (a,),
                                        fast_mode=True)


def test_pair_grad_is_the_documented_sum():
    """out_i = sum_j 2 f'(d2_ij) u_i v_j (a_i - b_j), checked by explicit loops for the Gaussian kernel."""
    gen = _gen()
    a, b = torch.randn(1, 4, 3, dtype=torch.float64, generator=gen), torch.randn(1, 5, 3, dtype=torch.float64, generator=gen)
    u, v = torch.rand(1, 4, dtype=torch.float64, generator=gen), torch.randn(1, 5, dtype=torch.float64, generator=gen)
    got = pair_grad(a, b, u, v, "gaussian", (1.3,))
    c = 1.0 / (2 * 1.3 ** 2)
    want = torch.zeros_like(a)
    for i in range(4):
        for j in range(5):
            diff = a[0, i] - b[0, j]
            want[0, i] += -2 * c * torch.exp(-c * (diff @ diff)) * u[0, i] * v[0, j] * diff
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_empty_sets_give_zero_sums_and_gradients():
    a = torch.randn(2, 6, 3, requires_grad=True)
    b = torch.randn(2, 4, 3, requires_grad=True)
    w = torch.zeros(2, 6)  # no real cell in a
    out = kernel_colsums(a, b, w, "energy")
    assert (out == 0).all()
    out.sum().backward()
    assert (a.grad == 0).all() and (b.grad == 0).all()
    assert colsums(torch.randn(1, 0, 3), torch.randn(1, 4, 3), torch.zeros(1, 0), "energy").eq(0).all()
    assert colsums(torch.randn(1, 5, 3), torch.randn(1, 0, 3), torch.ones(1, 5), "energy").shape == (1, 0)


def test_coincident_points_have_zero_energy_gradient():
    a = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]], requires_grad=True)
    b = a.detach().clone()[:, :1]  # b_0 == a_0 exactly
    kernel_colsums(a, b, torch.ones(1, 2), "energy").sum().backward()
    want = (a.detach()[0, 1] - b[0, 0]) / (a.detach()[0, 1] - b[0, 0]).norm() * -1.0
    torch.testing.assert_close(a.grad[0, 0], torch.zeros(2))
    torch.testing.assert_close(a.grad[0, 1], want)


def test_bad_arguments_are_named():
    a, b = torch.randn(1, 3, 2), torch.randn(1, 4, 2)
    with pytest.raises(ValueError, match="unknown kernel 'rbf'"):
        colsums(a, b, torch.ones(1, 3), "rbf")
    with pytest.raises(ValueError, match="positive bandwidths"):
        colsums(a, b, torch.ones(1, 3), "gaussian", (1.0, -2.0))
    with pytest.raises(ValueError, match=r"expected a \[B, N, D\]"):
        colsums(a, torch.randn(1, 4, 3), torch.ones(1, 3), "energy")
    with pytest.raises(ValueError, match="between 1 and 8 bandwidths"):
        colsums(a, b, torch.ones(1, 3), "laplacian", tuple(range(1, 10)))
