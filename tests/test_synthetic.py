"""The synthetic Tahoe-format generator: exact schema, design, determinism, resumability, biology, h5ad."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from data_sharding.synthetic import generate, load_ground_truth, write_h5ad
from perturbdiff.config import SynthConfig
from perturbdiff.data import schema

SMALL = dict(
    num_cells=3000, num_genes=300, num_cell_lines=3, num_drugs=3, doses=[0.05, 0.5, 5.0], num_plates=2,
    num_programs=8, control_wells_per_plate=2, cells_per_file=1000, row_group_size=256, seed=7,
)


def small_cfg(out: Path, **kw) -> SynthConfig:
    return SynthConfig(out_dir=str(out), **{**SMALL, **kw})


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "ds"
    summary = generate(small_cfg(out, num_workers=1))
    return out, summary


def load_cells(out: Path):
    """All cells of a dataset: the table, an obs frame and a CSR counts matrix in gene_metadata order."""
    files = sorted((out / "data").glob("train-*.parquet"))
    table = pa.concat_tables([pq.read_table(f) for f in files])
    gm = pq.read_table(out / "metadata" / schema.GENE_METADATA_FILE).to_pandas()
    lut = {int(t): i for i, t in enumerate(gm["token_id"])}
    genes = table.column("genes").to_pylist()
    expr = table.column("expressions").to_pylist()
    indptr, indices, data = [0], [], []
    for g, e in zip(genes, expr):
        indices.extend(lut[t] for t in g[1:])
        data.extend(e[1:])
        indptr.append(len(indices))
    X = sp.csr_matrix((np.asarray(data, np.float32), np.asarray(indices), np.asarray(indptr)),
                      shape=(len(genes), len(gm)))
    X.sort_indices()
    obs = table.drop(["genes", "expressions"]).to_pandas()
    smp = pq.read_table(out / "metadata" / schema.SAMPLE_METADATA_FILE).to_pandas().set_index("sample")
    obs["drugname_drugconc"] = smp.loc[obs["sample"], "drugname_drugconc"].to_numpy()
    obs["dose"] = [schema.parse_drugconc(t)[0][1] for t in obs["drugname_drugconc"]]
    return table, obs, X, gm


@pytest.fixture(scope="module")
def cells(ds):
    return load_cells(ds[0])


# ---------------------------------------------------------------------------------------------
# Format
# ---------------------------------------------------------------------------------------------


def test_parquet_schema_exact(ds):
    out, summary = ds
    files = sorted((out / "data").glob("*"))
    assert [f.name for f in files] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    assert summary["num_files"] == 3 and summary["num_cells"] == 3000
    expected = [
        ("genes", pa.list_(pa.int64())), ("expressions", pa.list_(pa.float32())), ("drug", pa.string()),
        ("sample", pa.string()), ("BARCODE_SUB_LIB_ID", pa.string()), ("cell_line_id", pa.string()),
        ("moa-fine", pa.string()), ("canonical_smiles", pa.string()), ("pubchem_cid", pa.string()),
        ("plate", pa.string()),
    ]
    for f in files:
        pf = pq.ParquetFile(f)
        sch = pf.schema_arrow
        assert tuple(sch.names) == schema.TAHOE_COLUMNS
        assert [(fld.name, fld.type) for fld in sch] == expected
        assert pf.metadata.num_rows == 1000
        sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
        assert sizes == [256, 256, 256, 232]


def test_rows_marker_and_counts(cells):
    table, _, _, gm = cells
    valid = set(gm["token_id"].tolist())
    for g, e in zip(table.column("genes").to_pylist(), table.column("expressions").to_pylist()):
        assert g[0] == schema.TAHOE_MARKER_TOKEN and e[0] == schema.TAHOE_MARKER_VALUE
        assert len(g) == len(e)
        v = np.asarray(e[1:], np.float64)
        t = np.asarray(g[1:])
        assert np.all(v > 0) and np.all(v == np.round(v))  # raw integer counts, zeros never listed
        assert np.all(np.diff(t) > 0)
        assert set(t.tolist()) <= valid
    assert len(set(table.column("BARCODE_SUB_LIB_ID").to_pylist())) == table.num_rows


def test_gene_metadata_tokens_not_offset(ds):
    out, _ = ds
    gm = pq.read_table(out / "metadata" / schema.GENE_METADATA_FILE)
    assert gm.schema.names == list(schema.GENE_METADATA_COLUMNS)
    assert gm.schema.field("token_id").type == pa.int64()
    tok = gm.column("token_id").to_numpy()
    assert len(np.unique(tok)) == len(tok) == SMALL["num_genes"]
    assert tok.min() >= 3 and tok.max() < 3 + 4 * SMALL["num_genes"]
    assert not np.array_equal(tok, np.arange(len(tok)) + 3)
    assert np.mean(tok == np.arange(len(tok)) + 3) < 0.05
    assert not np.all(np.diff(tok) > 0)
    sym = gm.column("gene_symbol").to_pylist()
    assert len(set(sym)) == len(sym) and all(s.startswith("SYN") for s in sym)
    assert all(e.startswith("ENSG") and len(e) == 15 for e in gm.column("ensembl_id").to_pylist())


def test_metadata_tables(ds, cells):
    out, _ = ds
    _, obs, _, _ = cells
    drugs = pq.read_table(out / "metadata" / schema.DRUG_METADATA_FILE)
    assert drugs.schema.names == list(schema.DRUG_METADATA_COLUMNS)
    assert all(t == pa.string() for t in drugs.schema.types)
    dn = drugs.column("drug").to_pylist()
    assert schema.TAHOE_CONTROL_DRUG in dn and len(dn) == SMALL["num_drugs"] + 1 == len(set(dn))
    lines = pq.read_table(out / "metadata" / "cell_line_metadata.parquet").to_pandas()
    assert list(lines.columns) == ["cell_line_id", "cell_name"]
    assert all(x.startswith("CVCL_") for x in lines["cell_line_id"])
    # per-cell drug annotations agree with drug_metadata
    dm = drugs.to_pandas().set_index("drug")
    for col in ("moa-fine", "canonical_smiles", "pubchem_cid"):
        assert (dm.loc[obs["drug"], col].to_numpy() == obs[col].to_numpy()).all()
    assert set(obs["cell_line_id"]) == set(lines["cell_line_id"])


# ---------------------------------------------------------------------------------------------
# Design
# ---------------------------------------------------------------------------------------------


def test_plate_design(ds, cells):
    out, _ = ds
    _, obs, _, _ = cells
    smp = pq.read_table(out / "metadata" / schema.SAMPLE_METADATA_FILE).to_pandas()
    assert list(smp.columns) == list(schema.SAMPLE_METADATA_COLUMNS)
    assert smp["sample"].is_unique
    control = schema.format_drugconc(schema.TAHOE_CONTROL_DRUG, 0.0)
    assert control == "[('DMSO_TF', 0.0, 'uM')]"
    drugs = sorted(set(smp["drug"]) - {schema.TAHOE_CONTROL_DRUG})
    labels = {schema.format_drugconc(d, z) for d in drugs for z in SMALL["doses"]}
    assert len(drugs) == SMALL["num_drugs"]
    plates = sorted(set(smp["plate"]))
    assert plates == ["plate1", "plate2"]
    for _, g in smp.groupby("plate"):
        assert (g["drugname_drugconc"] == control).sum() == SMALL["control_wells_per_plate"]
        treated = g.loc[g["drug"] != schema.TAHOE_CONTROL_DRUG, "drugname_drugconc"]
        assert treated.is_unique and set(treated) == labels  # every (drug, dose) once on every plate
    # every well pools every cell line, and cells split evenly over (well, line)
    counts = obs.groupby(["sample", "cell_line_id"]).size()
    assert len(counts) == len(smp) * SMALL["num_cell_lines"]
    assert counts.max() - counts.min() <= 1
    truth = load_ground_truth(out)["cell_counts"].set_index(["sample", "cell_line_id"])["n_cells"]
    assert (truth.loc[counts.index].to_numpy() == counts.to_numpy()).all()
    # plate column agrees with sample_metadata
    assert (smp.set_index("sample").loc[obs["sample"], "plate"].to_numpy() == obs["plate"].to_numpy()).all()


def test_cells_not_sorted_within_files(cells):
    _, obs, _, _ = cells
    key = obs["cell_line_id"] + "|" + obs["drug"] + "|" + obs["sample"]
    runs = int((key.to_numpy()[1:] != key.to_numpy()[:-1]).sum()) + 1
    assert runs > 0.8 * len(obs)  # neighbouring cells almost never share a group
    assert not obs["cell_line_id"].is_monotonic_increasing
    # plates are written in order
    assert obs["plate"].is_monotonic_increasing


def test_nonzero_fraction_default_library(tmp_path):
    out = tmp_path / "nz"
    cfg = SynthConfig(out_dir=str(out), num_cells=400, num_genes=2000, cells_per_file=400, seed=1)
    generate(cfg)
    t = pq.read_table(out / "data" / "train-00000-of-00001.parquet", columns=["genes", "expressions"])
    n = np.asarray([len(g) - 1 for g in t.column("genes").to_pylist()])
    frac = n.mean() / cfg.num_genes
    assert 0.10 <= frac <= 0.40
    lib = np.asarray([sum(e[1:]) for e in t.column("expressions").to_pylist()])
    assert 0.85 * cfg.mean_library_size < lib.mean() < 1.15 * cfg.mean_library_size


# ---------------------------------------------------------------------------------------------
# Determinism and resumability
# ---------------------------------------------------------------------------------------------


def _file_bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((out / "data").glob("*.parquet"))}


def test_same_output_any_num_workers(ds, tmp_path):
    out1, _ = ds
    out2 = tmp_path / "w2"
    s2 = generate(small_cfg(out2, num_workers=2))
    assert s2["num_written"] == 3
    b1, b2 = _file_bytes(out1), _file_bytes(out2)
    assert b1.keys() == b2.keys()
    for name in b1:
        assert pq.read_table(out1 / "data" / name).equals(pq.read_table(out2 / "data" / name))
        assert b1[name] == b2[name]
    for name in ("baseline_log_mean.npy", "effect_logfc.npy", "plate_shift.npy"):
        assert (out1 / "ground_truth" / name).read_bytes() == (out2 / "ground_truth" / name).read_bytes()
    assert (out1 / "metadata" / "gene_metadata.parquet").read_bytes() == \
        (out2 / "metadata" / "gene_metadata.parquet").read_bytes()


def test_resume_regenerates_only_missing_file(tmp_path):
    out = tmp_path / "resume"
    cfg = small_cfg(out, num_cells=1500, cells_per_file=500)
    generate(cfg)
    before = _file_bytes(out)
    victim = out / "data" / "train-00001-of-00003.parquet"
    victim.unlink()
    (out / "data" / "train-00002-of-00003.parquet.tmp").write_bytes(b"partial")  # a crashed writer's leftover
    s = generate(cfg)
    assert s["num_written"] == 1 and s["num_skipped"] == 2
    assert _file_bytes(out) == before
    assert not list((out / "data").glob("*.tmp"))
    assert generate(cfg)["num_written"] == 0
    # another config must not be mixed into the same directory
    with pytest.raises(ValueError, match="another config"):
        generate(dataclasses.replace(cfg, seed=cfg.seed + 1))


def test_seed_changes_output(ds, tmp_path):
    out1, _ = ds
    out2 = tmp_path / "seed"
    generate(small_cfg(out2, num_cells=1000, seed=8))
    a = pq.read_table(out1 / "data" / "train-00000-of-00003.parquet", columns=["expressions"])
    b = pq.read_table(out2 / "data" / "train-00000-of-00001.parquet", columns=["expressions"])
    assert not a.equals(b)


# ---------------------------------------------------------------------------------------------
# Biology against the ground truth
# ---------------------------------------------------------------------------------------------


def _lognorm(X: sp.csr_matrix) -> np.ndarray:
    lib = np.asarray(X.sum(1)).ravel()
    return np.log1p(X.toarray() / lib[:, None] * 1e4)


def test_ground_truth_contents(ds):
    out, _ = ds
    gt = load_ground_truth(out)
    C, D, Z, G = SMALL["num_cell_lines"], SMALL["num_drugs"], len(SMALL["doses"]), SMALL["num_genes"]
    K = C * D * Z
    assert (out / "ground_truth" / "README.md").is_file()
    assert gt["baseline_log_mean"].shape == (C, G)
    assert gt["effect_logfc"].shape == gt["effect_logit"].shape == (K, G)
    assert gt["programs"].shape == (SMALL["num_programs"], G)
    assert gt["plate_shift"].shape == (2, SMALL["num_programs"])
    n_wells = 2 * (SMALL["control_wells_per_plate"] + D * Z)
    assert gt["well_shift"].shape == (n_wells, SMALL["num_programs"])
    assert gt["sensitivity"].shape == (C, D)
    assert gt["truth"]["config"]["seed"] == SMALL["seed"]
    assert gt["truth"]["cell_lines"] == gt["conditions"]["cell_line_id"].unique().tolist()
    assert gt["gene_metadata"].shape[0] == G
    cond = gt["conditions"]
    assert len(cond) == K and list(cond["condition"]) == list(range(K))
    assert set(cond.columns) >= {"cell_line_id", "drug", "dose", "drugname_drugconc", "sensitivity"}
    # baseline: expected counts sum to the library size
    np.testing.assert_allclose(np.exp(gt["baseline_log_mean"].astype(np.float64)).sum(1),
                               SMALL.get("mean_library_size", 2500.0), rtol=1e-3)
    # some lines respond strongly, some not at all; larger doses give larger effects
    for d in range(D):
        s = gt["sensitivity"][:, d]
        assert s.max() >= 0.8 and s.min() == 0.0
    for _, g in cond.groupby(["cell_line_id", "drug"]):
        norms = g.sort_values("dose")["effect_norm"].to_numpy()
        if g["sensitivity"].iloc[0] > 0:
            assert np.all(np.diff(norms) > 0)
        else:
            assert np.all(norms == 0)


def test_replicate_plates_differ_beyond_sampling_noise(ds, cells):
    """The same (line, drug, dose) on two plates differs more than two random halves of one plate."""
    out, _ = ds
    _, obs, X, _ = cells
    L = _lognorm(X)
    shift = load_ground_truth(out)["plate_shift_genes"]
    shift = shift[1] - shift[0]
    signal = np.abs(shift) >= np.quantile(np.abs(shift), 0.75)  # genes the hidden plate shift moves most
    rng = np.random.default_rng(0)
    ratios, ratios_signal, diffs = [], [], []
    for _, g in obs.groupby(["cell_line_id", "drugname_drugconc"]):
        a, b = (g.index[g["plate"] == p].to_numpy() for p in ("plate1", "plate2"))
        perm = rng.permutation(a)
        h1, h2 = perm[: len(a) // 2], perm[len(a) // 2:]
        # squared mean differences, scaled by (1/n1 + 1/n2) so both are ~ the per-gene variance under no effect
        between = (L[a].mean(0) - L[b].mean(0)) ** 2 / (1 / len(a) + 1 / len(b))
        within = (L[h1].mean(0) - L[h2].mean(0)) ** 2 / (1 / len(h1) + 1 / len(h2))
        ratios.append(between.sum() / within.sum())
        ratios_signal.append(between[signal].sum() / within[signal].sum())
        diffs.append(L[b].mean(0) - L[a].mean(0))
    ratios, ratios_signal = np.asarray(ratios), np.asarray(ratios_signal)
    # without plate effects each ratio is ~1 (an F-like variable): here nearly all exceed 1, by a lot where the
    # truth says the plates differ, and the plate difference follows the true hidden shift
    assert np.mean(ratios > 1.0) >= 0.85
    assert np.median(ratios) > 1.2
    assert np.median(ratios_signal) > 1.8
    assert np.corrcoef(np.mean(diffs, axis=0), shift)[0, 1] > 0.5


def _pseudobulk_lfc(X: sp.csr_matrix, treated: np.ndarray, control: np.ndarray) -> np.ndarray:
    lib = np.asarray(X.sum(1)).ravel()
    Xn = sp.diags(1.0 / lib) @ X
    mt = np.asarray(Xn[treated].mean(0)).ravel()
    mc = np.asarray(Xn[control].mean(0)).ravel()
    eps = 1e-5
    return np.log(mt + eps) - np.log(mc + eps)


def test_drug_effect_matches_truth_and_differs_by_line(ds, cells):
    out, _ = ds
    _, obs, X, _ = cells
    gt = load_ground_truth(out)
    cond = gt["conditions"]
    top_dose = max(SMALL["doses"])
    strong = cond[(cond["dose"] == top_dose) & (cond["sensitivity_class"] == "strong")]
    best = strong.sort_values("effect_norm").iloc[-1]
    drug = best["drug"]
    # a non-responding line to the same drug
    none = cond[(cond["drug"] == drug) & (cond["dose"] == top_dose) & (cond["sensitivity"] == 0)].iloc[0]

    def data_lfc(line):
        is_line = obs["cell_line_id"] == line
        treated = np.flatnonzero(is_line & (obs["drug"] == drug) & (obs["dose"] == top_dose))
        control = np.flatnonzero(is_line & (obs["drug"] == schema.TAHOE_CONTROL_DRUG))
        assert len(treated) > 50 and len(control) > 100
        return _pseudobulk_lfc(X, treated, control)

    truth_strong = gt["effect_logfc"][int(best["condition"])]
    lfc_strong = data_lfc(best["cell_line_id"])
    lfc_none = data_lfc(none["cell_line_id"])
    r_strong = np.corrcoef(lfc_strong, truth_strong)[0, 1]
    r_none = np.corrcoef(lfc_none, truth_strong)[0, 1]
    assert r_strong > 0.5
    assert r_none < r_strong - 0.3
    assert np.abs(gt["effect_logfc"][int(none["condition"])]).max() == 0.0
    # the truth is calibrated: the data effect projects onto it with slope ~1 for the responder, ~0 otherwise
    slope_strong = lfc_strong @ truth_strong / (truth_strong @ truth_strong)
    slope_none = lfc_none @ truth_strong / (truth_strong @ truth_strong)
    assert 0.6 < slope_strong < 1.4
    assert abs(slope_none) < 0.35
    # the lowest dose has a smaller effect than the highest
    low = cond[(cond["cell_line_id"] == best["cell_line_id"]) & (cond["drug"] == drug)].sort_values("dose")
    assert low["effect_norm"].iloc[0] < best["effect_norm"]


def test_controls_have_no_drug_effect_but_plate_shift(ds, cells):
    out, _ = ds
    _, obs, X, _ = cells
    gt = load_ground_truth(out)
    line = gt["truth"]["cell_lines"][0]
    ctrl = obs[(obs["cell_line_id"] == line) & (obs["drug"] == schema.TAHOE_CONTROL_DRUG)]
    a = ctrl.index[ctrl["plate"] == "plate1"].to_numpy()
    b = ctrl.index[ctrl["plate"] == "plate2"].to_numpy()
    lfc = _pseudobulk_lfc(X, b, a)
    shift = gt["plate_shift_genes"][1] - gt["plate_shift_genes"][0]
    assert np.corrcoef(lfc, shift)[0, 1] > 0.2


# ---------------------------------------------------------------------------------------------
# h5ad
# ---------------------------------------------------------------------------------------------


def test_write_h5ad_matches_parquet(ds, cells, tmp_path):
    import anndata as ad
    import h5py

    out, _ = ds
    table, obs, X, gm = cells
    path = write_h5ad(out, tmp_path / "x.h5ad", chunk_cells=300)  # several batches per file
    assert path == tmp_path / "x.h5ad" and path.is_file()
    assert not list(tmp_path.glob("*.partial"))
    with h5py.File(path, "r") as h5:
        assert h5["X"].attrs["encoding-type"] == "csr_matrix"
        assert list(h5["X"].attrs["shape"]) == [3000, 300]
        assert h5["X/data"].dtype == np.float32
    a = ad.read_h5ad(path)
    assert a.shape == (3000, 300)
    assert sp.issparse(a.X) and a.X.dtype == np.float32
    A = sp.csr_matrix(a.X)
    assert A.has_sorted_indices
    assert (A != X).nnz == 0 and A.nnz == X.nnz
    assert list(a.obs_names) == obs["BARCODE_SUB_LIB_ID"].tolist()
    assert list(a.obs.columns) == ["drug", "drugname_drugconc", "cell_line", "plate", "sample", "dose"]
    for col, src in (("drug", "drug"), ("cell_line", "cell_line_id"), ("plate", "plate"), ("sample", "sample"),
                     ("drugname_drugconc", "drugname_drugconc")):
        assert isinstance(a.obs[col].dtype, pd.CategoricalDtype)
        assert a.obs[col].astype(str).tolist() == obs[src].tolist()
    np.testing.assert_array_equal(a.obs["dose"].to_numpy(), obs["dose"].to_numpy())
    assert list(a.var_names) == gm["gene_symbol"].tolist()
    assert a.var["ensembl_id"].tolist() == gm["ensembl_id"].tolist()
    np.testing.assert_array_equal(a.var["token_id"].to_numpy(), gm["token_id"].to_numpy())

    b = ad.read_h5ad(path, backed="r")
    try:
        assert b.shape == (3000, 300)
        rows = np.arange(100, 140)
        np.testing.assert_array_equal(sp.csr_matrix(b.X[100:140]).toarray(), X[rows].toarray())
        assert list(b.obs_names[:5]) == obs["BARCODE_SUB_LIB_ID"].tolist()[:5]
    finally:
        b.file.close()


def test_generate_writes_h5ad_when_asked(tmp_path):
    import anndata as ad

    out = tmp_path / "with_h5ad"
    s = generate(small_cfg(out, num_cells=600, cells_per_file=250, write_h5ad=True))
    h5 = Path(s["paths"]["h5ad"])
    assert h5 == out / "synthetic.h5ad" and h5.is_file()
    a = ad.read_h5ad(h5)
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in (out / "data").glob("*.parquet"))
    assert a.n_obs == n == 600
    assert json.loads((out / "ground_truth" / "truth.json").read_text())["num_cells"] == 600
    # a complete rerun keeps the h5ad; regenerating a file rewrites it
    mtime = h5.stat().st_mtime_ns
    assert generate(small_cfg(out, num_cells=600, cells_per_file=250, write_h5ad=True))["num_written"] == 0
    assert h5.stat().st_mtime_ns == mtime
    (out / "data" / "train-00001-of-00003.parquet").unlink()
    generate(small_cfg(out, num_cells=600, cells_per_file=250, write_h5ad=True))
    assert h5.stat().st_mtime_ns != mtime and ad.read_h5ad(h5).n_obs == 600


def test_bad_config_rejected(tmp_path):
    with pytest.raises(ValueError):
        generate(SynthConfig(out_dir=None))
    with pytest.raises(ValueError):
        generate(small_cfg(tmp_path / "bad", doses=[0.0, 1.0]))
