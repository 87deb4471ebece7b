"""Optimiser pieces shared by every engine: parameter groups, the learning-rate schedule, EMA.

- ``param_groups``: AdamW weight decay on weight matrices only; never on norms, biases, embeddings
  (nn.Embedding tables and learned null vectors) or any other 1-D parameter.
- ``lr_factor``: linear warm-up from 0 over ``warmup_steps``, then cosine decay to
  ``min_lr_ratio`` at ``max_steps`` (the paper: 2e-4, 200 warm-up steps, cosine).
- ``EMA``: an exponential moving average of the parameters, updated every ``ema_every`` optimizer
  steps with decay ``ema_decay`` (the paper: 0.99 every 10 steps); its state is a plain dict of
  tensors, so it checkpoints without pickling.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import OptimConfig


def _no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that take no weight decay."""
    names = set()
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            norm = isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d))
            if p.ndim < 2 or norm or isinstance(module, nn.Embedding) or p_name.endswith("bias"):
                names.add(full)
    return names


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything else without decay."""
    skip = _no_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    if len(cfg.betas) != 2:
        raise ValueError(f"train.optim.betas must be two numbers, got {cfg.betas}")
    groups = [{k: v for k, v in g.items() if k != "name"} for g in param_groups(model, cfg.weight_decay)]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base LR at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))


class EMA:
    """Exponential moving average of a model's parameters (fp32 copies, on the model's device).

    With ``warmup`` the decay of the n-th update (n = 0, 1, ...) is min(decay, (1 + n) / (10 + n)),
    so a short run (or a fine-tune whose first weights are an initialisation) is not dominated by its
    starting point: at decay 0.99 every 10 steps, plain EMA still weighs the initial weights by 0.55
    after 600 steps, the warmed-up one by ~1e-7. After a few hundred updates both are the same."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1, warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.optim.ema_decay must be in [0, 1), got {decay}")
        self.decay, self.every, self.num_updates, self.warmup = decay, max(1, every), 0, bool(warmup)
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def step(self, model: nn.Module, optimizer_step: int) -> bool:
        """Update after optimizer step ``optimizer_step`` (1-based) when it is due; True if updated."""
        if optimizer_step % self.every:
            return False
        decay = self.current_decay()
        for n, p in model.named_parameters():
            self.shadow[n].lerp_(p.detach().float(), 1.0 - decay)
        self.num_updates += 1
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "every": self.every, "num_updates": self.num_updates, "warmup": self.warmup,
                "shadow": {n: t.clone() for n, t in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
        self.decay, self.every, self.num_updates = state["decay"], state["every"], state["num_updates"]
        self.warmup = bool(state.get("warmup", False))
        for n, t in state["shadow"].items():
            if n in self.shadow:
                self.shadow[n].copy_(t)
