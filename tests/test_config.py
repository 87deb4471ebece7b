"""Typed config: unknown keys and wrong types are errors naming the key; merge order; save/load round trip."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from perturbdiff.config import (
    ConfigError, DataConfig, HoldoutRule, RunConfig, ShardConfig, load_config, resolve_paths, save_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml")) + sorted((REPO / "configs").rglob("*.yml"))


def write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_defaults_are_the_dataclass_defaults():
    cfg = load_config()
    assert isinstance(cfg, RunConfig) and cfg == RunConfig()
    assert type(cfg.data) is DataConfig and type(cfg.shard) is ShardConfig


# ---------------------------------------------------------------------------------------------
# Unknown / misspelled keys
# ---------------------------------------------------------------------------------------------


def test_misspelled_key_in_yaml(tmp_path):
    f = write(tmp_path, "bad.yaml", "data:\n  set_sise: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config([f])
    msg = str(err.value)
    assert "set_sise" in msg and "data.set_size" in msg and "bad.yaml" in msg


def test_misspelled_nested_key_in_yaml(tmp_path):
    f = write(tmp_path, "bad.yaml", "shard:\n  hvg:\n    num_top_gene: 10\n")
    with pytest.raises(ConfigError) as err:
        load_config([f])
    assert "num_top_gene" in str(err.value) and "shard.hvg.num_top_genes" in str(err.value)


def test_unknown_top_level_section(tmp_path):
    f = write(tmp_path, "bad.yaml", "trainer:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match="trainer"):
        load_config([f])


def test_misspelled_key_in_dotlist():
    with pytest.raises(ConfigError) as err:
        load_config([], ["data.sets_per_bach=3"])
    msg = str(err.value)
    assert "sets_per_bach" in msg and "data.sets_per_batch" in msg and "command line" in msg


def test_unknown_key_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config([], ["data.zzzzzz=1"])
    assert "zzzzzz" in str(err.value) and "did you mean" not in str(err.value)


def test_unknown_key_inside_a_list_of_rules(tmp_path):
    f = write(tmp_path, "bad.yaml", "data:\n  split:\n    test:\n      - {context: [A]}\n")
    with pytest.raises(ConfigError, match="context"):
        load_config([f])


# ---------------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override,key", [
    ("data.set_size=many", "data.set_size"),
    ("shard.num_workers=1.5", "shard.num_workers"),
    ("data.drop_last=perhaps", "data.drop_last"),
    ("data.normalize.target_sum=big", "data.normalize.target_sum"),
])
def test_wrong_type_in_dotlist_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([], [override])
    assert key in str(err.value)


def test_wrong_type_in_yaml_names_the_key(tmp_path):
    f = write(tmp_path, "bad.yaml", "data:\n  set_size: [1, 2]\n")
    with pytest.raises(ConfigError) as err:
        load_config([f])
    assert "set_size" in str(err.value)
    f = write(tmp_path, "bad2.yaml", "shard:\n  cells_per_part: lots\n")
    with pytest.raises(ConfigError, match="shard.cells_per_part"):
        load_config([f])


def test_types_are_converted():
    cfg = load_config([], ["data.set_size=12", "data.normalize.target_sum=100", "data.drop_last=false",
                           "shard.batch_col=donor"])
    assert cfg.data.set_size == 12 and isinstance(cfg.data.set_size, int)
    assert cfg.data.normalize.target_sum == 100.0 and isinstance(cfg.data.normalize.target_sum, float)
    assert cfg.data.drop_last is False and cfg.shard.batch_col == "donor"


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config([], ["data.set_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config([str(tmp_path / "nope.yaml")])


# ---------------------------------------------------------------------------------------------
# Merge order and round trip
# ---------------------------------------------------------------------------------------------


def test_merge_order_defaults_then_yamls_then_overrides(tmp_path):
    a = write(tmp_path, "a.yaml", "name: a\ndata:\n  set_size: 10\n  sets_per_batch: 5\n  seed: 1\n"
                                  "shard:\n  hvg: {num_top_genes: 7}\n")
    b = write(tmp_path, "b.yaml", "name: b\ndata:\n  set_size: 20\n")
    cfg = load_config([a, b], ["data.set_size=30", "data.split.seed=9"])
    assert cfg.name == "b"  # later file wins
    assert cfg.data.set_size == 30  # the command line wins over every file
    assert cfg.data.sets_per_batch == 5 and cfg.data.seed == 1  # earlier file kept where not overridden
    assert cfg.shard.hvg.num_top_genes == 7 and cfg.shard.hvg.flavor == "seurat_v3"  # defaults fill the rest
    assert cfg.data.split.seed == 9
    assert load_config([b, a]).name == "a" and load_config([b, a]).data.set_size == 10


def test_holdout_rules_become_dataclasses(tmp_path):
    f = write(tmp_path, "s.yaml", "data:\n  split:\n    test:\n      - {contexts: [A, B], perturbations: [x]}\n"
                                  "      - {batches: [d1]}\n")
    cfg = load_config([f])
    assert cfg.data.split.test == [HoldoutRule(contexts=["A", "B"], perturbations=["x"]), HoldoutRule(batches=["d1"])]
    assert all(type(r) is HoldoutRule for r in cfg.data.split.test)


def test_save_then_load_round_trip(tmp_path):
    f = write(tmp_path, "s.yaml", "data:\n  split:\n    test:\n      - {contexts: [A], perturbations: [\"[('D', 0.5, 'uM')]\"]}\n"
                                  "    val:\n      - {batches: [p1]}\n")
    cfg = load_config([f], ["data.set_size=17", "shard.inputs=[a.parquet,b.parquet]", "shard.batch_col=donor",
                            "data.normalize.scale=2.5", "name=round"])
    cfg = resolve_paths(cfg)
    path = save_config(cfg, tmp_path / "out")
    assert path.is_file() and path.name == "config.yaml"
    assert not path.with_suffix(".yaml.tmp").exists()
    back = load_config([str(path)])
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    assert back.data.split.test[0].perturbations == ["[('D', 0.5, 'uM')]"]
    assert back.shard.inputs == ["a.parquet", "b.parquet"]


def test_resolve_paths_fills_outputs():
    cfg = resolve_paths(load_config([], ["out_dir=/x/run"]))
    assert cfg.shard.out == "/x/run/store.zarr" and cfg.data.store == cfg.shard.out
    assert cfg.synth.out_dir == "/x/run/source" and cfg.wds.out == "/x/run/wds"
    cfg = resolve_paths(load_config([], ["out_dir=/x/run", "shard.out=/y/s.zarr"]))
    assert cfg.data.store == "/y/s.zarr"


# ---------------------------------------------------------------------------------------------
# Every preset in configs/
# ---------------------------------------------------------------------------------------------


def test_configs_has_the_presets():
    names = {p.relative_to(REPO).as_posix() for p in CONFIGS}
    assert {"configs/demo.yaml", "configs/data/tahoe100m.yaml", "configs/data/pbmc.yaml",
            "configs/data/replogle.yaml", "configs/data/devel_h5ad.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(REPO)) for p in CONFIGS])
def test_every_config_preset_loads(path):
    cfg = load_config([str(path)])
    assert isinstance(cfg, RunConfig)
    # presets stay loadable together with a later override, as on the command line
    assert load_config([str(path)], ["data.seed=3"]).data.seed == 3


def test_invalid_yaml_in_an_override_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"override 'data.split.test=.*not valid YAML.*space after each colon"):
        load_config([], ["data.split.test=[{contexts:[U87MG]}]"])


def test_the_cpu_preset_loads_with_every_data_preset():
    """configs/cpu.yaml is valid alone and under each dataset preset (which wins where it sets a value)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    base = load_config([str(root / "cpu.yaml")])
    assert base.diffusion.guidance == 0.5 and base.diffusion.start == "controls"
    assert base.data.include_controls and base.predict.decode == "counts"
    assert (base.pipeline.pretrain_steps, base.pipeline.finetune_steps) == (150, 1500)
    assert (RunConfig().pipeline.pretrain_steps, RunConfig().pipeline.finetune_steps) == (150, 1500)  # the same
    for preset in sorted((root / "data").glob("*.yaml")):
        cfg = load_config([str(root / "cpu.yaml"), str(preset)])
        assert cfg.model.size == "tiny" and cfg.pipeline.finetune_steps == 1500, preset.name
    devel = load_config([str(root / "cpu.yaml"), str(root / "data" / "devel_h5ad.yaml")])
    assert devel.data.panel.num_genes == 500  # the 500-gene file's own panel
