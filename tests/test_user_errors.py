"""Every failure a user can cause is one line naming the file, column, condition or key, exit status 2,
and no Python traceback. The table walks the cases an independent adversarial run
found (bad condition cells, truncated controls, bad options, missing files, bad output paths, ...)
through the real command line entry, and checks that a refused prediction leaves no output behind.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import build_train_store, data_cfg, write_h5ad
from perturbdiff.cli import main as cli
from perturbdiff.config import DiffusionConfig, HoldoutRule, ModelConfig, NormalizeConfig, SplitConfig
from perturbdiff.data.loader import SetLoader
from perturbdiff.models import build_model
from perturbdiff.foundation import save_foundation

ROOT = Path(__file__).resolve().parents[1]
SPLIT = SplitConfig(test=[HoldoutRule(contexts=["B_cell"], perturbations=["IL2"])])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store, a foundation trained on nothing (prediction does not care), a controls h5ad on its
    genes, a truncated copy of it, and a prediction's inputs for evaluate."""
    root = tmp_path_factory.mktemp("user_errors")
    store = build_train_store(root, genes=16, cells=300)
    loader = SetLoader(data_cfg(store, split=SPLIT), "train", log=lambda *a: None)
    model = build_model(ModelConfig(size="tiny"), len(loader.gene_ids), {k: len(v) for k, v in loader.vocabularies.items()})
    extra = {"set_size": 8, "normalize": dataclasses.asdict(NormalizeConfig()),
             "diffusion": dataclasses.asdict(DiffusionConfig(kme_impl="torch", steps=50)), "numeric_in_data": []}
    found = save_foundation(root / "foundation", model.state_dict(), model_cfg=ModelConfig(size="tiny"),
                            genes=list(loader.gene_ids), vocabularies=loader.vocabularies, extra=extra)
    genes = [str(g) for g in loader.gene_ids]
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"perturbation": ["control"] * 40, "context": ["T_cell"] * 20 + ["B_cell"] * 20},
                       index=[f"c{i}" for i in range(40)])
    controls = write_h5ad(root / "ctrl" / "controls.h5ad", rng.poisson(2.0, (40, len(genes))).astype(float), obs, genes)
    few = write_h5ad(root / "few.h5ad", rng.poisson(2.0, (40, 3)).astype(float), obs, genes[:3])
    truncated = root / "truncated.h5ad"
    truncated.write_bytes(controls.read_bytes()[: controls.stat().st_size // 2])
    return {"root": root, "store": store, "found": found, "controls": controls, "few": few, "truncated": truncated}


def _table(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


GOOD = "perturbation,context,n_cells\nIL2,B_cell,5\n"

# (id, conditions file text or None, extra argv, fragment the one error line must contain)
PREDICT_CASES = [
    ("n_cells_fraction", "perturbation,context,n_cells\nIL2,B_cell,2.7\n", [], "n_cells='2.7' is not a positive integer"),
    ("n_cells_text", "perturbation,context,n_cells\nIL2,B_cell,abc\n", [], "n_cells='abc' is not a positive integer"),
    ("n_cells_zero", "perturbation,context,n_cells\nIL2,B_cell,0\n", [], "row 1"),
    ("n_samples_negative", "perturbation,context,n_samples\nIL2,B_cell,-2\n", [], "n_samples='-2'"),
    ("empty_file", "", [], "the conditions file is empty"),
    ("header_only", "perturbation,context,n_cells\n", [], "header but no conditions"),
    ("binary_file", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 40, [], "cannot read the conditions table"),
    ("duplicate_rows", "perturbation,context,n_cells\nIL2,B_cell,5\nTNF,B_cell,5\nIL2,B_cell,5\n", [],
     "rows 1 and 3 name the same condition"),
    ("absurd_size", "perturbation,context,n_cells\nIL2,B_cell,1e9\n", [], "more than the limit of 5,000,000"),
    ("missing_column", "perturbation,n_cells\nIL2,5\n", [], "conditions need columns ['context']"),
    ("missing_label", "perturbation,context\n,B_cell\n", [], "row 1: no perturbation label"),
    ("unknown_perturbation", "perturbation,context\nNOPE,B_cell\n", [], "perturbation 'NOPE' is neither"),
    ("unknown_context", "perturbation,context\nIL2,Neuron\n", [], "no control cells for context 'Neuron'"),
    ("dose_not_a_number", "perturbation,context,dose\nIL2,B_cell,lots\n", [], "dose='lots' is not a number"),
    ("sample_steps_too_many", GOOD, ["--sample-steps", "999"], "--sample-steps 999: must be in 1 .. 50"),
    ("no_cuda", GOOD, ["--device", "cuda"], "no CUDA device"),
    ("bad_device", GOOD, ["--device", "tpu9"], "is not a device"),
    ("conditions_not_found", None, ["--conditions", "nowhere.csv"], "nowhere.csv: conditions file not found"),
    ("one_step_from_controls", GOOD, ["--sample-steps", "1"], "--sample-steps 1: starting from the controls needs"),
]


@pytest.mark.parametrize("case", PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_errors_are_one_line(world, tmp_path, capsys, case):
    name, text, extra, fragment = case
    out = tmp_path / "out"
    argv = ["predict", "--checkpoint", str(world["found"]), "--controls", str(world["controls"]), "--out", str(out),
            "--sample-steps", "2", "--context-col", "context"]
    if text is not None:
        argv += ["--conditions", str(_table(tmp_path / "conds.csv", text))]
    if name == "no_cuda" and __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    _expect(capsys, [*argv, *extra], "perturbdiff predict", fragment)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def _expect(capsys, argv, prog, fragment):
    capsys.readouterr()
    assert cli(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"{prog}: error: ") and fragment in err[0], err[0]
    assert "Traceback" not in err[0]


def test_other_command_errors_are_one_line(world, tmp_path, capsys):
    root, found, store = world["root"], str(world["found"]), str(world["store"])
    conds = str(_table(tmp_path / "conds.csv", GOOD))
    predict = ["predict", "--checkpoint", found, "--sample-steps", "2", "--context-col", "context"]
    cases = [
        ([*predict, "--controls", str(world["truncated"]), "--conditions", conds, "--out", str(tmp_path / "o")],
         "perturbdiff predict", "truncated.h5ad: cannot read the controls h5ad"),
        ([*predict, "--controls", str(root / "none.h5ad"), "--conditions", conds, "--out", str(tmp_path / "o")],
         "perturbdiff predict", "none.h5ad: controls h5ad not found"),
        ([*predict, "--controls", str(world["few"]), "--conditions", conds, "--out", str(tmp_path / "o")],
         "perturbdiff predict", "genes are missing"),
        ([*predict, "--conditions", conds, "--out", str(tmp_path / "o")], "perturbdiff predict", "--conditions needs"),
        ([*predict, "--controls", str(world["controls"]), "--conditions", conds, "--out", str(world["controls"].parent)],
         "perturbdiff predict", "holds the input"),
        ([*predict, "--controls", str(world["controls"]), "--conditions", conds, "--out", conds],
         "perturbdiff predict", "is an input of this command"),
        (["predict", "--checkpoint", str(root / "nope"), "--out", str(tmp_path / "o")], "perturbdiff predict",
         "no such checkpoint directory"),
        (["predict", "--checkpoint", found, "--out", str(tmp_path / "o"), f"data.store={store}", "--split", "bogus"],
         "perturbdiff predict", "split 'bogus' has no conditions"),
        (["evaluate", "--dir", str(root / "nope")], "perturbdiff evaluate", "no such prediction directory"),
        (["evaluate", "--pred", str(root / "p.h5ad"), "--real", str(world["controls"]), "--out", str(tmp_path / "e")],
         "perturbdiff evaluate", "p.h5ad: pred AnnData not found"),
        (["evaluate", "--pred", str(world["controls"]), "--real", str(world["few"]), "--out", str(tmp_path / "e")],
         "perturbdiff evaluate", "var_names differ"),
        (["evaluate", "--pred", str(world["controls"]), "--real", str(world["controls"]), "--methods", "model,oracle",
          "--out", str(tmp_path / "e")], "perturbdiff evaluate", "evaluate.methods[1]='oracle': must be one of model"),
        (["report", "--eval", str(root / "nope")], "perturbdiff report", "nope"),
        (["verify", str(root / "nope.zarr")], "perturbdiff verify", "not a PerturbDiff store"),
        (["shard", "shard.source=h5ad", f"shard.inputs=[{root / 'none.h5ad'}]", f"shard.out={tmp_path / 's.zarr'}"],
         "perturbdiff shard", "none.h5ad"),
        (["shard", "shard.inputs=[]"], "perturbdiff shard", "shard.inputs is empty"),
        (["shard", "shard.nonsense=1"], "perturbdiff shard", "unknown config key 'shard.nonsense'"),
        (["stream", f"data.store={root / 'nope.zarr'}"], "perturbdiff stream", "not a PerturbDiff store"),
        (["pipeline", f"out_dir={tmp_path / 'p'}", f"data.store={store}"], "perturbdiff pipeline",
         "data.split.test is empty"),
    ]
    for argv, prog, fragment in cases:
        _expect(capsys, argv, prog, fragment)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_launchers_report_user_errors_in_one_line(world, tmp_path):
    """The training launchers, as separate processes: a missing foundation and an unknown key."""
    base = [f"out_dir={tmp_path / 'run'}", f"data.store={world['store']}", "train.max_steps=1", "model.size=tiny",
            "data.panel.kind=all"]
    for script, argv, fragment in (
            ("finetune.py", ["--init", str(world["root"] / "nope"), *base], "no such checkpoint directory"),
            ("pretrain.py", [*base, "train.nonsense=1"], "unknown config key 'train.nonsense'"),
            ("finetune.py", [*base, f"train.resume={tmp_path / 'nope'}"], "no such checkpoint directory")):
        res = subprocess.run([sys.executable, f"launch/{script}", *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        err = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(err) == 1 and fragment in err[0], res.stderr[-2000:]
