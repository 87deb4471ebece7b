"""The torch reference for kernel mean embeddings and MMD (perturbdiff/ops/kme_reference.py): known answers in
float64 against explicit formulas, masking with garbage padding, permutations, edge cases, gradients."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from helpers import fresh_seed
from perturbdiff.ops.kme_reference import KERNELS, kme, mmd2, pairwise_kernel

BANDWIDTHS = (0.7, 1.9)


def _k(a: np.ndarray, b: np.ndarray, kernel: str) -> float:
    d = float(np.sqrt(((a - b) ** 2).sum()))
    if kernel == "energy":
        return -d
    if kernel == "gaussian":
        return sum(np.exp(-d * d / (2 * s * s)) for s in BANDWIDTHS)
    return sum(np.exp(-d / s) for s in BANDWIDTHS)


def _mmd2_loops(x: np.ndarray, y: np.ndarray, kernel: str, unbiased: bool) -> float:
    def mean(a, b, skip_diag):
        vals = [_k(a[i], b[j], kernel) for i, j in itertools.product(range(len(a)), range(len(b)))
                if not (skip_diag and i == j)]
        return float(np.mean(vals))
    return mean(x, x, unbiased) + mean(y, y, unbiased) - 2 * mean(x, y, False)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd2_matches_explicit_double_loops(kernel, unbiased):
    rng = np.random.default_rng(fresh_seed())
    x, y = rng.normal(size=(2, 7, 5)), rng.normal(0.5, 1.3, size=(2, 9, 5))
    got = mmd2(torch.from_numpy(x), torch.from_numpy(y), kernel=kernel, bandwidths=BANDWIDTHS, unbiased=unbiased)
    want = [_mmd2_loops(x[b], y[b], kernel, unbiased) for b in range(2)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)


def test_energy_mmd_is_the_energy_distance():
    rng = np.random.default_rng(fresh_seed())
    x, y = rng.normal(size=(1, 11, 3)), rng.normal(1.0, 1.0, size=(1, 6, 3))
    exy = np.mean([np.linalg.norm(a - b) for a in x[0] for b in y[0]])
    exx = np.mean([np.linalg.norm(a - b) for a in x[0] for b in x[0]])
    eyy = np.mean([np.linalg.norm(a - b) for a in y[0] for b in y[0]])
    got = mmd2(torch.from_numpy(x), torch.from_numpy(y), kernel="energy")
    np.testing.assert_allclose(got.item(), 2 * exy - exx - eyy, rtol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kme_is_the_mean_kernel_over_x(kernel):
    rng = np.random.default_rng(fresh_seed())
    x, y = rng.normal(size=(3, 13, 4)), rng.normal(size=(3, 5, 4))
    got = kme(torch.from_numpy(x), torch.from_numpy(y), kernel=kernel, bandwidths=BANDWIDTHS).numpy()
    want = [[np.mean([_k(a, q, kernel) for a in x[b]]) for q in y[b]] for b in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", [False, True])
def test_masked_sets_equal_trimmed_sets_even_with_nan_padding(kernel, unbiased):
    rng = np.random.default_rng(fresh_seed())
    B, N, M, D = 4, 10, 7, 6
    nx, ny = rng.integers(2, N + 1, B), rng.integers(2, M + 1, B)
    x = torch.from_numpy(rng.normal(size=(B, N, D))).requires_grad_()
    y = torch.from_numpy(rng.normal(size=(B, M, D))).requires_grad_()
    xm = torch.arange(N)[None] < torch.from_numpy(nx)[:, None]
    ym = torch.arange(M)[None] < torch.from_numpy(ny)[:, None]
    garbage_x = torch.where(xm[..., None], x, torch.full_like(x, float("nan")))
    garbage_y = torch.where(ym[..., None], y, torch.full_like(y, float("inf")))
    got = mmd2(garbage_x, garbage_y, xm, ym, kernel, BANDWIDTHS, unbiased)
    got_kme = kme(garbage_x, garbage_y, xm, ym, kernel, BANDWIDTHS)
    (got.sum() + got_kme.sum()).backward()
    for b in range(B):
        xb, yb = x[b:b + 1, :nx[b]].detach().requires_grad_(), y[b:b + 1, :ny[b]].detach().requires_grad_()
        want = mmd2(xb, yb, kernel=kernel, bandwidths=BANDWIDTHS, unbiased=unbiased)
        want_kme = kme(xb, yb, kernel=kernel, bandwidths=BANDWIDTHS)
        (want.sum() + want_kme.sum()).backward()
        torch.testing.assert_close(got[b], want[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_kme[b, :ny[b]], want_kme[0], rtol=1e-12, atol=1e-12)
        assert (got_kme[b, ny[b]:] == 0).all()
        torch.testing.assert_close(x.grad[b, :nx[b]], xb.grad[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(y.grad[b, :ny[b]], yb.grad[0], rtol=1e-10, atol=1e-12)
        assert (x.grad[b, nx[b]:] == 0).all() and (y.grad[b, ny[b]:] == 0).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_permutation_invariance_and_symmetry(kernel):
    rng = np.random.default_rng()
    x, y = torch.from_numpy(rng.normal(size=(2, 9, 3))), torch.from_numpy(rng.normal(size=(2, 8, 3)))
    base = mmd2(x, y, kernel=kernel, bandwidths=BANDWIDTHS)
    px, py = torch.from_numpy(rng.permutation(9)), torch.from_numpy(rng.permutation(8))
    torch.testing.assert_close(mmd2(x[:, px], y[:, py], kernel=kernel, bandwidths=BANDWIDTHS), base)
    torch.testing.assert_close(mmd2(y, x, kernel=kernel, bandwidths=BANDWIDTHS), base)
    # kme: invariant to permuting X, equivariant to permuting Y
    e = kme(x, y, kernel=kernel, bandwidths=BANDWIDTHS)
    torch.testing.assert_close(kme(x[:, px], y[:, py], kernel=kernel, bandwidths=BANDWIDTHS), e[:, py])
    torch.testing.assert_close(mmd2(x, x, kernel=kernel, bandwidths=BANDWIDTHS), torch.zeros(2, dtype=x.dtype),
                               atol=1e-12, rtol=0)


def test_empty_and_one_cell_sets():
    x = torch.tensor([[[0.0, 0.0], [9.0, 9.0]], [[1.0, 2.0], [3.0, 4.0]]], dtype=torch.float64)
    y = torch.tensor([[[3.0, 4.0], [5.0, 5.0]], [[0.0, 0.0], [7.0, 7.0]]], dtype=torch.float64)
    xm = torch.tensor([[True, False], [False, False]])  # one cell; empty
    ym = torch.tensor([[True, False], [True, True]])
    v = mmd2(x, y, xm, ym, kernel="energy")
    assert v[0].item() == pytest.approx(2 * 5.0)  # one cell each: 2 ||x - y||
    assert torch.isnan(v[1])  # empty X: undefined
    u = mmd2(x, y, xm, ym, kernel="energy", unbiased=True)
    assert torch.isnan(u).all()  # U-statistic needs two cells per set
    e = kme(x, y, xm, ym, kernel="energy")
    assert e[1].abs().sum() == 0 and e[0, 0].item() == pytest.approx(-5.0) and e[0, 1] == 0


def test_unbiased_estimator_is_unbiased_and_biased_one_is_not():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 5, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(4000, 5, 3, generator=gen, dtype=torch.float64)  # same distribution: MMD = 0
    u = mmd2(x, y, kernel="gaussian", bandwidths=(1.0,), unbiased=True)
    v = mmd2(x, y, kernel="gaussian", bandwidths=(1.0,))
    assert abs(u.mean().item()) < 4 * u.std().item() / np.sqrt(len(u))
    assert v.mean().item() > 10 * v.std().item() / np.sqrt(len(v))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unbiased", [False, True])
def test_gradcheck(kernel, unbiased):
    gen = torch.Generator().manual_seed(int(np.random.default_rng().integers(1 << 30)))
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    xm = torch.tensor([[True] * 5, [True, True, True, False, False]])
    ym = torch.tensor([[True] * 4, [True, False, True, True]])
    assert torch.autograd.gradcheck(lambda a, b: mmd2(a, b, xm, ym, kernel, BANDWIDTHS, unbiased), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: kme(a, b, xm, ym, kernel, BANDWIDTHS), (x, y))


def test_energy_gradient_is_finite_at_coincident_points():
    x = torch.tensor([[[1.0, 2.0], [1.0, 2.0]]], dtype=torch.float64, requires_grad=True)
    mmd2(x, x.detach() + 0.0, kernel="energy").backward()
    assert torch.isfinite(x.grad).all()


def test_bad_arguments():
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="unknown kernel"):
        pairwise_kernel(x, x, "cosine")
    with pytest.raises(ValueError, match="positive bandwidths"):
        mmd2(x, x, kernel="gaussian", bandwidths=(0.0,))
    with pytest.raises(ValueError, match=r"expected x \[B, N, D\]"):
        mmd2(x, torch.zeros(1, 2, 4))
