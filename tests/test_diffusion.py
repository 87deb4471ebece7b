"""The diffusion process (perturbdiff/diffusion): schedules, the objective's per-set draws and masking,
and the DDIM sampler's arithmetic, with small recording networks whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from perturbdiff.config import DiffusionConfig
from perturbdiff.diffusion import NoiseSchedule, SetDiffusion, respaced_timesteps, sample_sets


class Recorder(torch.nn.Module):
    """A network with a known answer: x0_hat = relu(x_t @ W) for conditioned sets, ``uncond`` (a
    constant) for sets whose covariates were dropped. Records every call's keyword arguments."""

    def __init__(self, G: int, uncond: float | None = None, const: float | None = None):
        super().__init__()
        self.lin = torch.nn.Linear(G, G)
        self.uncond, self.const = uncond, const
        self.calls: list[dict] = []

    def forward(self, x_t, t, *, mask, ctrl, ctrl_mask, cov, self_cond=None, drop_cov=None, drop_ctrl=None):
        self.calls.append(dict(x_t=x_t.clone(), t=t.clone(), mask=mask, ctrl=ctrl, ctrl_mask=ctrl_mask, cov=cov,
                               self_cond=None if self_cond is None else self_cond.clone(),
                               drop_cov=drop_cov, drop_ctrl=drop_ctrl))
        out = torch.relu(self.lin(x_t)) if self.const is None else torch.full_like(x_t, self.const)
        if self.uncond is not None and drop_cov is not None:
            out = torch.where(drop_cov[:, None, None], torch.full_like(out, self.uncond), out)
        return torch.where(mask[..., None], out, torch.zeros_like(out))


def _batch(B=6, M=10, G=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(M)[None] < torch.randint(2, M + 1, (B,), generator=g)[:, None]
    x = torch.rand(B, M, G, generator=g) * mask[..., None]
    return {"x": x, "mask": mask, "ctrl": torch.rand(B, M, G, generator=g), "ctrl_mask": torch.ones(B, M, dtype=torch.bool),
            "context": torch.zeros(B, dtype=torch.long), "perturbation": torch.arange(B), "num_dose": torch.rand(B),
            "rows": torch.zeros(B, M, dtype=torch.long)}


def test_linear_schedule_matches_the_paper_default():
    s = NoiseSchedule("linear", 1000)
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - b for b in s.betas.tolist()), rel=1e-9)
    s100 = NoiseSchedule("linear", 100)  # scaled by 1000 / T: about the same total noise
    assert s100.betas[0].item() == pytest.approx(1e-3) and s100.betas[-1].item() == pytest.approx(0.2)
    assert abs(math.log(s100.alphas_cumprod[-1].item()) / math.log(s.alphas_cumprod[-1].item()) - 1) < 0.2


def test_cosine_schedule_is_monotone_and_ends_near_pure_noise():
    ab = NoiseSchedule("cosine", 1000).alphas_cumprod
    assert (ab[1:] < ab[:-1]).all() and 0.99 < ab[0] < 1 and ab[-1] < 1e-4


def test_q_sample_has_the_forward_marginals():
    s = NoiseSchedule("linear", 1000)
    x0 = torch.full((1, 200_000, 1), 2.0)
    t = torch.tensor([300])
    xt = s.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)))
    ab = s.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(2 * math.sqrt(ab), abs=0.01)
    assert xt.var().item() == pytest.approx(1 - ab, rel=0.02)
    assert s.abar(torch.tensor([-1])).item() == 1.0


def test_respacing():
    assert respaced_timesteps(1000, 5) == [999, 749, 500, 250, 0]
    ts = respaced_timesteps(1000, 100)
    assert len(ts) == 100 and ts[0] == 999 and ts[-1] == 0 and ts == sorted(ts, reverse=True)
    assert respaced_timesteps(1000, 3, "released") == [2, 1, 0]
    with pytest.raises(ValueError, match="sample_steps must be in 1 .. 1000"):
        respaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="unknown noise schedule 'sigmoid'"):
        NoiseSchedule("sigmoid")


def test_loss_draws_are_per_set_and_padding_is_ignored():
    cfg = DiffusionConfig(p_drop_cond=0.5, p_drop_control=0.5, p_self_cond=1.0, kme_impl="torch")
    diff, model = SetDiffusion(cfg), Recorder(5)
    batch = _batch(B=64)
    out = diff.loss(model, batch, torch.Generator().manual_seed(3))
    assert len(model.calls) == 2  # self-conditioning: a first pass, then the trained pass
    call = model.calls[-1]
    assert 0 < call["drop_cov"].sum() < 64 and 0 < call["drop_ctrl"].sum() < 64  # drawn per set
    assert len(set(out.t.tolist())) > 10
    torch.testing.assert_close(call["self_cond"], torch.relu(model.lin(model.calls[0]["x_t"])) * batch["mask"][..., None])
    assert set(call["cov"]) == {"context", "perturbation", "num_dose"}  # rows etc. are not covariates
    assert (call["x_t"][~batch["mask"]] == 0).all()
    # garbage in padded cells changes nothing
    garbage = dict(batch, x=torch.where(batch["mask"][..., None], batch["x"], torch.full_like(batch["x"], 1e4)))
    model2 = Recorder(5)
    model2.load_state_dict(model.state_dict())
    out2 = diff.loss(model2, garbage, torch.Generator().manual_seed(3))
    torch.testing.assert_close(out2.loss, out.loss)
    torch.testing.assert_close(out2.mmd, out.mmd)


def test_self_conditioning_probability_zero_is_one_pass():
    diff, model = SetDiffusion(DiffusionConfig(p_self_cond=0.0, kme_impl="torch")), Recorder(5)
    diff.loss(model, _batch(), torch.Generator().manual_seed(0))
    assert len(model.calls) == 1 and model.calls[0]["self_cond"] is None


def test_set_errors_known_answers():
    diff = SetDiffusion(DiffusionConfig(kernel="energy", kme_impl="torch"))
    x = torch.rand(2, 6, 4)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    mse, mmd = diff.set_errors(x + 0.5 * mask[..., None], x, mask)
    torch.testing.assert_close(mse, torch.tensor([0.25, 0.25]))
    # one-cell sets: the energy distance of {a} and {a + d} is 2|d| / sqrt(G) after the per-gene scaling
    a = torch.zeros(1, 1, 4)
    _, mmd1 = diff.set_errors(a + torch.tensor([1.0, 1, 1, 1]), a, torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(mmd1, torch.tensor([2.0 * 2.0 / 2.0]))
    _, mmd0 = diff.set_errors(x, x, mask)
    assert mmd0.abs().max() < 1e-5


def test_sampler_with_an_oracle_returns_the_oracle_answer():
    """A network that always predicts the same x0 makes DDIM return exactly it, whatever the guidance."""
    diff = SetDiffusion(DiffusionConfig(sample_steps=7))
    model = Recorder(3, const=0.7)
    ctrl = torch.rand(2, 4, 3)
    out = sample_sets(model, diff, ctrl=ctrl, ctrl_mask=torch.ones(2, 4, dtype=torch.bool),
                      cov={"perturbation": torch.tensor([1, 2])}, num_cells=5, num_samples=3,
                      generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 5, 3)
    torch.testing.assert_close(out, torch.full_like(out, 0.7))
    assert len(model.calls) == 7 and [int(c["t"][0]) for c in model.calls][:2] == [999, 832]


def test_guidance_batches_cond_and_uncond_and_keeps_the_control_set():
    diff = SetDiffusion(DiffusionConfig(sample_steps=4, cutoff=1e-4))
    a, b, w = 0.8, 0.3, 1.5
    model = Recorder(2, const=a, uncond=b)
    ctrl = torch.rand(1, 3, 2)
    cmask = torch.tensor([[True, True, False]])
    out = sample_sets(model, diff, ctrl=ctrl, ctrl_mask=cmask, cov={"context": torch.tensor([4])}, num_cells=2,
                      num_samples=2, guidance=w)
    torch.testing.assert_close(out, torch.full_like(out, (1 + w) * a - w * b))  # eps-space guidance, linear in x0
    first = model.calls[0]
    assert first["x_t"].shape[0] == 4 and first["drop_cov"].tolist() == [False, False, True, True]
    assert (first["ctrl_mask"] == cmask).all() and (first["ctrl"] == ctrl).all()  # uncond pass keeps controls
    assert (first["self_cond"] == 0).all()
    # x0 fed back (at t = T - 1, fp32 rounding is amplified by 1 / sqrt(abar) ~ 160)
    torch.testing.assert_close(model.calls[1]["self_cond"], torch.full((4, 2, 2), (1 + w) * a - w * b), atol=1e-3, rtol=0)
    # below the cutoff is clipped to zero
    clipped = sample_sets(Recorder(2, const=0.2, uncond=0.9), diff, ctrl=ctrl, ctrl_mask=cmask, cov={},
                          num_cells=2, guidance=1.0)
    assert (clipped == 0).all()
    # above x0_max is clipped to it, at every step (the guided x0 here would be 2 * 0.8 - 0.3 = 1.3)
    model = Recorder(2, const=0.8, uncond=0.3)
    bounded = sample_sets(model, diff, ctrl=ctrl, ctrl_mask=cmask, cov={}, num_cells=2, guidance=1.0, x0_max=0.5)
    torch.testing.assert_close(bounded, torch.full_like(bounded, 0.5))
    assert all(c["self_cond"].max() <= 0.5 for c in model.calls)
    cfg_bound = sample_sets(Recorder(2, const=0.8), SetDiffusion(DiffusionConfig(sample_steps=3, x0_max=0.25)),
                            ctrl=ctrl, ctrl_mask=cmask, cov={}, num_cells=2, guidance=0.0)
    torch.testing.assert_close(cfg_bound, torch.full_like(cfg_bound, 0.25))


def test_released_respacing_is_available():
    diff = SetDiffusion(DiffusionConfig(sample_steps=5, respacing="released"))
    model = Recorder(2, const=0.5)
    sample_sets(model, diff, ctrl=torch.rand(1, 2, 2), ctrl_mask=torch.ones(1, 2, dtype=torch.bool), cov={},
                num_cells=3, guidance=0.0)
    assert [int(c["t"][0]) for c in model.calls] == [4, 3, 2, 1, 0]
    assert model.calls[0]["x_t"].shape[0] == 1  # w = 0: no unconditional half


def _tiny_model(G=5):
    from perturbdiff.config import ModelConfig
    from perturbdiff.models import build_model
    return build_model(ModelConfig(size="tiny"), G, {"context": 2, "perturbation": 6})


def test_fixed_seed_gives_the_same_loss_with_the_real_network():
    torch.manual_seed(0)
    model, diff, batch = _tiny_model(), SetDiffusion(DiffusionConfig(kme_impl="torch")), _batch()
    a = diff.loss(model, batch, torch.Generator().manual_seed(11))
    b = diff.loss(model, batch, torch.Generator().manual_seed(11))
    c = diff.loss(model, batch, torch.Generator().manual_seed(12))
    assert a.loss.item() == b.loss.item() and torch.equal(a.mse, b.mse) and torch.equal(a.t, b.t)
    assert a.loss.item() != c.loss.item()
    a.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_relu_head_keeps_a_gradient_below_zero():
    """relu in value, but a unit pushed below zero for every input can climb back (no dead units)."""
    from perturbdiff.models.mmdit import relu_leaky_grad
    z = torch.tensor([-2.0, -0.1, 0.5], requires_grad=True)
    out = relu_leaky_grad(z)
    assert out.tolist() == [0.0, 0.0, 0.5]
    out.sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([0.01, 0.01, 1.0]))
