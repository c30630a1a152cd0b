"""Live riCOM: every stream source ends at batch riCOM (1e-6); snapshots, thread safety, view."""

from __future__ import annotations

import json
import queue

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import xarray as xr
import zarr

import stemdask.events
from stemdask.kernels.ricom import correlate_zero_padded, ricom_kernel
from stemdask.live_ricom import LiveRiCOM, LiveView, consume, replay_csr, replay_store
from stemdask.methods.ricom import ricom
from stemdask.optics import Calibration
from stemdask.simulate import SimulationParams, simulate
from stemdask.store import StoreError

KW = dict(kernel_size=21, kmin=0.05, kmax=2.0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = SimulationParams(scan_shape=(40, 48), detector=32, dose=150, rotation_quarter_turns=1, flip=True, seed=4)
    return simulate(tmp_path_factory.mktemp("live") / "s.zarr", p, rows_per_block=7, progress=False)


@pytest.fixture(scope="module")
def batch(store):
    ds = stemdask.events.open(store.path)
    return ricom(ds.com(), ds.calibration, **KW).phase.values


def assert_matches(image, batch):
    assert np.abs(image - batch).max() <= 1e-6 * np.abs(batch).max()


def per_position(store):
    indices, offsets = store.to_csr()
    return [indices[offsets[p] : offsets[p + 1]] for p in range(offsets.size - 1)]


def test_store_replay_equals_batch(store, batch):
    live = replay_store(store, **KW)
    assert live.done and live.rows_final == 40
    assert_matches(live.snapshot(), batch)
    result = live.result()
    assert result.dims == ("scan_y", "scan_x") and result.attrs["units"] == "rad"
    assert np.allclose(result.scan_x.values, np.arange(48) * store.calibration.scan_step_a[1])


def test_csr_replay_equals_batch(store, batch, tmp_path):
    indices, offsets = store.to_csr()
    path = tmp_path / "events.npz"
    np.savez(path, indices=indices, offsets=offsets)
    live = replay_csr(path, store.scan_shape, store.detector_shape, store.calibration, rows_per_update=3, **KW)
    assert_matches(live.snapshot(), batch)
    with pytest.raises(ValueError, match="positions"):
        replay_csr(path, (10, 10), store.detector_shape, store.calibration, **KW)


def test_iterator_of_positions_equals_batch(store, batch):
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    consume(iter(per_position(store)), live, batch=37)  # batches that straddle rows
    assert_matches(live.snapshot(), batch)


def test_one_position_at_a_time_equals_batch(store, batch):
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    for events in per_position(store):
        live.push_position(events)
    assert_matches(live.snapshot(), batch)


def test_queue_fed_by_an_acquisition_thread_with_concurrent_snapshots(store, batch):
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    q: queue.Queue = queue.Queue(maxsize=64)
    worker = live.run_in_background(consume, q)
    snapshots = []
    for i, events in enumerate(per_position(store)):
        q.put(events)
        if i % 300 == 0:
            rows_final = live.rows_final
            snap = live.snapshot()
            snapshots.append((live.positions_done, rows_final, snap))  # done read last: an upper bound
    q.put(None)
    worker.join(timeout=60)
    assert not worker.is_alive() and worker.exception is None
    final = live.snapshot()
    assert_matches(final, batch)
    for done, rows_final, snap in snapshots:
        # rows reported final never change afterwards; rows beyond the kernel's reach are untouched
        assert np.array_equal(snap[:rows_final], final[:rows_final])
        assert not snap[done // 48 + KW["kernel_size"] // 2 + 1 :].any()
    snap = live.snapshot()
    snap[:] = 0  # a snapshot is a copy
    assert live.snapshot().any()


def test_background_errors_are_raised_to_the_caller(store):
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    bad = [np.array([store.detector_shape[0] * store.detector_shape[1]])]  # index beyond the detector
    worker = live.run_in_background(consume, iter(bad))
    with pytest.raises(ValueError, match="detector"):
        worker.join(timeout=30)
    assert isinstance(worker.exception, ValueError)
    with pytest.raises(ValueError, match="detector"):  # and on every later snapshot: never swallowed
        live.snapshot()


def test_readme_snippet_replays_a_store_in_the_background(store, batch):
    """README: ``thread = live.run_in_background(replay_store("sto.zarr"))``, then snapshots."""
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    thread = live.run_in_background(replay_store(str(store.path)))
    assert thread.name == "live-ricom" and thread.daemon
    live.snapshot()  # any time, thread-safe
    thread.join(timeout=60)
    assert live.done and thread.exception is None
    assert_matches(live.snapshot(), batch)
    with pytest.raises(StoreError, match="no such store"):  # a failing replay says so to the caller
        live2 = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
        live2.run_in_background(replay_store(store.path.parent / "missing.zarr")).join(timeout=30)


def test_dense_frames_equal_their_events(store):
    blocks = list(store.iter_blocks())
    n_pix = store.detector_shape[0] * store.detector_shape[1]
    from_events = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    from_frames = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    for blk in blocks:
        from_events.push_events(blk.indices, blk.counts)
        offsets = blk.offsets
        frames = np.stack([np.bincount(blk.indices[offsets[p] : offsets[p + 1]], minlength=n_pix)
                           for p in range(blk.counts.size)]).astype(np.uint16)
        from_frames.push_frames(frames.reshape((-1,) + store.detector_shape))
    assert np.allclose(from_frames.snapshot(), from_events.snapshot(), atol=1e-12)


def test_positions_without_electrons_contribute_nothing():
    cal = Calibration(scan_step_a=0.5, detector_pixel_mrad=1.0, bf_center=(4.0, 4.0))
    live = LiveRiCOM((5, 6), (8, 8), cal, kernel_size=3)
    live.push_events(np.empty(0, np.uint16), np.zeros(30, np.uint32))
    assert live.done and not live.snapshot().any()


def test_working_memory_is_a_ring_of_kernel_rows_and_rows_stream_to_out(tmp_path):
    """A scan ten kernels tall: the ring buffer stays n rows; rows go to a Zarr array as they finish."""
    ny, nx, n = 230, 17, 21
    cal = Calibration(scan_step_a=0.4, detector_pixel_mrad=1.0, bf_center=(4.0, 4.0))
    out = zarr.create_array(tmp_path / "out.zarr", shape=(ny, nx), chunks=(8, nx), dtype="float64", fill_value=0.0)
    live = LiveRiCOM((ny, nx), (8, 8), cal, kernel_size=n, out=out)
    assert live._ring.shape == (n, nx)
    arrays = [v for v in vars(live).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) == (n * nx + 2 * n * n) * 8  # ring + kernel: no image, nothing per position
    rng = np.random.default_rng(0)
    com_y, com_x = rng.normal(size=(2, ny * nx))
    for p0 in range(0, ny * nx, 50):  # batches that straddle rows
        live.push_com(com_y[p0 : p0 + 50], com_x[p0 : p0 + 50])
        assert live.rows_final == (ny if live.done else max(0, live.positions_done // nx - n // 2))
    scale = cal.detector_pixel_inv_a  # no rotation: detector frame = scan frame
    batch = correlate_zero_padded(com_y.reshape(ny, nx) * scale, com_x.reshape(ny, nx) * scale,
                                  ricom_kernel(n, cal.scan_step_a))
    assert_matches(out[...], batch)
    assert_matches(live.snapshot(), batch)


def test_bad_input_is_named(store):
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    with pytest.raises(ValueError, match="counts sum"):
        live.push_events(np.zeros(3, np.uint16), np.array([1, 1]))
    with pytest.raises(ValueError, match="overrun"):
        live.push_com(np.zeros(40 * 48 + 1), np.zeros(40 * 48 + 1))
    with pytest.raises(ValueError, match="detector"):
        live.push_frames(np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="reference"):
        LiveRiCOM((4, 4), (8, 8), Calibration(), kernel_size=3)
    with pytest.raises(ValueError, match="odd"):
        LiveRiCOM((4, 4), (8, 8), store.calibration, kernel_size=4)
    assert live.positions_done == 0  # nothing was half-applied


def test_live_view_builds_headless_and_follows_a_feed(store, tmp_path):
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    view = LiveView(live)
    worker = live.run_in_background(consume, iter(per_position(store)))
    view.follow(worker, interval=0.01)
    assert "1,920 / 1,920" in view.ax.get_title()
    assert np.allclose(view.image.get_array(), live.snapshot())
    view.fig.savefig(tmp_path / "live.png")
    assert (tmp_path / "live.png").stat().st_size > 1000


def test_live_view_replaces_its_inline_notebook_output(store, monkeypatch):
    import IPython.display

    shown = []

    class Handle:
        def update(self, fig):
            shown.append(fig)

    monkeypatch.setattr(matplotlib, "get_backend", lambda: "module://matplotlib_inline.backend_inline")
    monkeypatch.setattr(IPython.display, "display", lambda fig, display_id: Handle())
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    view = LiveView(live)
    worker = live.run_in_background(consume, iter(per_position(store)))
    view.follow(worker, interval=0.01)
    assert shown and all(f is view.fig for f in shown)


def test_shared_abtem_case_replays_to_batch(abtem_case):
    """Independent data (abTEM): the CSR replay equals batch riCOM of its COM."""
    params = json.loads((abtem_case / "params.json").read_text())
    n = params["detector"]["shape_yx"][0]
    cal = Calibration(
        energy_ev=params["energy_eV"], scan_step_a=params["scan"]["step_A"],
        detector_pixel_mrad=params["detector"]["pixel_size_mrad"],
        bf_center=tuple(params["detector"]["bf_center_px_yx"]),
    )
    path = abtem_case / "events_dose50.npz"
    live = replay_csr(path, params["scan"]["shape_yx"], (n, n), cal, kernel_size=31)
    with np.load(path) as z:
        indices, offsets = z["indices"].astype(np.int64), z["offsets"]
    pos = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    cnt = np.diff(offsets).astype(float)
    with np.errstate(invalid="ignore"):
        cy = np.bincount(pos, indices // n, minlength=cnt.size) / cnt - cal.bf_center[0]
        cx = np.bincount(pos, indices % n, minlength=cnt.size) / cnt - cal.bf_center[1]
    shape = tuple(params["scan"]["shape_yx"])
    com = xr.Dataset({k: (("scan_y", "scan_x"), v.reshape(shape), {"units": "px"})
                      for k, v in (("com_y", cy), ("com_x", cx))})
    assert_matches(live.snapshot(), ricom(com, cal, kernel_size=31).phase.values)
