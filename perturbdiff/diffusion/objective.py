"""The training objective: per-set x0 prediction, scored by a per-gene MSE plus lambda x MMD^2.

For each set b of a batch (all coin flips are drawn PER SET, unlike the released code's per-batch flips):

    t_b ~ U{0 .. T-1},  eps ~ N(0, I) per cell,  x_t = q_sample(x0, t, eps)
    drop_cov_b  ~ Bernoulli(p_drop_cond)     covariates replaced by null tokens (classifier-free guidance)
    drop_ctrl_b ~ Bernoulli(p_drop_control)  control stream left out (1.0 = marginal pretraining)
    self_b      ~ Bernoulli(p_self_cond)     a first, gradient-free pass gives x0' fed back as input

    mse_b = sum over real cells and genes of (x0_hat - x0)^2 / (n_b G)
    mmd_b = MMD^2_k(x0_hat / sqrt(G), x0 / sqrt(G)) over real cells
    loss  = mean_b (mse_b + lambda mmd_b)

Both terms are per gene: the MSE is a mean over genes, and the MMD sees cells scaled by 1 / sqrt(G),
so squared distances are mean squared per-gene differences and kernel bandwidths are in per-gene
units; neither term grows with the panel size, and lambda keeps its meaning across panels. Padded
cells enter neither term (nor attention: the network masks them).

Several datasets on one union gene vocabulary (marginal pretraining): a batch may carry
``gene_mask`` [B, G], True where the set's dataset measures the gene. Unmeasured genes enter neither
term (G above becomes the set's count of measured genes) and their noisy input is zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import DiffusionConfig
from ..data.batch import covariates_of
from ..ops.kme import mmd2
from .schedule import NoiseSchedule


@dataclass
class LossTerms:
    loss: torch.Tensor  # [] the scalar to minimise
    mse: torch.Tensor  # [B] per set
    mmd: torch.Tensor  # [B] per set (0 where undefined, e.g. a one-cell set with the U-statistic)
    t: torch.Tensor  # [B] the timesteps drawn


def _bernoulli(p: float, n: int, generator, device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return (torch.rand(n, generator=generator, device=gen_device) < p).to(device)


class SetDiffusion:
    """The diffusion process around a network ``model(x_t, t, *, mask, ctrl, ctrl_mask, cov, self_cond,
    drop_cov, drop_ctrl) -> x0_hat``; the network itself knows nothing of noise or schedules."""

    def __init__(self, cfg: DiffusionConfig):
        self.cfg = cfg
        self.schedule = NoiseSchedule(cfg.schedule, cfg.steps, cfg.beta_start, cfg.beta_end)

    def set_errors(self, x0_hat: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor,
                   gene_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mse [B], mmd [B]) between predicted and true sets [B, M, G] over the real cells (mask [B, M])
        and, with ``gene_mask`` [B, G], over each set's measured genes only."""
        B, G = x0.shape[0], x0.shape[-1]
        w = mask.to(torch.float32)
        diff = x0_hat.float() - x0.float()
        if gene_mask is None:
            genes = torch.full((B,), float(G), device=x0.device)
        else:
            gm = gene_mask.to(device=x0.device, dtype=torch.float32)[:, None, :]  # [B, 1, G]
            diff = diff * gm
            genes = gm.sum((1, 2)).clamp_min(1.0)
        sq = (diff ** 2).sum(-1)  # [B, M]
        mse = (sq * w).sum(1) / (w.sum(1).clamp_min(1.0) * genes)
        if self.cfg.mmd_weight == 0:
            return mse, torch.zeros_like(mse)
        scale = genes.rsqrt()[:, None, None]  # [B, 1, 1]
        pred, real = x0_hat * scale, x0 * scale
        if gene_mask is not None:
            pred, real = pred * gm, real * gm
        mmd = mmd2(pred, real, mask, mask, self.cfg.kernel, tuple(self.cfg.bandwidths),
                   self.cfg.mmd_unbiased, impl=self.cfg.kme_impl)
        return mse, torch.nan_to_num(mmd, nan=0.0)

    def loss(self, model, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> LossTerms:
        """One training loss for a loader batch (keys x, mask, ctrl, ctrl_mask, the covariates and
        optionally gene_mask)."""
        cfg = self.cfg
        x0, mask = batch["x"], batch["mask"].bool()
        B, device = x0.shape[0], x0.device
        gen_device = generator.device if generator is not None else device
        t = torch.randint(0, cfg.steps, (B,), generator=generator, device=gen_device).to(device)
        noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device, x0.dtype)
        keep = mask[..., None]
        gene_mask = batch.get("gene_mask")
        if gene_mask is not None:
            keep = keep & gene_mask.bool()[:, None, :]
        x_t = torch.where(keep, self.schedule.q_sample(x0, t, noise), torch.zeros((), dtype=x0.dtype, device=device))
        drop_cov = _bernoulli(cfg.p_drop_cond, B, generator, device)
        drop_ctrl = _bernoulli(cfg.p_drop_control, B, generator, device)
        use_self = _bernoulli(cfg.p_self_cond, B, generator, device)
        kwargs = dict(mask=mask, ctrl=batch["ctrl"], ctrl_mask=batch["ctrl_mask"].bool(),
                      cov=covariates_of(batch), drop_cov=drop_cov, drop_ctrl=drop_ctrl)
        self_cond = None
        # The first pass runs whenever self-conditioning is on, even if no local set drew it: under
        # ZeRO-3 every forward is a collective, so all ranks must run the same passes.
        if getattr(model, "self_condition", True) and cfg.p_self_cond > 0:
            with torch.no_grad():
                first = model(x_t, t.float(), self_cond=None, **kwargs)
            self_cond = torch.where(use_self[:, None, None], first.detach(), torch.zeros_like(first))
        x0_hat = model(x_t, t.float(), self_cond=self_cond, **kwargs)
        mse, mmd = self.set_errors(x0_hat, x0, mask, gene_mask)
        total = (mse + cfg.mmd_weight * mmd).mean()
        return LossTerms(loss=total, mse=mse.detach(), mmd=mmd.detach(), t=t)
