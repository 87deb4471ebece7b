"""Tiny hand-built sources for the data-layer tests, and helpers to read / compare stores.

Nothing here depends on ``data_sharding/synthetic/``: the fixtures are written directly with
pyarrow and anndata from a dense matrix the builder returns, so every test knows the exact source.

Tahoe fixture layout (``build_tahoe``)::

    root/data/train-0000i-of-0000k.parquet   the 10 Tahoe columns, cells shuffled (not by group),
                                              several row groups per file, marker entry first
    root/metadata/gene_metadata.parquet       token_id / ensembl_id / gene_symbol; token ids are
                                              random (not index + 3), rows not in token order
    root/metadata/sample_metadata.parquet     sample / plate / drug / drugname_drugconc
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.sparse as sp

from perturbdiff.config import DataConfig, HVGConfig, PanelConfig, ShardConfig
from perturbdiff.data import schema

REPO = Path(__file__).resolve().parents[1]

CELL_LINES = ("CVCL_0480", "CVCL_1056", "CVCL_0023")
PLATES = ("plate1", "plate2")
# (drug, dose); the control is DMSO_TF at dose 0.0
TREATMENTS = (("DMSO_TF", 0.0), ("Dinaciclib", 0.5), ("Dinaciclib", 5.0), ("Belinostat", 0.05))
MOA = {"DMSO_TF": "vehicle", "Dinaciclib": "CDK inhibitor", "Belinostat": "HDAC inhibitor"}
SMILES = {"DMSO_TF": "CS(C)=O", "Dinaciclib": "CCC1=C2N=C(C=C(N2N=C1)NCC3=C[N+](=CC=C3)[O-])N4CCCCC4CCO",
          "Belinostat": "C1=CC=C(C=C1)NS(=O)(=O)C2=CC=CC(=C2)C=CC(=O)NO"}
PUBCHEM = {"DMSO_TF": "679", "Dinaciclib": "46926350", "Belinostat": "6918638"}


# ---------------------------------------------------------------------------------------------
# Counts
# ---------------------------------------------------------------------------------------------


def make_counts(rng: np.random.Generator, n_cells: int, n_genes: int, *, planted: tuple[int, ...] = (),
                zero_genes: tuple[int, ...] = (), zero_cells: tuple[int, ...] = (),
                group_of_cell: np.ndarray | None = None) -> np.ndarray:
    """Integer counts [n_cells, n_genes]: Poisson-gamma with gene means spanning decades.

    ``planted`` genes get a strong on/off component (high variance for their mean); ``zero_genes``
    and ``zero_cells`` are all zero. A per-group multiplicative effect makes groups differ.
    """
    mu = np.exp(rng.normal(-0.5, 1.3, size=n_genes))
    size = rng.lognormal(0.0, 0.4, size=n_cells)
    lam = size[:, None] * mu[None, :] * rng.gamma(4.0, 0.25, size=(n_cells, n_genes))
    if group_of_cell is not None:
        n_groups = int(group_of_cell.max()) + 1
        effect = np.exp(rng.normal(0, 0.4, size=(n_groups, n_genes)))
        lam = lam * effect[group_of_cell]
    for k, g in enumerate(planted):  # rare bursts; on-levels 6, 12, 24 keep the means in the bulk
        on = rng.random(n_cells) < 0.1
        lam[:, g] = np.where(on, 6.0 * 2.0 ** (k % 3) * size, 0.02 * size)
    counts = rng.poisson(lam).astype(np.int64)
    counts[:, list(zero_genes)] = 0
    counts[list(zero_cells), :] = 0
    return counts


# ---------------------------------------------------------------------------------------------
# Tahoe parquet fixture
# ---------------------------------------------------------------------------------------------


@dataclass
class TahoeSource:
    root: Path  # has data/ and metadata/
    files: list[Path]  # data files in name order (the converter's order)
    counts: np.ndarray  # int64 [N, G]: rows in file order, columns in gene_metadata row order
    obs: pd.DataFrame  # per cell, same row order: cell_id, drug, dose, sample, cell_line_id, plate, ...
    token_ids: np.ndarray  # int64 [G], gene_metadata.token_id (the var order of the store)
    gene_ids: np.ndarray  # str [G], ensembl ids
    gene_symbols: np.ndarray  # str [G]
    planted: tuple[int, ...] = ()  # var positions of high-variance genes
    zero_genes: tuple[int, ...] = ()
    row_groups: list[int] = field(default_factory=list)  # row groups per file

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def meta_dir(self) -> Path:
        return self.root / "metadata"

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.counts))


def default_group_sizes(rng: np.random.Generator) -> dict[tuple[str, str, str, float], int]:
    """(cell_line, plate, drug, dose) -> cell count. Controls are large pools; one group is tiny."""
    sizes = {}
    for c in CELL_LINES:
        for p in PLATES:
            for drug, dose in TREATMENTS:
                sizes[(c, p, drug, dose)] = int(rng.integers(40, 70) if drug == "DMSO_TF" else rng.integers(8, 45))
    sizes[(CELL_LINES[1], PLATES[0], "Belinostat", 0.05)] = 3  # smaller than any set size used
    return sizes


def build_tahoe(root: Path, *, seed: int = 0, n_genes: int = 150, n_files: int = 3, row_group_size: int = 37,
                group_sizes: dict | None = None, planted: tuple[int, ...] = (5, 17, 33),
                zero_genes: tuple[int, ...] = (8, 41), zero_cell: bool = True) -> TahoeSource:
    """Write a small Tahoe-format dataset under ``root`` and return what it contains."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "data").mkdir(parents=True, exist_ok=True)
    (root / "metadata").mkdir(parents=True, exist_ok=True)

    # gene vocabulary: random token ids >= 3 (0..2 are special tokens), NOT index + 3, rows shuffled
    token_ids = rng.choice(np.arange(3, 3 + 7 * n_genes), size=n_genes, replace=False).astype(np.int64)
    assert not np.all(np.diff(token_ids) > 0)
    gene_ids = np.array([f"ENSG{int(t) * 7919 % 10**11:011d}" for t in token_ids])
    gene_symbols = np.array([f"GENE{i}_{t}" for i, t in enumerate(token_ids)])
    pq.write_table(pa.table({
        "token_id": pa.array(token_ids, pa.int64()),
        "ensembl_id": pa.array(gene_ids.tolist(), pa.string()),
        "gene_symbol": pa.array(gene_symbols.tolist(), pa.string()),
    }), root / "metadata" / schema.GENE_METADATA_FILE)

    # samples: one well per (plate, treatment), numbered in a shuffled order
    wells = [(p, drug, dose) for p in PLATES for drug, dose in TREATMENTS]
    numbers = rng.permutation(len(wells)) + 1
    sample_of = {w: f"smp_{1000 + int(k):04d}" for w, k in zip(wells, numbers)}
    pq.write_table(pa.table({
        "sample": [sample_of[w] for w in wells],
        "plate": [w[0] for w in wells],
        "drug": [w[1] for w in wells],
        "drugname_drugconc": [schema.format_drugconc(w[1], w[2]) for w in wells],
        "mean_gene_count": rng.random(len(wells)).tolist(),  # an unrelated QC column, as in the release
    }), root / "metadata" / schema.SAMPLE_METADATA_FILE)

    sizes = group_sizes if group_sizes is not None else default_group_sizes(rng)
    recs = []
    for gi, ((c, p, drug, dose), k) in enumerate(sizes.items()):
        for _ in range(k):
            recs.append((gi, c, p, drug, float(dose)))
    order = rng.permutation(len(recs))  # cells NOT sorted by group
    recs = [recs[i] for i in order]
    n = len(recs)
    group_of_cell = np.array([r[0] for r in recs])
    obs = pd.DataFrame({
        "cell_id": [f"{i % 97:02d}_{i:05d}_{r[2][-1]}{'x' * (i % 3)}-lib_{1100 + i % 5}" for i, r in enumerate(recs)],
        "cell_line_id": [r[1] for r in recs],
        "plate": [r[2] for r in recs],
        "drug": [r[3] for r in recs],
        "dose": [r[4] for r in recs],
    })
    obs["sample"] = [sample_of[(p, d, z)] for p, d, z in zip(obs["plate"], obs["drug"], obs["dose"])]
    obs["perturbation"] = [schema.format_drugconc(d, z) for d, z in zip(obs["drug"], obs["dose"])]
    obs["is_control"] = obs["drug"] == schema.TAHOE_CONTROL_DRUG
    obs["moa-fine"] = obs["drug"].map(MOA)

    zero_cells = (int(rng.integers(0, n)),) if zero_cell else ()
    counts = make_counts(rng, n, n_genes, planted=planted, zero_genes=zero_genes, zero_cells=zero_cells,
                         group_of_cell=group_of_cell)

    # rows: marker first, then the nonzero genes by token; half the rows in a random gene order
    genes_col, expr_col = [], []
    for i in range(n):
        nz = np.flatnonzero(counts[i])
        tok = token_ids[nz]
        o = np.argsort(tok) if i % 2 == 0 else rng.permutation(len(nz))
        genes_col.append([schema.TAHOE_MARKER_TOKEN] + tok[o].tolist())
        expr_col.append([schema.TAHOE_MARKER_VALUE] + counts[i, nz][o].astype(np.float32).tolist())

    # unequal files, several row groups each
    cuts = np.sort(rng.choice(np.arange(row_group_size, n - row_group_size), size=n_files - 1, replace=False))
    bounds = [0, *cuts.tolist(), n]
    files, rgs = [], []
    for fi in range(n_files):
        a, b = bounds[fi], bounds[fi + 1]
        path = root / "data" / f"train-{fi:05d}-of-{n_files:05d}.parquet"
        write_tahoe_rows(path, genes_col[a:b], expr_col[a:b], obs.iloc[a:b], row_group_size)
        files.append(path)
        rgs.append(pq.ParquetFile(path).metadata.num_row_groups)
    return TahoeSource(root=root, files=files, counts=counts, obs=obs, token_ids=token_ids, gene_ids=gene_ids,
                       gene_symbols=gene_symbols, planted=tuple(planted), zero_genes=tuple(zero_genes),
                       row_groups=rgs)


def tahoe_table(genes: list, expressions: list, obs: pd.DataFrame) -> pa.Table:
    drugs = obs["drug"].tolist()
    return pa.table({
        "genes": pa.array(genes, pa.list_(pa.int64())),
        "expressions": pa.array(expressions, pa.list_(pa.float32())),
        "drug": pa.array(drugs, pa.string()),
        "sample": pa.array(obs["sample"].tolist(), pa.string()),
        "BARCODE_SUB_LIB_ID": pa.array(obs["cell_id"].tolist(), pa.string()),
        "cell_line_id": pa.array(obs["cell_line_id"].tolist(), pa.string()),
        "moa-fine": pa.array([MOA.get(d, "unknown") for d in drugs], pa.string()),
        "canonical_smiles": pa.array([SMILES.get(d, "C") for d in drugs], pa.string()),
        "pubchem_cid": pa.array([PUBCHEM.get(d, "0") for d in drugs], pa.string()),
        "plate": pa.array(obs["plate"].tolist(), pa.string()),
    })


def write_tahoe_rows(path: Path, genes: list, expressions: list, obs: pd.DataFrame, row_group_size: int) -> None:
    table = tahoe_table(genes, expressions, obs)
    assert tuple(table.column_names) == schema.TAHOE_COLUMNS
    pq.write_table(table, path, row_group_size=row_group_size)


# ---------------------------------------------------------------------------------------------
# h5ad fixture
# ---------------------------------------------------------------------------------------------


@dataclass
class H5adSource:
    path: Path
    X: np.ndarray  # dense values as written (counts or log-normalised), float64 view
    obs: pd.DataFrame  # index = cell ids
    var_names: np.ndarray
    counts: np.ndarray | None = None  # the counts behind X (log-normalised fixtures)


def h5ad_obs(rng: np.random.Generator, n_cells: int, *, contexts=("T_cell", "B_cell"), batches=("donor1", "donor2"),
             perts=("control", "IFNG", "IL2", "TNF"), control_share: float = 0.3) -> pd.DataFrame:
    ctx = rng.choice(list(contexts), size=n_cells)
    bat = rng.choice(list(batches), size=n_cells)
    others = [p for p in perts if p != "control"]
    pert = np.where(rng.random(n_cells) < control_share, "control", rng.choice(others, size=n_cells))
    obs = pd.DataFrame({
        "perturbation": pd.Categorical(pert),
        "cell_type": pd.Categorical(ctx),
        "donor": bat.astype(str),  # a plain string column, not categorical
        "n_counts_raw": rng.integers(100, 5000, size=n_cells).astype(np.int64),
    }, index=[f"cell-{i:05d}-{'AC'[i % 2]}" for i in range(n_cells)])
    return obs


def write_h5ad(path: Path, X, obs: pd.DataFrame, var_names, *, dense: bool = False, dtype=np.float32,
               var: pd.DataFrame | None = None) -> Path:
    import anndata as ad

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Xw = np.asarray(X).astype(dtype) if dense else sp.csr_matrix(np.asarray(X).astype(dtype))
    v = var if var is not None else pd.DataFrame(index=pd.Index([str(g) for g in var_names]))
    adata = ad.AnnData(X=Xw, obs=obs.copy(), var=v)
    adata.write_h5ad(path)
    return path


def build_h5ad(path: Path, *, seed: int = 1, n_cells: int = 400, n_genes: int = 50, kind: str = "counts",
               dense: bool = False, planted: tuple[int, ...] = (3, 11), obs_kw: dict | None = None) -> H5adSource:
    """An h5ad of counts (kind='counts') or log1p(normalize_total 1e4) values (kind='lognorm')."""
    rng = np.random.default_rng(seed)
    obs = h5ad_obs(rng, n_cells, **(obs_kw or {}))
    counts = make_counts(rng, n_cells, n_genes, planted=planted, zero_genes=(n_genes - 1,))
    var_names = np.array([f"G{i:03d}" for i in range(n_genes)])
    if kind == "counts":
        X = counts.astype(np.float64)
    elif kind == "lognorm":
        X = lognorm(counts).astype(np.float32).astype(np.float64)  # exactly representable in float32
    else:
        raise ValueError(kind)
    write_h5ad(path, X, obs, var_names, dense=dense)
    return H5adSource(path=Path(path), X=X, obs=obs, var_names=var_names, counts=counts)


# ---------------------------------------------------------------------------------------------
# A learnable store for the training tests
# ---------------------------------------------------------------------------------------------


PERTS = ("control", "IFNG", "IL2", "TNF")


def build_train_store(root: Path, name: str = "train", genes: int = 32, cells: int = 900, seed: int = 0,
                      dataset: str = "ds", first_gene: int = 0) -> Path:
    """An h5ad with strong per-(context, perturbation) effects, converted to a store (genes named
    G<first_gene> ... G<first_gene + genes - 1>)."""
    from data_sharding.convert import convert

    rng = np.random.default_rng(seed)
    obs = h5ad_obs(rng, cells, perts=PERTS, control_share=0.4)
    group = (obs["cell_type"].cat.codes.to_numpy() * len(PERTS)
             + obs["perturbation"].astype(str).map({p: i for i, p in enumerate(PERTS)}).to_numpy())
    counts = make_counts(rng, cells, genes, group_of_cell=group)
    names = [f"G{i:03d}" for i in range(first_gene, first_gene + genes)]
    src = write_h5ad(root / f"{name}.h5ad", counts.astype(np.float64), obs, names)
    out = root / f"{name}.zarr"
    convert(h5ad_cfg(src, out, dataset=dataset, hvg=HVGConfig(num_top_genes=genes)), log=quiet)
    return out



def lognorm(counts: np.ndarray, target_sum: float = 1e4) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    tot = c.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(c * target_sum, tot, out=np.zeros_like(c), where=tot > 0))


# ---------------------------------------------------------------------------------------------
# Hand-made conditions tables (sampler / split unit tests without a store)
# ---------------------------------------------------------------------------------------------


def make_conditions(contexts, batches, perts, control="control", seed=0, skip=(), control_n=None,
                    sizes=None) -> pd.DataFrame:
    """A conditions table like a store's: each (context, batch) has ``control`` and every perturbation.

    ``skip``: (context, batch, perturbation) keys left out; ``control_n``: fixed control group size;
    ``sizes``: {key: n} overrides; other sizes are random in [1, 30).
    """
    import itertools

    rng = np.random.default_rng(seed)
    rows, start = [], 0
    for c, b in itertools.product(contexts, batches):
        for p in sorted([control, *perts]):
            if (c, b, p) in skip:
                continue
            n = int(rng.integers(1, 30))
            if p == control and control_n is not None:
                n = control_n
            n = (sizes or {}).get((c, b, p), n)
            rows.append(dict(context=c, batch=b, perturbation=p, is_control=p == control, start=start,
                             stop=start + n, n=n))
            start += n
    df = pd.DataFrame(rows)
    df.insert(0, "group_id", np.arange(len(df)))
    return df


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def shard_cfg(inputs, out: Path, **kw) -> ShardConfig:
    """Small layout settings so a few hundred cells make many parts, blocks, chunks and shards."""
    base: dict[str, Any] = dict(
        source="tahoe", inputs=[str(p) for p in (inputs if isinstance(inputs, (list, tuple)) else [inputs])],
        out=str(out), dataset="test", cells_per_part=64, num_workers=1, chunk_nnz=512, shard_nnz=2048,
        chunk_cells=128, block_cells=100, hvg=HVGConfig(num_top_genes=20),
    )
    base.update(kw)
    return ShardConfig(**base)


def h5ad_cfg(inputs, out: Path, **kw) -> ShardConfig:
    base = dict(source="h5ad", perturbation_col="perturbation", context_col="cell_type", batch_col="donor",
                control_label="control", extra_obs=["n_counts_raw"])
    base.update(kw)
    return shard_cfg(inputs, out, **base)


def data_cfg(store: Path, **kw) -> DataConfig:
    base: dict[str, Any] = dict(store=str(store), set_size=8, sets_per_batch=3, panel=PanelConfig(kind="all"),
                                num_workers=0, drop_last=False, seed=0)
    base.update(kw)
    return DataConfig(**base)


def quiet(*_args, **_kw) -> None:
    pass


class LogCapture:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, msg: str) -> None:
        self.lines.append(str(msg))

    def text(self) -> str:
        return "\n".join(self.lines)


# ---------------------------------------------------------------------------------------------
# Reading and comparing stores
# ---------------------------------------------------------------------------------------------


def store_csr(path: Path) -> tuple[sp.csr_matrix, np.ndarray]:
    """The whole store as a scipy CSR [N, G] (float64) and its cell ids, read with zarr-python only
    (independent of the reader under test)."""
    import zarr

    from perturbdiff.data.store import as_numpy

    root = zarr.open_group(str(path), mode="r")
    ip = np.asarray(root["X/indptr"][:])
    ix = np.asarray(root["X/indices"][:])
    dt = np.asarray(root["X/data"][:])
    m = manifest(path)
    assert ip.dtype == np.int64 and ix.dtype == np.int32 and dt.dtype == np.float32
    X = sp.csr_matrix((dt.astype(np.float64), ix, ip), shape=(m["num_cells"], m["num_genes"]))
    return X, as_numpy(root["obs/cell_id"][:]).astype(str)


def source_in_store_order(store_cells: np.ndarray, source_ids, source_matrix: np.ndarray) -> np.ndarray:
    """Rows of ``source_matrix`` (indexed by ``source_ids``) reordered to the store's cell order."""
    pos = pd.Index(np.asarray(source_ids).astype(str)).get_indexer(np.asarray(store_cells).astype(str))
    assert (pos >= 0).all(), "store has cell ids the source does not"
    return np.asarray(source_matrix)[pos]


def gene_positions(store: Path, gene_ids) -> np.ndarray:
    """Store var position of each given gene id (the store may order its vocabulary its own way)."""
    import zarr

    from perturbdiff.data.store import as_numpy

    ids = as_numpy(zarr.open_group(str(store), mode="r")["var/gene_id"][:]).astype(str)
    pos = pd.Index(ids).get_indexer(np.asarray(gene_ids).astype(str))
    assert (pos >= 0).all(), "genes missing from the store vocabulary"
    assert len(np.unique(pos)) == len(pos)
    return pos


def tahoe_in_store_order(src: "TahoeSource", store: Path) -> np.ndarray:
    """The source counts with rows in the store's cell order and columns in its gene order."""
    _, cell_ids = store_csr(store)
    rows = source_in_store_order(cell_ids, src.obs["cell_id"], src.counts)
    pos = gene_positions(store, src.gene_ids)
    out = np.zeros_like(rows)
    out[:, pos] = rows
    return out


def zarr_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store, by path, as numpy."""
    import zarr

    from perturbdiff.data.store import as_numpy

    import warnings

    root = zarr.open_group(str(path), mode="r")
    out = {}

    def walk(group, prefix):
        for name, arr in group.arrays():
            out[f"{prefix}{name}"] = as_numpy(arr[:])
        for name, sub in group.groups():
            walk(sub, f"{prefix}{name}/")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zarr notes the non-zarr files (manifest, conditions)
        walk(root, "")
    return out


def manifest(path: Path) -> dict:
    return json.loads((Path(path) / schema.MANIFEST_FILE).read_text())


def assert_stores_identical(a: Path, b: Path) -> None:
    """Same arrays (values and dtypes), same conditions table, same manifest checksums and HVG."""
    xa, xb = zarr_arrays(a), zarr_arrays(b)
    assert sorted(xa) == sorted(xb)
    for k in xa:
        assert xa[k].dtype == xb[k].dtype, k
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)
    ca = pd.read_parquet(Path(a) / schema.CONDITIONS_FILE)
    cb = pd.read_parquet(Path(b) / schema.CONDITIONS_FILE)
    pd.testing.assert_frame_equal(ca, cb)
    ma, mb = manifest(a), manifest(b)
    for key in ("num_cells", "num_genes", "nnz", "num_groups", "hvg", "value_kind", "sources"):
        assert ma[key] == mb[key], key
    differ = sorted(k for k in set(ma["arrays"]) | set(mb["arrays"]) if ma["arrays"].get(k) != mb["arrays"].get(k))
    assert not differ, f"manifest 'arrays' checksums differ for {differ} although the arrays are equal"


# ---------------------------------------------------------------------------------------------
# Subprocess conversion (kill / fault tests)
# ---------------------------------------------------------------------------------------------


def cfg_to_json(cfg: ShardConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg))


def convert_script(cfg: ShardConfig, slow_parts: float = 0.0) -> str:
    """Python source that runs ``convert(cfg)``; ``slow_parts`` sleeps after each part's files are written
    (before the part is renamed into place), so a test can kill the run between parts."""
    return f"""
import json, time
from perturbdiff.config import HVGConfig, ShardConfig
import data_sharding.parts as parts
from data_sharding.convert import convert
d = json.loads({cfg_to_json(cfg)!r})
d["hvg"] = HVGConfig(**d["hvg"])
cfg = ShardConfig(**d)
delay = {slow_parts!r}
if delay and hasattr(parts, "_fsync_dir"):
    # sleep after a part's files are written, before it is renamed into place
    orig = parts._fsync_dir
    def slow(path):
        orig(path)
        time.sleep(delay)
    parts._fsync_dir = slow
elif delay:
    import data_sharding.convert as conv
    orig_write = conv.write_part
    def slow_write(*a, **k):
        res = orig_write(*a, **k)
        time.sleep(delay)
        return res
    conv.write_part = slow_write
convert(cfg, log=lambda m: None)
"""


def popen_convert(cfg: ShardConfig, slow_parts: float = 0.0, env: dict | None = None) -> subprocess.Popen:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-c", convert_script(cfg, slow_parts)], cwd=str(REPO), env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_convert(cfg: ShardConfig, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", convert_script(cfg)], cwd=str(REPO), env=e, capture_output=True,
                          timeout=timeout)


def random_foundation(store: Path, out: Path, split, set_size: int = 8, noise: float = 0.05, seed: int = 0) -> Path:
    """A foundation for ``store`` whose weights are the initialisation plus Gaussian noise, so that
    (unlike an untrained adaLN-Zero model, whose output is 0) predictions depend on every input."""
    import dataclasses

    import torch

    from perturbdiff.config import DiffusionConfig, ModelConfig, NormalizeConfig
    from perturbdiff.data.loader import SetLoader
    from perturbdiff.models import build_model
    from perturbdiff.foundation import save_foundation

    loader = SetLoader(data_cfg(store, split=split), "train", log=lambda *a: None)
    vocabs = loader.vocabularies
    cfg = ModelConfig(size="tiny")
    torch.manual_seed(seed)
    model = build_model(cfg, len(loader.gene_ids), {k: len(v) for k, v in vocabs.items()})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    extra = {"set_size": set_size, "normalize": dataclasses.asdict(NormalizeConfig()),
             "diffusion": dataclasses.asdict(DiffusionConfig(kme_impl="torch", steps=50)),
             "numeric_in_data": sorted(loader.group_numeric),
             "control_perturbations": loader.control_perturbations, "control_numeric": loader.control_numeric}
    save_foundation(out, model.state_dict(), model_cfg=cfg, genes=list(loader.gene_ids), vocabularies=vocabs,
                    extra=extra)
    return out


def fresh_seed() -> int:
    """A new random seed every run for the property tests, printed (pytest shows it beside a failure);
    KME_TEST_SEED=N in the environment replays that run's inputs."""
    seed = int(os.environ.get("KME_TEST_SEED") or np.random.default_rng().integers(1 << 30))
    print(f"random inputs from seed {seed} (replay: KME_TEST_SEED={seed})")
    return seed
