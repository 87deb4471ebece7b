"""Integrity on read: a damaged store stops streaming / training with one DataError naming the array
(or file) and the row, instead of running to the end.

Each test first damages a copy of a store the way a disk or a user would (bytes of a chunk file
rewritten in place, a file truncated, a table rewritten), then checks what notices: the open-time
structural checks, the per-read checks of CellStore.read_csr, the chunk readers, or only the full
checksum pass (``data.verify_on_open`` / ``perturbdiff verify``). See perturbdiff/data/integrity.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import google_crc32c
import numpy as np
import pandas as pd
import pytest
import zarr
from numcodecs import blosc

from helpers import LogCapture, data_cfg, quiet, shard_cfg

from data_sharding.convert import convert
from perturbdiff.data import integrity, schema
from perturbdiff.data.chunks import ZarrRanges
from perturbdiff.data.loader import SetLoader
from perturbdiff.data.multi import MultiSetLoader
from perturbdiff.data.schema import DataError
from perturbdiff.data.store import CellStore

# ---------------------------------------------------------------------------------------------
# Damage, done on the files (independently of the readers under test)
# ---------------------------------------------------------------------------------------------


def copy_store(store: Path, tmp_path: Path, name: str = "damaged.zarr") -> Path:
    out = tmp_path / name
    shutil.copytree(store, out)
    return out


def _meta(store: Path, array: str) -> dict:
    return json.loads((store / array / "zarr.json").read_text())


def element_location(store: Path, array: str, element: int) -> tuple[Path, int, np.dtype]:
    """(file, byte offset, dtype) of one element of an uncompressed 1-D array, sharded or not."""
    meta = _meta(store, array)
    dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    outer = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
    codec = meta["codecs"][0]
    if codec["name"] == "sharding_indexed":
        conf = codec["configuration"]
        assert [c["name"] for c in conf["codecs"]] == ["bytes"], "only uncompressed chunks can be poked"
        assert conf.get("index_location", "end") == "end"
        inner, per = int(conf["chunk_shape"][0]), outer // int(conf["chunk_shape"][0])
        shard, rest = divmod(element, outer)
        k, within = divmod(rest, inner)
        path = store / array / "c" / str(shard)
        raw = path.read_bytes()
        tail = 4 if any(c["name"] == "crc32c" for c in conf["index_codecs"]) else 0
        index = np.frombuffer(raw[len(raw) - 16 * per - tail:len(raw) - tail], dtype="<u8").reshape(-1, 2)
        return path, int(index[k, 0]) + within * dtype.itemsize, dtype
    assert [c["name"] for c in meta["codecs"]] == ["bytes"], "only uncompressed chunks can be poked"
    k, within = divmod(element, outer)
    return store / array / "c" / str(k), within * dtype.itemsize, dtype


def poke(store: Path, array: str, element: int, value) -> Path:
    """Overwrite one element of an uncompressed array in its chunk file; returns the file."""
    path, offset, dtype = element_location(store, array, element)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype=dtype).tobytes())
    return path


def peek(store: Path, array: str, element: int):
    path, offset, dtype = element_location(store, array, element)
    with open(path, "rb") as f:
        f.seek(offset)
        return np.frombuffer(f.read(dtype.itemsize), dtype=dtype)[0]


def indptr(store: Path) -> np.ndarray:
    return np.asarray(zarr.open_group(str(store), mode="r")["X/indptr"][:])


def streamed_row(store: Path, **cfg) -> int:
    """A non-empty row the first training batch of data_cfg(store, **cfg) reads (sampling is seeded)."""
    batch = next(iter(SetLoader(data_cfg(store, **cfg), log=quiet)))
    ip = indptr(store)
    rows = batch["rows"].numpy().ravel()
    rows = rows[(rows >= 0) & (ip[np.maximum(rows, 0) + 1] > ip[np.maximum(rows, 0)])]
    return int(rows[0])


def stream_all(store: Path, **cfg) -> int:
    """Iterate every training batch; returns the number of batches."""
    return sum(1 for _ in SetLoader(data_cfg(store, **cfg), log=quiet))


@pytest.fixture(scope="module")
def lz4_store(tahoe_src, tmp_path_factory) -> Path:
    """The shared Tahoe source converted like tahoe_store but with blosc-lz4 chunks."""
    out = tmp_path_factory.mktemp("lz4_store") / "store.zarr"
    convert(shard_cfg(tahoe_src.root, out, compressor="lz4"), log=quiet)
    return out


# ---------------------------------------------------------------------------------------------
# (a) (b) damaged values and gene indices: caught at read, naming the array and the row
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-3.0, float("nan"), float("inf")])
def test_bad_value_stops_streaming_naming_x_data_and_row(tahoe_store, tmp_path, value):
    store = copy_store(tahoe_store, tmp_path)
    row = streamed_row(store)
    element = int(indptr(store)[row])
    poke(store, "X/data", element, value)
    CellStore(store)  # the open-time checks do not read values
    with pytest.raises(DataError) as err:
        stream_all(store)
    msg = str(err.value)
    assert err.value.path == str(store) and f"X/data[{element}]" in msg and f"row {row}" in msg, msg
    assert "\n" not in msg
    with pytest.raises(DataError, match=rf"X/data\[{element}\].*row {row}"):
        st = CellStore(store)
        st.read_csr(np.arange(st.num_cells))


@pytest.mark.parametrize("bad_gene", ["num_genes", -1])
def test_gene_index_out_of_range_names_x_indices_and_row(tahoe_store, tmp_path, bad_gene):
    store = copy_store(tahoe_store, tmp_path)
    row = streamed_row(store)
    element = int(indptr(store)[row]) + 1
    value = CellStore(store).num_genes if bad_gene == "num_genes" else bad_gene
    poke(store, "X/indices", element, value)
    with pytest.raises(DataError) as err:
        stream_all(store)
    msg = str(err.value)
    assert f"X/indices[{element}] = {value}" in msg and f"row {row}" in msg and str(store) in msg, msg


# ---------------------------------------------------------------------------------------------
# (c) broken row pointers
# ---------------------------------------------------------------------------------------------


def test_last_row_pointer_not_nnz_fails_at_open(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path)
    n, nnz = CellStore(store).num_cells, CellStore(store).manifest.nnz
    poke(store, "X/indptr", n, nnz - 1)
    with pytest.raises(DataError, match=rf"X/indptr\[{n}\] = {nnz - 1} but the manifest says nnz = {nnz}"):
        CellStore(store)


def test_group_start_pointer_out_of_order_fails_at_open(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path)
    cond = CellStore(store).conditions
    before, start = (int(v) for v in cond["start"].iloc[len(cond) // 2 - 1:len(cond) // 2 + 1])
    ip = indptr(store)
    poke(store, "X/indptr", start, int(ip[-1]) + 10)  # beyond nnz
    with pytest.raises(DataError, match=rf"X/indptr\[{start}\] = {int(ip[-1]) + 10} is outside"):
        CellStore(store)
    poke(store, "X/indptr", start, int(ip[before]) - 1)  # in range, but below the previous group start
    with pytest.raises(DataError, match="X/indptr decreases between group starts"):
        CellStore(store)


def test_decreasing_row_pointer_inside_a_group_fails_at_read(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path)
    cond = CellStore(store).conditions
    g = cond.iloc[int(np.argmax(cond["n"].to_numpy()))]
    row = int(g["start"]) + 2  # not a group start: the open-time check does not see it
    ip = indptr(store)
    poke(store, "X/indptr", row, int(ip[row - 1]) - 1)
    st = CellStore(store)
    with pytest.raises(DataError, match=rf"X/indptr decreases at row {row - 1}"):
        st.read_csr(np.arange(int(g["start"]), int(g["stop"])))
    with pytest.raises(DataError, match="X/indptr"):
        integrity.verify(store, log=quiet)


# ---------------------------------------------------------------------------------------------
# (d) a valid-looking change: only the checksum pass notices
# ---------------------------------------------------------------------------------------------


def test_changed_count_needs_the_checksum_pass(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path)
    row = streamed_row(store)
    element = int(indptr(store)[row])
    poke(store, "X/data", element, float(peek(store, "X/data", element)) + 1.0)
    # another valid count: every cheap check passes, by design (this is what the checksum pass is for)
    assert stream_all(store) > 0
    st = CellStore(store)
    st.read_csr(np.arange(st.num_cells))
    log = LogCapture()
    with pytest.raises(DataError, match="X/data checksum mismatch") as err:
        SetLoader(data_cfg(store, verify_on_open=True), log=log)
    assert err.value.path == str(store)
    assert "full checksum pass" in log.text()
    with pytest.raises(DataError, match="X/data checksum mismatch"):  # the multi-store loader too
        MultiSetLoader(data_cfg(None, verify_on_open=True), [str(store)], log=quiet)


def test_verify_on_open_runs_once_in_the_main_process(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path, "clean.zarr")
    log = LogCapture()
    loader = SetLoader(data_cfg(store, verify_on_open=True, num_workers=2), log=log)
    SetLoader(data_cfg(store, verify_on_open=True), log=log)  # a second loader over the same store
    assert sum("full checksum pass" in line for line in log.lines) == 1
    assert any(f"{store} ok" in line for line in log.lines)
    assert sum(1 for _ in loader) == len(loader)
    plain = LogCapture()
    SetLoader(data_cfg(copy_store(tahoe_store, tmp_path, "other.zarr")), log=plain)
    assert "checksum" not in plain.text()  # off by default


# ---------------------------------------------------------------------------------------------
# (e) truncated, empty and undecodable chunk files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ["none", "lz4"])
@pytest.mark.parametrize("array", ["X/indices", "X/data", "X/indptr"])
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_truncated_chunk_file_is_a_data_error_naming_the_file(tahoe_store, lz4_store, tmp_path, compressor,
                                                              array, damage):
    store = copy_store(tahoe_store if compressor == "none" else lz4_store, tmp_path)
    files = sorted((store / array / "c").iterdir(), key=lambda p: int(p.name))
    victim = files[len(files) // 2]
    raw = victim.read_bytes()
    victim.write_bytes(raw[:len(raw) // 2] if damage == "truncated" else b"")

    def read_everything():
        st = CellStore(store)
        st.read_csr(np.arange(st.num_cells))

    with pytest.raises(DataError) as err:  # not OSError / ValueError / a codec traceback
        read_everything()
    assert err.value.path == str(victim), str(err.value)
    reader = ZarrRanges(zarr.open_group(str(store), mode="r")[array], store / array)
    with pytest.raises(DataError) as err:  # the zarr-python fallback names the file too
        reader.take(np.array([0]), np.array([reader.array.shape[0]]))
    assert err.value.path == str(victim), str(err.value)
    with pytest.raises(DataError) as err:  # and so does the full pass
        integrity.verify(store, log=quiet)
    assert err.value.path == str(victim), str(err.value)


def test_garbled_lz4_chunk_is_a_data_error(lz4_store, tmp_path):
    store = copy_store(lz4_store, tmp_path)
    victim = store / "X" / "data" / "c" / "2"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 3:len(raw) // 3 + 64] = bytes(64)  # zeroed bytes inside a compressed chunk
    victim.write_bytes(bytes(raw))
    st = CellStore(store)
    with pytest.raises(DataError) as err:
        st.read_csr(np.arange(st.num_cells))
    assert err.value.path == str(victim) and "decode" in err.value.problem


def test_chunk_decoding_to_the_wrong_length(lz4_store, tmp_path):
    """A blosc chunk that decodes cleanly but to half a chunk (a file replaced by a shorter one)."""
    store = copy_store(lz4_store, tmp_path)
    victim = store / "X" / "indptr" / "c" / "1"
    chunk = int(_meta(store, "X/indptr")["chunk_grid"]["configuration"]["chunk_shape"][0])
    victim.write_bytes(blosc.compress(np.arange(chunk // 2, dtype="<i8"), b"lz4", 5, blosc.SHUFFLE))
    with pytest.raises(DataError) as err:
        st = CellStore(store)
        st.read_csr(np.arange(st.num_cells))
    assert err.value.path == str(victim) and "expected" in err.value.problem


def test_shard_index_pointing_beyond_the_file(tahoe_store, tmp_path):
    """A shard index with a valid crc32c whose entry points past the end of the file."""
    store = copy_store(tahoe_store, tmp_path)
    conf = _meta(store, "X/indices")["codecs"][0]["configuration"]
    per = int(_meta(store, "X/indices")["chunk_grid"]["configuration"]["chunk_shape"][0]) // conf["chunk_shape"][0]
    victim = store / "X" / "indices" / "c" / "1"
    raw = bytearray(victim.read_bytes())
    at = len(raw) - 16 * per - 4
    index = np.frombuffer(bytes(raw[at:at + 16 * per]), dtype="<u8").reshape(-1, 2).copy()
    index[1, 0] = len(raw) + 4096
    raw[at:at + 16 * per] = index.tobytes()
    raw[-4:] = google_crc32c.value(bytes(raw[at:at + 16 * per])).to_bytes(4, "little")
    victim.write_bytes(bytes(raw))
    st = CellStore(store)
    with pytest.raises(DataError, match="shard index entry 1") as err:
        st.read_csr(np.arange(st.num_cells))
    assert err.value.path == str(victim)


# ---------------------------------------------------------------------------------------------
# (f) shapes and dtypes, (g) the conditions table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("edit, expected", [
    ("zarr_shape", r"X/indices has shape \[\d+\], the manifest says"),
    ("manifest_shape", r"obs/dose has shape \[\d+\], the manifest says"),
    ("counts", r"X/indptr has \d+ elements, the manifest's counts give"),
    ("dtype", r"X/data has dtype float64, expected float32"),
    ("missing", r"array obs/n_genes is missing"),
])
def test_array_shape_or_dtype_differs_from_manifest(tahoe_store, tmp_path, edit, expected):
    store = copy_store(tahoe_store, tmp_path)
    man = json.loads((store / schema.MANIFEST_FILE).read_text())
    if edit == "zarr_shape":
        meta = _meta(store, "X/indices")
        meta["shape"] = [meta["shape"][0] - 1]
        (store / "X/indices/zarr.json").write_text(json.dumps(meta))
    elif edit == "manifest_shape":
        man["arrays"]["obs/dose"]["shape"] = [man["num_cells"] + 1]
    elif edit == "counts":  # manifest entry and array agree, the counts do not
        meta = _meta(store, "X/indptr")
        meta["shape"] = [man["num_cells"]]
        (store / "X/indptr/zarr.json").write_text(json.dumps(meta))
        man["arrays"]["X/indptr"]["shape"] = [man["num_cells"]]
    elif edit == "dtype":
        meta = _meta(store, "X/data")
        meta["data_type"] = "float64"
        (store / "X/data/zarr.json").write_text(json.dumps(meta))
    else:
        shutil.rmtree(store / "obs" / "n_genes")
    (store / schema.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DataError, match=expected) as err:
        CellStore(store)
    assert err.value.path == str(store)
    with pytest.raises(DataError, match=expected):
        integrity.verify(store, log=quiet)


def test_altered_conditions_table_fails_its_checksum(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path)
    cond = pd.read_parquet(store / schema.CONDITIONS_FILE)
    cond.loc[0, "perturbation"] = cond.loc[1, "perturbation"]
    cond.to_parquet(store / schema.CONDITIONS_FILE, index=False)
    with pytest.raises(DataError, match=f"{schema.CONDITIONS_FILE} checksum mismatch") as err:
        CellStore(store)
    assert err.value.path == str(store)
    (store / schema.CONDITIONS_FILE).write_bytes(b"PAR1 not parquet")  # garbage, checksum re-recorded
    man = json.loads((store / schema.MANIFEST_FILE).read_text())
    man["arrays"][schema.CONDITIONS_FILE]["sha256"] = schema.file_sha256(store / schema.CONDITIONS_FILE)
    (store / schema.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DataError, match="not readable parquet"):
        CellStore(store)


@pytest.mark.parametrize("edit, expected", [
    ("gap", r"group 3 starts at row \d+ but group 2 stops at row \d+"),
    ("n", r"group 0 has n = \d+ but stop - start = \d+"),
    ("first", r"the first group starts at row 1, not 0"),
    ("last", r"the last group stops at row \d+, the store has \d+ cells"),
])
def test_conditions_that_do_not_tile_the_cells(tahoe_store, tmp_path, edit, expected):
    """A table edited and its checksum re-recorded (a careless user): the tiling check still fails."""
    store = copy_store(tahoe_store, tmp_path)
    cond = pd.read_parquet(store / schema.CONDITIONS_FILE)
    if edit == "gap":
        cond.loc[3, "start"] += 1
        cond.loc[3, "n"] -= 1
    elif edit == "n":
        cond.loc[0, "n"] += 1
    elif edit == "first":
        cond.loc[0, "start"] = 1
        cond.loc[0, "n"] -= 1
    else:
        cond.loc[len(cond) - 1, "stop"] -= 1
        cond.loc[len(cond) - 1, "n"] -= 1
    cond.to_parquet(store / schema.CONDITIONS_FILE, index=False)
    man = json.loads((store / schema.MANIFEST_FILE).read_text())
    man["arrays"][schema.CONDITIONS_FILE]["sha256"] = schema.file_sha256(store / schema.CONDITIONS_FILE)
    (store / schema.MANIFEST_FILE).write_text(json.dumps(man))
    with pytest.raises(DataError, match=expected):
        CellStore(store)


def test_zarr_attribute_must_agree_with_the_manifest(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"][schema.STORE_ATTR] = 999
    (store / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="disagree on the schema version"):
        CellStore(store)


# ---------------------------------------------------------------------------------------------
# (h) errors from DataLoader workers, and the CLI
# ---------------------------------------------------------------------------------------------


def test_data_error_in_a_worker_arrives_as_the_same_data_error(tahoe_store, tmp_path):
    store = copy_store(tahoe_store, tmp_path)
    row = streamed_row(store)
    element = int(indptr(store)[row])
    poke(store, "X/data", element, -1.0)
    with pytest.raises(DataError) as err:
        stream_all(store, num_workers=2)
    assert type(err.value) is DataError and err.value.path == str(store)
    assert f"X/data[{element}] = -1.0 in row {row}" in err.value.problem
    assert "Caught" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError) as err:  # the multi-store loader's workers too
        for _ in MultiSetLoader(data_cfg(None, num_workers=2), [str(store)], log=quiet):
            pass
    assert err.value.path == str(store) and f"row {row}" in err.value.problem


def test_stream_command_on_a_damaged_store_exits_2_with_one_line(tahoe_store, tmp_path, capsys):
    from perturbdiff.cli import main

    store = copy_store(tahoe_store, tmp_path)
    args = ["stream", f"data.store={store}", f"out_dir={tmp_path / 'run'}", "data.panel.kind=all",
            "data.num_workers=0", "data.set_size=8", "data.sets_per_batch=2", "stream.num_batches=1000"]
    assert main(args) == 0
    capsys.readouterr()
    ip = indptr(store)
    for row in np.flatnonzero(np.diff(ip) > 0):  # every cell's first value: whichever set is read first
        poke(store, "X/data", int(ip[row]), float("nan"))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("perturbdiff stream: error:") and "X/data[" in err[0], err
