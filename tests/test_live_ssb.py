"""Live SSB: the crops kept while a scan arrives give, once it completes, the batch SSB phase
(``reconstruct --method ssb --bin B``), with the mask and descan honoured, and the true phase."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

import stemdask
from stemdask.cli import main
from stemdask.live_session import LiveSession
from stemdask.live_ssb import LiveSSB
from stemdask.methods.ssb import ssb
from stemdask.optics import Aberrations
from stemdask.reductions import CropWindow
from stemdask.simulate import SimulationParams, load_truth, simulate
from stemdask.store import open_store
from stemdask.testing.merlin import MerlinReplayServer, write_mib

from helpers import pearson, realistic_calibrated


def _frames(store):
    """Every position of ``store`` as a dense uint16 frame, row block by row block."""
    n_pix = int(np.prod(store.detector_shape))
    for blk in store.iter_blocks():
        o = blk.offsets
        yield np.stack([np.bincount(blk.indices[o[p]:o[p + 1]], minlength=n_pix)
                        for p in range(blk.counts.size)]).astype(np.uint16).reshape((-1,) + store.detector_shape)


def _batch_phase(path, bin_, c10=0.0):
    ds = stemdask.open(path)
    return ssb(ds.densify(bin=bin_), ds.calibration, Aberrations(C10=c10)).phase.values


def _assert_close(live, batch):
    assert np.abs(live - batch).max() <= 1e-5 * np.abs(batch).max()


@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """A realistic recording (off-centre disk, descan, hot/dead pixels, a dead column), calibrated."""
    return realistic_calibrated(tmp_path_factory.mktemp("live-ssb") / "r.zarr", 6, scan_shape=(32, 30), detector=40,
                                dose=1500, seed=6)


def _session(store, **kw):
    mask, fill = store.detector_mask()
    return LiveSession(store.scan_shape, store.detector_shape, store.calibration, methods=("ssb",), mask=mask,
                       fill=fill, aberrations=Aberrations(), **kw)


@pytest.mark.parametrize("fed", ["events", "frames"])
def test_live_ssb_with_mask_and_descan_equals_batch(realistic, fed):
    live = _session(realistic, ssb_crop=13)
    for blk, frames in zip(realistic.iter_blocks(), _frames(realistic)):
        if fed == "events":
            live.push_events(blk.indices, blk.counts)
        else:
            live.push_frames(frames)
    assert live.done and live.ssb_seconds is not None
    b = live.live_ssb.window.bin
    assert b > 1 and live.live_ssb.window.n <= 13
    _assert_close(live.snapshot()["ssb_phase"], _batch_phase(realistic.path, b))
    truth = load_truth(realistic.path)
    assert pearson(live.ssb_phase, truth) > 0.8  # the right sign, not just the batch's


def test_without_corrections_frames_are_cut_from_the_detector_and_equal_batch(tmp_path):
    p = SimulationParams(scan_shape=(30, 28), detector=32, dose=800, seed=3)
    sim = simulate(tmp_path / "s.zarr", p, rows_per_block=8, progress=False)
    cal = sim.calibration
    assert cal.descan is None and sim.detector_mask()[0] is None
    by_events = LiveSession(
        sim.scan_shape, sim.detector_shape, cal, methods=("ssb", "ricom"), aberrations=Aberrations()
    )
    by_frames = LiveSession(sim.scan_shape, sim.detector_shape, cal, methods=("ssb",), aberrations=Aberrations())
    assert by_frames.live_ssb.window.within(sim.detector_shape)  # the sliced path
    for blk, frames in zip(sim.iter_blocks(), _frames(sim)):
        by_events.push_events(blk.indices, blk.counts)
        by_frames.push_frames(frames)
    batch = _batch_phase(sim.path, by_events.live_ssb.window.bin)
    _assert_close(by_events.ssb_phase, batch)
    _assert_close(by_frames.ssb_phase, batch)
    assert pearson(batch, load_truth(sim.path)) > 0.8  # SNR-weighted SSB of a 30×28 scan: r ≈ 0.85
    names = set(by_events.result().data_vars)
    assert {"ricom_phase", "ssb_phase"} <= names and "phase" not in names  # reconstruct's naming rule
    assert set(by_frames.result().data_vars) == {"phase"}
    # G is kept: a refocus reruns only the trotter sums
    assert by_events.ssb.kept and by_events.ssb.refocus(C10=-50.0).shape == sim.scan_shape


def test_the_crop_fits_its_side_and_the_memory_is_said():
    crop = CropWindow.fitting((128.0, 128.0), 45, 32)
    assert crop.n <= 32 and CropWindow.around((128.0, 128.0), 45, crop.bin - 1).n > 32
    assert crop.n * crop.bin >= 2 * 45 + 1
    with pytest.raises(ValueError, match="positive whole number"):
        CropWindow.fitting((1.0, 1.0), 3, 0)
    from stemdask.optics import Calibration

    cal = Calibration(bf_center=(128.0, 128.0), bf_radius=40.0)
    s = LiveSSB((256, 256), (256, 256), cal, crop_side=32)
    npix = len(s.disk.pixels)
    assert s.window.n == 31 and 0.9 * np.pi * (40 / 3) ** 2 < npix < 1.1 * np.pi * (40 / 3) ** 2
    assert s.nbytes == 256 * 129 * npix * 8 + 256 * 31 * 31 * 4  # the rows' scan-x FFT and one row of crops
    assert f"crops 31×31 (bin {s.window.bin})" in s.describe() and f"{s.nbytes / 2**20:,.0f} MiB" in s.describe()
    assert "0.03 MiB" in LiveSSB((8, 8), (32, 32), Calibration(bf_center=(16.0, 16.0), bf_radius=5.0)).describe()


def test_positions_out_of_order_and_an_unfinished_scan_are_refused():
    from stemdask.optics import Calibration

    cal = Calibration(bf_center=(8.0, 8.0), bf_radius=3.0)
    s = LiveSSB((3, 4), (16, 16), cal)
    s.push_frames(slice(0, 5), np.ones((5, 16, 16), np.uint8))  # a row and one position
    with pytest.raises(ValueError, match="scan order"):
        s.push_frames(slice(6, 7), np.ones((1, 16, 16), np.uint8))
    with pytest.raises(ValueError, match="5 of 12 positions"):
        s.reconstruct(cal, Aberrations())


def test_live_ssb_needs_a_calibrated_disk(tmp_path, capsys):
    from stemdask.optics import Calibration

    with pytest.raises(ValueError, match="BF disk"):
        LiveSession((4, 4), (16, 16), Calibration(bf_center=(8.0, 8.0)), methods=("ssb",))
    p = SimulationParams(scan_shape=(6, 5), detector=16, dose=50, seed=1)
    sim = simulate(tmp_path / "s.zarr", p, progress=False)
    frames = np.concatenate(list(_frames(sim)))
    mib = write_mib(tmp_path / "s.mib", frames[:, ::-1], counter_depth=6)
    rc = main(["live", str(mib), "--scan-shape", "6", "5", "--method", "ssb", "--bf-center", "8", "8"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if ": error: " in line]
    assert len(errors) == 1 and "BF disk" in errors[0] and "Traceback" not in "".join(err)
    # a .mib records no optics: what nobody gave is assumed, and said so
    assert err[0].startswith("stemdask live: warning: ASSUMED, neither given nor from --calibration-from: 300 keV")


def test_cli_live_ssb_from_the_merlin_socket_equals_reconstruct(tmp_path, capsys):
    p = SimulationParams(scan_shape=(24, 20), detector=32, dose=400, seed=8, rotation_quarter_turns=1, flip=True)
    sim = simulate(tmp_path / "sim.zarr", p, rows_per_block=5, progress=False)
    frames = np.concatenate(list(_frames(sim)))
    mib = write_mib(tmp_path / "scan.mib", frames[:, ::-1], counter_depth=6)  # ingest flips .mib rows back
    optics = ["--energy-kev", str(p.energy_ev / 1e3), "--scan-step", str(p.scan_step), "--semiangle-mrad",
              str(p.semiangle_mrad), "--detector-pixel-mrad", str(p.pixel_mrad)]
    store = tmp_path / "ingested.zarr"
    assert main(["ingest", str(mib), str(store), "--scan-shape", "24", "20", *optics, "--quiet"]) == 0
    open_store(store, mode="r+").set_calibration(sim.calibration)
    out, live_out = tmp_path / "batch.zarr", tmp_path / "live.zarr"
    with MerlinReplayServer(mib, chunk_frames=7) as server:
        assert (
            main(
                [
                    "live",
                    server.url,
                    "--scan-shape",
                    "24",
                    "20",
                    "--calibration-from",
                    str(store),
                    "--method",
                    "ssb",
                    "--method",
                    "ricom",
                    "--kernel-size",
                    "11",
                    "--ssb-crop",
                    "9",
                    "--c10",
                    "-20",
                    "--out",
                    str(live_out),
                ]
            )
            == 0
        )
    said = capsys.readouterr().out
    assert "live SSB crops" in said and "SSB C10 = -20 Å (given)" in said and "SSB phase" in said
    bin_ = xr.open_zarr(live_out).ssb_phase.attrs["crop_bin"]
    assert bin_ > 1
    assert (
        main(
            ["reconstruct", str(store), "--method", "ssb", "--method", "ricom", "--kernel-size", "11",
             "--com-reference", "bf", "--bin", str(bin_), "--c10", "-20", "--out", str(out), "--quiet"]
        )
        == 0
    )
    batch, live = xr.open_zarr(out), xr.open_zarr(live_out)
    _assert_close(live.ssb_phase.values, batch.ssb_phase.values)
    assert (
        np.abs(live.ricom_phase.values - batch.ricom_phase.values).max()
        <= 1e-9 * np.abs(batch.ricom_phase.values).max()
    )


def test_a_measured_unsigned_defocus_gets_its_sign_as_in_batch(tmp_path, capsys):
    """calibrate measured |C10| but not its sign: live SSB picks it by the focus criterion at the
    end, as `reconstruct --method ssb` does, and never says C10 = 0 while doing so."""
    p = SimulationParams(
        scan_shape=(32, 32), detector=32, dose=2000, max_phase=0.5, aberrations=Aberrations(C10=-100.0), seed=3
    )
    sim = simulate(tmp_path / "sim.zarr", p, rows_per_block=8, progress=False)
    cal = sim.calibration.replace(report={"c10_magnitude_a": 100.0})
    open_store(sim.path, mode="r+").set_calibration(cal)
    assert cal.c10_estimate_a is None
    live = LiveSession(sim.scan_shape, sim.detector_shape, cal, methods=("ssb",), ssb_crop=15)
    assert "but not its sign" in live.ssb_c10_source and "when the scan completes" in live.ssb_c10_source
    for blk in sim.iter_blocks():
        live.push_events(blk.indices, blk.counts)
    b = live.live_ssb.window.bin
    out = tmp_path / "batch.zarr"
    assert main(["reconstruct", str(sim.path), "--method", "ssb", "--bin", str(b), "--out", str(out), "--quiet"]) == 0
    batch = xr.open_zarr(out).phase
    assert abs(live.aberrations.C10 - batch.attrs["aberration_C10"]) < 1e-9
    assert -115 < live.aberrations.C10 < -85  # the right sign
    _assert_close(live.ssb_phase, batch.values)
    attrs = live.result().phase.attrs
    assert attrs["aberration_C10"] == live.aberrations.C10 and attrs["c10_source"].startswith("auto")
    assert attrs["c10_search_range_a"] == batch.attrs["c10_search_range_a"]
