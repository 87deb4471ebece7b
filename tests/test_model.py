"""The MM-DiT denoiser and its covariate encoder: symmetries, padding, adaLN-Zero, conditioning, panels.

Equalities are checked on float64 models. Symmetry and conditioning tests first replace every
parameter with random values (``randomize``): at initialisation the zero gates make every block
the identity, and those tests would pass trivially.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from perturbdiff.config import ModelConfig
from perturbdiff.models import PRESETS, CovariateEncoder, MMDiT, build_model, load_perturbation_table, resolve_size
from perturbdiff.models.covariates import UNSEEN_ID
from perturbdiff.train.transfer import swap_gene_panel

B, M, C, G = 3, 7, 9, 24
VOCAB = {"context": 3, "batch": 4, "perturbation": 5}


def make_model(seed: int = 0, randomized: bool = True, num_genes: int = G, vocab: dict | None = None,
               features: torch.Tensor | None = None, **cfg_overrides) -> MMDiT:
    torch.manual_seed(seed)
    cfg = ModelConfig(size="tiny", **cfg_overrides)
    model = build_model(cfg, num_genes, VOCAB if vocab is None else vocab, features).double().eval()
    if randomized:
        randomize(model, seed)
    return model


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter (zero-initialised modulations and gates included) drawn at random."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        fan_in = p.shape[-1] if p.ndim > 1 else 1
        p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / math.sqrt(fan_in))


def make_inputs(seed: int = 0, num_genes: int = G) -> dict:
    """Float64 inputs with ragged sets; padded rows are zero."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, M, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    ctrl_mask = torch.ones(B, C, dtype=torch.bool)
    ctrl_mask[0, 6:] = False
    ctrl_mask[2, 3:] = False
    x_t = torch.randn(B, M, num_genes, generator=gen, dtype=torch.float64) * mask[..., None]
    self_cond = torch.rand(B, M, num_genes, generator=gen, dtype=torch.float64) * mask[..., None]
    ctrl = torch.rand(B, C, num_genes, generator=gen, dtype=torch.float64) * 2 * ctrl_mask[..., None]
    cov = {"context": torch.tensor([0, 1, 2]), "batch": torch.tensor([3, 0, 1]),
           "perturbation": torch.tensor([4, 2, 0]), "num_dose": torch.tensor([0.05, 5.0, 0.5])}
    t = torch.rand(B, generator=gen, dtype=torch.float64) * 1000
    return dict(x_t=x_t, t=t, mask=mask, ctrl=ctrl, ctrl_mask=ctrl_mask, cov=cov, self_cond=self_cond)


def run(model: MMDiT, inputs: dict, **changes) -> torch.Tensor:
    kw = {**inputs, **changes}
    return model(kw.pop("x_t"), kw.pop("t"), **kw)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, rtol=1e-6, atol=1e-8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float64 round-off (the same cells computed in a differently composed batch)."""
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Symmetries and padding
# ---------------------------------------------------------------------------------------------


def test_equivariant_to_perturbed_cells_invariant_to_control_cells():
    model, inp = make_model(), make_inputs()
    out = run(model, inp)
    perm = torch.randperm(M, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(perm, torch.arange(M))
    out_p = run(model, inp, x_t=inp["x_t"][:, perm], self_cond=inp["self_cond"][:, perm], mask=inp["mask"][:, perm])
    torch.testing.assert_close(out_p, out[:, perm], rtol=1e-10, atol=1e-12)

    perm_c = torch.randperm(C, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(perm_c, torch.arange(C))
    out_c = run(model, inp, ctrl=inp["ctrl"][:, perm_c], ctrl_mask=inp["ctrl_mask"][:, perm_c])
    torch.testing.assert_close(out_c, out, rtol=1e-10, atol=1e-12)

    # ... and neither is trivial: cells see each other and the control set matters
    x_t = inp["x_t"].clone()
    x_t[0, 0] += 1.0
    assert differs(run(model, inp, x_t=x_t)[0, 1:], out[0, 1:])
    ctrl = inp["ctrl"].clone()
    ctrl[0, 0] += 1.0
    assert differs(run(model, inp, ctrl=ctrl)[0], out[0])
    assert differs(run(model, inp, self_cond=None), out)


@pytest.mark.parametrize("fill", [1e30, float("nan"), float("-inf")])
def test_padded_cells_cannot_reach_real_cells(fill):
    model, inp = make_model(), make_inputs()
    out = run(model, inp)
    pad, pad_c = ~inp["mask"][..., None], ~inp["ctrl_mask"][..., None]
    garbage = dict(x_t=inp["x_t"].masked_fill(pad, fill), self_cond=inp["self_cond"].masked_fill(pad, fill),
                   ctrl=inp["ctrl"].masked_fill(pad_c, fill))
    model.zero_grad()
    out_g = run(model, inp, **garbage)
    assert torch.equal(out_g[inp["mask"]], out[inp["mask"]])
    assert (out_g[~inp["mask"]] == 0).all()
    out_g.sum().backward()  # NaN in padded inputs must not reach any gradient either
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_padding_is_the_same_as_absence():
    """Set 2 (2 real cells, 3 real controls, padded to M and C) equals the same set alone, unpadded:
    padded tokens are never keys."""
    model, inp = make_model(), make_inputs()
    out = run(model, inp)
    alone = run(model, inp, x_t=inp["x_t"][2:, :2], self_cond=inp["self_cond"][2:, :2], mask=inp["mask"][2:, :2],
                ctrl=inp["ctrl"][2:, :3], ctrl_mask=inp["ctrl_mask"][2:, :3], t=inp["t"][2:],
                cov={k: v[2:] for k, v in inp["cov"].items()})
    assert_same(alone[0], out[2, :2])


def test_all_padded_set_gives_zeros_and_no_nan_elsewhere():
    model, inp = make_model(), make_inputs()
    mask, ctrl_mask = inp["mask"].clone(), inp["ctrl_mask"].clone()
    mask[1] = False
    ctrl_mask[1] = False
    out = run(model, inp, mask=mask, ctrl_mask=ctrl_mask)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()
    # the other sets are untouched by set 1 (attention never crosses sets)
    ref = run(model, inp)
    assert_same(out[[0, 2]], ref[[0, 2]])
    # no control cells at all (C = 0)
    out0 = run(model, inp, mask=mask, ctrl=inp["ctrl"][:, :0], ctrl_mask=ctrl_mask[:, :0])
    assert torch.isfinite(out0).all() and (out0[1] == 0).all()


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def test_blocks_are_identity_at_init_and_head_is_live():
    model, inp = make_model(randomized=False), make_inputs()
    seen = []

    def hook(block, args, output):
        h_x, h_c, _, _, mask, ctrl_mask = args
        seen.append(block)
        assert torch.equal(output[0][mask], h_x[mask])
        if output[1] is not None:
            assert torch.equal(output[1][ctrl_mask], h_c[ctrl_mask])

    handles = [b.register_forward_hook(hook) for b in model.blocks]
    out = run(model, inp)
    for h in handles:
        h.remove()
    assert len(seen) == len(model.blocks) == PRESETS["tiny"].depth

    # The head is not dead: the output depends on the input and the head gets a gradient.
    assert (out[inp["mask"]] > 0).any()
    x_t = inp["x_t"].clone()
    x_t[0, 0] += 1.0
    assert differs(run(model, inp, x_t=x_t)[0, 0], out[0, 0])
    out.sum().backward()
    assert model.head.linear.weight.grad.abs().sum() > 0
    assert model.x_embed.weight.grad.abs().sum() > 0


def test_parameter_groups_all_receive_gradients():
    """Every parameter is in the autograd graph (DDP needs no find_unused_parameters), even with
    the covariates absent and every control stream dropped."""
    model, inp = make_model(), make_inputs()
    run(model, inp, cov={}, drop_ctrl=torch.ones(B, dtype=torch.bool)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ---------------------------------------------------------------------------------------------
# Conditioning
# ---------------------------------------------------------------------------------------------


def test_drop_cov_equals_missing_covariates_and_drop_ctrl_equals_masked_controls():
    model, inp = make_model(), make_inputs()
    full, empty = run(model, inp), run(model, inp, cov={})
    drop = torch.tensor([True, False, True])
    out = run(model, inp, drop_cov=drop)
    assert_same(out[drop], empty[drop])
    assert_same(out[~drop], full[~drop])
    assert differs(empty, full)

    ctrl_mask = inp["ctrl_mask"].clone()
    ctrl_mask[drop] = False
    out_d = run(model, inp, drop_ctrl=drop)
    torch.testing.assert_close(out_d, run(model, inp, ctrl_mask=ctrl_mask), rtol=0, atol=0)
    assert differs(out_d[drop], full[drop])
    # marginal pretraining (every control dropped) == no control cells at all
    out_all = run(model, inp, drop_ctrl=torch.ones(B, dtype=torch.bool))
    out_none = run(model, inp, ctrl=inp["ctrl"][:, :0], ctrl_mask=inp["ctrl_mask"][:, :0])
    assert_same(out_all, out_none)


@pytest.mark.parametrize("key,value", [("context", 2), ("batch", 1), ("perturbation", 3), ("num_dose", 50.0)])
def test_changing_a_covariate_changes_only_that_set(key, value):
    model, inp = make_model(), make_inputs()
    out = run(model, inp)
    cov = dict(inp["cov"])
    cov[key] = cov[key].clone()
    cov[key][0] = value
    out2 = run(model, inp, cov=cov)
    assert differs(out2[0], out[0])
    assert_same(out2[1:], out[1:])


def test_timestep_changes_output():
    model, inp = make_model(), make_inputs()
    assert differs(run(model, inp, t=inp["t"] + 0.5), run(model, inp))


def test_covariate_validation():
    model, inp = make_model(), make_inputs()
    for bad in (5, -1):
        cov = dict(inp["cov"], perturbation=torch.tensor([0, bad, 1]))
        with pytest.raises(ValueError, match=f"'perturbation'.*{bad}"):
            run(model, inp, cov=cov)
        # a dropped set may carry any placeholder id
        run(model, inp, cov=cov, drop_cov=torch.tensor([False, True, False]))
    with pytest.raises(ValueError, match="'context'.*integer"):
        run(model, inp, cov=dict(inp["cov"], context=torch.tensor([0.0, 1.0, 2.0])))
    with pytest.raises(ValueError, match="'batch'.*shape"):
        run(model, inp, cov=dict(inp["cov"], batch=torch.tensor([0, 1])))
    with pytest.raises(ValueError, match="num_dose"):
        run(model, inp, cov=dict(inp["cov"], num_dose=torch.tensor([1.0, -2.0, 1.0])))


def test_encoder_nulls():
    torch.manual_seed(0)
    enc = CovariateEncoder({"context": 3, "dataset": 0}, width=16, cov_dim=8, numeric=["dose"]).double()
    assert enc.branch_names == ["context", "dose"]
    randomize(enc)
    cov = {"context": torch.tensor([0, 2]), "num_dose": torch.tensor([float("nan"), 1.0])}
    out = enc(cov)
    null = enc({}, batch_size=2)
    assert out.shape == (2, 16)
    assert_same(null[0], null[1])
    # NaN dose = missing dose: equal to leaving the dose out for that set
    assert_same(out[0], enc({"context": cov["context"]})[0])
    assert_same(enc(cov, torch.tensor([True, True])), null)
    # UNSEEN_ID (a label the vocabulary lacks) = that set's context left out; the other set unchanged
    unseen = enc({"context": torch.tensor([UNSEEN_ID, 2]), "num_dose": cov["num_dose"]})
    assert_same(unseen[0], enc({"num_dose": cov["num_dose"]})[0])
    assert_same(unseen[1], out[1])
    with pytest.raises(ValueError, match=r"id -1 outside \[0, 3\)"):
        enc({"context": torch.tensor([-1, 0])})
    with pytest.raises(ValueError, match="unknown categorical.*'plate'"):
        CovariateEncoder({"plate": 3}, width=16)
    with pytest.raises(ValueError, match="batch size"):
        enc({})
    assert (CovariateEncoder({}, width=16)({}, batch_size=4) == 0).all()


# ---------------------------------------------------------------------------------------------
# Perturbation feature tables
# ---------------------------------------------------------------------------------------------


def test_table_encoding_uses_the_table_row():
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(6, 4, generator=gen)
    features[2] = features[0]  # two perturbations with identical features
    model = make_model(vocab={"context": 3, "batch": 4}, features=features, perturbation_encoding="table")
    assert "cov_encoder.perturbation_features" in dict(model.named_buffers())
    assert all("perturbation_features" not in n for n, _ in model.named_parameters())
    inp = make_inputs()

    def out_for(pert: int, m: MMDiT = model) -> torch.Tensor:
        return run(m, inp, cov=dict(inp["cov"], perturbation=torch.full((B,), pert)))

    assert differs(out_for(0), out_for(1))
    assert_same(out_for(0), out_for(2))
    # perturbation 5 (say, never seen in training) is just its table row: moving that row to id 1
    # gives the same output
    moved = make_model(vocab={"context": 3, "batch": 4}, features=features, perturbation_encoding="table")
    with torch.no_grad():
        moved.cov_encoder.perturbation_features[1] = features[5].double()
    assert_same(out_for(5), out_for(1, moved))

    with pytest.raises(ValueError, match="perturbation_features"):
        make_model(perturbation_encoding="table")
    with pytest.raises(ValueError, match="5 entries.*6 rows"):
        make_model(features=features, perturbation_encoding="table")


def test_load_perturbation_table(tmp_path):
    table = pd.DataFrame({"perturbation": ["drugB", "drugA", "drugC"], "f0": [1.0, 2.0, 3.0], "f1": [4, 5, 6]})
    path = tmp_path / "perts.parquet"
    table.to_parquet(path)
    feats = load_perturbation_table(path, ["drugA", "drugC"])
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, torch.tensor([[2.0, 5.0], [3.0, 6.0]]))

    with pytest.raises(ValueError, match=r"perts\.parquet.*2 perturbation.*'drugX'.*'drugY'"):
        load_perturbation_table(path, ["drugA", "drugX", "drugY"])
    bad = tmp_path / "bad.parquet"
    table.assign(smiles=["C", "CC", "CCC"]).to_parquet(bad)
    with pytest.raises(ValueError, match=r"bad\.parquet.*'smiles'.*not numeric"):
        load_perturbation_table(bad, ["drugA"])
    nocol = tmp_path / "nocol.parquet"
    table.rename(columns={"perturbation": "drug"}).to_parquet(nocol)
    with pytest.raises(ValueError, match=r"nocol\.parquet.*'perturbation'"):
        load_perturbation_table(nocol, ["drugA"])


# ---------------------------------------------------------------------------------------------
# Gene panels
# ---------------------------------------------------------------------------------------------


def test_swap_gene_panel_reorder_is_a_no_op():
    model, inp = make_model(), make_inputs()
    genes = [f"g{i}" for i in range(G)]
    out = run(model, inp)
    perm = torch.randperm(G, generator=torch.Generator().manual_seed(4))
    report = swap_gene_panel(model, genes, [genes[i] for i in perm])
    assert report == {"kept": G, "new": 0, "dropped": 0}
    out_p = run(model, inp, x_t=inp["x_t"][..., perm], self_cond=inp["self_cond"][..., perm],
                ctrl=inp["ctrl"][..., perm])
    torch.testing.assert_close(out_p, out[..., perm], rtol=1e-10, atol=1e-12)


def test_swap_gene_panel_new_and_dropped_genes():
    model, inp = make_model(), make_inputs()
    old = [f"g{i}" for i in range(G)]
    new = old[4:] + [f"n{i}" for i in range(6)]  # drop g0..g3, add n0..n5
    # with the dropped and the new genes at zero, the kept genes' outputs are unchanged
    zero_old = {k: inp[k].clone() for k in ("x_t", "self_cond", "ctrl")}
    for v in zero_old.values():
        v[..., :4] = 0
    out = run(model, inp, **zero_old)
    report = swap_gene_panel(model, old, new)
    assert report == {"kept": G - 4, "new": 6, "dropped": 4}
    assert model.num_genes == G + 2
    assert model.x_embed.in_features == 2 * (G + 2) and model.head.linear.out_features == G + 2
    grown = {k: torch.cat([v[..., 4:], torch.zeros(*v.shape[:-1], 6, dtype=v.dtype)], dim=-1)
             for k, v in zero_old.items()}
    out_new = run(model, inp, **grown)
    torch.testing.assert_close(out_new[..., : G - 4], out[..., 4:], rtol=1e-10, atol=1e-12)

    with pytest.raises(ValueError, match="num_genes=26"):
        swap_gene_panel(model, old, new)
    with pytest.raises(ValueError, match="duplicated"):
        swap_gene_panel(model, new, new[:-1] + new[:1])


# ---------------------------------------------------------------------------------------------
# Sizes, shapes, precision
# ---------------------------------------------------------------------------------------------


def expected_parameters(depth: int, W: int, heads: int, G: int, vocab: dict, numeric: int, cov_dim: int = 128,
                        mlp_ratio: float = 4.0, num_freqs: int = 256) -> int:
    """Parameter count from the architecture (self-conditioning and QK-norm on)."""
    hidden, head_dim = int(W * mlp_ratio), W // heads
    full_stream = (6 * W * W + 6 * W) + (3 * W * W + 3 * W) + 2 * head_dim + (W * W + W) \
        + (W * hidden + hidden) + (hidden * W + W)
    key_only_stream = (2 * W * W + 2 * W) + (2 * W * W + 2 * W) + head_dim  # last block's control stream
    blocks = depth * full_stream + (depth - 1) * full_stream + key_only_stream
    embed = (2 * G * W + W) + (G * W + W)
    t_embed = (num_freqs * W + W) + (W * W + W)
    branches = len(vocab) + numeric
    cov = sum((n + 1) * cov_dim for n in vocab.values()) + numeric * (2 * cov_dim + cov_dim * cov_dim + 2 * cov_dim) \
        + branches * cov_dim * W + W
    head = (2 * W * W + 2 * W) + (W * G + G)
    return blocks + embed + t_embed + cov + head


def test_paper_preset_parameter_count():
    with torch.device("meta"):
        model = MMDiT(ModelConfig(size="paper"), 2000, VOCAB)
    assert (model.depth, model.width, model.heads) == (8, 512, 8)
    n = model.num_parameters()
    assert n == expected_parameters(8, 512, 8, 2000, VOCAB, numeric=1)
    assert 75e6 < n < 90e6  # ~9.4M per block (2 streams x 18 W^2) x 8, plus 2G+G+G gene layers
    tiny = make_model(randomized=False)
    assert tiny.num_parameters() == expected_parameters(2, 64, 4, G, VOCAB, numeric=1)


def test_resolve_size():
    assert resolve_size(ModelConfig(size="paper")) == (8, 512, 8)
    assert resolve_size(ModelConfig(size="tiny", width=96, depth=3)) == (3, 96, 4)
    with pytest.raises(ValueError, match="tiny, small, paper, large, xl"):
        resolve_size(ModelConfig(size="huge"))
    with pytest.raises(ValueError, match="divisible"):
        resolve_size(ModelConfig(size="tiny", heads=5))


def test_shape_errors_name_expected_and_got():
    model, inp = make_model(randomized=False), make_inputs()
    with pytest.raises(ValueError, match=r"x_t: expected \[B, M, 24\], got \(3, 7, 23\)"):
        run(model, inp, x_t=inp["x_t"][..., :23])
    with pytest.raises(ValueError, match=r"mask: expected shape \(3, 7\), got \(3, 6\)"):
        run(model, inp, mask=inp["mask"][:, :6])
    with pytest.raises(ValueError, match="mask: expected a bool"):
        run(model, inp, mask=inp["mask"].long())
    with pytest.raises(ValueError, match=r"ctrl: expected \[3, C, 24\]"):
        run(model, inp, ctrl=inp["ctrl"][..., :5])
    with pytest.raises(ValueError, match=r"ctrl_mask: expected shape \(3, 9\)"):
        run(model, inp, ctrl_mask=inp["ctrl_mask"][:, :4])
    no_sc = make_model(randomized=False, self_condition=False)
    assert no_sc.x_embed.in_features == G
    with pytest.raises(ValueError, match="self_condition"):
        run(no_sc, inp)
    run(no_sc, inp, self_cond=None)


def test_output_activation():
    inp = make_inputs()
    assert (run(make_model(), inp) >= 0).all()
    assert (run(make_model(output_activation="none"), inp) < 0).any()
    with pytest.raises(ValueError, match="output_activation"):
        make_model(output_activation="softplus")


def test_bf16_autocast_forward_and_backward():
    torch.manual_seed(0)
    model = build_model(ModelConfig(size="tiny", dropout=0.1), G, VOCAB)
    randomize(model)
    inp = make_inputs()
    inp = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inp.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model.train(), inp)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out[~inp["mask"]] == 0).all()
    out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = run(model.eval(), inp)
    torch.testing.assert_close(ref.float(), run(model, inp), rtol=0.1, atol=0.1)
