"""Ingest round trips: every format → store → the events read back equal the source's."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stemdask.cli import main
from stemdask.io import ingest, open_source, sniff_format, validate_against_source
from stemdask.store import open_store

from helpers import DET, SCAN, dense_from_csr, per_position, random_csr, write_mib, write_stempy


# ------------------------------------------------------------------ test data (the writers are in helpers.py)
def assert_store_equals(store, indices, offsets, toa=None):
    got_indices, got_offsets = store.to_csr()
    np.testing.assert_array_equal(got_offsets, offsets)
    np.testing.assert_array_equal(got_indices, indices)
    assert store.n_events == offsets[-1] == store.provenance["source_events"]
    if toa is not None:
        got_toa = np.concatenate([b.toa for b in store.iter_blocks()])
        np.testing.assert_array_equal(got_toa, toa)


# ------------------------------------------------------------------ CSR
@pytest.mark.parametrize("compressed", [False, True])
def test_csr_round_trip(tmp_path, compressed):
    indices, offsets = random_csr()
    src = tmp_path / "ev.npz"
    (np.savez_compressed if compressed else np.savez)(src, indices=indices, offsets=offsets)
    store = ingest(src, tmp_path / "s.zarr", scan_shape=SCAN, detector_shape=DET, rows_per_block=5, progress=False,
                   assume_defaults=True)
    assert store.complete and store.n_blocks == 3
    assert_store_equals(store, indices, offsets)
    prov = store.provenance
    assert prov["format"] == "csr" and prov["source"] == str(src.resolve())
    assert prov["ingest"]["scan_shape"] == list(SCAN) and prov["ingest"]["rows_per_block"] == 5
    assert len(prov["source_sha256"]) == 64
    assert validate_against_source(store)["source_events"] == offsets[-1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".stemdask")]  # scratch removed


def test_csr_shapes_from_npz_keys_and_calibration(tmp_path):
    indices, offsets = random_csr()
    src = tmp_path / "ev.npz"
    np.savez(src, indices=indices, offsets=offsets, scan_shape=np.array(SCAN), detector_shape=np.array(DET))
    cal = {"energy_ev": 200e3, "scan_step_a": 0.5, "semiangle_mrad": 25.0, "detector_pixel_mrad": 0.8}
    store = ingest(src, tmp_path / "s.zarr", calibration=cal, progress=False)
    assert store.scan_shape == SCAN and store.detector_shape == DET
    c = store.calibration
    assert (c.energy_ev, c.scan_step_a, c.semiangle_mrad, c.detector_pixel_mrad) == (200e3, (0.5, 0.5), 25.0, 0.8)
    assert_store_equals(store, indices, offsets)


# ------------------------------------------------------------------ stempy
@pytest.mark.parametrize(
    "version, F, two_d, split, shuffle",
    [
        (1, 1, False, False, False),
        (1, 1, False, False, True),
        (2, 1, False, True, False),
        (2, 1, False, True, True),
        (3, 1, False, False, False),
        (3, 3, False, False, False),
        (3, 2, True, False, False),
    ],
)
def test_stempy_round_trip(tmp_path, version, F, two_d, split, shuffle):
    indices, offsets = random_csr(seed=version + F)
    events = per_position(indices, offsets)
    src = tmp_path / "s.h5"
    exp_indices, exp_offsets = write_stempy(
        src, events, SCAN, DET, version=version, frames_per_position=F, two_d=two_d, split=split, shuffle=shuffle
    )
    np.testing.assert_array_equal(exp_offsets, offsets)
    assert sniff_format(src) == "stempy"
    store = ingest(src, tmp_path / "s.zarr", rows_per_block=4, progress=False, assume_defaults=True)
    assert store.scan_shape == SCAN and store.detector_shape == DET
    assert_store_equals(store, exp_indices, exp_offsets)  # frames of a position merged in file order
    assert store.provenance["ingest"]["stempy_version"] == version
    assert validate_against_source(store)["source_events"] == offsets[-1]


def test_stempy_flyback_column_dropped(tmp_path):
    scan_file = (SCAN[0], SCAN[1] + 1)
    indices, offsets = random_csr(seed=5, scan=scan_file)
    events = per_position(indices, offsets)
    src = tmp_path / "fly.h5"
    write_stempy(src, events, scan_file, DET, version=3)
    store = ingest(src, tmp_path / "s.zarr", scan_shape=SCAN, rows_per_block=5, progress=False, assume_defaults=True)
    kept = [ev for p, ev in enumerate(events) if p % scan_file[1] != 0]  # column ix = 0 is the flyback
    exp_off = np.concatenate([[0], np.cumsum([e.size for e in kept])])
    assert_store_equals(store, np.concatenate(kept), exp_off)
    assert store.provenance["ingest"]["drop_flyback"] is True
    assert validate_against_source(store)["n_events"] == exp_off[-1]


def test_stempy_written_by_stempy(tmp_path):
    stio = pytest.importorskip("stempy.io", reason="stempy not installed")
    indices, offsets = random_csr(seed=9)
    data = np.empty((SCAN[0] * SCAN[1], 1), dtype=object)
    for p, ev in enumerate(per_position(indices, offsets)):
        data[p, 0] = ev
    src = tmp_path / "by_stempy.h5"
    stio.SparseArray(data, SCAN, DET).write_to_hdf5(str(src))
    store = ingest(src, tmp_path / "s.zarr", progress=False, assume_defaults=True)
    assert_store_equals(store, indices, offsets)


# ------------------------------------------------------------------ dense
def test_dense_npy_counts_round_trip(tmp_path):
    indices, offsets = random_csr(seed=2, mean=40)
    frames = dense_from_csr(indices, offsets)
    assert frames.max() > 1  # several electrons in a pixel: counted exactly
    np.save(tmp_path / "d.npy", frames)
    store = ingest(tmp_path / "d.npy", tmp_path / "s.zarr", rows_per_block=5, progress=False, assume_defaults=True)
    assert_store_equals(store, indices, offsets)
    assert validate_against_source(store)["source_events"] == offsets[-1]


def test_dense_stack_needs_and_uses_scan_shape(tmp_path):
    indices, offsets = random_csr(seed=3)
    frames = dense_from_csr(indices, offsets).reshape(-1, *DET).astype(np.float32)
    np.save(tmp_path / "d.npy", frames)
    store = ingest(tmp_path / "d.npy", tmp_path / "s.zarr", scan_shape=SCAN, progress=False, assume_defaults=True)
    assert_store_equals(store, indices, offsets)


def test_dense_threshold_mode(tmp_path):
    indices, offsets = random_csr(seed=4, mean=30)
    counts = dense_from_csr(indices, offsets, dtype=np.float64)
    noise = np.random.default_rng(0).uniform(0, 0.4, counts.shape)
    analogue = (counts * 3.0 + noise).astype(np.float32)  # ~3 units per electron, noise below 0.5
    np.save(tmp_path / "a.npy", analogue)
    store = ingest(
        tmp_path / "a.npy", tmp_path / "s.zarr", mode="threshold", threshold=0.5, progress=False, assume_defaults=True
    )
    hit = counts.reshape(SCAN[0] * SCAN[1], -1) > 0  # one event per lit pixel
    exp_idx = np.concatenate([np.flatnonzero(h) for h in hit]).astype(np.uint32)
    exp_off = np.concatenate([[0], np.cumsum(hit.sum(1))])
    assert_store_equals(store, exp_idx, exp_off)
    assert store.provenance["ingest"]["mode"] == "threshold"
    assert validate_against_source(store)["source_events"] == exp_off[-1]


def test_dense_hdf5_dataset_path_and_single_dataset(tmp_path):
    indices, offsets = random_csr(seed=6)
    frames = dense_from_csr(indices, offsets, dtype=np.uint8)
    src = tmp_path / "d.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("entry/data", data=frames, chunks=(1, 5, *DET), compression="gzip")
        f.create_dataset("other/frames", data=frames[:, :, :2])  # a second 4-D dataset
    with pytest.raises(ValueError, match="several"):
        ingest(src, tmp_path / "x.zarr", progress=False, assume_defaults=True)
    store = ingest(f"{src}:/entry/data", tmp_path / "s.zarr", progress=False, assume_defaults=True)
    assert_store_equals(store, indices, offsets)
    assert store.provenance["ingest"]["dataset"] == "/entry/data"
    assert validate_against_source(store)["source_events"] == offsets[-1]
    single = tmp_path / "one.h5"
    with h5py.File(single, "w") as f:
        f["data"] = frames
    assert_store_equals(ingest(single, tmp_path / "t.zarr", progress=False, assume_defaults=True), indices, offsets)


def test_dense_pieces_bound_memory(tmp_path, monkeypatch):
    """A block larger than a piece is read in pieces (whole rows, then parts of a row)."""
    import stemdask.io.dense as dense

    indices, offsets = random_csr(seed=7)
    np.save(tmp_path / "d.npy", dense_from_csr(indices, offsets))
    frame_bytes = DET[0] * DET[1] * 2
    for piece in (3 * SCAN[1] * frame_bytes, 4 * frame_bytes):
        monkeypatch.setattr(dense, "PIECE_BYTES", piece)
        src = open_source(tmp_path / "d.npy")
        assert max(b - a for a, b in src._pieces(0, SCAN[0] * SCAN[1])) <= piece // frame_bytes
        store = ingest(tmp_path / "d.npy", tmp_path / f"s{piece}.zarr", progress=False, assume_defaults=True)
        assert_store_equals(store, indices, offsets)


def test_mib_round_trip(tmp_path):
    rsciio_qd = pytest.importorskip("rsciio.quantumdetector")
    indices, offsets = random_csr(seed=8)
    raw = dense_from_csr(indices, offsets).reshape(-1, *DET)
    src = tmp_path / "scan.mib"
    write_mib(src, raw)
    assert sniff_format(src) == "mib"
    store = ingest(src, tmp_path / "s.zarr", scan_shape=SCAN, rows_per_block=5, progress=False, assume_defaults=True)
    # rosettasciio's orientation: frames flipped vertically with respect to the file
    shown = rsciio_qd.file_reader(str(src), navigation_shape=SCAN[::-1])[0]["data"]
    np.testing.assert_array_equal(shown, raw.reshape(*SCAN, *DET)[..., ::-1, :])
    flat = shown.reshape(SCAN[0] * SCAN[1], -1)
    exp_idx = np.concatenate([np.repeat(np.arange(flat.shape[1]), f) for f in flat]).astype(np.uint32)
    exp_off = np.concatenate([[0], np.cumsum(flat.sum(1))])
    assert_store_equals(store, exp_idx, exp_off)
    assert store.provenance["format"] == "mib"
    assert validate_against_source(store)["source_events"] == offsets[-1]


def test_other_rosettasciio_format_hspy(tmp_path):
    rsciio_hspy = pytest.importorskip("rsciio.hspy")
    indices, offsets = random_csr(seed=10)
    frames = dense_from_csr(indices, offsets)
    axes = [
        {"size": n, "index_in_array": i, "name": name, "scale": 1.0, "offset": 0.0, "units": "", "navigate": i < 2}
        for i, (n, name) in enumerate(zip(frames.shape, ["y", "x", "ky", "kx"]))
    ]
    src = tmp_path / "scan.hspy"
    rsciio_hspy.file_writer(
        str(src),
        {"data": frames, "axes": axes, "metadata": {"General": {"title": ""}, "Signal": {"signal_type": ""}},
         "original_metadata": {}, "attributes": {"_lazy": False}, "tmp_parameters": {},
         "package_info": {"name": "stemdask-tests", "version": "0"}, "learning_results": {}, "models": {}},
    )
    assert sniff_format(src) == "dense"
    store = ingest(src, tmp_path / "s.zarr", rows_per_block=5, progress=False, assume_defaults=True)
    assert store.provenance["ingest"]["reader"] == "rsciio.hspy"
    assert_store_equals(store, indices, offsets)
    assert validate_against_source(store)["source_events"] == offsets[-1]


# ------------------------------------------------------------------ time-stamped events
def timestamped(seed=0, dwell=1000.0):
    indices, offsets = random_csr(seed=seed)
    rng = np.random.default_rng(seed)
    pos = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    toa = (pos + rng.uniform(0, 0.999, pos.size)) * dwell
    order = np.argsort(toa)
    return indices[order], toa[order], pos[order], offsets


@pytest.mark.parametrize("container", ["npz", "h5"])
def test_timestamped_round_trip(tmp_path, container):
    dwell = 1000.0
    index, toa, pos, offsets = timestamped(dwell=dwell)
    src = tmp_path / f"ev.{container}"
    if container == "npz":
        np.savez_compressed(src, index=index, toa_ns=toa)
    else:
        with h5py.File(src, "w") as f:
            f["index"], f["toa_ns"] = index, toa
    assert sniff_format(src) == "events"
    store = ingest(src, tmp_path / "s.zarr", scan_shape=SCAN, detector_shape=DET, dwell_ns=dwell, rows_per_block=5,
                   progress=False, assume_defaults=True)
    assert store.has_toa
    # events of a position keep their arrival order (toa sorted); toa stored within the dwell
    order = np.argsort(pos, kind="stable")
    exp_toa = np.floor(toa[order] - pos[order] * dwell).astype(np.uint32)
    assert_store_equals(store, index[order], offsets, exp_toa)
    assert validate_against_source(store)["source_events"] == offsets[-1]


def test_timestamped_metadata_in_file(tmp_path):
    index, toa, pos, offsets = timestamped(seed=3, dwell=500.0)
    src = tmp_path / "ev.h5"
    with h5py.File(src, "w") as f:
        f["index"], f["toa_ns"] = index, toa
        f.attrs["scan_shape"], f.attrs["detector_shape"], f.attrs["dwell_ns"] = SCAN, DET, 500.0
    store = ingest(src, tmp_path / "s.zarr", progress=False, assume_defaults=True)
    assert store.provenance["ingest"]["dwell_ns"] == 500.0
    assert store.n_events == offsets[-1]


# ------------------------------------------------------------------ resume and CLI
def test_resume_complete_store_is_a_no_op_and_resume_from_scratch_works(tmp_path):
    indices, offsets = random_csr()
    np.savez(tmp_path / "ev.npz", indices=indices, offsets=offsets)
    kw = dict(scan_shape=SCAN, detector_shape=DET, progress=False)
    store = ingest(
        tmp_path / "ev.npz", tmp_path / "s.zarr", resume=True, **kw, assume_defaults=True
    )  # nothing to resume: ingests
    assert store.complete
    again = ingest(tmp_path / "ev.npz", tmp_path / "s.zarr", resume=True, calibration={"energy_ev": 60e3}, **kw,
                   assume_defaults=True)
    assert again.complete and again.n_events == offsets[-1]
    assert open_store(tmp_path / "s.zarr").calibration.energy_ev == 60e3  # a resume may add calibration


def test_cli_ingest_and_info(tmp_path, capsys):
    indices, offsets = random_csr()
    np.savez(tmp_path / "ev.npz", indices=indices, offsets=offsets)
    out = tmp_path / "s.zarr"
    argv = ["ingest", str(tmp_path / "ev.npz"), str(out), "--scan-shape", *map(str, SCAN), "--detector-shape",
            *map(str, DET), "--energy-kev", "80", "--scan-step", "0.3", "--quiet", "--assume-defaults"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_events"] == offsets[-1] and info["complete"]
    assert info["calibration"]["energy_ev"] == 80e3


def test_shared_abtem_case_via_cli(tmp_path, capsys, abtem_events):
    dose, events = abtem_events  # dose 50 always (shipped), dose 1000 where the test data hold it
    out = tmp_path / "OUT.zarr"
    argv = ["ingest", str(events), str(out), "--scan-shape", "96", "96", "--detector-shape", "96", "96", "--energy-kev",
            "300", "--scan-step", "0.2033854", "--semiangle-mrad", "20", "--detector-pixel-mrad", "1.00832", "--quiet"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_events"] == {1000: 9212252, 50: 460615}[dose]  # the case's README
    with np.load(events) as z:
        indices, offsets = z["indices"], z["offsets"]
    assert_store_equals(open_store(out), indices, offsets)


# ------------------------------------------------------------------ block boundaries (property)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ny=st.integers(1, 7), nx=st.integers(1, 6), rows=st.integers(1, 8), mean=st.sampled_from([0.0, 0.5, 6.0]),
       fmt=st.sampled_from(["csr", "stempy", "events"]))
def test_any_block_layout_round_trips(ny, nx, rows, mean, fmt):
    """Scan shapes, rows per block (dividing the scan or not, larger than it) and empty
    positions/blocks: the store always equals the source."""
    indices, offsets = random_csr(seed=ny * 7 + nx, scan=(ny, nx), det=(5, 7), mean=mean)
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / {"csr": "ev.npz", "stempy": "ev.h5", "events": "tev.npz"}[fmt]
        kw = {}
        if fmt == "csr":
            np.savez(src, indices=indices, offsets=offsets, scan_shape=(ny, nx), detector_shape=(5, 7))
        elif fmt == "stempy":
            write_stempy(src, per_position(indices, offsets), (ny, nx), (5, 7), version=3, frames_per_position=2)
        else:
            pos = np.repeat(np.arange(ny * nx), np.diff(offsets))
            np.savez(src, index=indices, toa_ns=pos * 10.0 + 3.0)
            kw = dict(scan_shape=(ny, nx), detector_shape=(5, 7), dwell_ns=10.0)
        store = ingest(src, Path(d) / "s.zarr", rows_per_block=rows, progress=False, **kw, assume_defaults=True)
        assert store.n_blocks == -(-ny // min(rows, ny))
        assert_store_equals(store, indices, offsets)


@pytest.mark.parametrize("fmt", ["csr", "stempy", "dense", "events"])
def test_sources_read_a_block_without_the_whole_input(tmp_path, fmt):
    """Reading 2 of 64 scan rows allocates far less than the input holds (streaming)."""
    import tracemalloc

    scan, det = (64, 16), (32, 32)
    indices, offsets = random_csr(seed=11, scan=scan, det=det, mean=400)
    src = tmp_path / {"csr": "ev.npz", "stempy": "ev.h5", "dense": "ev.npy", "events": "tev.h5"}[fmt]
    kw = {}
    if fmt == "csr":
        np.savez_compressed(src, indices=indices, offsets=offsets, scan_shape=scan, detector_shape=det)
    elif fmt == "stempy":
        write_stempy(src, per_position(indices, offsets), scan, det)
    elif fmt == "dense":
        np.save(src, dense_from_csr(indices, offsets, scan, det))
    else:
        pos = np.repeat(np.arange(scan[0] * scan[1]), np.diff(offsets))
        with h5py.File(src, "w") as f:
            f["index"], f["toa_ns"] = indices, pos * 100.0 + 1
        kw = dict(scan_shape=scan, detector_shape=det, dwell_ns=100.0)
    per_event = {"csr": 4, "stempy": 4, "events": 12}  # uncompressed bytes of the input
    payload = per_event[fmt] * offsets[-1] if fmt != "dense" else 2 * scan[0] * scan[1] * det[0] * det[1]
    with open_source(src, scratch=tmp_path, **kw) as source:
        source.read_rows(0, 4)  # warm up: compile kernels, import codecs
        tracemalloc.start()
        try:
            counts, got, _ = source.read_rows(30, 32)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    np.testing.assert_array_equal(got, indices[offsets[30 * 16] : offsets[32 * 16]])
    assert peak < 0.25 * payload, f"peak {peak / 1e6:.2f} MB to read 1/32 of {payload / 1e6:.1f} MB"
