"""The event store: round trips, crash-safe resume, validation, finalize."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from stemdask.io import ingest
from stemdask.io.csr import CSRSource
from stemdask.optics import Calibration
from stemdask.store import (
    UNWRITTEN,
    CorruptStoreError,
    IncompleteStoreError,
    StoreError,
    create_store,
    open_store,
)

from helpers import random_csr


def write_all(store, indices, offsets, toa=None):
    nx = store.scan_shape[1]
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        a, z = offsets[r0 * nx], offsets[r1 * nx]
        counts = np.diff(offsets[r0 * nx : r1 * nx + 1]).reshape(r1 - r0, nx)
        store.write_block(b, counts, indices[a:z], None if toa is None else toa[a:z])


@pytest.mark.parametrize("det, dtype", [((16, 16), np.uint16), ((300, 300), np.uint32)])
@pytest.mark.parametrize("with_toa", [False, True])
def test_round_trip(tmp_path, det, dtype, with_toa):
    scan = (9, 7)
    indices, offsets = random_csr(seed=1, scan=scan, det=det)
    toa = np.random.default_rng(2).integers(0, 1000, indices.size).astype(np.uint32) if with_toa else None
    cal = Calibration(energy_ev=200e3, scan_step_a=(0.4, 0.5), detector_pixel_mrad=0.9, bf_center=(8, 8))
    store = create_store(tmp_path / "s.zarr", scan, det, cal, rows_per_block=4, has_toa=with_toa,
                         chunk_events=64, provenance={"source": "test"})
    assert store.index_dtype == dtype and store.n_blocks == 3 and store.cap % 64 == 0
    write_all(store, indices, offsets, toa)
    store.finalize(source_events=int(offsets[-1]))
    back = open_store(tmp_path / "s.zarr")
    assert back.complete and back.n_events == offsets[-1] and back.calibration == cal
    got_i, got_o = back.to_csr()
    np.testing.assert_array_equal(got_o, offsets)
    np.testing.assert_array_equal(got_i, indices)
    assert got_i.dtype == dtype
    if with_toa:
        np.testing.assert_array_equal(np.concatenate([b.toa for b in back.iter_blocks()]), toa)
    blk = back.read_block(1)
    assert blk.row_start == 4 and blk.counts.shape == (4, 7)
    np.testing.assert_array_equal(blk.offsets, offsets[28 : 56 + 1] - offsets[28])
    assert back.validate()["n_events"] == offsets[-1]


def _chunk_files(path):
    """{relative path: bytes} of every data chunk (not the metadata documents)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def test_resume_after_failed_block_is_identical(tmp_path, monkeypatch):
    scan = (12, 10)
    indices, offsets = random_csr(seed=4, scan=scan, mean=300)
    src = tmp_path / "ev.npz"
    np.savez(src, indices=indices, offsets=offsets)
    kw = dict(scan_shape=scan, detector_shape=(16, 16), rows_per_block=3, progress=False, assume_defaults=True)
    clean = ingest(src, tmp_path / "clean.zarr", **kw)

    real = CSRSource.read_rows
    def crash_on_block_2(self, r0, r1):
        if r0 == 6:
            raise RuntimeError("simulated crash in block 2")
        return real(self, r0, r1)

    monkeypatch.setattr(CSRSource, "read_rows", crash_on_block_2)
    out = tmp_path / "resumed.zarr"
    with pytest.raises(RuntimeError, match="block 2"):
        ingest(src, out, **kw)
    partial = open_store(out, allow_incomplete=True)
    done = partial.committed_blocks()
    assert not partial.complete and not done[2] and done.sum() >= 1
    monkeypatch.setattr(CSRSource, "read_rows", real)
    resumed = ingest(src, out, resume=True, **kw)
    assert resumed.complete
    # every block's bytes on disk and every CRC equal the uninterrupted store's
    assert _chunk_files(out) == _chunk_files(tmp_path / "clean.zarr")
    np.testing.assert_array_equal(zarr.open_array(str(out / "block_crc"))[...],
                                  zarr.open_array(str(tmp_path / "clean.zarr" / "block_crc"))[...])
    for b in range(clean.n_blocks):
        x, y = clean.read_block(b), resumed.read_block(b)
        np.testing.assert_array_equal(x.counts, y.counts)
        np.testing.assert_array_equal(x.indices, y.indices)
    assert resumed.n_events == clean.n_events == offsets[-1]
    assert resumed.provenance == clean.provenance


@pytest.fixture
def small_store(tmp_path):
    indices, offsets = random_csr(seed=5)
    src = tmp_path / "ev.npz"
    np.savez(src, indices=indices, offsets=offsets)
    return ingest(src, tmp_path / "s.zarr", scan_shape=(12, 10), detector_shape=(16, 16),
                  rows_per_block=4, progress=False, assume_defaults=True)


def test_validate_catches_changed_data(small_store):
    assert small_store.validate()["ok"]
    arr = zarr.open_array(str(small_store.path / "indices"), mode="r+")
    start = 1 * small_store.cap
    arr[start + 3] = (int(arr[start + 3]) + 1) % 256  # a valid value, in a well-formed chunk
    with pytest.raises(CorruptStoreError, match=r"row block 1 \(rows 4..7\) fails its checksum"):
        open_store(small_store.path).validate()


def test_validate_catches_garbage_chunk(small_store):
    chunk = sorted((small_store.path / "indices").rglob("c/*"))[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2 :] = b"\x00" * (len(data) - len(data) // 2)
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="row block 0 .*cannot be read"):
        open_store(small_store.path).validate()


def test_validate_catches_wrong_source_checksum_and_total(small_store):
    sha = small_store.provenance["source_sha256"]
    assert small_store.validate(source_checksum=sha)["ok"]
    with pytest.raises(CorruptStoreError, match="source checksum"):
        small_store.validate(source_checksum="0" * 64)
    store = open_store(small_store.path)
    store._set_attrs(provenance={**store.provenance, "source_events": store.n_events + 1})
    with pytest.raises(CorruptStoreError, match="source had"):
        store.validate()


def test_finalize_refuses_missing_blocks(tmp_path):
    indices, offsets = random_csr(seed=6)
    store = create_store(tmp_path / "s.zarr", (12, 10), (16, 16), rows_per_block=5)
    nx = 10
    store.write_block(0, np.diff(offsets[: 5 * nx + 1]).reshape(5, nx), indices[: offsets[5 * nx]])
    assert store.committed_blocks().tolist() == [True, False, False]
    missing = r"cannot finalize, 2 of 3 row blocks not written \(first: \[1, 2\]\)"
    with pytest.raises(IncompleteStoreError, match=missing):
        store.finalize()
    assert not open_store(tmp_path / "s.zarr", allow_incomplete=True).complete
    with pytest.raises(IncompleteStoreError, match="row block 1"):
        store.read_block(1)
    assert np.all(zarr.open_array(str(tmp_path / "s.zarr" / "counts"))[5:] == UNWRITTEN)


def test_write_block_checks_its_input(tmp_path):
    store = create_store(tmp_path / "s.zarr", (4, 3), (8, 8), rows_per_block=2)
    with pytest.raises(ValueError, match="counts has shape"):
        store.write_block(0, np.zeros((3, 3)), [])
    with pytest.raises(ValueError, match="2 indices but counts sum to 1"):
        store.write_block(0, [[1, 0, 0], [0, 0, 0]], [1, 2])
    with pytest.raises(ValueError, match="detector index 64 outside"):
        store.write_block(0, [[1, 0, 0], [0, 0, 0]], [64])
    assert not store.committed_blocks().any()
    with pytest.raises(FileExistsError, match="s.zarr already exists"):
        create_store(tmp_path / "s.zarr", (4, 3), (8, 8))
    with pytest.raises(StoreError, match="opened read-only"):
        open_store(tmp_path / "s.zarr", allow_incomplete=True).write_block(0, np.zeros((2, 3)), [])


def test_out_of_range_index_in_a_damaged_store_is_an_error_not_a_crash(tmp_path):
    """A version-1 store has no chunk checksums: an index beyond the detector must still never
    reach a kernel (the last bounds guard of every read)."""
    import stemdask

    store = create_store(tmp_path / "s.zarr", (4, 4), (8, 8), rows_per_block=2, format_version=1)
    for b in range(store.n_blocks):
        store.write_block(b, np.ones((2, 4), np.uint32), np.arange(8) + 8 * b)
    store.finalize()
    store._indices[3] = 60000  # what a flipped bit could decode to
    with pytest.raises(CorruptStoreError, match="row block 0 .*detector index 60000"):
        stemdask.open(store.path).pacbed().values


def test_read_tasks_reuse_one_handle_until_the_attrs_change(tmp_path):
    """Read tasks open a store once per process (``read_handle``), and see a changed store
    (here: its calibration set after ingest) through a new handle, never a stale one."""
    from stemdask.store import read_handle
    from stemdask.testing import random_event_store

    store = random_event_store(tmp_path / "s.zarr", (4, 4), 16, 5, rows_per_block=2)
    first = read_handle(store.path)
    assert read_handle(store.path) is first and read_handle(store.path, allow_incomplete=True) is not first
    writable = open_store(store.path, mode="r+")
    writable.set_calibration(writable.calibration.replace(scan_step_a=0.25))
    again = read_handle(store.path)
    assert again is not first and again.calibration.scan_step_a == (0.25, 0.25)
    assert np.array_equal(again.read_block(1).indices, first.read_block(1).indices)
