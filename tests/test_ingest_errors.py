"""Bad input: every case raises an error naming the file and the problem, the CLI exits 2,
and nothing is left half-written without being marked incomplete."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from stemdask.cli import main
from stemdask.io import SourceError, ingest
from stemdask.io.csr import CSRSource
from stemdask.store import IncompleteStoreError, StoreError, open_store

from helpers import DET, SCAN, dense_from_csr, per_position, random_csr, write_mib, write_stempy


@pytest.fixture
def csr_file(tmp_path):
    indices, offsets = random_csr()
    path = tmp_path / "ev.npz"
    np.savez(path, indices=indices, offsets=offsets)
    return path


@pytest.fixture
def stempy_file(tmp_path):
    indices, offsets = random_csr()
    path = tmp_path / "real.h5"
    write_stempy(path, per_position(indices, offsets), SCAN, DET, version=3)
    return path


def cli_fails(argv, capsys, *needles):
    """The CLI returns 2 and its message contains every needle."""
    assert main([*argv, "--quiet"] if argv[0] == "ingest" else argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert str(n) in err, err
    return err


def test_truncated_hdf5(tmp_path, stempy_file, capsys):
    data = stempy_file.read_bytes()
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated.h5.*not a readable HDF5"):
        ingest(bad, tmp_path / "o.zarr", progress=False, assume_defaults=True)
    assert not (tmp_path / "o.zarr").exists()
    cli_fails(["ingest", str(bad), str(tmp_path / "o.zarr"), "--assume-defaults"], capsys, bad, "HDF5")


def test_corrupt_hdf5(tmp_path, capsys):
    bad = tmp_path / "garbage.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(SourceError, match="garbage.h5.*not a readable HDF5"):
        ingest(bad, tmp_path / "o.zarr", progress=False, assume_defaults=True)
    cli_fails(["ingest", str(bad), str(tmp_path / "o.zarr"), "--assume-defaults"], capsys, bad)
    assert not (tmp_path / "o.zarr").exists()


def test_detector_index_outside_detector(tmp_path, capsys):
    indices, offsets = random_csr()
    indices[offsets[70] + 1] = DET[0] * DET[1]  # row 7: the third of three blocks
    src = tmp_path / "bad.npz"
    np.savez(src, indices=indices, offsets=offsets)
    out = tmp_path / "o.zarr"
    with pytest.raises(SourceError, match=r"bad.npz: detector index 256 .*scan rows 7..7.*16×16") as e:
        ingest(src, out, scan_shape=SCAN, detector_shape=DET, rows_per_block=1, progress=False, assume_defaults=True)
    assert "left incomplete" in str(e.value)
    # what was written before the failure is marked incomplete, never complete
    assert open_store(out, allow_incomplete=True).complete is False
    with pytest.raises(IncompleteStoreError):
        open_store(out)
    cli_fails(["ingest", str(src), str(tmp_path / "c.zarr"), "--scan-shape", *map(str, SCAN),
               "--detector-shape", *map(str, DET), "--assume-defaults"], capsys, src, "detector index 256")


def test_detector_index_outside_detector_stempy(tmp_path):
    indices, offsets = random_csr()
    indices[5] = 10_000
    src = tmp_path / "bad.h5"
    write_stempy(src, per_position(indices, offsets), SCAN, DET)
    with pytest.raises(SourceError, match="bad.h5: detector index 10000"):
        ingest(src, tmp_path / "o.zarr", progress=False, assume_defaults=True)


@pytest.mark.parametrize("scan", [(12, 8), (11, 10)])  # (12, 9) would drop a flyback column
def test_scan_shape_does_not_match(tmp_path, csr_file, stempy_file, capsys, scan):
    with pytest.raises(SourceError, match=r"ev.npz: scan shape .* does not match the data: 'offsets' has 121"):
        ingest(csr_file, tmp_path / "o.zarr", scan_shape=scan, detector_shape=DET, progress=False, assume_defaults=True)
    with pytest.raises(SourceError, match=r"real.h5: scan_shape .* does not match the file's scan \(12, 10\)"):
        ingest(stempy_file, tmp_path / "o.zarr", scan_shape=scan, progress=False, assume_defaults=True)
    np.save(tmp_path / "d.npy", np.zeros((*SCAN, *DET), np.uint8))
    with pytest.raises(SourceError, match=r"d.npy: scan_shape .* does not match the data"):
        ingest(tmp_path / "d.npy", tmp_path / "o.zarr", scan_shape=scan, progress=False, assume_defaults=True)
    assert not (tmp_path / "o.zarr").exists()
    cli_fails(["ingest", str(csr_file), str(tmp_path / "o.zarr"), "--scan-shape", *map(str, scan),
               "--detector-shape", *map(str, DET), "--assume-defaults"], capsys, csr_file, "does not match")


def test_missing_shapes_are_asked_for(tmp_path, csr_file):
    with pytest.raises(SourceError, match="ev.npz: the file does not record the detector_shape"):
        ingest(csr_file, tmp_path / "o.zarr", scan_shape=SCAN, progress=False, assume_defaults=True)


@pytest.mark.parametrize("field, value", [("energy_ev", -300e3), ("scan_step_a", float("nan")),
                                          ("detector_pixel_mrad", 0.0), ("semiangle_mrad", float("inf"))])
def test_bad_calibration(tmp_path, csr_file, field, value):
    with pytest.raises(ValueError, match=field):
        ingest(csr_file, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET,
               calibration={field: value}, progress=False, assume_defaults=True)
    assert not (tmp_path / "o.zarr").exists()


def test_unknown_calibration_field(tmp_path, csr_file):
    with pytest.raises(ValueError, match=r"unknown calibration fields \['voltage'\]"):
        ingest(csr_file, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET,
               calibration={"voltage": 300}, progress=False, assume_defaults=True)


def test_bad_calibration_cli(tmp_path, csr_file, capsys):
    cli_fails(["ingest", str(csr_file), str(tmp_path / "o.zarr"), "--scan-shape", *map(str, SCAN),
               "--detector-shape", *map(str, DET), "--energy-kev", "-300", "--assume-defaults"], capsys, "energy_ev")
    cli_fails(["ingest", str(csr_file), str(tmp_path / "o.zarr"), "--scan-shape", *map(str, SCAN),
               "--detector-shape", *map(str, DET), "--scan-step", "nan", "--assume-defaults"], capsys, "scan_step_a")


def test_output_exists_refused_unless_overwrite(tmp_path, csr_file, capsys):
    out = tmp_path / "o.zarr"
    kw = dict(scan_shape=SCAN, detector_shape=DET, progress=False)
    ingest(csr_file, out, **kw, assume_defaults=True)
    with pytest.raises(FileExistsError, match="o.zarr already exists"):
        ingest(csr_file, out, **kw, assume_defaults=True)
    argv = ["ingest", str(csr_file), str(out), "--scan-shape", *map(str, SCAN), "--detector-shape", *map(str, DET),
            "--assume-defaults"]
    cli_fails(argv, capsys, out, "already exists")
    assert main([*argv, "--overwrite", "--quiet"]) == 0
    with pytest.raises(ValueError, match="overwrite.*resume"):
        ingest(csr_file, out, overwrite=True, resume=True, **kw, assume_defaults=True)


def test_overwrite_keeps_old_output_when_the_source_is_bad(tmp_path, csr_file):
    out = tmp_path / "o.zarr"
    ingest(csr_file, out, scan_shape=SCAN, detector_shape=DET, progress=False, assume_defaults=True)
    with pytest.raises(SourceError):
        ingest(
            csr_file, out, scan_shape=(5, 5), detector_shape=DET, overwrite=True, progress=False, assume_defaults=True
        )
    assert open_store(out).complete


def test_incomplete_store_refused(tmp_path, csr_file, monkeypatch, capsys):
    out = tmp_path / "o.zarr"
    real = CSRSource.read_rows

    def fail_late(self, r0, r1):
        if r0 >= 8:
            raise RuntimeError("simulated crash")
        return real(self, r0, r1)

    monkeypatch.setattr(CSRSource, "read_rows", fail_late)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ingest(
            csr_file, out, scan_shape=SCAN, detector_shape=DET, rows_per_block=4, progress=False, assume_defaults=True
        )
    with pytest.raises(IncompleteStoreError, match=r"o.zarr: store is incomplete"):
        open_store(out)
    assert main(["info", str(out), "--json"]) == 0  # info still describes it, as INCOMPLETE
    capsys.readouterr()
    cli_fails(["reconstruct", str(out), "--method", "com", "--out", str(tmp_path / "r.zarr"), "--quiet"], capsys, out,
              "incomplete")


def test_resume_refuses_a_different_source_or_parameters(tmp_path, csr_file, monkeypatch):
    out = tmp_path / "o.zarr"
    kw = dict(scan_shape=SCAN, detector_shape=DET, progress=False)
    monkeypatch.setattr(CSRSource, "read_rows", lambda self, r0, r1: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        ingest(csr_file, out, rows_per_block=4, **kw, assume_defaults=True)
    monkeypatch.undo()
    other = tmp_path / "other.npz"
    indices, offsets = random_csr(seed=1)
    np.savez(other, indices=indices, offsets=offsets)
    with pytest.raises(StoreError, match="o.zarr: cannot resume: it was made from a different source"):
        ingest(other, out, resume=True, **kw, assume_defaults=True)
    with pytest.raises(StoreError, match="rows_per_block 3"):
        ingest(csr_file, out, resume=True, rows_per_block=3, **kw, assume_defaults=True)
    assert ingest(csr_file, out, resume=True, **kw, assume_defaults=True).complete


def test_newer_store_format_refused(tmp_path, csr_file, capsys):
    out = tmp_path / "o.zarr"
    ingest(csr_file, out, scan_shape=SCAN, detector_shape=DET, progress=False, assume_defaults=True)
    meta = out / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["format_version"] = 99
    meta.write_text(json.dumps(doc))
    with pytest.raises(StoreError, match=r"o.zarr: store format version 99 is newer"):
        open_store(out)
    cli_fails(["info", str(out)], capsys, out, "version 99")


def test_mode_and_dwell_only_where_they_apply(tmp_path, csr_file):
    with pytest.raises(SourceError, match="mode/threshold apply to dense frames only"):
        ingest(csr_file, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET, mode="threshold", threshold=1,
               progress=False, assume_defaults=True)
    with pytest.raises(SourceError, match="dwell_ns applies to time-stamped"):
        ingest(csr_file, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET, dwell_ns=10, progress=False,
               assume_defaults=True)
    np.save(tmp_path / "d.npy", np.zeros((*SCAN, *DET), np.uint8))
    with pytest.raises(SourceError, match="d.npy: mode 'threshold' needs a finite threshold"):
        ingest(tmp_path / "d.npy", tmp_path / "o.zarr", mode="threshold", progress=False, assume_defaults=True)


def test_dense_counts_must_be_whole_non_negative(tmp_path):
    frames = np.zeros((*SCAN, *DET), np.float32)
    frames[2, 3, 4, 5] = 0.5
    frames[7, 1, 0, 0] = -1
    np.save(tmp_path / "d.npy", frames)
    with pytest.raises(SourceError, match=r"d.npy: 2 pixels \(positions 0..119\) are negative or not whole"):
        ingest(tmp_path / "d.npy", tmp_path / "o.zarr", rows_per_block=2, progress=False, assume_defaults=True)
    assert not (tmp_path / "o.zarr").exists()  # checked on the first piece, before a store exists


def test_events_beyond_the_scan_or_unsorted(tmp_path):
    n = SCAN[0] * SCAN[1]
    src = tmp_path / "ev.h5"
    with h5py.File(src, "w") as f:
        f["index"] = np.arange(5, dtype=np.uint16)
        f["toa_ns"] = np.array([0.0, 10.0, 20.0, n * 100.0 - 1, n * 100.0 + 5])
    with pytest.raises(SourceError, match=r"ev.h5: 1 events arrive after the scan ends"):
        ingest(src, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET, dwell_ns=100, progress=False,
               assume_defaults=True)
    with h5py.File(src, "w") as f:
        f["index"] = np.arange(4, dtype=np.uint16)
        f["toa_ns"] = np.array([0.0, 5000.0, 10.0, 9000.0])
    with pytest.raises(SourceError, match=r"ev.h5: events of scan rows .* not grouped in time"):
        ingest(src, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET, dwell_ns=100, rows_per_block=1,
               progress=False, assume_defaults=True)


@pytest.mark.parametrize("dwell", [0.0, -5.0, float("nan"), 2.0**33])
def test_bad_dwell(tmp_path, dwell):
    src = tmp_path / "ev.h5"
    with h5py.File(src, "w") as f:
        f["index"], f["toa_ns"] = np.arange(3, dtype=np.uint16), np.array([0.0, 1.0, 2.0])
    with pytest.raises(SourceError, match="ev.h5: dwell_ns must be a positive number"):
        ingest(src, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET, dwell_ns=dwell, progress=False,
               assume_defaults=True)


def test_corrupt_and_truncated_mib(tmp_path, capsys):
    pytest.importorskip("rsciio.quantumdetector")
    garbage = tmp_path / "garbage.mib"
    garbage.write_bytes(np.random.default_rng(1).bytes(5000))
    with pytest.raises(SourceError, match="garbage.mib: expected a frame header 'MQ1,…'"):
        ingest(garbage, tmp_path / "o.zarr", scan_shape=SCAN, progress=False, assume_defaults=True)
    indices, offsets = random_csr()
    good = tmp_path / "scan.mib"
    write_mib(good, dense_from_csr(indices, offsets).reshape(-1, *DET))
    cut = tmp_path / "cut.mib"
    cut.write_bytes(good.read_bytes()[: (384 + 2 * DET[0] * DET[1]) * 55])  # 5.5 of 12 scan rows
    with pytest.raises(SourceError, match=r"cut.mib: scan_shape \(12, 10\) does not match the data"):
        ingest(cut, tmp_path / "o.zarr", scan_shape=SCAN, progress=False, assume_defaults=True)
    cli_fails(["ingest", str(cut), str(tmp_path / "o.zarr"), "--scan-shape", *map(str, SCAN), "--assume-defaults"],
              capsys, cut)
    assert not (tmp_path / "o.zarr").exists()


def test_unknown_and_missing_input(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(SourceError, match="x.txt: unknown format"):
        ingest(tmp_path / "x.txt", tmp_path / "o.zarr", progress=False, assume_defaults=True)
    cli_fails(["ingest", str(tmp_path / "nope.npz"), str(tmp_path / "o.zarr"), "--assume-defaults"], capsys, "nope.npz",
              "no such file")
    np.savez(tmp_path / "w.npz", a=np.zeros(3))
    with pytest.raises(SourceError, match="w.npz: .npz has neither"):
        ingest(tmp_path / "w.npz", tmp_path / "o.zarr", progress=False, assume_defaults=True)


def test_truncated_npz_and_npy(tmp_path, csr_file, capsys):
    bad = tmp_path / "cut.npz"
    bad.write_bytes(csr_file.read_bytes()[:-200])
    with pytest.raises(SourceError, match="cut.npz: not a readable .npz"):
        ingest(bad, tmp_path / "o.zarr", scan_shape=SCAN, detector_shape=DET, progress=False, assume_defaults=True)
    np.save(tmp_path / "d.npy", np.ones((*SCAN, *DET), np.uint8))
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "d.npy").read_bytes()[:5000])
    with pytest.raises(SourceError, match="cut.npy: not a readable .npy"):
        ingest(cut, tmp_path / "o.zarr", progress=False, assume_defaults=True)
    cli_fails(["ingest", str(cut), str(tmp_path / "o.zarr"), "--assume-defaults"], capsys, cut)
    assert not (tmp_path / "o.zarr").exists()


def test_stempy_frames_must_be_integers(tmp_path):
    src = tmp_path / "float.h5"
    with h5py.File(src, "w") as f:
        frames = f.create_dataset("electron_events/frames", (4,), dtype=h5py.vlen_dtype(np.float32))
        for i in range(4):
            frames[i] = np.array([3.7, 5.9], np.float32)
        pos = f.create_dataset("electron_events/scan_positions", data=np.arange(4, dtype=np.uint32))
        pos.attrs["Nx"], pos.attrs["Ny"] = 2, 2
    with pytest.raises(SourceError, match="variable-length integer arrays"):
        ingest(src, tmp_path / "s.zarr", format="stempy", detector_shape=(8, 8), progress=False, assume_defaults=True)


def test_resume_accepts_rows_per_block_larger_than_the_scan(tmp_path, csr_file):
    out = tmp_path / "s.zarr"
    kw = dict(scan_shape=SCAN, detector_shape=DET, rows_per_block=10 * SCAN[0], progress=False)
    first = ingest(csr_file, out, **kw, assume_defaults=True)
    again = ingest(csr_file, out, resume=True, **kw, assume_defaults=True)
    assert again.complete and again.n_events == first.n_events


def test_integrated_intensities_in_counts_mode_point_to_threshold_mode(tmp_path, capsys):
    """Analogue values are refused from the first piece, before any store exists, with advice
    that says what --mode threshold does; large whole counts (a 16-bit counter) are counts."""
    rng = np.random.default_rng(0)
    frames = rng.gamma(2.0, 900.0, (2, 2, 8, 8)).astype(np.float32)  # an integrating detector's values
    np.save(tmp_path / "analogue.npy", frames)
    cli_fails(["ingest", str(tmp_path / "analogue.npy"), str(tmp_path / "s.zarr"), "--assume-defaults"], capsys,
              "analogue.npy", "integrated (non-integer) intensities", "--mode threshold")
    assert not (tmp_path / "s.zarr").exists()
    np.save(tmp_path / "counted.npy", np.full((2, 2, 8, 8), 5000, np.uint16))
    store = ingest(tmp_path / "counted.npy", tmp_path / "c.zarr", progress=False, assume_defaults=True)
    assert store.n_events == 4 * 64 * 5000 and store.encoding == "weighted"


def test_bad_counts_after_the_first_piece_never_suggest_resume(tmp_path, capsys, monkeypatch):
    """The first piece is checked before a store exists; a fault further into the source
    leaves an incomplete store and says it cannot be resumed (resuming would meet it again)."""
    import stemdask.io.dense

    frames = np.ones((*SCAN, *DET), np.float32)
    frames[-1, -1, 0, 0] = 0.5  # the last position
    np.save(tmp_path / "d.npy", frames)
    monkeypatch.setattr(stemdask.io.dense, "PIECE_BYTES", frames[0].nbytes)  # a piece = one scan row
    err = cli_fails(
        ["ingest", str(tmp_path / "d.npy"), str(tmp_path / "o.zarr"), "--rows-per-block", "2", "--assume-defaults"],
        capsys,
        "d.npy",
        "not whole numbers",
        "cannot be resumed",
    )
    assert "--resume" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(IncompleteStoreError):
        open_store(tmp_path / "o.zarr")
