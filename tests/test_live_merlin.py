"""`stemdask live` from a Merlin data socket (a replaying test server): equal to ingest + reconstruct,
retunable mid-scan, saved as it arrives, and each fault one clear line (exit 2) with nothing saved lost."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import xarray as xr

import stemdask.events
import stemdask.io
import stemdask.io.dense
from stemdask.cli import main
from stemdask.live_session import LiveSession
from stemdask.live_sources import MerlinSocket, StreamEnded, StreamError
from stemdask.methods.ricom import ricom
from stemdask.optics import Calibration
from stemdask.simulate import SimulationParams, simulate
from stemdask.store import IncompleteStoreError, open_store
from stemdask.testing.merlin import MerlinReplayServer, acquisition_header, encode_frames, write_mib

SCAN = (24, 20)
DET = 32
KERNEL = ["--kernel-size", "11"]


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A simulated scan written as a 6-bit Merlin .mib (the detector's orientation), its ingested
    and calibrated store, and batch reconstruct of that store."""
    tmp = tmp_path_factory.mktemp("live-merlin")
    p = SimulationParams(scan_shape=SCAN, detector=DET, dose=150, rotation_quarter_turns=1, flip=True, seed=4)
    sim = simulate(tmp / "sim.zarr", p, rows_per_block=7, progress=False)
    indices, offsets = sim.to_csr()
    frames = np.stack([np.bincount(indices[offsets[i]:offsets[i + 1]], minlength=DET * DET)
                       for i in range(offsets.size - 1)]).reshape(-1, DET, DET)
    mib = write_mib(tmp / "scan.mib", frames[:, ::-1], counter_depth=6)  # ingest flips .mib rows back
    optics = ["--energy-kev", str(p.energy_ev / 1e3), "--scan-step", str(p.scan_step),
              "--semiangle-mrad", str(p.semiangle_mrad), "--detector-pixel-mrad", str(p.pixel_mrad)]
    assert main(["ingest", str(mib), str(tmp / "ingested.zarr"), "--scan-shape", *map(str, SCAN), *optics,
                 "--quiet"]) == 0
    open_store(tmp / "ingested.zarr", mode="r+").set_calibration(sim.calibration)  # as `stemdask calibrate` would
    assert main(["reconstruct", str(tmp / "ingested.zarr"), "--method", "ricom", "--method", "virtual",
                 "--method", "com", "--com-reference", "bf", "--out", str(tmp / "batch.zarr"), "--quiet",
                 *KERNEL]) == 0  # live riCOM measures from the BF centre
    return {"tmp": tmp, "mib": mib, "store": tmp / "ingested.zarr", "batch": xr.open_zarr(tmp / "batch.zarr"),
            "frames": frames, "calibration": sim.calibration}


def live(scan, url, *extra):
    return main(["live", url, "--scan-shape", *map(str, SCAN), "--calibration-from", str(scan["store"]),
                 *KERNEL, *extra])


def assert_same_images(batch, result):
    assert set(batch.data_vars) <= set(result.data_vars)
    for name in batch.data_vars:
        b, r = batch[name].values, result[name].values
        assert b.dtype == r.dtype, name
        if b.dtype.kind == "f":
            assert np.array_equal(np.isnan(b), np.isnan(r)), name
        assert np.nanmax(np.abs(b - r)) <= 1e-9 * np.nanmax(np.abs(b)), name


def assert_same_store(a, b, identical=False):
    """The same electrons at the same positions (either store may be weighted: to_csr expands
    it); ``identical``: also the same encoding, layout and entries block by block."""
    a, b = open_store(a), open_store(b)
    assert (a.scan_shape, a.detector_shape) == (b.scan_shape, b.detector_shape)
    assert a.calibration == b.calibration and a.n_events == b.n_events
    np.testing.assert_array_equal(a.counts(), b.counts())
    for x, y in zip(a.to_csr(), b.to_csr()):
        np.testing.assert_array_equal(x, y)
    if identical:
        layout = ("encoding", "weight_dtype", "index_dtype", "rows_per_block", "cap", "n_blocks")
        assert [getattr(a, k) for k in layout] == [getattr(b, k) for k in layout]
        for x, y in zip(a.iter_blocks(), b.iter_blocks()):
            for part in ("counts", "entries", "indices", "weights"):
                got, want = getattr(x, part), getattr(y, part)
                assert (got is None) == (want is None) and (got is None or np.array_equal(got, want)), part


def test_live_from_the_merlin_socket_equals_ingest_and_reconstruct(scan, capsys):
    out, saved = scan["tmp"] / "live.zarr", scan["tmp"] / "s.zarr"
    with MerlinReplayServer(scan["mib"], chunk_frames=7) as server:
        assert live(scan, server.url, "--save", str(saved), "--out", str(out)) == 0
    report = capsys.readouterr().out
    assert "480 of 480 positions" in report and "frames/s" in report and "latency" in report
    assert_same_images(scan["batch"], xr.open_zarr(out))
    assert_same_store(scan["store"], saved, identical=True)
    # the result records how it was made: the calibration used, the source, the saved store
    attrs = xr.open_zarr(out).attrs
    assert Calibration.from_dict(json.loads(attrs["calibration"])) == open_store(saved).calibration
    assert attrs["source"] == server.url and attrs["store"] == str(saved.resolve())
    assert attrs["store_n_events"] == open_store(saved).n_events and attrs["stemdask_version"]
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"source       {server.url} (480 of 480 positions)" in info and f"source store {saved.resolve()}" in info


@pytest.mark.parametrize("dense,encoding", [(slice(13, 40), "weighted"), (slice(0, 0), "events")])
def test_saved_frames_are_stored_as_ingest_stores_them(tmp_path, monkeypatch, dense, encoding):
    """Dense frames are saved in the encoding ingest picks for the same frames, by ingest's rule
    on its first piece (here 2 scan rows, arriving in batches of 13), in the same layout. The
    frames are sparse (mostly single electrons: events are smaller) but for positions ``dense``
    (several electrons a pixel: weighted is smaller): with 13..39 dense, the first batch alone
    or the whole scan would choose events, the first piece weighted."""
    monkeypatch.setattr(stemdask.io.dense, "PIECE_BYTES", 45 * DET * DET)  # first piece: 40 positions
    mean = np.full(SCAN[0] * SCAN[1], 0.3)
    mean[dense] = 3.0
    frames = np.random.default_rng(1).poisson(mean[:, None, None], (mean.size, DET, DET)).astype(np.uint8)
    np.save(tmp_path / "f.npy", frames)
    stemdask.io.ingest(tmp_path / "f.npy", tmp_path / "ingested.zarr", scan_shape=SCAN, assume_defaults=True,
                       progress=False)
    calibration = open_store(tmp_path / "ingested.zarr").calibration
    session = LiveSession(SCAN, (DET, DET), calibration, methods=("com",), reference=(16, 16),
                          save=tmp_path / "live.zarr")
    for a in range(0, len(frames), 13):
        session.push_frames(frames[a : a + 13])
    session.finish()
    assert open_store(tmp_path / "live.zarr").encoding == encoding
    assert_same_store(tmp_path / "ingested.zarr", tmp_path / "live.zarr", identical=True)


def test_a_session_ended_before_its_encoding_was_chosen_still_saves_its_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(stemdask.io.dense, "PIECE_BYTES", 45 * DET * DET)
    frames = np.random.default_rng(2).poisson(0.4, (25, DET, DET)).astype(np.uint8)
    session = LiveSession(SCAN, (DET, DET), Calibration(), methods=("com",), reference=(16, 16),
                          save=tmp_path / "live.zarr", rows_per_block=1)
    session.push_frames(frames)  # 25 of the 40 positions the rule looks at
    assert session.saved.endswith("no complete row block yet (nothing saved)")
    assert session.finish() is None
    assert "1 of 24 row blocks saved (scan rows 0..0, " in session.saved
    store = open_store(tmp_path / "live.zarr", allow_incomplete=True)
    assert store.committed_blocks().tolist() == [True] + [False] * 23
    np.testing.assert_array_equal(store.read_block(0).counts[0], frames[:20].reshape(20, -1).sum(1))


def test_save_refuses_an_existing_store_before_the_scan(tmp_path):
    (tmp_path / "x.zarr").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        LiveSession(SCAN, (DET, DET), Calibration(), methods=("com",), reference=(16, 16), save=tmp_path / "x.zarr")
    with pytest.raises(FileExistsError, match="is not a Zarr store; refusing to delete it"):
        LiveSession(SCAN, (DET, DET), Calibration(), methods=("com",), reference=(16, 16), save=tmp_path / "x.zarr",
                    overwrite=True)


def test_replayed_mib_file_at_a_rate_equals_batch(scan):
    out = scan["tmp"] / "replay.zarr"
    assert live(scan, str(scan["mib"]), "--rate", "20000", "--out", str(out)) == 0
    assert_same_images(scan["batch"], xr.open_zarr(out))


def test_replayed_event_store_at_a_rate_with_the_view_equals_batch(scan, capsys):
    out = scan["tmp"] / "store-replay.zarr"
    rc = main(["live", str(scan["store"]), "--scan-shape", *map(str, SCAN), *KERNEL, "--rate", "5000",
               "--out", str(out), "--view", "--port", "0"])  # calibration: the store's own
    assert rc == 0 and "live view on http://127.0.0.1:" in capsys.readouterr().out
    assert_same_images(scan["batch"], xr.open_zarr(out))


def test_consume_a_queue_of_positions_into_a_session(scan):
    """Acquisition software with events already: ``consume(queue, session)`` (``None`` ends it)."""
    import queue

    from stemdask.live_ricom import consume

    ingested = open_store(scan["store"])
    indices, offsets = ingested.to_csr()
    q: queue.Queue = queue.Queue()
    for p in range(offsets.size - 1):
        q.put(indices[offsets[p]:offsets[p + 1]])
    q.put(None)
    session = LiveSession(SCAN, (DET, DET), scan["calibration"], kernel_size=11, save=scan["tmp"] / "q.zarr",
                          overwrite=True)
    consume(q, session, batch=37)
    session.finish()
    result = session.result()
    assert_same_images(scan["batch"], result)
    assert_same_store(scan["store"], scan["tmp"] / "q.zarr")


def test_kernel_size_changed_mid_scan_ends_at_batch_with_the_new_kernel(scan):
    session = LiveSession(SCAN, (DET, DET), scan["calibration"], kernel_size=11)
    frames = scan["frames"]
    half = frames.shape[0] // 2 + 3  # mid-row
    session.push_frames(frames[:half])
    before = session.snapshot()["phase"]
    session.retune(kernel_size=7, kmin=0.05)
    retuned = session.snapshot()["phase"]
    assert not np.allclose(before, retuned)  # re-rendered from the kept COM
    session.push_frames(frames[half:])
    ds = stemdask.events.open(scan["store"])
    batch = ricom(ds.com(), ds.calibration, kernel_size=7, kmin=0.05).phase.values
    assert np.abs(session.snapshot()["phase"] - batch).max() <= 1e-9 * np.abs(batch).max()
    session.retune(rotation_deg=ds.calibration.rotation_deg + 90, flip=not ds.calibration.flip)
    rotated = ricom(ds.with_calibration(rotation_deg=ds.calibration.rotation_deg + 90,
                                        flip=not ds.calibration.flip).com(), ds.calibration.replace(
        rotation_deg=ds.calibration.rotation_deg + 90, flip=not ds.calibration.flip), kernel_size=7, kmin=0.05)
    assert np.abs(session.snapshot()["phase"] - rotated.phase.values).max() <= 1e-9 * np.abs(batch).max()
    with pytest.raises(ValueError, match="odd"):
        session.retune(kernel_size=8)
    assert session.kernel_size == 7  # a refused change changes nothing


def test_retune_from_another_thread_while_the_socket_streams(scan):
    session = LiveSession(SCAN, (DET, DET), scan["calibration"], kernel_size=11)
    with MerlinReplayServer(scan["mib"], rate=4000) as server, MerlinSocket(server.url, batch_frames=20) as src:
        worker = threading.Thread(target=session.run, args=(src,))
        worker.start()
        t0 = time.monotonic()
        while session.positions_done < 100 and time.monotonic() - t0 < 30:
            time.sleep(0.001)
        session.retune(kernel_size=7, kmin=0.05)
        worker.join(timeout=60)
    ds = stemdask.events.open(scan["store"])
    batch = ricom(ds.com(), ds.calibration, kernel_size=7, kmin=0.05).phase.values
    assert session.done and np.abs(session.snapshot()["phase"] - batch).max() <= 1e-9 * np.abs(batch).max()


def test_dropped_connection_stops_cleanly_with_committed_rows_saved(scan, capsys):
    saved = scan["tmp"] / "dropped.zarr"
    # 300 frames = 15 rows: two 7-row blocks committed
    with MerlinReplayServer(scan["mib"], drop_after=300, chunk_frames=300) as server:
        rc = main(
            [
                "live",
                server.url,
                "--scan-shape",
                *map(str, SCAN),
                "--calibration-from",
                str(scan["store"]),
                "--save",
                str(saved),
                "--rows-per-block",
                "7",
                "--out",
                str(scan["tmp"] / "partial.zarr"),
            ]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "connection closed" in err[0] and "300 frames received" in err[0] and "2 of 4 row blocks saved" in err[0]
    with pytest.raises(IncompleteStoreError):
        open_store(saved)
    store = open_store(saved, allow_incomplete=True)
    assert store.committed_blocks().tolist() == [True, True, False, False]
    ingested, block = open_store(scan["store"]), store.read_block(1)
    assert store.encoding == "weighted"  # as ingest stores these frames
    assert np.array_equal(np.repeat(block.indices, block.weights), _rows(ingested, 7, 14)[1])
    assert np.array_equal(block.counts, _rows(ingested, 7, 14)[0])
    partial = xr.open_zarr(scan["tmp"] / "partial.zarr")
    assert partial.attrs["positions_done"] == 300 and not partial.attrs["complete"]


def _rows(store, r0, r1):
    counts = store.counts()[r0:r1]
    indices, offsets = store.to_csr()
    nx = store.scan_shape[1]
    return counts, indices[offsets[r0 * nx] : offsets[r1 * nx]]


@pytest.mark.parametrize(
    "fault,message",
    [
        ({"garbage": b"GARBAGE" * 10}, "expected the Merlin framing 'MPX,<10-digit length>,', got b'GARBAGEGA"),
        ({"hdr": acquisition_header(480, 12)}, "frame 0's header says counter depth 6, the acquisition header 12"),
        ({"hdr": acquisition_header(100, 6)}, "the acquisition has 100 frames, the 24×20 scan needs 480"),
        ({"stall_after": 50}, "no data for 0.5 s while waiting for frame 50 (50 frames received; detector slower"),
    ],
)
def test_faults_are_one_clear_line(scan, capsys, fault, message):
    with MerlinReplayServer(scan["mib"], **fault) as server:
        rc = live(scan, server.url, "--timeout", "0.5", "--save", str(scan["tmp"] / "fault.zarr"), "--overwrite")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("stemdask live: error: merlin://127.0.0.1:")
    assert message in err[0]


def test_a_frame_header_that_changes_mid_scan_is_refused(scan):
    whole = encode_frames(scan["frames"][:, ::-1], 6)
    whole[40, 20:24] = np.frombuffer(b"0128", np.uint8)  # frame 40's header: width 128 ("MQ1,000041,00384,01,0128")
    with MerlinReplayServer(whole, hdr=acquisition_header(480, 6)) as server:
        session = LiveSession(SCAN, (DET, DET), scan["calibration"], kernel_size=11)
        with (
            MerlinSocket(server.url, timeout=2) as src,
            pytest.raises(
                StreamError,
                match=r"frame 40's header "
                r"\(128×32 U08 6-bit 1x1",
            ),
        ):
            session.run(src)
    assert session.positions_done == 40  # the frames before it were used


def test_connection_refused_and_bad_urls_are_named(capsys):
    assert main(["live", "merlin://127.0.0.1:1", "--scan-shape", "2", "2", "--bf-center", "1", "1"]) == 2
    assert "merlin://127.0.0.1:1: cannot connect" in capsys.readouterr().err
    with pytest.raises(StreamError, match="expected merlin://HOST:PORT"):
        MerlinSocket("merlin://nohost")
    assert issubclass(StreamEnded, StreamError)
