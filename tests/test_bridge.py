"""Populations that start from the control cells (diffusion.start=controls): the DDIM map run upwards
under the controls' covariates, then downwards under the condition's and the controls' own, the
difference added to the control cells (diffusion/sampler.py).

With the exact denoiser of Gaussian data the probability-flow map between two Gaussians is known in
closed form, x -> mu_b + (s_b / s_a)(x - mu_a) per gene, so the bridge has a known answer; under the
controls' own covariates the prediction is the controls."""

from __future__ import annotations

import dataclasses

import anndata as ad
import numpy as np
import pytest
import torch

from helpers import build_train_store, data_cfg, random_foundation
from perturbdiff.config import DiffusionConfig, HoldoutRule, SplitConfig
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.schema import DataError
from perturbdiff.diffusion import SetDiffusion, bridge_sets, invert_sets, sample_sets
from perturbdiff.predict import PredictOptions, predict_split
from perturbdiff.foundation import load_foundation

G = 3
MU = torch.tensor([[1.5, 1.0, 1.3], [2.5, 1.2, 1.6]])  # per perturbation id: mean per gene
SD = torch.tensor([[0.4, 0.2, 0.3], [0.6, 0.2, 0.15]])


class GaussianDenoiser(torch.nn.Module):
    """E[x0 | x_t] for x0 ~ N(MU[p], SD[p]^2) per gene, p = cov["perturbation"]: the exact x0 network."""

    self_condition = False

    def __init__(self, diffusion: SetDiffusion):
        super().__init__()
        self.schedule = diffusion.schedule

    def forward(self, x_t, t, *, cov, **_):
        ab = self.schedule.abar(t.long()).double()[:, None, None]
        mu, var = MU[cov["perturbation"]].double()[:, None, :], SD[cov["perturbation"]].double()[:, None, :] ** 2
        x0 = mu + ab.sqrt() * var / (ab * var + 1 - ab) * (x_t.double() - ab.sqrt() * mu)
        return x0.to(x_t.dtype)


def _bridge(src: torch.Tensor, p_from: int, p_to: int, steps: int = 250, recon: bool = False) -> torch.Tensor:
    diffusion = SetDiffusion(DiffusionConfig(steps=1000, sample_steps=steps, cutoff=-float("inf")))
    model = GaussianDenoiser(diffusion)
    B, m, _ = src.shape
    kw = dict(ctrl=torch.zeros(B, 1, G), ctrl_mask=torch.zeros(B, 1, dtype=torch.bool))
    cov = {"perturbation": torch.full((B,), p_to)}
    source_cov = {"perturbation": torch.full((B,), p_from)}
    gen = torch.Generator().manual_seed(1)
    if recon:  # the uncorrected descent from the inverted controls
        x_T = invert_sets(model, diffusion, src, cov=source_cov, generator=gen, **kw)
        return sample_sets(model, diffusion, cov=cov, num_cells=m, noise=x_T, **kw)[:, 0]
    return bridge_sets(model, diffusion, src, cov=cov, source_cov=source_cov, generator=gen, **kw)


def _cells(p: int, n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (MU[p] + SD[p] * torch.randn(2, n, G, generator=g, dtype=torch.float64).float())


def test_the_bridge_carries_each_cell_along_the_known_transport_map():
    """The map is exact where the two conditions differ by a shift (gene 1); where their spreads
    differ the error is the first step's small forward noise scaled by the spread change (it shrinks
    as the steps get finer), and below the uncorrected descent's (half of it in all)."""
    src = _cells(0)
    want = MU[1] + SD[1] / SD[0] * (src - MU[0])
    err = {K: (_bridge(src, 0, 1, steps=K) - want).abs().mean((0, 1)) for K in (25, 1000)}
    plain = (_bridge(src, 0, 1, steps=25, recon=True) - want).abs().mean((0, 1))
    assert err[25][1] < 1e-3 and (err[1000] < 0.05 * SD[1]).all() and (err[1000] < 0.5 * err[25] + 1e-3).all()
    assert (err[25] <= plain).all() and err[25].sum() < 0.5 * plain.sum()
    out = _bridge(src, 0, 1)
    for g in range(G):
        assert np.corrcoef(out[..., g].flatten(), src[..., g].flatten())[0, 1] > 0.98
    np.testing.assert_allclose(out.mean((0, 1)), MU[1], atol=0.05)
    np.testing.assert_allclose(out.std((0, 1)), SD[1], rtol=0.1)


def test_under_the_controls_own_covariates_the_prediction_is_the_controls():
    src = _cells(1, seed=3)
    torch.testing.assert_close(_bridge(src, 1, 1, steps=25), src)
    # the reconstruction it subtracts is exact only for fine steps: at 25 it loses much of each cell
    coarse, fine = ((_bridge(src, 1, 1, steps=K, recon=True) - src).abs().mean((0, 1)) for K in (25, 1000))
    assert (fine < 0.1 * SD[1]).all() and (coarse > 2 * fine).all()


def test_inversion_checks_its_inputs():
    diffusion = SetDiffusion(DiffusionConfig(steps=100, sample_steps=1))
    model = GaussianDenoiser(diffusion)
    kw = dict(ctrl=torch.zeros(1, 1, G), ctrl_mask=torch.zeros(1, 1, dtype=torch.bool),
              cov={"perturbation": torch.zeros(1, dtype=torch.long)})
    with pytest.raises(ValueError, match="at least 2 sampling steps"):
        invert_sets(model, diffusion, torch.zeros(1, 4, G), **kw)
    with pytest.raises(ValueError, match="noise must be shaped like x0"):
        invert_sets(model, diffusion, torch.zeros(1, 4, G), sample_steps=5, noise=torch.zeros(1, 3, G), **kw)


# ---- predict -------------------------------------------------------------------------------------

SPLIT = SplitConfig(test=[HoldoutRule(contexts=["B_cell"], perturbations=["IL2"])])
OPTS = PredictOptions(n_samples=2, sets_per_batch=3, sample_steps=4, seed=0, train_cells=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_train_store(tmp_path_factory.mktemp("bridge"), genes=16, cells=400)


def test_the_loader_names_the_control_perturbations_and_their_numeric_values(store):
    loader = SetLoader(data_cfg(store, split=SPLIT), "train", log=lambda *a: None)
    assert loader.control_perturbations == ["control"]
    assert set(loader.control_numeric) == set(loader.group_numeric)


def test_predict_starts_from_the_controls_by_default_and_from_noise_on_request(store, tmp_path):
    found = load_foundation(random_foundation(store, tmp_path / "found", SPLIT))
    outs = {}
    for start in (None, "noise", "controls"):
        pred, _ = predict_split(found, str(store), SPLIT, "test", tmp_path / str(start),
                                dataclasses.replace(OPTS, start=start, decode="continuous"), log=lambda *a: None)
        outs[start] = ad.read_h5ad(pred)
    assert outs[None].uns["perturbdiff"]["start"] == outs["controls"].uns["perturbdiff"]["start"] == "controls"
    assert outs["noise"].uns["perturbdiff"]["start"] == "noise"
    np.testing.assert_array_equal(outs[None].X.toarray(), outs["controls"].X.toarray())
    gen = {k: a[~a.obs["is_control"].values].X.toarray() for k, a in outs.items()}
    assert not np.allclose(gen["noise"], gen["controls"], atol=1e-2)
    with pytest.raises(DataError, match="--start 'both'"):
        predict_split(found, str(store), SPLIT, "test", tmp_path / "bad", dataclasses.replace(OPTS, start="both"),
                      log=lambda *a: None)


def test_a_checkpoint_without_the_control_perturbation_starts_from_noise_with_a_note(store, tmp_path):
    found = load_foundation(random_foundation(store, tmp_path / "found", SPLIT))
    found.control_perturbations = ["DMSO"]  # not in its vocabulary
    pred, _ = predict_split(found, str(store), SPLIT, "test", tmp_path / "p", OPTS, log=lambda *a: None)
    uns = ad.read_h5ad(pred).uns["perturbdiff"]
    assert uns["start"] == "noise" and any("start from noise" in n for n in uns["notes"])
