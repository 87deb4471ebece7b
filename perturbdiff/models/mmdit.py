"""The MM-DiT denoiser of PerturbDiff: predicts the clean perturbed set x0 from a noisy one.

Shape legend: B sets, M perturbed cells per set, C control cells per set, N = M + C tokens,
G genes, W width, H heads, Dh = W // H head dim, F frequency features of the timestep.

Each cell is one token (its whole expression vector, linearly projected); there is no positional
encoding over cells, so the network is equivariant to permuting the perturbed cells and invariant
to permuting the control cells. Two streams, as in SD3's MM-DiT: the noisy perturbed set and the
clean control set. Every block gives each stream its own adaLN-Zero modulation, QKV, output
projection and MLP, and runs ONE attention over both streams joined along the token axis (the
released code joined them along the feature axis, tying cell i to an arbitrary control i).

Conditioning: s = MLP(sinusoid(t)) + CovariateEncoder(cov); SiLU(s) drives every modulation.
adaLN-Zero: all gates start at zero, so every block is exactly the identity at initialisation. The
output head is an ordinary Linear followed by ReLU (expression is non-negative) whose gradient
leaks slightly below zero (``relu_leaky_grad``: a plain ReLU head went dead on sparse targets);
zero-initialising it would make the gradient vanish.

Padding: mask / ctrl_mask mark real cells. Padded inputs are replaced (not multiplied) by zeros,
padded tokens are never attention keys, and their hidden states are reset to zero after every
block, so nothing in a padded row (not even NaN) reaches a real cell. Dropping the control stream
(``drop_ctrl``, marginal pretraining) masks all of a set's control tokens out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from perturbdiff.config import ModelConfig

from .covariates import CovariateEncoder
from .presets import resolve_size

OUTPUT_ACTIVATIONS = ("relu", "none")


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, N, W] scaled and shifted per set by [B, W]."""
    return x * (1 + scale[:, None]) + shift[:, None]


def init_linear(layer: nn.Linear) -> None:
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


###############################################################################################
# Conditioning: timestep embedding
###############################################################################################


class TimestepEmbedding(nn.Module):
    """Float timesteps t [B] (any value in [0, T)) -> sinusoidal features [B, F] -> MLP -> [B, W]."""

    def __init__(self, width: int, num_freqs: int = 256, max_period: float = 10_000.0) -> None:
        super().__init__()
        self.num_freqs, self.max_period = num_freqs, max_period
        self.mlp = nn.Sequential(nn.Linear(num_freqs, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        dtype = self.mlp[0].weight.dtype  # fp32 (or fp64) even under autocast: sin/cos of t ~ 1e3 need it
        half = self.num_freqs // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
        args = t.to(dtype)[:, None] * freqs[None]  # [B, F/2]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))  # [B, F] -> [B, W]


###############################################################################################
# MM-DiT block
###############################################################################################


class StreamLayers(nn.Module):
    """One stream's half of a block: modulation, QKV (+ QK-norm), output projection and MLP.

    ``pre_only`` streams (the control stream of the last block, whose output nobody reads, as in
    SD3) only provide keys and values: no queries, output projection or MLP, so that no parameter
    is ever unused (DDP / ZeRO need no ``find_unused_parameters``).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, dropout: float,
                 pre_only: bool = False) -> None:
        super().__init__()
        self.heads, self.pre_only, self.qk_norm = heads, pre_only, qk_norm
        head_dim = width // heads
        # shift/scale (attention) [+ gate (attention), shift/scale/gate (MLP)]
        self.modulation = nn.Linear(width, (2 if pre_only else 6) * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, (2 if pre_only else 3) * width)  # [k, v] or [q, k, v]
        if qk_norm:  # RMSNorm over the head dim of queries and keys (SD3), against attention-logit growth
            self.k_norm = nn.RMSNorm(head_dim, eps=1e-6)
            if not pre_only:
                self.q_norm = nn.RMSNorm(head_dim, eps=1e-6)
        if not pre_only:
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            hidden = int(width * mlp_ratio)
            self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                     nn.Dropout(dropout), nn.Linear(hidden, width))

    def pre_attention(self, h: Tensor, c: Tensor) -> tuple[Tensor | None, Tensor, Tensor, list[Tensor]]:
        """h [B, N, W], c = SiLU(s) [B, W] -> q (None if pre_only), k, v [B, H, N, Dh] and the
        remaining modulation (gates and MLP shift/scale, each [B, W])."""
        B, N, W = h.shape
        shift, scale, *rest = self.modulation(c).chunk(2 if self.pre_only else 6, dim=-1)  # each [B, W]
        u = modulate(self.norm1(h), shift, scale)  # [B, N, W]
        parts = 2 if self.pre_only else 3  # (not -1: N may be 0)
        heads = self.qkv(u).view(B, N, parts, self.heads, W // self.heads)  # [B, N, 2|3, H, Dh]
        heads = heads.permute(2, 0, 3, 1, 4)  # [2|3, B, H, N, Dh]
        q, k, v = (None, *heads) if self.pre_only else heads  # each [B, H, N, Dh]
        if self.qk_norm:  # in the norm's own precision (fp32 under autocast), then back to v's dtype
            k = self.k_norm(k.to(self.k_norm.weight.dtype)).to(v.dtype)
            if q is not None:
                q = self.q_norm(q.to(self.q_norm.weight.dtype)).to(v.dtype)
        return q, k, v, rest

    def post_attention(self, h: Tensor, o: Tensor, rest: list[Tensor]) -> Tensor:
        """Gated residual updates: h [B, N, W] + attention output o [B, N, W] -> h [B, N, W]."""
        gate_attn, shift_mlp, scale_mlp, gate_mlp = rest  # each [B, W]
        h = h + gate_attn[:, None] * self.proj(o)
        return h + gate_mlp[:, None] * self.mlp(modulate(self.norm2(h), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    """Joint attention over [perturbed; control] tokens, with per-stream weights (SD3 style)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, qk_norm: bool, dropout: float,
                 last: bool = False) -> None:
        super().__init__()
        self.dropout = dropout
        self.pert = StreamLayers(width, heads, mlp_ratio, qk_norm, dropout)
        self.ctrl = StreamLayers(width, heads, mlp_ratio, qk_norm, dropout, pre_only=last)

    def forward(self, h_x: Tensor, h_c: Tensor, c: Tensor, key_mask: Tensor | None, mask: Tensor,
                ctrl_mask: Tensor) -> tuple[Tensor, Tensor | None]:
        """Args: h_x [B, M, W], h_c [B, C, W], c [B, W], key_mask [B, N] (None: every key is real),
        mask [B, M], ctrl_mask [B, C].

        Returns: h_x [B, M, W] and h_c [B, C, W] (None after the last block), padded rows zero.
        """
        B, M, W = h_x.shape
        q_x, k_x, v_x, rest_x = self.pert.pre_attention(h_x, c)  # [B, H, M, Dh]
        q_c, k_c, v_c, rest_c = self.ctrl.pre_attention(h_c, c)  # [B, H, C, Dh]
        # The last block's control tokens are keys only: their outputs would feed nothing.
        q = q_x if q_c is None else torch.cat([q_x, q_c], dim=2)  # [B, H, M (+ C), Dh]
        k = torch.cat([k_x, k_c], dim=2)  # [B, H, N, Dh]
        v = torch.cat([v_x, v_c], dim=2)  # [B, H, N, Dh]
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, N]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        o = o.transpose(1, 2).reshape(B, q.shape[2], W)  # [B, M (+ C), W]

        h_x = self.pert.post_attention(h_x, o[:, :M], rest_x).masked_fill(~mask[..., None], 0.0)
        if self.ctrl.pre_only:
            return h_x, None
        h_c = self.ctrl.post_attention(h_c, o[:, M:], rest_c).masked_fill(~ctrl_mask[..., None], 0.0)
        return h_x, h_c


def relu_leaky_grad(z: Tensor, slope: float = 0.01) -> Tensor:
    """relu(z) in value, with a small gradient ``slope`` where z < 0.

    Expression targets are non-negative with many exact zeros, so a plain ReLU head drifts into
    units that are negative for every input and never receive a gradient again (measured: 82% of
    outputs stuck at 0 after 200 steps on the synthetic data). The leaky gradient lets a unit whose
    target is positive climb back; a unit at 0 with target 0 has no residual and stays put."""
    return F.relu(z) + slope * torch.where(z < 0, z - z.detach(), torch.zeros_like(z))


class OutputHead(nn.Module):
    """Final adaLN (zero-init modulation) and Linear(W -> G), then the output activation."""

    def __init__(self, width: int, num_genes: int, activation: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, num_genes)
        self.activation = activation

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c).chunk(2, dim=-1)  # [B, W] each
        out = self.linear(modulate(self.norm(h), shift, scale))  # [B, M, G]
        return relu_leaky_grad(out) if self.activation == "relu" else out


###############################################################################################
# The model
###############################################################################################


class MMDiT(nn.Module):
    """Set-level MM-DiT: (x_t, t, control set, covariates) -> predicted clean perturbed set x0.

    Args:
        cfg: the model config (size preset and overrides, covariate encoding, ...).
        num_genes: G, the gene panel size of the input and output.
        vocab_sizes: categories per categorical covariate ("context", "batch", "dataset",
            "perturbation"); see :class:`CovariateEncoder`.
        perturbation_features: [P, F] table features when ``cfg.perturbation_encoding == "table"``.
    """

    def __init__(self, cfg: ModelConfig, num_genes: int, vocab_sizes: Mapping[str, int],
                 perturbation_features: Tensor | None = None) -> None:
        super().__init__()
        if cfg.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(f"model.output_activation must be one of {OUTPUT_ACTIVATIONS}, "
                             f"got '{cfg.output_activation}'")
        if num_genes <= 0:
            raise ValueError(f"num_genes must be positive, got {num_genes}")
        if not 0.0 <= cfg.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout}")
        self.cfg = cfg
        self.depth, self.width, self.heads = resolve_size(cfg)
        self.num_genes, self.self_condition = num_genes, cfg.self_condition
        W, G = self.width, num_genes

        # Conditioning
        self.t_embed = TimestepEmbedding(W)
        self.cov_encoder = CovariateEncoder(
            vocab_sizes, width=W, cov_dim=cfg.cov_dim, numeric=list(cfg.numeric_covariates),
            log_numeric=cfg.log_numeric, perturbation_encoding=cfg.perturbation_encoding,
            perturbation_features=perturbation_features)
        # Cell tokens: [x_t, self_cond] (2G) or x_t (G) for the perturbed stream, G for the control stream
        self.x_embed = nn.Linear((2 if self.self_condition else 1) * G, W)
        self.c_embed = nn.Linear(G, W)
        self.blocks = nn.ModuleList([
            MMDiTBlock(W, self.heads, cfg.mlp_ratio, cfg.qk_norm, cfg.dropout, last=(i == self.depth - 1))
            for i in range(self.depth)])
        self.head = OutputHead(W, G, cfg.output_activation)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier for every Linear; zero for every adaLN modulation (each block starts as the identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear(m)
        self.cov_encoder.reset_parameters()
        for layer in self.t_embed.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02)
        for block in self.blocks:
            for stream in (block.pert, block.ctrl):
                nn.init.zeros_(stream.modulation.weight)
                nn.init.zeros_(stream.modulation.bias)
        # Final modulation zero (plain LayerNorm at init), but the output Linear keeps its ordinary
        # init: with a ReLU after it, a zero head would never receive a gradient.
        nn.init.zeros_(self.head.modulation.weight)
        nn.init.zeros_(self.head.modulation.bias)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (buffers such as the perturbation table are not counted)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # -----------------------------------------------------------------------------------------

    def forward(self, x_t: Tensor, t: Tensor, *, mask: Tensor, ctrl: Tensor, ctrl_mask: Tensor,
                cov: Mapping[str, Tensor], self_cond: Tensor | None = None, drop_cov: Tensor | None = None,
                drop_ctrl: Tensor | None = None) -> Tensor:
        """Predict x0 for every perturbed cell.

        Args:
            x_t: [B, M, G] noisy perturbed cells.
            t: [B] float timesteps (one per set).
            mask: bool [B, M], True for real perturbed cells.
            ctrl: [B, C, G] clean control cells (C may be 0).
            ctrl_mask: bool [B, C], True for real control cells.
            cov: covariates, see :meth:`CovariateEncoder.forward` (extra keys are ignored).
            self_cond: [B, M, G] previous x0 estimate, or None (zeros); only with self_condition.
            drop_cov: bool [B], True = covariates replaced by NULL (classifier-free guidance).
            drop_ctrl: bool [B], True = the set's whole control stream is excluded.

        Returns:
            x0_hat [B, M, G]; rows of padded cells are exactly zero.
        """
        B, M, C = self._check_inputs(x_t, t, mask, ctrl, ctrl_mask, self_cond, drop_ctrl)
        dtype = self.x_embed.weight.dtype
        if drop_ctrl is not None:  # a dropped control stream is a fully padded one
            ctrl_mask = ctrl_mask & ~drop_ctrl[:, None]  # [B, C]
        pad_x, pad_c = ~mask[..., None], ~ctrl_mask[..., None]  # [B, M, 1], [B, C, 1]

        # Conditioning vector s: timestep + covariates
        s = self.t_embed(t) + self.cov_encoder(cov, drop_cov, batch_size=B)  # [B, W]
        c = F.silu(s)  # [B, W], what every modulation reads

        # Key mask over the N = M + C joint tokens. A set without any real key would get NaN from
        # softmax over nothing; it attends to its (zeroed) padding instead, and its output is zeroed.
        key_mask = torch.cat([mask, ctrl_mask], dim=1)  # [B, N]
        key_mask = key_mask | ~key_mask.any(dim=1, keepdim=True)  # [B, N]
        if bool(key_mask.all()):  # no padding anywhere: SDPA may pick its fused (flash) kernels
            key_mask = None

        # Cell tokens. masked_fill replaces padded inputs (NaN * 0 would still be NaN).
        x_in = x_t.masked_fill(pad_x, 0.0)  # [B, M, G]
        if self.self_condition:
            sc = torch.zeros_like(x_in) if self_cond is None else self_cond.masked_fill(pad_x, 0.0)
            x_in = torch.cat([x_in, sc.to(x_in.dtype)], dim=-1)  # [B, M, 2G]
        h_x = self.x_embed(x_in.to(dtype)).masked_fill(pad_x, 0.0)  # [B, M, W]
        h_c = self.c_embed(ctrl.masked_fill(pad_c, 0.0).to(dtype)).masked_fill(pad_c, 0.0)  # [B, C, W]

        for block in self.blocks:
            h_x, h_c = block(h_x, h_c, c, key_mask, mask, ctrl_mask)  # [B, M, W], [B, C, W]

        out = self.head(h_x, c)  # [B, M, G], only the perturbed stream is decoded
        return out.masked_fill(pad_x, 0.0)

    def _check_inputs(self, x_t: Tensor, t: Tensor, mask: Tensor, ctrl: Tensor, ctrl_mask: Tensor,
                      self_cond: Tensor | None, drop_ctrl: Tensor | None) -> tuple[int, int, int]:
        """Shapes and dtypes of the forward inputs; a ValueError names what was expected and got."""
        if x_t.ndim != 3 or x_t.shape[-1] != self.num_genes:
            raise ValueError(f"x_t: expected [B, M, {self.num_genes}], got {tuple(x_t.shape)}")
        B, M, G = x_t.shape
        if ctrl.ndim != 3 or ctrl.shape[0] != B or ctrl.shape[-1] != G:
            raise ValueError(f"ctrl: expected [{B}, C, {G}], got {tuple(ctrl.shape)}")
        C = ctrl.shape[1]
        expected: list[tuple[str, Tensor | None, tuple[int, ...], bool]] = [
            ("t", t, (B,), False), ("mask", mask, (B, M), True), ("ctrl_mask", ctrl_mask, (B, C), True),
            ("self_cond", self_cond, (B, M, G), False), ("drop_ctrl", drop_ctrl, (B,), True)]
        for name, tensor, shape, boolean in expected:
            if tensor is None:
                continue
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(tensor.shape)}")
            if boolean and tensor.dtype != torch.bool:
                raise ValueError(f"{name}: expected a bool tensor, got {tensor.dtype}")
        if self_cond is not None and not self.self_condition:
            raise ValueError("self_cond was given but the model has self_condition=false")
        return B, M, C
