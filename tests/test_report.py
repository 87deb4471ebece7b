"""``perturbdiff report`` (perturbdiff/eval/report/) on a small synthetic evaluation.

The evaluation directory is built here: pred / real / train h5ad files in the evaluation layout
(2 contexts x 3 held-out conditions, 3 sampled populations, 2 real batches, 60 genes) scored by
``evaluate_files``. Rendering dominates the time, so the two reports (default, and explicit
conditions without a run directory) are written once per module and inspected by several tests.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import matplotlib.image as mpimg
import pandas as pd
import pytest

from eval_inputs import build_inputs
from perturbdiff.data.schema import DataError
from perturbdiff.eval import report as rp
from perturbdiff.eval.evaluate import EvaluateOptions, evaluate_files

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
def write_run(root: Path, name: str) -> Path:
    """A training run directory: metrics.jsonl with train, val and sample lines, a config.yaml."""
    run = root / name
    run.mkdir(parents=True)
    lines = []
    for step in range(1, 41):
        lines.append({"step": step, "train/loss": 1.0 / step + 0.01 * (step % 3), "train/lr": 1e-4 * min(1, step / 5),
                      "train/grad_norm": 0.5, "perf/cells_per_s": 1000.0 + step})
        if step % 10 == 0:
            lines.append({"step": step, "val/loss": 1.2 / step, "sample/pearson_delta": step / 40})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 41, \"tra")
    (run / "config.yaml").write_text("model:\n  depth: 2\n")
    return run


@pytest.fixture(scope="module")
def eval_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("report_inputs")
    paths = build_inputs(root)
    opts = EvaluateOptions(methods=("model", "control_mean", "perturbation_mean", "ceiling"), cap=200)
    evaluate_files(paths["pred"], paths["real"], root / "eval", paths["train"], opts, log=lambda s: None)
    return root / "eval"


@pytest.fixture(scope="module")
def report(eval_dir) -> Path:
    """The default report (chosen conditions) with a training run."""
    run = write_run(eval_dir.parent / "runs", "pretrain")
    return rp.write_report(eval_dir, run_dir=run, log=lambda s: None)


@pytest.fixture(scope="module")
def report_explicit(eval_dir) -> Path:
    """Two explicit conditions, no run directory."""
    out = eval_dir.parent / "explicit"
    return rp.write_report(eval_dir, out=out, conditions=["c2/drug/A", "p3"], log=lambda s: None)


class _Tags(HTMLParser):
    """Collects <img> sources, tables (rows of (cell text, class)) and unbalanced tags."""

    VOID = {"meta", "img", "br", "wbr", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.imgs, self.tables = [], [], [], []
        self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src", ""))
        if tag == "table":
            self.tables.append([])
        if tag == "tr":
            self.tables[-1].append([])
        if tag in ("td", "th"):
            self._cell = ["", attrs.get("class")]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(tuple(self._cell))
            self._cell = None
        if tag in self.VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[0] += data


def parse(index: Path) -> _Tags:
    tags = _Tags()
    tags.feed(index.read_text(encoding="utf-8"))
    tags.close()
    return tags


def headline(index: Path) -> dict[str, dict[str, tuple[str, str | None]]]:
    """The headline metric table: {method: {column: (text, class)}}."""
    table = next(t for t in parse(index).tables if t and t[0] and t[0][0][0] == "method")
    cols = [c[0].replace("\u2191", "").replace("\u2193", "").strip() for c in table[0]]
    return {row[0][0]: dict(zip(cols[1:], row[1:])) for row in table[1:]}


# ---------------------------------------------------------------------------------------------


def test_page_is_self_contained_and_well_formed(report):
    assert report.name == "index.html" and report.parent.name == "report"
    tags = parse(report)
    assert not tags.errors and not tags.stack, (tags.errors, tags.stack)
    pngs = sorted(report.parent.glob("*.png"))
    assert len(tags.imgs) == len(pngs) >= 6
    on_disk = {p.read_bytes() for p in pngs}
    for src in tags.imgs:
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG_SIGNATURE) and data in on_disk
    for p in pngs:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0
    text = report.read_text()
    assert "<link" not in text and "<script" not in text and "http" not in text.split("<footer>")[0]


def test_metric_table_shows_aggregated_means(report, eval_dir):
    agg = pd.read_csv(eval_dir / "aggregated.csv")
    table = headline(report)
    assert set(table) == {"model", "control_mean", "perturbation_mean", "ceiling"}
    for metric in ("pearson_delta", "mae", "mmd2"):
        for method, row in table.items():
            mean = agg[(agg["method"] == method) & (agg["metric"] == metric)]["mean"].item()
            assert row[metric][0] == rp.format_value(mean), (method, metric)
    scores = pd.read_csv(eval_dir / "scores.csv")
    avg = scores[(scores["method"] == "model") & (scores["metric"] == "avg_score")]["from_baseline"].item()
    assert table["model"]["avg_score"][0] == rp.format_value(avg)


@pytest.mark.parametrize("metric, lower", [("mae", True), ("mse_delta", True), ("pearson_delta", False),
                                           ("r_squared", False)])
def test_best_value_marked(report, eval_dir, metric, lower):
    agg = pd.read_csv(eval_dir / "aggregated.csv")
    means = agg[(agg["metric"] == metric) & (agg["method"] != "ceiling")].set_index("method")["mean"]
    best = means.idxmin() if lower else means.idxmax()
    marked = {m for m, row in headline(report).items() if row[metric][1] == "best"}
    assert marked == {best}


def test_best_methods_rules():
    mean = pd.DataFrame({"mae": [0.5, 0.2, 0.1], "pearson_delta": [0.9, 0.9, 1.0],
                         "de_nsig_counts_real": [3.0, 4.0, 5.0]}, index=["model", "linear", "ceiling"])
    best = rp.best_methods(mean)
    assert best == {"mae": {"linear"}, "pearson_delta": {"model", "linear"}}  # ceiling never, ties both


def test_fidelity_table_reads_each_method_against_the_real_cells(report):
    tables = [t for t in parse(report).tables if t and t[0] and t[0][0][0] == "method"
              and any(c[0] == "exact zeros" for c in t[0])]
    assert len(tables) == 1
    table = tables[0]
    rows = {row[0][0]: row[1:] for row in table[1:]}
    assert "model" in rows and "real cells" in rows
    assert all(cell[1] != "best" for row in rows.values() for cell in row)  # read against the real row, not ranked
    head = [c[0] for c in table[0]]
    assert rows["real cells"][head.index("nonzero values below one count") - 1][0] == "0"


def test_default_conditions_are_the_largest_real_effects(report):
    text = report.read_text()
    section = text.split("Conditions in the cell-level plots:")[1].split("</p>")[0]
    shown = [s.strip() for s in section.replace("<code>", "").replace("</code>", "").split(";")]
    assert shown == ["c1/drug/A", "c2/drug/A", "c1/p3"]
    populations = sorted(p.name for p in report.parent.glob("populations_*.png"))
    assert populations == [f"populations_{i}.png" for i in (1, 2, 3)]


def test_training_section_iff_run_dir(report, report_explicit):
    text = report.read_text()
    assert "<h2>Training</h2>" in text and (report.parent / "training.png").is_file()
    assert "pretrain" in text and "config.yaml of pretrain" in text
    assert "<h2>Training</h2>" not in report_explicit.read_text()
    assert not (report_explicit.parent / "training.png").exists()


def test_explicit_conditions(report_explicit):
    text = report_explicit.read_text()
    assert "<code>c2/drug/A</code>; <code>c1/p3</code>" in text
    assert sorted(p.name for p in report_explicit.parent.glob("populations_*.png")) == \
        ["populations_1.png", "populations_2.png"]
    assert len(parse(report_explicit).imgs) == len(list(report_explicit.parent.glob("*.png")))


def test_resolve_conditions():
    known = [("c1", "drug/A"), ("c1", "p3"), ("c2", "drug/A"), ("c2", "p4")]
    assert rp.resolve_conditions(["c1/drug/A", "p4", "c2/p4"], known) == [("c1", "drug/A"), ("c2", "p4")]
    with pytest.raises(ValueError, match="in 2 contexts"):
        rp.resolve_conditions(["drug/A"], known)


def test_unknown_condition_names_it(eval_dir, tmp_path):
    out = tmp_path / "r"
    with pytest.raises(ValueError, match=r"unknown condition 'c1/nope'.*c1/drug/A"):
        rp.write_report(eval_dir, out=out, conditions=["c1/nope"], log=lambda s: None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_missing_inputs_are_named(eval_dir, tmp_path):
    with pytest.raises(DataError, match="evaluation directory not found") as err:
        rp.write_report(tmp_path / "nowhere", log=lambda s: None)
    assert "nowhere" in str(err.value)
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match=r"summary\.json: missing"):
        rp.write_report(tmp_path / "half", log=lambda s: None)
    with pytest.raises(DataError, match="norun.*training log not found"):
        rp.write_report(eval_dir, out=tmp_path / "r", run_dir=tmp_path / "norun", log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_failure_leaves_no_partial_output(eval_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(rp.page, "plot_deltas", boom)  # after metrics.png is written
    out = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="plot failed"):
        rp.write_report(eval_dir, out=out, log=lambda s: None)
    assert not out.exists() and not list(tmp_path.iterdir())
    monkeypatch.undo()
    old = tmp_path / "old"  # an earlier report is kept as it was when its replacement fails
    rp.write_report(eval_dir, out=old, log=lambda s: None)
    before = (old / "index.html").read_text()
    monkeypatch.setattr(rp.page, "plot_metrics", boom)
    with pytest.raises(RuntimeError):
        rp.write_report(eval_dir, out=old, log=lambda s: None, overwrite=True)
    assert (old / "index.html").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_refuses_to_replace_a_non_report_directory(eval_dir, tmp_path):
    """A user's directory is never replaced, even one that happens to hold an index.html; an
    earlier report only with overwrite."""
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("my page")
    (mine / "keep.txt").write_text("x")
    with pytest.raises(DataError, match="not a perturbdiff output"):
        rp.write_report(eval_dir, out=mine, log=lambda s: None, overwrite=True)
    assert (mine / "index.html").read_text() == "my page" and (mine / "keep.txt").is_file()
    report = rp.write_report(eval_dir, out=tmp_path / "r", log=lambda s: None)
    with pytest.raises(DataError, match="pass --overwrite"):
        rp.write_report(eval_dir, out=tmp_path / "r", log=lambda s: None)
    assert rp.write_report(eval_dir, out=tmp_path / "r", log=lambda s: None, overwrite=True) == report


def test_renders_in_headless_chromium(report, tmp_path):
    """The page renders in a real browser. CI (.ci/run) installs Debian's chromium and sets
    PERTURBDIFF_REQUIRE_BROWSER=1, so there a missing browser fails; elsewhere (a developer machine
    without chromium) the test skips saying how to get it."""
    import os

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("PERTURBDIFF_REQUIRE_BROWSER") == "1":
            pytest.fail("PERTURBDIFF_REQUIRE_BROWSER=1 but no chromium binary is on PATH")
        pytest.skip("no chromium binary on PATH (apt-get install -y chromium) for the rendering check")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,2400", report.resolve().as_uri()], capture_output=True, timeout=90)
    assert shot.is_file() and shot.stat().st_size > 20_000
    assert mpimg.imread(shot).std() > 0
