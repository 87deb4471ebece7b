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
"""

from __future__ import annotations

import torch

from .objective import SetDiffusion
from .schedule import respaced_timesteps


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

    if noise is not None:
        if tuple(noise.shape) != (B * S, num_cells, G):
            raise ValueError(f"noise must be [B * S, m, G] = {[B * S, num_cells, G]}, got {list(noise.shape)}")
        x = noise.to(device, dtype)  # x_T
    else:
        gen_device = generator.device if generator is not None else device
        x = torch.randn(B * S, num_cells, G, generator=generator, device=gen_device).to(device, dtype)  # x_T
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
        x0 = torch.where(x0 < cutoff, torch.zeros_like(x0), x0)
        if x0_max is not None:  # no value beyond what the data can hold, at every step (so x_t stays in range too)
            x0 = x0.clamp(max=x0_max)
        t_next = torch.full_like(t, steps[i + 1] if i + 1 < len(steps) else -1)
        ab_next = sched.abar(t_next).to(dtype)[:, None, None]
        x = ab_next.sqrt() * x0 + (1.0 - ab_next).sqrt() * sched.eps_from_x0(x, t, x0)
    return x.reshape(B, S, num_cells, G)
