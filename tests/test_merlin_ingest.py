"""Merlin ``.mib`` ingest in counts mode: every real file of rosettasciio's test set (1, 6,
12, 24-bit; single chip and quad; RAW and processed) with exact totals and round trip, the
``.hdr`` supplying the scan shape; and each kind of bad file refused with one line (exit 2)
before any store exists."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stemdask.cli import main
from stemdask.io import ingest
from stemdask.io.merlin import decode_frames, mib_frames, to_store_orientation
from stemdask.testing.merlin import acquisition_header, write_mib


def _dense(store) -> np.ndarray:
    indices, offsets = store.to_csr()
    n = offsets.size - 1
    frames = np.zeros((n, store.detector_shape[0] * store.detector_shape[1]), np.int64)
    np.add.at(frames, (np.repeat(np.arange(n), np.diff(offsets)), indices.astype(np.int64)), 1)
    return frames.reshape(n, *store.detector_shape)


def _hdr_field(mib: Path, key: str) -> str:
    for line in mib.with_suffix(".hdr").read_text("latin-1").splitlines():
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    raise KeyError(key)


@pytest.mark.slow
def test_every_real_mib_ingests_exactly(real_merlin, tmp_path, capsys):
    files = sorted(real_merlin.glob("*.mib"))
    assert len(files) == 20
    rsciio = pytest.importorskip("rsciio.quantumdetector")
    for f in files:
        out = tmp_path / f"{f.stem}.zarr"
        assert main(["ingest", str(f), str(out), "--assume-defaults", "--quiet"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        assert main(["info", str(out), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        header, whole = mib_frames(f)
        frames = to_store_orientation(decode_frames(whole[:, header.header_bytes:], header))
        assert info["n_events"] == int(frames.sum(dtype=np.int64)), f.name
        per_trigger = int(_hdr_field(f, "Frames per Trigger (Number)"))
        assert info["scan_shape"] == [len(frames) // per_trigger, per_trigger], f.name  # from the .hdr
        assert info["provenance"]["ingest"]["scan_shape_from"].startswith(".hdr")
        from stemdask.store import open_store

        store = open_store(out)
        assert np.array_equal(_dense(store), frames), f.name
        if not f.stem.endswith("RAW"):  # an independent reader agrees (it cannot read RAW)
            theirs = np.asarray(rsciio.file_reader(str(f), navigation_shape=(len(frames),))[0]["data"])
            assert np.array_equal(_dense(store), theirs.reshape(frames.shape)), f.name
            assert info["n_events"] == int(theirs.sum(dtype=np.int64))


def _fails(argv, capsys, *needles) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture
def good(tmp_path) -> Path:
    frames = np.random.default_rng(0).poisson(3.0, (6, 16, 16)).clip(0, 63)
    path = write_mib(tmp_path / "scan.mib", frames, counter_depth=6)
    path.with_suffix(".hdr").write_bytes(acquisition_header(6, 6, **{"Frames per Trigger (Number)": "3"}))
    return path


def test_the_hdr_gives_the_scan_shape(good, tmp_path):
    store = ingest(good, tmp_path / "o.zarr", progress=False, assume_defaults=True)
    assert store.scan_shape == (2, 3) and store.provenance["ingest"]["scan_shape_from"].startswith(".hdr")


def test_bad_merlin_files_are_refused_in_one_line(good, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    argv = ["ingest", None, str(out), "--assume-defaults", "--quiet"]
    data = good.read_bytes()
    frame = len(data) // 6
    cut = tmp_path / "cut.mib"
    cut.write_bytes(data[: 5 * frame + frame // 2])
    _fails([argv[0], str(cut), *argv[2:]], capsys, str(cut), "the last frame is truncated", "5 whole")
    wide = tmp_path / "wide.mib"  # the headers say 6-bit U08 pixels, the data are 2 bytes a pixel
    head = data[:384]
    wide.write_bytes(b"".join(head + bytes(2 * 16 * 16) for _ in range(6)))
    _fails([argv[0], str(wide), *argv[2:]], capsys, str(wide), "counter depth does not match the file size")
    for key, value, needle in [("Counter Depth (number)", "12", "says counter depth 12"),
                               ("Frames in Acquisition (Number)", "9", "says 9 frames"),
                               ("Assembly Size (NX1, 2X2)", "2x2", "says chip assembly 2x2")]:
        good.with_suffix(".hdr").write_bytes(acquisition_header(6, 6, **{key: value}))
        _fails([argv[0], str(good), *argv[2:]], capsys, str(good), needle)
    assert not out.exists()


def test_a_frame_without_its_header_is_refused_by_ingest_and_live(good, tmp_path, capsys):
    data = bytearray(good.read_bytes())
    frame = len(data) // 6
    data[3 * frame : 3 * frame + 4] = b"XXXX"  # frame 4's header
    bad = tmp_path / "bad.mib"
    bad.write_bytes(bytes(data))
    bad.with_suffix(".hdr").write_bytes(good.with_suffix(".hdr").read_bytes())
    _fails(["ingest", str(bad), str(tmp_path / "o.zarr"), "--assume-defaults", "--quiet"], capsys,
           str(bad), "frame 4 does not start with a frame header")
    from stemdask.live_sources import FileReplay

    with FileReplay(bad) as src, pytest.raises(ValueError, match="frame 4 does not start with a frame header"):
        list(src.batches(6))
