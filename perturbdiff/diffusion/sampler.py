"""Sampling whole perturbed populations: respaced DDIM (eta = 0) with classifier-free guidance.

For each condition (a control set plus covariates) the sampler draws S independent populations of m
cells, each starting from pure noise at the first respaced timestep (t = T - 1 by default):

    x0_c, x0_u = f(x_t, t; ctrl, cov), f(x_t, t; ctrl, null)    one forward over the doubled batch;
                                                                the unconditional pass KEEPS the control set
    eps  = (1 + w) eps(x0_c) - w eps(x0_u)                      guidance in eps space
    x0   = x0(eps), then x0 < cutoff -> 0, x0 > x0_max -> x0_max the clip (expression is non-negative and
                                                                bounded by what normalisation can produce)
    x_t' = sqrt(abar_t') x0 + sqrt(1 - abar_t') eps(x0)         DDIM step to the next respaced t' (x0 at the end)

and the x0 of each step is fed back as the self-conditioning input of the next. w = 0 skips the
unconditional half of the batch.

Starting from the control cells instead of noise (``bridge_sets``): the DDIM map run upwards
under the CONTROL covariates carries a set of real control cells to x_T (``invert_sets``); run
downwards from that x_T it gives the cells under the target covariates, G_p(x_T), and under the
controls' own, G_c(x_T). The prediction is

    x = clamp(x_ctrl + G_p(x_T) - G_c(x_T), 0, x0_max)

each control cell plus the model's response for it. G_c(x_T) is the DDIM reconstruction of the
controls, exact only in the limit of fine steps; subtracting it (as "direct inversion" does for
image editing, Ju et al. 2024) leaves the real cell where the model predicts no response, so what
the model has not learned of the cells (their zeros, their spread, their library) comes from real
cells, and what it has learned of the response moves them. Under the controls' own covariates the
prediction is the controls exactly. (Without the correction, at 25 steps the reconstruction loses
much of each cell: the last, coarse steps are close to a posterior mean.)
"""

from __future__ import annotations

import torch

from .objective import SetDiffusion
from .schedule import respaced_timesteps


def _clamp(x0: torch.Tensor, cutoff: float, x0_max: float | None) -> torch.Tensor:
    x0 = torch.where(x0 < cutoff, torch.zeros_like(x0), x0)
    return x0 if x0_max is None else x0.clamp(max=x0_max)


def _start_noise(shape: tuple, noise: torch.Tensor | None, generator: torch.Generator | None, device, dtype,
                 what: str) -> torch.Tensor:
    """``noise`` checked against ``shape`` (``what`` names it in the error), or a draw from ``generator``."""
    if noise is not None:
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise must be {what}, got {list(noise.shape)}")
        return noise.to(device, dtype)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device, dtype)


def _repeat(v: torch.Tensor | None, times: int) -> torch.Tensor | None:
    return None if v is None else v.repeat_interleave(times, dim=0)


@torch.no_grad()
def sample_sets(model, diffusion: SetDiffusion, *, ctrl: torch.Tensor, ctrl_mask: torch.Tensor,
                cov: dict[str, torch.Tensor], num_cells: int, num_samples: int = 1,
                guidance: float | None = None, sample_steps: int | None = None, respacing: str | None = None,
                cutoff: float | None = None, x0_max: float | None = None, generator: torch.Generator | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """Populations for B conditions: [B, S, m, G] (S = num_samples, m = num_cells).

    ctrl [B, C, G] and ctrl_mask [B, C] are each condition's control set; cov holds [B] covariates.
    The config's guidance / sample_steps / respacing / cutoff / x0_max are used unless given here
    (x0_max None in both: no upper bound; predict passes the data's attainable maximum). DDIM is
    deterministic given x_T: ``noise`` [B * S, m, G] (condition-major) fixes it, so a population
    does not depend on which others share its batch; otherwise x_T is drawn from ``generator``."""
    cfg = diffusion.cfg
    w = cfg.guidance if guidance is None else guidance
    K = cfg.sample_steps if sample_steps is None else sample_steps
    cutoff = cfg.cutoff if cutoff is None else cutoff
    x0_max = cfg.x0_max if x0_max is None else x0_max
    steps = respaced_timesteps(cfg.steps, K, cfg.respacing if respacing is None else respacing)
    B, S, G = ctrl.shape[0], num_samples, ctrl.shape[-1]
    device, dtype = ctrl.device, ctrl.dtype
    if num_cells < 1 or num_samples < 1:
        raise ValueError(f"num_cells and num_samples must be positive, got {num_cells} and {num_samples}")

    # [B * S] populations, condition-major; the guided batch is [cond; uncond] = 2 B S
    ctrl_s, ctrl_mask_s = _repeat(ctrl, S), _repeat(ctrl_mask.bool(), S)
    cov_s = {k: _repeat(v, S) for k, v in cov.items()}
    guided = w != 0
    halves = 2 if guided else 1
    kwargs = dict(mask=torch.ones(halves * B * S, num_cells, dtype=torch.bool, device=device),
                  ctrl=ctrl_s.repeat(halves, 1, 1), ctrl_mask=ctrl_mask_s.repeat(halves, 1),
                  cov={k: v.repeat(halves) for k, v in cov_s.items()},
                  drop_cov=torch.arange(halves * B * S, device=device) >= B * S)  # second half: no covariates

    x = _start_noise((B * S, num_cells, G), noise, generator, device, dtype,
                     f"[B * S, m, G] = {[B * S, num_cells, G]}")  # x_T
    sched = diffusion.schedule
    x0 = torch.zeros_like(x)
    for i, t_now in enumerate(steps):
        t = torch.full((B * S,), t_now, dtype=torch.long, device=device)
        out = model(x.repeat(halves, 1, 1), t.float().repeat(halves), self_cond=x0.repeat(halves, 1, 1), **kwargs)
        x0_c = out[:B * S]
        if guided:
            eps = (1.0 + w) * sched.eps_from_x0(x, t, x0_c) - w * sched.eps_from_x0(x, t, out[B * S:])
            x0 = sched.x0_from_eps(x, t, eps)
        else:
            x0 = x0_c
        x0 = _clamp(x0, cutoff, x0_max)  # x0_max at every step, so x_t stays in range too
        t_next = torch.full_like(t, steps[i + 1] if i + 1 < len(steps) else -1)
        ab_next = sched.abar(t_next).to(dtype)[:, None, None]
        x = ab_next.sqrt() * x0 + (1.0 - ab_next).sqrt() * sched.eps_from_x0(x, t, x0)
    return x.reshape(B, S, num_cells, G)


@torch.no_grad()
def invert_sets(model, diffusion: SetDiffusion, x0: torch.Tensor, *, ctrl: torch.Tensor, ctrl_mask: torch.Tensor,
                cov: dict[str, torch.Tensor], sample_steps: int | None = None, respacing: str | None = None,
                cutoff: float | None = None, x0_max: float | None = None,
                generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_T [B, m, G] for the sets x0 [B, m, G] of real cells: the sampler's DDIM map run upwards
    under the covariates ``cov`` (those of x0's own condition) and control sets ctrl / ctrl_mask.

    The timesteps are the sampler's, ascending t_0 = 0 < t_1 < ... < t_{K-1}. The first step is the
    forward process itself, x_{t_1} = q(x0, t_1, eps) with eps = ``noise`` [B, m, G] or drawn from
    ``generator`` (near the data the
    ODE is singular for cells with exact zeros, and the noise there is small); then, for each t_i,
    x0' = f(x_{t_i}, t_i) and x_{t_{i+1}} = sqrt(abar_{t_{i+1}}) x0' + sqrt(1 - abar_{t_{i+1}}) eps(x0'),
    the sampler's step with the time reversed, x0' clamped as the sampler clamps it."""
    cfg = diffusion.cfg
    K = cfg.sample_steps if sample_steps is None else sample_steps
    cutoff = cfg.cutoff if cutoff is None else cutoff
    x0_max = cfg.x0_max if x0_max is None else x0_max
    steps = respaced_timesteps(cfg.steps, K, cfg.respacing if respacing is None else respacing)[::-1]
    B, m = x0.shape[:2]
    if len(steps) < 2:
        raise ValueError("inverting a set needs at least 2 sampling steps")
    sched, device, dtype = diffusion.schedule, x0.device, x0.dtype
    eps = _start_noise(tuple(x0.shape), noise, generator, device, dtype, f"shaped like x0 {list(x0.shape)}")
    x = sched.q_sample(x0, torch.full((B,), steps[1], dtype=torch.long, device=device), eps)
    kwargs = dict(mask=torch.ones(B, m, dtype=torch.bool, device=device), ctrl=ctrl, ctrl_mask=ctrl_mask.bool(),
                  cov=cov, drop_cov=torch.zeros(B, dtype=torch.bool, device=device))
    x0_hat = torch.zeros_like(x)
    for t_now, t_up in zip(steps[1:-1], steps[2:]):
        t = torch.full((B,), t_now, dtype=torch.long, device=device)
        x0_hat = _clamp(model(x, t.float(), self_cond=x0_hat, **kwargs), cutoff, x0_max)
        ab_up = sched.abar(torch.full_like(t, t_up)).to(dtype)[:, None, None]
        x = ab_up.sqrt() * x0_hat + (1.0 - ab_up).sqrt() * sched.eps_from_x0(x, t, x0_hat)
    return x


@torch.no_grad()
def bridge_sets(model, diffusion: SetDiffusion, source: torch.Tensor, *, ctrl: torch.Tensor, ctrl_mask: torch.Tensor,
                cov: dict[str, torch.Tensor], source_cov: dict[str, torch.Tensor], guidance: float | None = None,
                sample_steps: int | None = None, respacing: str | None = None, cutoff: float | None = None,
                x0_max: float | None = None, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, m, G]: the sets of real cells ``source`` [B, m, G] (of the covariates ``source_cov``, e.g.
    control cells) carried to the covariates ``cov``: source + G_cov(x_T) - G_source_cov(x_T) with
    x_T = invert_sets(source), clamped to [0, x0_max] (see the module docstring). ``noise`` /
    ``generator``: the inversion's first-step noise. Guidance applies to both descents."""
    cutoff = diffusion.cfg.cutoff if cutoff is None else cutoff
    x0_max = diffusion.cfg.x0_max if x0_max is None else x0_max
    steps = dict(sample_steps=sample_steps, respacing=respacing, cutoff=cutoff, x0_max=x0_max)
    x_T = invert_sets(model, diffusion, source, ctrl=ctrl, ctrl_mask=ctrl_mask, cov=source_cov, noise=noise,
                      generator=generator, **steps)
    m = source.shape[1]
    target, recon = (sample_sets(model, diffusion, ctrl=ctrl, ctrl_mask=ctrl_mask, cov=c, num_cells=m, noise=x_T,
                                 guidance=guidance, **steps)[:, 0] for c in (cov, source_cov))
    return _clamp(source + target - recon, 0.0, x0_max)
