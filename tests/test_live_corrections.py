"""Live COM and riCOM honour the stored detector mask and descan exactly as batch does
(issue 10 item 1/3: "every product … batch and live riCOM honours it consistently")."""

from __future__ import annotations

import numpy as np
import pytest

import stemdask
from stemdask.live_session import LiveSession
from stemdask.methods.ricom import ricom

from helpers import realistic_calibrated

KW = dict(kernel_size=21, kmin=0.05, kmax=2.0)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """A realistic recording (off-centre disk, descan, hot/dead pixels, dead column), calibrated."""
    store = realistic_calibrated(tmp_path_factory.mktemp("live-corr") / "r.zarr", 5, scan_shape=(24, 28),
                                 detector=32, dose=1500, seed=5)
    path = store.path
    mask, fill = store.detector_mask()
    ds = stemdask.open(path)
    com = ds.com(reference="bf").compute()
    return {"store": store, "mask": mask, "fill": fill, "com": com,
            "phase": ricom(ds.com(reference="bf"), ds.calibration, **KW).phase.values}


def _session(c) -> LiveSession:
    s = c["store"]
    return LiveSession(s.scan_shape, s.detector_shape, s.calibration, methods=("ricom", "com"),
                       mask=c["mask"], fill=c["fill"], **KW)


def _check(live: LiveSession, c) -> None:
    snap = live.snapshot()
    assert np.allclose(snap["com_y"], c["com"].com_y.values, atol=1e-9)
    assert np.allclose(snap["com_x"], c["com"].com_x.values, atol=1e-9)
    assert np.abs(snap["phase"] - c["phase"]).max() <= 1e-6 * np.abs(c["phase"]).max()


def test_live_events_with_mask_and_descan_equal_batch(calibrated):
    live = _session(calibrated)
    for blk in calibrated["store"].iter_blocks():
        live.push_events(blk.indices, blk.counts)
    _check(live, calibrated)


def test_live_frames_with_mask_and_descan_equal_batch(calibrated):
    live = _session(calibrated)
    n_pix = int(np.prod(calibrated["store"].detector_shape))
    for blk in calibrated["store"].iter_blocks():
        o = blk.offsets
        frames = np.stack([np.bincount(blk.indices[o[p]:o[p + 1]], minlength=n_pix) for p in range(blk.counts.size)])
        live.push_frames(frames.astype(np.uint16).reshape((-1,) + calibrated["store"].detector_shape))
    _check(live, calibrated)
    # the masked pixels count nowhere: a hot pixel never reaches the counts image
    hot = np.argwhere(calibrated["mask"])
    assert live.snapshot()["counts"].sum() < calibrated["store"].n_events and len(hot)


def test_a_mask_of_the_wrong_shape_is_refused(calibrated):
    s = calibrated["store"]
    with pytest.raises(ValueError, match="detector mask"):
        LiveSession(s.scan_shape, s.detector_shape, s.calibration, mask=np.ones((3, 3), bool), fill=np.zeros((3, 3)))
