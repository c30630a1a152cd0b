import dataclasses

import numpy as np
import pytest

from stemdask import open_store
from stemdask.kernels.sampling import sample_events
from stemdask.optics import Aberrations
from stemdask.simulate import SimulationParams, load_truth, simulate, simulate_dense


def _com(intensity, n):
    k = np.arange(n) - n // 2
    tot = intensity.sum((-2, -1))
    return (intensity.sum(-1) * k).sum(-1) / tot, (intensity.sum(-2) * k).sum(-1) / tot


def test_patterns_are_normalised_and_centred():
    p = SimulationParams(scan_shape=(8, 8), detector=32, max_phase=0.0)
    intensity, truth = simulate_dense(p)
    assert np.allclose(intensity.sum((-2, -1)), 1.0, atol=1e-5)
    cy, cx = _com(intensity, 32)  # vacuum: disk centred exactly on pixel N/2
    assert np.allclose(cy, 0, atol=1e-6) and np.allclose(cx, 0, atol=1e-6)
    # BF disk radius = alpha / pixel
    mean = intensity.mean((0, 1))
    assert mean[16, 16 + int(p.calibration().bf_radius) - 1] > 0.5 * mean[16, 16]
    assert mean[16, 16 + int(p.calibration().bf_radius) + 2] < 1e-3 * mean[16, 16]


def test_com_follows_phase_gradient():
    """A thin phase object deflects the beam along +grad(phi) (positive phase attracts)."""
    p = SimulationParams(scan_shape=(32, 32), detector=32, max_phase=0.3)
    intensity, truth = simulate_dense(p)
    cy, cx = _com(intensity, 32)
    gy, gx = np.gradient(truth.astype(float))
    assert np.corrcoef(cy.ravel(), gy.ravel())[0, 1] > 0.9
    assert np.corrcoef(cx.ravel(), gx.ravel())[0, 1] > 0.9


def test_object_breaks_symmetries():
    p = SimulationParams(scan_shape=(48, 48), detector=16)
    _, truth = simulate_dense(p)
    for op in (lambda a: a[::-1], lambda a: a[:, ::-1], lambda a: a.T, lambda a: a[::-1, ::-1]):
        # the transformed object never coincides with any cyclic shift of itself
        f1, f2 = np.fft.fft2(truth), np.fft.fft2(op(truth))
        xcorr = np.fft.ifft2(f1 * np.conj(f2)).real
        assert xcorr.max() < 0.999 * (truth**2).sum()


@pytest.mark.parametrize("q,flip", [(1, False), (2, False), (0, True), (3, True)])
def test_rotation_and_flip_transform_the_com_field(q, flip):
    from stemdask.optics import detector_to_scan_frame

    base = SimulationParams(scan_shape=(16, 16), detector=32, max_phase=0.3)
    turned = SimulationParams(scan_shape=(16, 16), detector=32, max_phase=0.3, rotation_quarter_turns=q, flip=flip)
    i0, _ = simulate_dense(base)
    i1, _ = simulate_dense(turned)
    s = detector_to_scan_frame(*_com(i1, 32), 90.0 * q, flip)
    ref = np.array(_com(i0, 32))
    # exact up to the Nyquist row/column of the even detector, which a mirror wraps (~1e-7 px)
    assert np.abs(ref).max() > 0.05
    assert np.allclose(s, ref, atol=1e-5)


def test_sampling_kernel_matches_distribution():
    rng = np.random.default_rng(0)
    p = rng.random((3, 50))
    p /= p.sum(1, keepdims=True) * 1.25  # 80 % detected
    counts, idx = sample_events(np.repeat(p, 2000, axis=0), 40.0, 7)
    assert counts.mean() == pytest.approx(32.0, rel=0.02)
    off = np.concatenate([[0], np.cumsum(counts.astype(np.int64))])
    for j in range(6):
        seg = idx[off[j] : off[j + 1]]
        assert np.all(np.diff(seg.astype(int)) >= 0)  # ascending within a position
    hist = np.bincount(idx[: off[2000]], minlength=50) / off[2000]
    assert np.allclose(hist, p[0] / p[0].sum(), atol=0.01)
    again = sample_events(np.repeat(p, 2000, axis=0), 40.0, 7)
    assert np.array_equal(again[1], idx)  # reproducible from the seed


def test_simulate_into_store_is_poisson_around_dose(tmp_path):
    p = SimulationParams(scan_shape=(12, 10), detector=32, dose=500, aberrations=Aberrations(C10=-50))
    store = simulate(tmp_path / "s.zarr", p, rows_per_block=5, progress=False)
    assert store.complete and store.scan_shape == (12, 10)
    s = open_store(tmp_path / "s.zarr")
    s.validate()
    counts = s.counts()
    assert counts.mean() == pytest.approx(500, rel=0.02)
    assert counts.std() == pytest.approx(np.sqrt(500), rel=0.3)
    truth = load_truth(tmp_path / "s.zarr")
    assert truth.shape == (12, 10) and truth.max() == pytest.approx(0.5, rel=0.1)
    assert s.calibration.bf_center == (16.0, 16.0)
    assert s.provenance["simulation"]["aberrations"]["C10"] == -50


@pytest.mark.parametrize("q,flip", [(1, False), (3, True)])
def test_quarter_turns_permute_the_patterns_with_the_probe_in_the_scan_frame(q, flip):
    """Stored pattern D(d) = scan-frame pattern S(R·F·d): an index permutation for quarter
    turns. With astigmatism the probe (azimuths in the scan frame) must turn with the object."""
    ab = Aberrations(C10=-20.0, C12=40.0, phi12=25.0)
    base, _ = simulate_dense(SimulationParams(scan_shape=(8, 8), detector=32, max_phase=0.3, aberrations=ab))
    turned, _ = simulate_dense(SimulationParams(scan_shape=(8, 8), detector=32, max_phase=0.3, aberrations=ab,
                                                rotation_quarter_turns=q, flip=flip))
    n = 32
    d = np.arange(n) - n // 2
    d_y, d_x = np.meshgrid(d, d, indexing="ij")
    d_x = -d_x if flip else d_x
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][q]
    s_y, s_x = s * d_x + c * d_y, c * d_x - s * d_y
    expect = base[..., (s_y + n // 2) % n, (s_x + n // 2) % n]
    # equal up to the probe window's edge (the even window is not symmetric about its centre)
    assert np.abs(turned - expect).max() < 1e-3 * base.max()
    wrong = SimulationParams(scan_shape=(8, 8), detector=32, max_phase=0.3, rotation_quarter_turns=q, flip=flip,
                             aberrations=dataclasses.replace(ab, phi12=25.0 + 90.0 * q))
    assert np.abs(simulate_dense(wrong)[0] - expect).max() > 0.05 * base.max()
