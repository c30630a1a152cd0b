"""A damaged store is never silently wrong: every kind of damage makes ``reconstruct`` and
``validate`` stop with exit 2 and one message naming the store, the array/chunk (or the
attrs) and what to do — never a result, never a crash.

Each case damages a copy of one small format-2 store the way a disk, a copy or a person
would; ``CASES`` maps the case to the text (or regex) its error must contain.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import zarr

from stemdask.cli import main
from stemdask.store import CorruptStoreError, create_store, open_store
from stemdask.testing import random_event_store


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """12×10 scan, 3 row blocks of 4 rows, one index chunk per block."""
    return random_event_store(tmp_path_factory.mktemp("clean") / "s.zarr", (12, 10), 16, 20, rows_per_block=4).path


def _flip(path, *, bit: bool):
    data = bytearray(path.read_bytes())
    i = len(data) // 2
    data[i] ^= 0x04 if bit else 0xFF
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) * 2 // 3])


def _swap(a, b):
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def _edit_attr(store, key, fn):
    meta = store / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"][key] = fn(doc["attributes"][key])
    meta.write_text(json.dumps(doc))


def _drop_crc32c(store, name):
    """Remove the crc32c codec from an array's metadata (its own and the consolidated copy)."""
    for meta, get in ((store / name / "zarr.json", lambda d: d),
                      (store / "zarr.json", lambda d: d["consolidated_metadata"]["metadata"][name])):
        doc = json.loads(meta.read_text())
        node = get(doc)
        node["codecs"] = [c for c in node["codecs"] if c["name"] != "crc32c"]
        meta.write_text(json.dumps(doc))


def _first_chunk(store, b: int) -> int:
    """The first ``indices`` chunk of row block ``b`` (its slot starts at ``b · cap``)."""
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    chunk = json.loads((store / "indices" / "zarr.json").read_text())["chunk_grid"]["configuration"]["chunk_shape"][0]
    return b * attrs["cap"] // chunk


def _idx(store, b: int):
    return store / f"indices/c/{_first_chunk(store, b)}"


#: damage(store), and the text its error must contain; {c0}, {c1}, {c2}: the first indices
#: chunk of row blocks 0, 1, 2.
CASES = {
    "indices byte flipped": (lambda s: _flip(_idx(s, 1), bit=False), "indices chunk indices/c/{c1} of row block 1"),
    "indices bit flipped": (lambda s: _flip(_idx(s, 1), bit=True), "indices chunk indices/c/{c1} of row block 1"),
    "counts byte flipped": (lambda s: _flip(s / "counts/c/2/0", bit=False), "counts chunk counts/c/2/0 of row block 2"),
    "counts bit flipped": (lambda s: _flip(s / "counts/c/2/0", bit=True), "counts chunk counts/c/2/0 of row block 2"),
    "block_crc bit flipped": (lambda s: _flip(s / "block_crc/c/0", bit=True), "block_crc chunk block_crc/c/0"),
    "indices chunk deleted": (lambda s: _idx(s, 1).unlink(),
                              "chunk indices/c/{c1} of row block 1 (rows 4..7) is missing"),
    "counts chunk deleted": (lambda s: (s / "counts/c/0/0").unlink(), "counts chunk counts/c/0/0 (row block 0"),
    "block_crc chunk deleted": (lambda s: (s / "block_crc/c/2").unlink(),
                                "chunk block_crc/c/2 (the record of row block 2"),
    "indices chunk truncated": (lambda s: _truncate(_idx(s, 0)), "indices chunk indices/c/{c0} of row block 0"),
    "counts chunk truncated": (lambda s: _truncate(s / "counts/c/1/0"), "counts chunk counts/c/1/0 of row block 1"),
    "indices chunks of two blocks swapped": (lambda s: _swap(_idx(s, 0), _idx(s, 2)),
                                             r"row block ([02]) \(rows .*\) fails its checksum: .*indices/c/"),
    "counts chunks of two blocks swapped": (lambda s: _swap(s / "counts/c/0/0", s / "counts/c/1/0"),
                                            r"row block ([01]) \(rows .*\) fails its checksum: .*counts/c/\1/0"),
    "scan_shape attr edited": (lambda s: _edit_attr(s, "scan_shape", lambda v: [v[0], v[1] - 1]), "layout attrs"),
    "detector_shape attr edited": (
        lambda s: _edit_attr(s, "detector_shape", lambda v: [v[0], v[1] + 4]),
        "layout attrs",
    ),
    "rows_per_block attr edited": (lambda s: _edit_attr(s, "rows_per_block", lambda v: v + 1), "layout attrs"),
    "cap attr edited": (lambda s: _edit_attr(s, "cap", lambda v: v // 2), "layout attrs"),
    "n_events attr edited": (lambda s: _edit_attr(s, "n_events", lambda v: v + 1), "layout attrs"),
    "index_dtype attr edited": (lambda s: _edit_attr(s, "index_dtype", lambda v: "uint32"), "layout attrs"),
    "crc32c codec removed from indices": (lambda s: _drop_crc32c(s, "indices"),
                                          "array indices has lost its crc32c codec"),
}


def _expect_clear_error(capsys, argv, expected: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err or re.search(expected, err), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_a_clear_error_for_reconstruct_and_validate(case, clean, tmp_path, capsys):
    damage, expected = CASES[case]
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    damage(store)
    expected = expected.replace("{c0}", str(_first_chunk(store, 0))).replace("{c1}", str(_first_chunk(store, 1)))
    out = tmp_path / "r.zarr"
    err = _expect_clear_error(
        capsys,
        ["reconstruct", str(store), "--method", "com", "--method", "virtual", "--out", str(out), "--quiet"],
        expected,
    )
    assert str(store) in err and "re-ingest" in err
    assert not out.exists() and not list(tmp_path.glob("r.zarr*"))  # no result, no leftovers
    err = _expect_clear_error(capsys, ["validate", str(store)], expected)
    assert err.count("\n") == len([ln for ln in err.splitlines() if ln.startswith("stemdask validate: error: ")])


def test_the_undamaged_store_validates_and_reconstructs(clean, tmp_path, capsys):
    assert main(["validate", str(clean)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"OK {clean}: 3 row blocks") and "every chunk's and block's checksum verified" in out
    assert main(["reconstruct", str(clean), "--method", "com", "--out", str(tmp_path / "r.zarr"), "--quiet"]) == 0


def test_validate_lists_every_damaged_block(clean, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    _flip(_idx(store, 0), bit=True)
    _idx(store, 2).unlink()
    assert main(["validate", str(store)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and f"indices/c/{_first_chunk(store, 0)}" in lines[0]
    assert f"indices/c/{_first_chunk(store, 2)}" in lines[1]


def test_a_wrong_count_with_a_valid_chunk_checksum_is_caught_before_reading(clean, tmp_path):
    """A count with bit 30 set, written through zarr (so its chunk checksum is valid): the slot
    check refuses it before any index is read."""
    store = tmp_path / "s.zarr"
    shutil.copytree(clean, store)
    counts = zarr.open_array(str(store / "counts"), mode="r+")
    counts[5, 3] = int(counts[5, 3]) | (1 << 30)
    with pytest.raises(
        CorruptStoreError, match=r"counts chunk counts/c/1/0 \(row block 1, .*more than its entry chunks hold"
    ):
        open_store(store).read_block(1)


# ---------------------------------------------------------------- format version 1
@pytest.fixture
def v1_store(tmp_path):
    store = create_store(tmp_path / "v1.zarr", (4, 4), (8, 8), rows_per_block=2, format_version=1)
    for b in range(store.n_blocks):
        store.write_block(b, np.ones((2, 4), np.uint32), np.arange(8) + 8 * b)
    return store.finalize()


def test_version_1_stores_still_open_and_say_what_they_lack(v1_store, capsys):
    assert open_store(v1_store.path).read_block(1).indices.tolist() == list(range(8, 16))
    assert main(["info", str(v1_store.path)]) == 0
    assert "version 1; checksums: block CRCs only" in capsys.readouterr().out
    assert main(["validate", str(v1_store.path)]) == 0
    assert "format version 1: block CRCs verified, no per-chunk checksums" in capsys.readouterr().out
    v1_store._indices[3] = 7  # valid value, changed data
    assert main(["validate", str(v1_store.path)]) == 2
    assert "row block 0 (rows 0..1) fails its checksum" in capsys.readouterr().err


def test_version_1_guards_count_bit_30_and_edited_rows_per_block(v1_store, tmp_path):
    v1_store._counts[1, 1] = 1 | (1 << 30)
    with pytest.raises(CorruptStoreError, match="more than the block's slot"):
        open_store(v1_store.path).read_block(0)
    _edit_attr(v1_store.path, "rows_per_block", lambda v: 1)
    with pytest.raises(CorruptStoreError, match=r"array counts is .* chunks \(2, 4\)"):
        open_store(v1_store.path)


def test_a_block_whose_chunk_is_all_fill_value_reads_back(tmp_path):
    """zarr writes no file for a chunk equal to the fill value (all indices 0): the block record
    accounts for it, and a deleted chunk with data still fails."""
    store = create_store(tmp_path / "z.zarr", (4, 4), (8, 8), rows_per_block=2, chunk_events=8)
    store.write_block(0, np.ones((2, 4)), np.zeros(8, np.uint16))
    store.write_block(1, np.ones((2, 4)), np.arange(8, dtype=np.uint16))
    store.finalize()
    assert not (store.path / "indices/c/0").exists() and open_store(store.path).read_block(0).indices.sum() == 0
    (store.path / f"indices/c/{store.cap // 8}").unlink()
    with pytest.raises(CorruptStoreError, match=r"chunk indices/c/\d+ of row block 1 \(rows 2..3\) is missing"):
        open_store(store.path).read_block(1)
