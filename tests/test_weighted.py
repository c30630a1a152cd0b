"""Weighted entries (one per counted pixel, its count as weight) give exactly the dense
computation: kernels against their expanded events, and a 64×64 scan of 64×64 frames at
≈ 50 counts/pixel — COM, riCOM and SSB from the weighted store against the same methods fed
the dense frames."""

from __future__ import annotations

import numpy as np
import pytest

import stemdask.events
from stemdask.io import ingest
from stemdask.kernels.dense import counted_frames_to_events, counted_frames_to_weighted
from stemdask.kernels.events import annular_counts, center_of_mass, densify, histogram, position_sums
from stemdask.kernels.ricom import accumulator_zero, com_from_frames
from stemdask.live_ricom import LiveRiCOM
from stemdask.methods.ricom import ricom
from stemdask.methods.ssb import ssb
from stemdask.simulate import SimulationParams, simulate_dense

KW = dict(kernel_size=21, kmin=0.05, kmax=2.0)


@pytest.mark.parametrize("seed", range(4))
def test_weighted_kernels_equal_the_expanded_events(seed):
    rng = np.random.default_rng(seed)
    det = (9, 11)
    frames = rng.poisson(rng.uniform(0.05, 30), (23, det[0] * det[1])).astype(np.uint16)
    counts, events, _ = counted_frames_to_events(frames)
    entries, indices, weights, _, _ = counted_frames_to_weighted(frames, np.uint16, np.uint16)
    assert np.array_equal(np.repeat(indices, weights), events)
    assert np.array_equal(position_sums(entries, weights), counts)
    np.testing.assert_array_equal(histogram(indices, weights, frames.shape[1]), frames.sum(axis=0))
    ref = (4.3, 5.1)
    com_w = center_of_mass(entries, indices, det[1], *ref, weights=weights)
    com_e = center_of_mass(counts, events, det[1], *ref)
    np.testing.assert_allclose(com_w, com_e, rtol=0, atol=1e-12)
    ky, kx = np.divmod(np.arange(frames.shape[1]), det[1])
    with np.errstate(invalid="ignore"):
        dense_y = (frames * (ky - ref[0])).sum(1) / frames.sum(1)
    np.testing.assert_allclose(com_w[0], dense_y, rtol=0, atol=1e-12)
    n = frames.shape[0]
    ring = annular_counts(entries, indices, weights, det[1], np.full(n, ref[0]), np.full(n, ref[1]),
                          np.array([1.5**2]), np.array([4.0**2]), np.ones(frames.shape[1], np.uint8),
                          np.zeros(0, np.int64), np.zeros(0))
    r2 = (ky - ref[0]) ** 2 + (kx - ref[1]) ** 2
    np.testing.assert_array_equal(ring[:, 0], (frames * ((r2 >= 1.5**2) & (r2 < 4.0**2))).sum(1))
    lookup = np.arange(frames.shape[1], dtype=np.int64)
    out = np.zeros((n, *det), np.float32)
    densify(entries, indices, weights, lookup, out)
    np.testing.assert_array_equal(out.reshape(n, -1), frames)


@pytest.fixture(scope="module")
def dense_scan(tmp_path_factory):
    """64×64 scan, 64×64 detector, ≈ 50 counts/pixel (2·10⁵ per frame), Poisson counted."""
    p = SimulationParams(scan_shape=(64, 64), detector=64, dose=50 * 64 * 64, max_phase=0.4, seed=3)
    intensity, _ = simulate_dense(p)
    frames = np.random.default_rng(3).poisson(p.dose * intensity).astype(np.uint16)  # intensity: per electron
    folder = tmp_path_factory.mktemp("dense50")
    np.save(folder / "frames.npy", frames)
    store = ingest(folder / "frames.npy", folder / "s.zarr", calibration=p.calibration().to_dict(), progress=False)
    return p, frames, store


def test_a_dense_high_dose_scan_is_stored_weighted_and_exact(dense_scan):
    p, frames, store = dense_scan
    assert store.encoding == "weighted" and store.weight_dtype == np.uint16
    assert store.n_events == int(frames.sum()) and frames.sum() / frames.size > 40
    assert np.array_equal(store.counts(), frames.sum(axis=(2, 3)))
    raw = frames.size * 2
    assert store.nbytes_stored() <= 1.1 * raw, (store.nbytes_stored(), raw)


def test_com_and_ricom_equal_the_dense_computation(dense_scan):
    p, frames, store = dense_scan
    ds = stemdask.events.open(store.path)
    com = ds.com()
    ny, nx = store.scan_shape
    flat = frames.reshape(ny * nx, 64, 64)
    dense_y, dense_x = com_from_frames(flat, *store.calibration.bf_center, accumulator_zero(flat.dtype))
    assert np.abs(com["com_y"].values.ravel() - dense_y).max() <= 1e-9
    assert np.abs(com["com_x"].values.ravel() - dense_x).max() <= 1e-9
    live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KW)
    live.push_frames(flat)
    batch = ricom(com, ds.calibration, **KW).phase.values
    image = live.snapshot()
    assert np.abs(image - batch).max() <= 1e-6 * np.abs(batch).max()


def test_ssb_equals_ssb_of_the_dense_frames(dense_scan):
    p, frames, store = dense_scan
    ds = stemdask.events.open(store.path)
    dense = ds.densify().compute()
    cal = store.calibration
    ky = np.rint(dense.k_y.values / cal.detector_pixel_mrad + cal.bf_center[0]).astype(int)
    kx = np.rint(dense.k_x.values / cal.detector_pixel_mrad + cal.bf_center[1]).astype(int)
    from_frames = dense.copy(data=frames[:, :, ky][:, :, :, kx].astype(np.float32))
    np.testing.assert_array_equal(dense.values, from_frames.values)
    a = ssb(dense.chunk({"scan_y": 16}), cal).phase.values
    b = ssb(from_frames, cal).phase.values
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()
