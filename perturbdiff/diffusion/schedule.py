"""Noise schedules and the forward process, one timestep per set.

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,      eps ~ N(0, I) independently per cell and gene

Noising each cell independently is, to first order, a Gaussian random element in the RKHS of the
set's kernel mean embedding (perturbdiff/ops/kme_reference.py), so the process is an ordinary DDPM applied per
cell with a shared t per set. Timesteps are integers 0 .. T-1 (index into the schedule); the network
receives them as floats.

    linear   betas from beta_start * 1000 / T to beta_end * 1000 / T (improved-DDPM's scaling, so any
             T keeps the same total noise as T = 1000; the paper's default is T = 1000, 1e-4 .. 0.02)
    cosine   abar_t = cos^2(((t + 1) / T + s) / (1 + s) * pi / 2) / cos^2(s / (1 + s) * pi / 2), s = 0.008,
             betas clipped at 0.999 (Nichol & Dhariwal 2021)
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine")
RESPACINGS = ("uniform", "released")  # diffusion.respacing (respaced_timesteps)


class NoiseSchedule:
    """The cumulative products abar_t in float64, and the forward process q(x_t | x_0)."""

    def __init__(self, kind: str = "linear", steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if kind not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {kind!r}: use one of {SCHEDULES}")
        if steps < 2:
            raise ValueError(f"diffusion.steps must be at least 2, got {steps}")
        if kind == "linear":
            scale = 1000.0 / steps
            if not 0 < beta_start * scale < beta_end * scale < 1:
                raise ValueError(f"linear schedule needs 0 < beta_start < beta_end < {1 / scale:g}, "
                                 f"got {beta_start}, {beta_end}")
            betas = torch.linspace(beta_start * scale, beta_end * scale, steps, dtype=torch.float64)
        else:
            s = 0.008

            def f(t: float) -> float:
                return math.cos((t / steps + s) / (1 + s) * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - f(t + 1) / f(t), 0.999) for t in range(steps)], dtype=torch.float64)
        self.kind, self.steps = kind, steps
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # [T]

    def abar(self, t: torch.Tensor) -> torch.Tensor:
        """abar_t for integer timesteps (t = -1 means "before any noise": 1.0), as float32 on t's device."""
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod]).to(t.device)
        return table[t.long() + 1].float()

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t for sets x0 [B, M, G] at timesteps t [B] with noise [B, M, G]."""
        ab = self.abar(t).to(x0.dtype)[:, None, None]
        return ab.sqrt() * x0 + (1.0 - ab).sqrt() * noise

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        ab = self.abar(t).to(x_t.dtype)[:, None, None]
        return (x_t - ab.sqrt() * x0) / (1.0 - ab).sqrt()

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        ab = self.abar(t).to(x_t.dtype)[:, None, None]
        return (x_t - (1.0 - ab).sqrt() * eps) / ab.sqrt()


def respaced_timesteps(steps: int, sample_steps: int, kind: str = "uniform") -> list[int]:
    """The K timesteps a sampler visits, descending.

    uniform   from T - 1 down to 0 in K evenly spaced steps: the sampler starts from pure noise at t = T - 1
    released  K - 1 down to 0: the released code's schedule (it starts from pure noise but only runs the
              last K timesteps, a train/test mismatch; kept so the paper's numbers can be reproduced)
    """
    if not 1 <= sample_steps <= steps:
        raise ValueError(f"diffusion.sample_steps must be in 1 .. {steps} (diffusion.steps), got {sample_steps}")
    if kind == "uniform":
        if sample_steps == 1:
            return [steps - 1]
        ts = [round(i * (steps - 1) / (sample_steps - 1)) for i in range(sample_steps)]
        return sorted(set(ts), reverse=True)
    if kind == "released":
        return list(range(sample_steps - 1, -1, -1))
    raise ValueError(f"unknown respacing {kind!r}: use {' or '.join(RESPACINGS)}")
