"""From a foundation checkpoint to a model for new data: gene panel, covariates, and a full report.

Fine-tuning starts from a foundation (often marginally pretrained: no perturbation branch, the
control stream never seen) and a target dataset with its own gene panel and covariate vocabularies.
``init_from_foundation`` builds the target model and fills it, saying what it did with every tensor:

- the backbone (blocks, timestep embedding, head modulation) must match in depth / width / heads:
  a different size is an error, never a silent partial load;
- the gene panel: input columns and output rows of shared genes are copied (``swap_gene_panel``),
  genes new to the model start fresh; counts are reported;
- categorical covariates: embedding rows are matched by category NAME (a context known to the
  foundation keeps its vector, a new one starts fresh; the null row is kept);
- covariate branches new to the model (the perturbation and dose branches when fine-tuning a
  marginal foundation) start fresh, and their columns of the combining layer start at ZERO, so the
  fine-tuned model initially computes exactly what the foundation computed for its covariates;
- anything else that does not fit is listed in the report as "fresh", with the reason.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..models import MMDiT, build_model
from ..models.mmdit import init_linear
from ..models.presets import resolve_size
from ..foundation import CheckpointError, Foundation


def init_from_foundation(found: Foundation, model_cfg: ModelConfig, genes: Sequence[str],
                         vocabularies: Mapping[str, Sequence[str]], perturbation_features: torch.Tensor | None = None,
                         log=print):
    """The target model initialised from ``found``; returns (model, report)."""
    have, want = resolve_size(found.model_cfg), resolve_size(model_cfg)
    if have != want:
        raise CheckpointError(f"the foundation is {found.model_cfg.size} {tuple(have)} (depth, width, heads) but "
                              f"the config asks for {model_cfg.size} {tuple(want)}; set model.size to match")
    source = found.build()
    report: dict = {"genes": None, "categories": {}, "loaded": 0, "fresh": {}}
    genes = [str(g) for g in genes]
    if genes != found.genes:
        report["genes"] = swap_gene_panel(source, found.genes, genes)
        g = report["genes"]
        log(f"gene panel differs from the foundation's: {g['kept']} genes kept, {g['new']} new (fresh "
            f"input/output weights), {g['dropped']} dropped")
    src = source.state_dict()
    target = build_model(model_cfg, len(genes), {k: len(v) for k, v in vocabularies.items()}, perturbation_features)
    dst = target.state_dict()
    loaded: dict[str, torch.Tensor] = {}

    # categorical embeddings: rows by category name, the null row last
    for name, cats in vocabularies.items():
        key = f"cov_encoder.embeddings.{name}.weight"
        if key not in dst or key not in src or name not in found.vocabularies:
            continue
        old = {c: i for i, c in enumerate(found.vocabularies[name])}
        w = dst[key].clone()
        kept = [(j, old[c]) for j, c in enumerate(cats) if c in old]
        for j, i in kept:
            w[j] = src[key][i]
        w[-1] = src[key][-1]
        loaded[key] = w
        report["categories"][name] = {"kept": len(kept), "new": len(cats) - len(kept)}

    # the combining layer: input column blocks follow the branches, matched by branch name
    src_branches, dst_branches = source.cov_encoder.branch_names, target.cov_encoder.branch_names
    D = target.cov_encoder.cov_dim
    if "cov_encoder.combine.weight" in dst and "cov_encoder.combine.weight" in src and source.cov_encoder.cov_dim == D:
        w = torch.zeros_like(dst["cov_encoder.combine.weight"])  # new branches: zero columns
        for j, name in enumerate(dst_branches):
            if name in src_branches:
                i = src_branches.index(name)
                w[:, j * D:(j + 1) * D] = src["cov_encoder.combine.weight"][:, i * D:(i + 1) * D]
        loaded["cov_encoder.combine.weight"] = w
        loaded["cov_encoder.combine.bias"] = src["cov_encoder.combine.bias"]
        new_branches = [b for b in dst_branches if b not in src_branches]
        if new_branches:
            log(f"covariate branches new to the model: {new_branches} (fresh, entering through zero weights)")

    # everything else: by name and shape
    for key, value in dst.items():
        if key in loaded:
            continue
        if key in src and src[key].shape == value.shape:
            loaded[key] = src[key]
        else:
            reason = "not in the foundation" if key not in src else f"shape {list(src[key].shape)} -> {list(value.shape)}"
            report["fresh"][key] = reason
    target.load_state_dict({**dst, **loaded})
    report["loaded"] = len(loaded)
    fresh = report["fresh"]
    log(f"initialised {len(loaded)} of {len(dst)} tensors from the foundation"
        + (f"; fresh: {', '.join(f'{k} ({v})' for k, v in list(fresh.items())[:8])}"
           + (f" and {len(fresh) - 8} more" if len(fresh) > 8 else "") if fresh else ""))
    return target, report


@torch.no_grad()
def swap_gene_panel(model: MMDiT, old_genes: Sequence[str], new_genes: Sequence[str]) -> dict[str, int]:
    """Replace ``model``'s gene input projections and output Linear (in place) for a new gene panel.

    Weights of genes present in both panels are copied (so a reordered panel is an exact
    no-op); genes new to the model get fresh init. Rebuild the optimizer afterwards: the
    swapped layers are new parameters.

    Args:
        old_genes: the current panel, in the model's current gene order (length num_genes).
        new_genes: the new panel, in the order inputs will have from now on.

    Returns:
        {"kept": genes in both, "new": genes only in new_genes, "dropped": genes only in old_genes}.
    """
    old, new = [str(g) for g in old_genes], [str(g) for g in new_genes]
    if len(old) != model.num_genes:
        raise ValueError(f"old_genes has {len(old)} genes but the model has num_genes={model.num_genes}")
    for name, genes in (("old_genes", old), ("new_genes", new)):
        if len(set(genes)) != len(genes):
            raise ValueError(f"{name} has duplicated gene names")
    if not new:
        raise ValueError("new_genes is empty")
    where = {g: i for i, g in enumerate(old)}
    dst = [j for j, g in enumerate(new) if g in where]  # positions in the new panel
    src = [where[new[j]] for j in dst]  # the same genes in the old panel
    g_old, g_new = len(old), len(new)

    def remap_inputs(layer: nn.Linear, halves: int) -> nn.Linear:  # gene columns, per half
        fresh = nn.Linear(halves * g_new, layer.out_features, device=layer.weight.device, dtype=layer.weight.dtype)
        init_linear(fresh)
        fresh.bias.copy_(layer.bias)
        for h in range(halves):
            fresh.weight[:, [h * g_new + j for j in dst]] = layer.weight[:, [h * g_old + i for i in src]]
        return fresh

    halves = 2 if model.self_condition else 1
    model.x_embed = remap_inputs(model.x_embed, halves)
    model.c_embed = remap_inputs(model.c_embed, 1)
    old_out = model.head.linear  # gene rows
    fresh = nn.Linear(old_out.in_features, g_new, device=old_out.weight.device, dtype=old_out.weight.dtype)
    init_linear(fresh)
    fresh.weight[dst] = old_out.weight[src]
    fresh.bias[dst] = old_out.bias[src]
    model.head.linear = fresh
    model.num_genes = g_new
    return {"kept": len(dst), "new": g_new - len(dst), "dropped": g_old - len(dst)}
