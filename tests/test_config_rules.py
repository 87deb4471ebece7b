"""Every config value is checked when the config is loaded (perturbdiff/config_rules.py), and labels
are literal strings (no OmegaConf interpolation): issue 11, items 7 and 8."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from perturbdiff import cli
from perturbdiff.config import (
    ConfigError, HoldoutRule, RunConfig, load_config, resolve_paths, save_config, validate_config,
)
from perturbdiff.config_rules import FREE, LEAVES, RULES, Choice, config_problems

REPO = Path(__file__).resolve().parents[1]
DATA_PRESETS = sorted((REPO / "configs" / "data").glob("*.yaml"))
STAGE_PRESETS = [REPO / "configs" / n for n in ("pretrain.yaml", "finetune.yaml", "demo.yaml")]


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def load_error(*overrides: str, files: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(list(files), list(overrides))
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------
# The cases of the issue, and one of each kind of rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,expected", [
    ("train.max_steps=-5", "train.max_steps=-5: must be an integer >= 1"),
    ("train.max_steps=0", "train.max_steps=0: must be an integer >= 1"),
    ("train.optim.lr=0", "train.optim.lr=0.0: must be a number > 0"),
    ("train.optim.lr=-1e-3", "train.optim.lr=-0.001: must be a number > 0"),
    ("train.ckpt_every=-1", "train.ckpt_every=-1: must be an integer >= 0"),
    ("diffusion.p_drop_cond=1.5", "diffusion.p_drop_cond=1.5: must be a number in [0, 1]"),
    ("diffusion.p_self_cond=-0.1", "diffusion.p_self_cond=-0.1: must be a number in [0, 1]"),
    ("train.keep_last=0", "train.keep_last=0: must be an integer >= 1"),
    ("train.sample_steps=2000", "train.sample_steps=2000: must be <= diffusion.steps (1000)"),
    ("diffusion.sample_steps=1001", "diffusion.sample_steps=1001: must be <= diffusion.steps (1000)"),
    ("predict.sample_steps=5000", "predict.sample_steps=5000: must be <= diffusion.steps (1000)"),
    ("data.sampling=random", "data.sampling='random': must be one of proportional | balanced"),
    ("shard.compressor=gzip", "shard.compressor='gzip': must be one of none | lz4 | zstd"),
    ("shard.hvg.flavor=cell_ranger", "shard.hvg.flavor='cell_ranger': must be one of seurat_v3 | dispersion"),
    ("model.size=huge", "model.size='huge': must be one of tiny | small | paper | large | xl"),
    ("evaluate.profile=everything", "evaluate.profile='everything': must be one of full | paper | vcc | minimal"),
    ("train.engine.zero_stage=4", "train.engine.zero_stage=4: must be one of 1 | 2 | 3"),
    ("train.engine.grad_accum=0", "train.engine.grad_accum=0: must be an integer >= 1"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s=0.0: must be a number > 0"),
    ("train.optim.betas=[0.9,1.0]", "train.optim.betas[1]=1.0: must be a number in [0, 1)"),
    ("train.optim.betas=[0.9]", "train.optim.betas=[0.9]: must be a list of 2 values"),
    ("train.optim.ema_decay=1.0", "train.optim.ema_decay=1.0: must be a number in [0, 1)"),
    ("train.optim.weight_decay=-0.01", "train.optim.weight_decay=-0.01: must be a number >= 0"),
    ("data.split.random_val_fraction=1.0", "data.split.random_val_fraction=1.0: must be a number in [0, 1)"),
    ("data.normalize.target_sum=0", "data.normalize.target_sum=0.0: must be a number > 0"),
    ("data.normalize.scale=-1", "data.normalize.scale=-1.0: must be a number > 0"),
    ("diffusion.steps=1", "diffusion.steps=1: must be an integer >= 2"),
    ("diffusion.beta_end=1.5", "diffusion.beta_end=1.5: must be a number in (0, 1)"),
    ("diffusion.bandwidths=[1.0,0]", "diffusion.bandwidths[1]=0.0: must be a number > 0"),
    ("model.depth=0", "model.depth=0: must be an integer >= 1"),
    ("pipeline.pretrain_lr=0", "pipeline.pretrain_lr=0.0: must be a number > 0"),
    ("pipeline.finetune_steps=0", "pipeline.finetune_steps=0: must be an integer >= 1"),
    ("synth.doses=[0.5,0.5]", "synth.doses[1]=0.5: must not repeat an earlier element"),
    ("data.seed=-1", "data.seed=-1: must be an integer >= 0"),
    ("train.optim.lr=.inf", "train.optim.lr=inf: must be a number > 0"),
    ("train.resume=' '",
     "train.resume=' ': must be a non-empty value (auto, never or a checkpoint directory)"),
    ("wds.split=training", "wds.split='training': must be one of train | val | test"),
])
def test_a_bad_value_is_one_line_naming_key_value_and_rule(override, expected):
    assert load_error(override) == expected


def test_a_bad_value_in_a_yaml_file_is_caught_too(tmp_path):
    f = write(tmp_path, "bad.yaml", "train:\n  keep_last: 0\n  optim: {lr: 0}\n")
    assert load_error(files=(f,)) == ("train.keep_last=0: must be an integer >= 1; "
                                      "train.optim.lr=0.0: must be a number > 0")


def test_a_later_source_can_repair_an_earlier_one(tmp_path):
    """Rules apply to the merged result, not to each source: a preset may be fixed on the command line."""
    f = write(tmp_path, "a.yaml", "diffusion:\n  steps: 10\n  beta_end: 0.005\n")
    assert "diffusion.sample_steps=100" in load_error(files=(f,))
    cfg = load_config([f], ["diffusion.sample_steps=10", "train.sample_steps=5"])
    assert cfg.diffusion.steps == 10 and cfg.diffusion.sample_steps == 10


@pytest.mark.parametrize("overrides", [
    ["train.val_every=0", "train.sample_every=0", "train.ckpt_every=0", "pipeline.pretrain_steps=0"],  # 0 = never
    ["train.optim.ema_every=0", "train.optim.grad_clip=0", "train.optim.warmup_steps=0", "diffusion.mmd_weight=0"],
    ["diffusion.p_drop_control=1", "diffusion.p_drop_cond=0", "train.optim.min_lr_ratio=1", "train.optim.ema_decay=0"],
    ["diffusion.sample_steps=1000", "train.sample_steps=1000", "predict.sample_steps=1000"],  # the bound itself
    ["diffusion.steps=2", "diffusion.beta_end=0.0019", "diffusion.sample_steps=2", "train.sample_steps=1"],
    ["data.num_workers=0", "predict.train_cells=0", "synth.num_drugs=0", "data.split.random_val_fraction=0"],
    ["model.depth=null", "pipeline.pretrain_lr=null", "predict.sample_steps=null", "data.panel.genes_file=null"],
    ["model.depth=3", "model.width=96", "model.heads=6", "model.dropout=0.1", "train.engine.zero_stage=3"],
    ["diffusion.schedule=cosine", "diffusion.steps=10", "diffusion.sample_steps=10", "train.sample_steps=10"],
    ["train.resume=never", "train.resume=/some/checkpoints/step_00000100", "train.engine.backend=deepspeed",
     "train.engine.offload_optimizer=true"],
])
def test_values_at_the_bounds_are_accepted(overrides):
    load_config([], overrides)


@pytest.mark.parametrize("overrides,expected", [
    (["data.panel.kind=file"], "data.panel.genes_file=None: must be set when data.panel.kind=file"),
    (["model.perturbation_encoding=table"],
     "model.perturbation_table=None: must be set when model.perturbation_encoding=table"),
    (["diffusion.beta_start=0.05"], "diffusion.beta_start=0.05: must be < diffusion.beta_end (0.02)"),
    (["diffusion.steps=10", "diffusion.sample_steps=10", "train.sample_steps=10"],
     "diffusion.beta_end=0.02: the linear schedule scales betas by 1000 / diffusion.steps (10), so it must be < 0.01"),
    (["diffusion.kernel=gaussian", "diffusion.bandwidths=[]"],
     "diffusion.bandwidths=[]: must not be empty when diffusion.kernel=gaussian"),
    (["train.engine.offload_optimizer=true"],
     "train.engine.offload_optimizer=True: needs train.engine.backend=deepspeed (ZeRO-Offload), not ddp"),
    (["model.width=100", "model.heads=3"], "model.width=100: must be divisible by model.heads (3)"),
    (["synth.num_drugs=0", "synth.control_wells_per_plate=0"],
     "synth.control_wells_per_plate=0: must be >= 1 when synth.num_drugs=0 (a plate needs a well)"),
    (["synth.doses=[]"], "synth.doses=[]: must not be empty when synth.num_drugs=12"),
    (["data.split.test=[{contexts: [A]}, {}]"],
     ("data.split.test[1]={}: must name at least one context, batch or perturbation "
      "(an empty rule holds out everything)")),
    (["model.numeric_covariates=[dose,dose]"],
     "model.numeric_covariates[1]='dose': must not repeat an earlier element"),
])
def test_cross_field_rules(overrides, expected):
    assert load_error(*overrides) == expected


def test_cross_rules_pass_once_the_other_field_agrees(tmp_path):
    cfg = load_config([], ["data.panel.kind=file", f"data.panel.genes_file={tmp_path / 'genes.txt'}",
                           "model.perturbation_encoding=table", "model.perturbation_table=drugs.parquet",
                           "diffusion.kernel=energy", "diffusion.bandwidths=[]"])
    assert cfg.data.panel.kind == "file" and cfg.model.perturbation_table == "drugs.parquet"


def test_every_problem_is_reported_on_the_one_line():
    msg = load_error("train.max_steps=-5", "train.optim.lr=0", "data.sampling=random")
    assert msg.split("; ") == ["data.sampling='random': must be one of proportional | balanced",
                               "train.max_steps=-5: must be an integer >= 1",
                               "train.optim.lr=0.0: must be a number > 0"]


def test_validate_config_checks_a_hand_built_config():
    cfg = RunConfig()
    assert validate_config(cfg) is cfg
    cfg.train.keep_last = 0
    with pytest.raises(ConfigError, match=r"^train.keep_last=0: must be an integer >= 1$"):
        validate_config(cfg)
    cfg = RunConfig()
    cfg.data.set_size = 8.0  # the type a hand-built config can get wrong
    cfg.model.depth = True
    cfg.train.engine.zero_stage = True  # True == 1, but is no ZeRO stage
    assert config_problems(cfg) == ["data.set_size=8.0: must be an integer >= 1",
                                    "model.depth=True: must be an integer >= 1",
                                    "train.engine.zero_stage=True: must be one of 1 | 2 | 3"]
    cfg = RunConfig()
    cfg.data.split.test = [HoldoutRule()]
    assert config_problems(cfg) == [("data.split.test[0]={}: must name at least one context, batch or perturbation "
                                     "(an empty rule holds out everything)")]


# ---------------------------------------------------------------------------------------------
# The table covers every field
# ---------------------------------------------------------------------------------------------


def test_every_leaf_field_has_a_rule_or_is_listed_as_free():
    """A new numeric or string field must get a rule in RULES (or be declared free in FREE)."""
    unchecked = [key for key, hint in LEAVES.items() if hint is not bool and key not in RULES and key not in FREE]
    assert not unchecked, f"add these fields to config_rules.RULES (or FREE): {unchecked}"
    assert not set(RULES) - set(LEAVES), f"rules for fields that do not exist: {sorted(set(RULES) - set(LEAVES))}"
    assert not FREE - set(LEAVES), f"FREE names fields that do not exist: {sorted(FREE - set(LEAVES))}"
    assert not FREE & set(RULES), f"both ruled and free: {sorted(FREE & set(RULES))}"
    assert not [k for k in RULES if LEAVES[k] is bool], "a bool needs no rule: its type is checked on load"


def test_the_defaults_follow_every_rule():
    assert config_problems(RunConfig()) == []


def test_choices_match_the_code_that_reads_them():
    """The rule table is torch-free, so it spells out choices that heavier modules define."""
    from data_sharding.convert import SOURCES
    from data_sharding.hvg import FLAVORS
    from data_sharding.writer import COMPRESSORS
    from perturbdiff.data.sampler import EMPTY_POOL_POLICIES, SAMPLINGS
    from perturbdiff.data.schema import VALUE_KINDS
    from perturbdiff.data.store import PANEL_KINDS
    from perturbdiff.predict.controls import MISSING_GENES
    from perturbdiff.diffusion.schedule import RESPACINGS, SCHEDULES, respaced_timesteps
    from perturbdiff.config import EVAL_METHODS
    from perturbdiff.decode import DECODES
    from perturbdiff.eval.schema import METHODS, PROFILES
    from perturbdiff.models.covariates import ENCODINGS
    from perturbdiff.models.mmdit import OUTPUT_ACTIVATIONS
    from perturbdiff.models.presets import PRESETS
    from perturbdiff.ops.kme import IMPLS
    from perturbdiff.ops.kme_reference import KERNELS
    from perturbdiff.train.engine import BACKEND_NAMES, PRECISIONS

    def choices(key: str) -> set:
        rule = RULES[key]
        assert isinstance(rule, Choice)
        return set(rule.values)

    code = {"model.size": PRESETS, "shard.compressor": COMPRESSORS, "diffusion.schedule": SCHEDULES,
            "diffusion.kernel": KERNELS, "diffusion.kme_impl": IMPLS, "model.perturbation_encoding": ENCODINGS,
            "model.output_activation": OUTPUT_ACTIVATIONS, "train.engine.backend": BACKEND_NAMES,
            "train.engine.precision": PRECISIONS, "evaluate.profile": PROFILES, "predict.decode": DECODES,
            "shard.source": SOURCES, "shard.values": ("auto", *VALUE_KINDS), "shard.hvg.flavor": FLAVORS,
            "data.sampling": SAMPLINGS, "data.empty_control_pool": EMPTY_POOL_POLICIES,
            "data.panel.kind": PANEL_KINDS, "diffusion.respacing": RESPACINGS, "predict.missing_genes": MISSING_GENES}
    for key, values in code.items():
        assert choices(key) == set(values), key
    assert EVAL_METHODS == METHODS and set(RULES["evaluate.methods"].item.values) == set(METHODS)
    for kind in choices("diffusion.respacing"):
        assert respaced_timesteps(10, 3, kind)


# ---------------------------------------------------------------------------------------------
# Failing before anything runs: one stderr line, exit status 2
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["shard", "train.max_steps=-1"],
    ["synth", "diffusion.p_drop_cond=1.5"],
    ["stream", "data.sampling=random"],
    ["pipeline", "train.keep_last=0"],
])
def test_cli_bad_value_exits_2_with_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)  # no configs/demo.yaml here: the defaults, then the override
    ran = []
    for name in ("cmd_shard", "cmd_synth", "stream_throughput", "cmd_pipeline"):
        monkeypatch.setattr(cli, name, lambda *a, **k: ran.append(a))
    capsys.readouterr()
    assert cli.main([*argv, f"out_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.splitlines()
    key = argv[1].partition("=")[0]
    assert len(err) == 1 and err[0].startswith(f"perturbdiff {argv[0]}: error: {key}="), err
    assert "must" in err[0] and "Traceback" not in err[0]
    assert not ran and list(tmp_path.iterdir()) == []


def test_training_launcher_refuses_before_training(tmp_path, capsys):
    from perturbdiff.train.run import main as train_main

    capsys.readouterr()
    assert train_main("finetune", [f"out_dir={tmp_path / 'run'}", "train.max_steps=-5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["finetune: error: train.max_steps=-5: must be an integer >= 1"]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# Labels are literal strings
# ---------------------------------------------------------------------------------------------

TRICKY = ["${oc.env:HOME}", "a ${b", "x}", "${data.set_size}", "???", "\\${x}", "\\\\${x}", "$", "${", "}", "${}",
          "a\\b", "${oc.env:PERTURBDIFF_TEST_SECRET}", "[('Drug', 0.5, 'uM')]", "1e4", "null", "true", "~", ""]


def test_labels_in_a_yaml_file_arrive_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("PERTURBDIFF_TEST_SECRET", "leaked")
    rule = {"contexts": ["${oc.env:HOME}"], "batches": ["a ${b"], "perturbations": TRICKY}
    f = write(tmp_path, "labels.yaml", "name: ${oc.env:HOME}\nshard:\n  control_label: '???'\n"
              f"data:\n  split:\n    test: [{json.dumps(rule)}]\n"
              "    val:\n      - perturbations:\n          - x}\n          - a ${b\n          - ${oc.env:HOME}\n")
    cfg = load_config([f])
    assert cfg.name == "${oc.env:HOME}" and cfg.shard.control_label == "???"
    assert cfg.data.split.test == [HoldoutRule(**rule)]
    assert cfg.data.split.val == [HoldoutRule(perturbations=["x}", "a ${b", "${oc.env:HOME}"])]


def test_labels_on_the_command_line_arrive_unchanged(monkeypatch):
    monkeypatch.setenv("PERTURBDIFF_TEST_SECRET", "leaked")
    cfg = load_config([], ["name=${oc.env:HOME}", "shard.batch_col=a ${b", "shard.control_label=???",
                           f"data.split.test=[{{perturbations: {json.dumps(TRICKY)}}}]"])
    assert cfg.name == "${oc.env:HOME}" and cfg.shard.batch_col == "a ${b" and cfg.shard.control_label == "???"
    assert cfg.data.split.test == [HoldoutRule(perturbations=TRICKY)]


def test_labels_reach_the_command_unchanged(tmp_path, monkeypatch):
    """Through the real entry: argv -> load_config -> the command's RunConfig."""
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(cli, "stream_throughput", seen.append)
    assert cli.main(["stream", "data.split.test=[{contexts: ['${oc.env:HOME}'], perturbations: ['a ${b', 'x}']}]",
                     f"data.store={tmp_path / 's.zarr'}"]) == 0
    assert seen[0].data.split.test == [HoldoutRule(contexts=["${oc.env:HOME}"], perturbations=["a ${b", "x}"])]


def test_interpolation_is_not_a_way_around_a_type():
    msg = load_error("data.set_size=${oc.env:HOME}")
    assert msg.startswith("command line: bad value for 'data.set_size'") and "'${oc.env:HOME}'" in msg
    assert "'???'" in load_error("data.set_size=???")


def test_literal_labels_round_trip_through_save_config(tmp_path):
    cfg = load_config([], [f"data.split.test=[{{contexts: ['${{oc.env:HOME}}'], perturbations: {json.dumps(TRICKY)}}}]",
                           "data.split.val=[{batches: ['???', 'x}']}]", "name=a ${b", "shard.batch_col=???"])
    cfg = resolve_paths(cfg)
    back = load_config([str(save_config(cfg, tmp_path))])
    assert back == cfg and back.data.split.test[0].perturbations == TRICKY


def test_random_strings_stay_literal_from_the_command_line_and_through_a_save(tmp_path):
    rng = random.Random(11)
    pieces = ["${", "$", "{", "}", "\\", "?", "???", ":", "'", '"', " ", "a", "1", ".", "e", ",", "[", "]", "#", "- ",
              "\t", "é", "oc.env:HOME", "null"]
    labels = sorted({"".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))) for _ in range(300)})
    cfg = load_config([], [f"data.split.test=[{{perturbations: {json.dumps(labels)}}}]",
                           f"shard.dataset={json.dumps(labels[0])}"])
    assert sum("${" in s for s in labels) > 30  # the generator does hit interpolation syntax
    assert cfg.data.split.test[0].perturbations == labels and cfg.shard.dataset == labels[0]
    assert load_config([str(save_config(cfg, tmp_path))]) == cfg


def test_bad_override_keys_and_file_contents_are_clear_errors(tmp_path):
    for bad in ("=5", "data..set_size=3", "data.set size=3"):
        assert "key=value" in load_error(bad)
    assert "must hold a mapping" in load_error(files=(write(tmp_path, "list.yaml", "- a\n- b\n"),))
    assert load_config([write(tmp_path, "empty.yaml", "# nothing\n")]) == RunConfig()


# ---------------------------------------------------------------------------------------------
# The presets
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", DATA_PRESETS, ids=[p.stem for p in DATA_PRESETS])
def test_every_data_preset_loads_with_every_stage_preset(data):
    """As the README combines them: --config configs/data/<d>.yaml --config configs/<stage>.yaml."""
    for stage in STAGE_PRESETS:
        cfg = load_config([str(data), str(stage)])
        assert config_problems(cfg) == []
