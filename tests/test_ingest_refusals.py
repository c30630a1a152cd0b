"""Ingest never takes a lossy shape silently, and every reader answers an empty or random file
with one line naming it (exit 2, no traceback)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from stemdask.cli import main
from stemdask.io import ingest, validate_against_source

from helpers import DET, SCAN, dense_from_csr, random_csr, write_mib


@pytest.fixture(scope="module")
def real_mib(real_merlin_zip, tmp_path_factory) -> Path:
    """The real 9-frame single-chip Merlin file (6-bit counters); skips without the test data's real-merlin/."""
    pytest.importorskip("rsciio.quantumdetector")
    folder = tmp_path_factory.mktemp("merlin")
    name = "Single_9_Frame_CounterDepth_6_Rows_256"
    with zipfile.ZipFile(real_merlin_zip) as z:
        for ext in (".mib", ".hdr"):
            z.extract(name + ext, folder)
    return folder / f"{name}.mib"


def _fails(argv, capsys, *needles) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("scan", [(2, 2), (2, 5)])
def test_real_mib_with_a_scan_of_another_size_is_refused(real_mib, tmp_path, capsys, scan):
    out = tmp_path / "o.zarr"
    _fails(["ingest", str(real_mib), str(out), "--scan-shape", *map(str, scan), "--quiet", "--assume-defaults"], capsys,
           f"{real_mib}: scan_shape {scan}", "the file has 9 frames", "--frames-range")
    assert not out.exists()


def test_real_mib_frames_range_takes_exactly_what_it_says(real_mib, tmp_path, capsys):
    full = ingest(real_mib, tmp_path / "full.zarr", scan_shape=(3, 3), progress=False, assume_defaults=True)
    part = ingest(
        real_mib, tmp_path / "part.zarr", scan_shape=(2, 2), frames_range=(3, 7), progress=False, assume_defaults=True
    )
    assert part.provenance["ingest"]["frames_range"] == [3, 7] and part.provenance["ingest"]["source_frames"] == 9
    assert full.provenance["ingest"]["frames_range"] is None
    full_counts = full.counts().ravel()
    np.testing.assert_array_equal(part.counts().ravel(), full_counts[3:7])
    assert part.n_events == int(full_counts[3:7].sum()) == part.provenance["source_events"]
    assert validate_against_source(part)["source_events"] == part.n_events
    _fails(
        ["ingest", str(real_mib), str(tmp_path / "o.zarr"), "--scan-shape", "2", "2", "--frames-range", "7", "11",
         "--quiet", "--assume-defaults"],
        capsys,
        "frames_range 7..11 is outside the file's 9 frames",
    )
    _fails(
        ["ingest", str(real_mib), str(tmp_path / "o.zarr"), "--scan-shape", "2", "2", "--frames-range", "0", "5",
         "--quiet", "--assume-defaults"],
        capsys,
        "holds 5 frames but scan_shape (2, 2) has 4 positions",
    )


def test_synthetic_mib_with_more_frames_than_the_scan_is_refused(tmp_path, capsys):
    pytest.importorskip("rsciio.quantumdetector")
    indices, offsets = random_csr()
    src = tmp_path / "scan.mib"
    write_mib(src, dense_from_csr(indices, offsets).reshape(-1, *DET))  # 120 frames
    _fails(["ingest", str(src), str(tmp_path / "o.zarr"), "--scan-shape", "10", "10", "--quiet", "--assume-defaults"],
           capsys, "scan_shape (10, 10) does not match the data: 100 positions, but the file has 120 frames")
    store = ingest(
        src, tmp_path / "o.zarr", scan_shape=(10, 10), frames_range=(20, 120), progress=False, assume_defaults=True
    )
    assert store.n_events == int(offsets[-1] - offsets[20]) and store.provenance["ingest"]["frames_range"] == [20, 120]


def test_frames_range_is_only_for_frame_stacks(tmp_path, capsys):
    indices, offsets = random_csr()
    np.save(tmp_path / "d.npy", dense_from_csr(indices, offsets))  # 4-D: the scan is in the file
    _fails(
        ["ingest", str(tmp_path / "d.npy"), str(tmp_path / "o.zarr"), "--frames-range", "0", "5", "--quiet",
         "--assume-defaults"],
        capsys,
        "frames_range applies to a stack of frames",
    )
    np.savez(tmp_path / "e.npz", indices=indices, offsets=offsets)
    _fails(
        ["ingest", str(tmp_path / "e.npz"), str(tmp_path / "o.zarr"), "--scan-shape", *map(str, SCAN),
         "--detector-shape", *map(str, DET), "--frames-range", "0", "5", "--quiet", "--assume-defaults"],
        capsys,
        "frames_range applies to dense frame stacks only, not to csr input",
    )


FORMATS = {".npy": "auto", ".npz": "auto", ".h5": "auto", ".mib": "auto", ".hspy": "auto", ".bin": "auto",
           ".h5 as stempy": "stempy", ".npz as csr": "csr", ".npz as events": "events", ".npy as dense": "dense",
           ".mib as mib": "mib"}


@pytest.mark.parametrize("content", ["empty", "random"])
@pytest.mark.parametrize("kind", list(FORMATS))
def test_empty_and_random_files_are_one_line(tmp_path, capsys, kind, content):
    pytest.importorskip("rsciio")
    src = tmp_path / ("input" + kind.split()[0])
    src.write_bytes(b"" if content == "empty" else np.random.default_rng(3).bytes(4096))
    argv = [
        "ingest",
        str(src),
        str(tmp_path / "o.zarr"),
        "--format",
        FORMATS[kind],
        "--scan-shape",
        "2",
        "2",
        "--detector-shape",
        "4",
        "4",
        "--quiet",
        "--assume-defaults",
    ]
    if FORMATS[kind] == "events":
        argv += ["--dwell-ns", "100"]
    err = _fails(argv, capsys, str(src))
    if content == "empty":
        assert "is empty (0 bytes)" in err
    assert not (tmp_path / "o.zarr").exists()


# ---------------------------------------------------------------- data from elsewhere
def test_hdf5_external_links_and_virtual_datasets_are_refused(tmp_path, capsys):
    import h5py

    frames = dense_from_csr(*random_csr()).astype(np.uint16)
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["frames"] = frames
    with h5py.File(tmp_path / "linked.h5", "w") as f:
        f["data"] = h5py.ExternalLink("other.h5", "/frames")
    with h5py.File(tmp_path / "virtual.h5", "w") as f:
        layout = h5py.VirtualLayout(shape=frames.shape, dtype=frames.dtype)
        layout[...] = h5py.VirtualSource(str(tmp_path / "other.h5"), "frames", shape=frames.shape)
        f.create_virtual_dataset("data", layout)
    for name, what in (("linked.h5", "/data is an external link to other.h5:/frames"),
                       ("virtual.h5", "dataset /data is a virtual dataset")):
        _fails(["ingest", f"{tmp_path / name}:/data", str(tmp_path / "o.zarr"), "--quiet", "--assume-defaults"], capsys,
               f"{tmp_path / name}: {what}", "not covered by its checksum")
    assert (
        main(["ingest", f"{tmp_path / 'other.h5'}:/frames", str(tmp_path / "o.zarr"), "--quiet", "--assume-defaults"])
        == 0
    )


@pytest.mark.slow
def test_a_zip_bomb_is_refused_before_writing(tmp_path, capsys):
    """A ~1 MB .npz whose member inflates to 1 GiB: refused by its declared size, nothing extracted."""
    bomb = tmp_path / "bomb.npz"
    n = 1 << 30
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("offsets.npy", _npy(np.zeros(3, np.int64)))
        with z.open("indices.npy", "w", force_zip64=True) as f:
            header = {"descr": "<u4", "fortran_order": False, "shape": (n // 4,)}
            np.lib.format.write_array_header_1_0(f, header)
            zeros = bytes(1 << 24)
            for _ in range(n >> 24):
                f.write(zeros)
    assert bomb.stat().st_size < 2 << 20
    _fails(
        ["ingest", str(bomb), str(tmp_path / "o.zarr"), "--scan-shape", "1", "2", "--detector-shape", "4", "4",
         "--quiet", "--assume-defaults"],
        capsys,
        f"{bomb}: member 'indices' would expand from",
        "refusing to extract it",
    )
    assert sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file()) < 4 << 20


def _npy(arr) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_a_compressed_member_larger_than_the_free_space_is_refused(tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    import stemdask.io.npzfile as npzfile

    indices, offsets = random_csr()
    src = tmp_path / "e.npz"
    np.savez_compressed(src, indices=indices, offsets=offsets)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(npzfile.shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 100))
    _fails(
        ["ingest", str(src), str(tmp_path / "o.zarr"), "--scan-shape", *map(str, SCAN), "--detector-shape",
         *map(str, DET), "--quiet", "--assume-defaults"],
        capsys,
        f"{src}: member 'indices' needs",
        "more than is free",
    )
