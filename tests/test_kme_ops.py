"""The KME / MMD ops (perturbdiff/ops/kme.py), both implementations, against the float64 specification.

impl="triton" runs in the CPU interpreter here (TRITON_INTERPRET=1 from conftest). Ragged sets come
with masks whose padded rows hold garbage (huge values and NaN) that must reach neither values nor
gradients. Fresh random inputs every run; fp32 tolerance 2e-4 relative to the largest value.
"""

from __future__ import annotations

import pytest
import torch

from helpers import fresh_seed
from perturbdiff.ops import kme_reference as ref
from perturbdiff.ops.kme import kme, mmd2, resolve_impl

BANDWIDTHS = (0.6, 1.7)
IMPLS = ["torch", "triton"]


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(fresh_seed())


def _ragged(gen, B=3, N=23, M=17, D=11):
    x = torch.randn(B, N, D, generator=gen)
    y = torch.randn(B, M, D, generator=gen) * 1.2 + 0.4
    n = torch.tensor([N, 5, 2])[:B]
    m = torch.tensor([9, M, 2])[:B]
    xm = torch.arange(N)[None] < n[:, None]
    ym = torch.arange(M)[None] < m[:, None]
    x[~xm] = 1e6
    y[~ym] = float("nan")
    return x, y, xm, ym


def _close(got, want, tol=2e-4):
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * scale, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel", ref.KERNELS)
@pytest.mark.parametrize("unbiased", [False, True])
def test_mmd2_values_and_gradients(impl, kernel, unbiased):
    x, y, xm, ym = _ragged(_gen())
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = mmd2(x1, y1, xm, ym, kernel, BANDWIDTHS, unbiased, impl=impl)
    assert got.dtype == torch.float32 and got.shape == (3,)
    x2, y2 = x.double().requires_grad_(), y.double().requires_grad_()
    want = ref.mmd2(x2, y2, xm, ym, kernel, BANDWIDTHS, unbiased)
    _close(got, want)
    got.sum().backward()
    want.sum().backward()
    assert torch.isfinite(x1.grad).all() and torch.isfinite(y1.grad).all()
    assert (x1.grad[~xm] == 0).all() and (y1.grad[~ym] == 0).all()
    _close(x1.grad, x2.grad)
    _close(y1.grad, y2.grad)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel", ref.KERNELS)
def test_kme_values_and_gradients(impl, kernel):
    x, y, xm, ym = _ragged(_gen())
    x1, y1 = x.clone().requires_grad_(), y.clone().requires_grad_()
    got = kme(x1, y1, xm, ym, kernel, BANDWIDTHS, impl=impl)
    x2, y2 = x.double().requires_grad_(), y.double().requires_grad_()
    want = ref.kme(x2, y2, xm, ym, kernel, BANDWIDTHS)
    _close(got, want)
    weights = torch.randn(got.shape, generator=_gen())
    (got * weights).sum().backward()
    (want * weights.double()).sum().backward()
    _close(x1.grad, x2.grad)
    _close(y1.grad, y2.grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_known_answer_energy_distance_of_two_points(impl):
    """x = {0}, y = {v}: the energy distance is 2|v| (the within-set terms vanish)."""
    x = torch.zeros(1, 1, 4)
    y = torch.tensor([[[3.0, 0.0, 4.0, 0.0]]])
    torch.testing.assert_close(mmd2(x, y, impl=impl), torch.tensor([10.0]))
    torch.testing.assert_close(kme(x, y, impl=impl), torch.tensor([[-5.0]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_one_cell_sets(impl):
    x, y = torch.randn(2, 4, 3), torch.randn(2, 5, 3)
    xm = torch.tensor([[False] * 4, [True, False, False, False]])
    ym = torch.ones(2, 5, dtype=torch.bool)
    v = mmd2(x, y, xm, ym, impl=impl)
    assert torch.isnan(v[0]) and torch.isfinite(v[1])  # empty set: undefined; one cell: defined (V)
    u = mmd2(x, y, xm, ym, unbiased=True, impl=impl)
    assert torch.isnan(u).all()  # the U-statistic needs two cells on each side
    assert (kme(x, y, xm, ym, impl=impl)[0] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_permutation_invariance_and_identity(impl):
    gen = _gen()
    x, y = torch.randn(2, 13, 6, generator=gen), torch.randn(2, 9, 6, generator=gen)
    p, q = torch.randperm(13, generator=gen), torch.randperm(9, generator=gen)
    _close(mmd2(x[:, p], y[:, q], impl=impl), mmd2(x, y, impl=impl).double(), 1e-5)
    _close(kme(x[:, p], y[:, q], impl=impl), kme(x, y, impl=impl)[:, q].double(), 1e-5)
    assert mmd2(x, x.clone(), impl=impl).abs().max() < 1e-4


def test_bf16_and_autocast_inputs_compute_in_fp32():
    gen = _gen()
    x, y = torch.randn(2, 20, 8, generator=gen), torch.randn(2, 15, 8, generator=gen) + 0.5
    want = ref.mmd2(x.bfloat16().double(), y.bfloat16().double())
    for impl in IMPLS:
        got = mmd2(x.bfloat16(), y.bfloat16(), impl=impl)
        assert got.dtype == torch.float32
        _close(got, want, 5e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mmd2(x, y, impl="torch")
    assert got.dtype == torch.float32
    _close(got, ref.mmd2(x.double(), y.double()))


def test_impl_resolution():
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("torch", cpu) == "torch"
    assert resolve_impl("triton", cpu) == "triton"  # the interpreter is on in the test run
    with pytest.raises(ValueError, match="unknown kme impl 'cuda'"):
        resolve_impl("cuda", cpu)
    with pytest.raises(ValueError, match="unknown kernel"):
        mmd2(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), kernel="rbf")


@pytest.mark.parametrize("impl", IMPLS)
def test_lengths_equal_masks(impl):
    x, y, xm, ym = _ragged(_gen())
    by_mask = mmd2(x, y, xm, ym, "gaussian", BANDWIDTHS, impl=impl)
    by_len = mmd2(x, y, xm.sum(1), ym.sum(1), "gaussian", BANDWIDTHS, impl=impl)
    assert torch.equal(by_mask, by_len)
    torch.testing.assert_close(kme(x, y, xm.sum(1), ym, impl=impl), kme(x, y, xm, ym, impl=impl))
    with pytest.raises(ValueError, match=r"x lengths must be \[B=3\] integers in 0..23"):
        mmd2(x, y, torch.tensor([24, 1, 1]), ym, impl=impl)
    with pytest.raises(ValueError, match=r"y mask must be \[B, N\] = \[3, 17\]"):
        mmd2(x, y, xm, ym[:, :5], impl=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_dtypes_promote_instead_of_rounding_down(impl):
    x, y = torch.randn(1, 9, 6).bfloat16(), torch.randn(1, 7, 6) + 0.3  # fp32 y must not be rounded to bf16
    want = ref.mmd2(x.double(), y.double())
    _close(mmd2(x, y, impl=impl), want, 1e-5)
