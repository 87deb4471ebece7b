"""Foundation checkpoints (safetensors + manifest), atomic directories, rotation, and the optimiser
pieces (parameter groups, LR schedule, EMA) of perturbdiff/train."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch

from perturbdiff.config import ModelConfig, OptimConfig
from perturbdiff.models import build_model
from perturbdiff.foundation import CheckpointError, content_sha256, load_foundation, save_foundation
from perturbdiff.outputs import atomic_directory
from perturbdiff.train.checkpoint import latest_step, list_steps, rotate, step_dir
from perturbdiff.train.optim import EMA, build_optimizer, lr_factor, param_groups

GENES = [f"ENSG{i:05d}" for i in range(12)]
VOCAB = {"context": ["A549", "K562", "MCF7"], "perturbation": ["DMSO", "drugA", "drugB", "drugC"]}


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(size="tiny"), len(GENES), {k: len(v) for k, v in VOCAB.items()})


def _inputs():
    g = torch.Generator().manual_seed(1)
    return dict(x_t=torch.randn(2, 5, 12, generator=g), t=torch.tensor([3.0, 700.0]),
                mask=torch.ones(2, 5, dtype=torch.bool), ctrl=torch.rand(2, 4, 12, generator=g),
                ctrl_mask=torch.ones(2, 4, dtype=torch.bool),
                cov={"context": torch.tensor([0, 2]), "perturbation": torch.tensor([1, 3])})


def _forward(model):
    kw = _inputs()
    return model(kw.pop("x_t"), kw.pop("t"), **kw)


def test_foundation_round_trip_is_exact_and_needs_no_pickle(tmp_path, monkeypatch):
    model = _model()
    with torch.no_grad():  # non-trivial weights everywhere (adaLN-Zero starts at zero)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_foundation(tmp_path / "foundation", model.state_dict(), model_cfg=model.cfg, genes=GENES,
                           vocabularies=VOCAB, extra={"steps": 123})
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]

    def no_pickle(*a, **k):
        raise AssertionError("loading a foundation checkpoint must not unpickle")
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    found = load_foundation(path)
    assert found.genes == GENES and found.vocabularies == VOCAB and found.manifest["extra"] == {"steps": 123}
    assert found.model_cfg == model.cfg
    rebuilt = found.build()
    for (n, a), (_, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(_forward(model.eval()), _forward(rebuilt.eval()))


def test_truncated_altered_and_foreign_checkpoints_are_named(tmp_path):
    path = save_foundation(tmp_path / "f", _model().state_dict(), model_cfg=ModelConfig(size="tiny"), genes=GENES,
                           vocabularies=VOCAB)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: sha256 .* \(truncated or altered file\)"):
        load_foundation(path)
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_foundation(path, verify=False)
    weights.write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps(manifest | {"format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99 is newer"):
        load_foundation(path)
    newer = manifest | {"model": manifest["model"] | {"warp_drive": 1}}  # as a newer perturbdiff writes it
    (path / "manifest.json").write_text(json.dumps(newer | {"content_sha256": content_sha256(newer)}))
    with pytest.raises(CheckpointError, match=r"keys \['warp_drive'\] are unknown"):
        load_foundation(path)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest.json: not valid JSON"):
        load_foundation(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json: missing"):
        load_foundation(path)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_foundation(tmp_path / "nowhere")


def test_an_edited_manifest_is_refused(tmp_path):
    """Swapping two gene names (or any edit of the vocabularies or config) would predict those genes
    swapped: the manifest's content is checksummed, so the load fails instead."""
    path = save_foundation(tmp_path / "f", _model().state_dict(), model_cfg=ModelConfig(size="tiny"), genes=GENES,
                           vocabularies=VOCAB)
    manifest = json.loads((path / "manifest.json").read_text())
    assert load_foundation(path).genes == GENES
    for edit in ({"genes": [GENES[1], GENES[0], *GENES[2:]]},
                 {"vocabularies": {k: v[::-1] for k, v in manifest["vocabularies"].items()}},
                 {"model": manifest["model"] | {"qk_norm": not manifest["model"]["qk_norm"]}},
                 {"content_sha256": "0" * 64}):
        (path / "manifest.json").write_text(json.dumps(manifest | edit, indent=1))
        with pytest.raises(CheckpointError, match="does not match its checksum"):
            load_foundation(path)
    old = {k: v for k, v in manifest.items() if k != "content_sha256"} | {"format_version": 1}
    (path / "manifest.json").write_text(json.dumps(old))  # written before the checksum existed
    with pytest.warns(UserWarning, match="no manifest checksum"):
        assert load_foundation(path).genes == GENES


def test_weights_that_do_not_fit_their_manifest_are_refused(tmp_path):
    state = _model().state_dict()
    path = save_foundation(tmp_path / "f", state, model_cfg=ModelConfig(size="tiny"), genes=GENES[:-1],
                           vocabularies=VOCAB)  # one gene short of the weights
    with pytest.raises(CheckpointError, match="do not fit the model built from its own manifest"):
        load_foundation(path).build()


def test_a_crash_during_a_save_leaves_the_last_good_checkpoint(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_directory(final) as d:
        (d / "a.txt").write_text("good")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_directory(final) as d:
            (d / "a.txt").write_text("half-writ")
            raise RuntimeError("killed mid-save")
    assert (final / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporaries left behind
    with atomic_directory(final) as d:  # and a later save replaces it whole
        (d / "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]


def test_rotation_keeps_the_newest(tmp_path):
    for step in (5, 10, 15, 20):
        with atomic_directory(step_dir(tmp_path, step)) as d:
            (d / "x").write_text(str(step))
    (tmp_path / ".step_000000025.tmp-1").mkdir()  # an interrupted save is not a checkpoint
    assert [s for s, _ in list_steps(tmp_path)] == [5, 10, 15, 20]
    deleted = rotate(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_000000005", "step_000000010"]
    assert latest_step(tmp_path).name == "step_000000020"
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        rotate(tmp_path, 0)


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = _model()
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "cov_encoder.embeddings.context.weight" in nd and "blocks.0.pert.q_norm.weight" in nd
    assert all(n.endswith("bias") or "norm" in n or "embeddings" in n or "null" in n for n in nd)
    assert all(model.get_parameter(n).ndim == 2 for n in d) and "blocks.0.pert.qkv.weight" in d
    assert len(nd) + len(d) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimConfig(weight_decay=0.05))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_lr_warmup_then_cosine():
    cfg = OptimConfig(warmup_steps=4, min_lr_ratio=0.1)
    f = [lr_factor(s, cfg, 14) for s in range(16)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f[14] == pytest.approx(0.1) and f[15] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))


def test_ema_updates_every_n_steps_and_round_trips():
    model = _model()
    ema = EMA(model, decay=0.9, every=2)
    p0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not ema.step(model, 1)
    assert all(torch.equal(ema.shadow[n], p0[n]) for n in p0)
    assert ema.step(model, 2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], 0.9 * p0[n] + 0.1 * p.detach())
    other = EMA(_model(seed=3), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and all(torch.equal(other.shadow[n], ema.shadow[n]) for n in p0)
    target = _model(seed=4)
    ema.copy_to(target)
    assert all(torch.equal(p.detach(), ema.shadow[n]) for n, p in target.named_parameters())


def test_ema_warmup_forgets_the_initialisation():
    """decay_n = min(decay, (1 + n) / (10 + n)): the n-th update against a float64 recurrence, and the
    weight left on the initial parameters after 60 updates (0.55 without warm-up at decay 0.99)."""
    model = _model()
    p0 = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    ema, plain = EMA(model, decay=0.99, every=1, warmup=True), EMA(model, decay=0.99, every=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    w_init = 1.0
    for n in range(60):
        assert ema.current_decay() == pytest.approx(min(0.99, (1 + n) / (10 + n)))
        ema.step(model, n + 1)
        plain.step(model, n + 1)
        w_init *= min(0.99, (1 + n) / (10 + n))
    for name, p in model.named_parameters():
        expect = w_init * p0[name] + (1 - w_init) * p.detach().double()
        torch.testing.assert_close(ema.shadow[name].double(), expect, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.shadow[name].double(), 0.99 ** 60 * p0[name] + (1 - 0.99 ** 60) * p.detach().double(),
                                   atol=1e-5, rtol=1e-5)
    assert w_init < 1e-6 < 0.5 < 0.99 ** 60
    restored = EMA(_model(seed=3), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.warmup and restored.current_decay() == ema.current_decay()


def test_fine_tune_init_from_a_marginal_foundation_reports_everything(tmp_path):
    from perturbdiff.train.transfer import init_from_foundation
    torch.manual_seed(0)
    fcfg = ModelConfig(size="tiny", numeric_covariates=[])  # marginal pretraining: context and batch only
    fvocab = {"context": ["A549", "K562"], "batch": ["p1", "p2", "p3"]}
    foundation = build_model(fcfg, len(GENES), {k: len(v) for k, v in fvocab.items()})
    with torch.no_grad():
        for p in foundation.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = save_foundation(tmp_path / "f", foundation.state_dict(), model_cfg=fcfg, genes=GENES, vocabularies=fvocab)

    genes = list(reversed(GENES))  # the same genes in another order: the model must compute the same
    vocab = {"context": ["MCF7", "K562", "A549"], "batch": ["p1", "p2", "p3"], "perturbation": ["DMSO", "drugA"]}
    lines: list[str] = []
    model, report = init_from_foundation(load_foundation(path), ModelConfig(size="tiny"), genes, vocab,
                                         log=lines.append)
    assert report["genes"] == {"kept": 12, "new": 0, "dropped": 0}  # reordered: every weight moves with its gene
    assert report["categories"] == {"context": {"kept": 2, "new": 1}, "batch": {"kept": 3, "new": 0}}
    assert any(k.startswith("cov_encoder.embeddings.perturbation") for k in report["fresh"])
    assert any(k.startswith("cov_encoder.numeric.dose") for k in report["fresh"])
    assert "covariate branches new to the model: ['perturbation', 'dose']" in "\n".join(lines)

    g = torch.Generator().manual_seed(2)
    x, c = torch.rand(2, 5, 12, generator=g), torch.rand(2, 4, 12, generator=g)
    kw = dict(mask=torch.ones(2, 5, dtype=torch.bool), ctrl_mask=torch.ones(2, 4, dtype=torch.bool))
    old = foundation.eval()(x, torch.tensor([5.0, 400.0]), ctrl=c, cov={"context": torch.tensor([0, 1])}, **kw)
    rev = list(range(11, -1, -1))
    new = model.eval()(x[..., rev], torch.tensor([5.0, 400.0]), ctrl=c[..., rev], **kw,
                       cov={"context": torch.tensor([2, 1]), "perturbation": torch.tensor([1, 0]),
                            "num_dose": torch.tensor([0.5, 5.0])})
    torch.testing.assert_close(new, old[..., rev], rtol=1e-5, atol=1e-6)  # new branches enter through zeros

    new_panel = GENES[2:] + ["ENSGnew1", "ENSGnew2"]
    lines.clear()
    model, report = init_from_foundation(load_foundation(path), ModelConfig(size="tiny"), new_panel, vocab,
                                         log=lines.append)
    assert report["genes"] == {"kept": 10, "new": 2, "dropped": 2}
    assert "10 genes kept, 2 new" in "\n".join(lines)
    with pytest.raises(CheckpointError, match=r"foundation is tiny .* config asks for small"):
        init_from_foundation(load_foundation(path), ModelConfig(size="small"), GENES, vocab, log=lines.append)


def test_the_run_settings_are_typed_and_checked_at_load(tmp_path):
    """normalisation, diffusion settings, set size, mode and control labels come back as typed fields;
    an unknown or ill-typed setting is a CheckpointError naming the manifest and the key."""
    from perturbdiff.config import DiffusionConfig, NormalizeConfig

    model = _model()
    extra = {"mode": "finetune", "set_size": 32, "normalize": {"target_sum": 5000.0},
             "diffusion": {"steps": 200, "start": "controls"}, "control_perturbations": ["DMSO"],
             "control_numeric": {"dose": 0}, "numeric_in_data": ["dose"]}
    found = load_foundation(save_foundation(tmp_path / "f", model.state_dict(), model_cfg=model.cfg, genes=GENES,
                                            vocabularies=VOCAB, extra=extra))
    assert found.mode == "finetune" and found.set_size == 32 and found.control_perturbations == ["DMSO"]
    assert found.normalize == NormalizeConfig(target_sum=5000.0)
    assert found.diffusion == DiffusionConfig(steps=200, start="controls")
    assert found.control_numeric == {"dose": 0.0} and found.numeric_in_data == ["dose"]
    # nothing recorded: the defaults, and a checkpoint from before the bridge sampled from noise
    bare = load_foundation(save_foundation(tmp_path / "b", model.state_dict(), model_cfg=model.cfg, genes=GENES,
                                           vocabularies=VOCAB))
    assert bare.diffusion.start == "noise" and bare.set_size == 256 and bare.mode is None
    assert bare.control_perturbations is None and bare.numeric_in_data is None
    for bad, match in (({"normalize": {"target": 1}}, r"extra.normalize keys \['target'\] are unknown"),
                       ({"set_size": 0}, "extra.set_size must be a positive integer"),
                       ({"mode": "sideways"}, "extra.mode must be one of"),
                       ({"control_perturbations": "DMSO"}, "extra.control_perturbations must be a list")):
        path = save_foundation(tmp_path / "bad", model.state_dict(), model_cfg=model.cfg, genes=GENES,
                               vocabularies=VOCAB, extra=bad)
        with pytest.raises(CheckpointError, match=match) as err:
            load_foundation(path)
        assert "manifest.json" in str(err.value)
