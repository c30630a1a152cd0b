"""SSB ptychography against an independent brute-force NumPy SSB and the simulator's phase.

The small helpers the ``test_ssb_*`` files share (dense arrays in the ``EventDataset.densify``
layout, band limits, correlations) are in ``helpers.py``.
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from stemdask.methods.ssb import SSBResult, ssb, to_gpu
from stemdask.optics import Aberrations, chi, detector_to_scan_frame
from stemdask.testing import raise_if_dask_computes

from helpers import as_dense, band_limited, filtered, pearson, scan_frequencies, simulated, slope


# ---------------------------------------------------------------------- helpers
def pixel_grid(calibration, n):
    """Detector pixel frequencies (Å⁻¹, scan frame), (N, N) each."""
    lam = calibration.wavelength_a
    k = (np.arange(n) - calibration.bf_center[0]) * calibration.detector_pixel_mrad
    dy, dx = np.meshgrid(k, k, indexing="ij")
    sy, sx = detector_to_scan_frame(dy, dx, calibration.rotation_deg, calibration.flip)
    return sy * 1e-3 / lam, sx * 1e-3 / lam


def brute_force_ssb(counts, calibration, ab, quantitative):
    """Direct SSB, one scan frequency at a time over the full plane (no rfft, no chunks, no
    polynomial χ): Φ(Q) = Σ_left −i·G·e^{i(χ(k−Q)−χ(k))} + Σ_right +i·G·e^{i(χ(k)−χ(k+Q))},
    divided by the BF intensity Σ_disk G(k, 0) (× n_trotter/n_disk if quantitative)."""
    ny, nx, n, _ = counts.shape
    lam = calibration.wavelength_a
    k0 = calibration.semiangle_mrad * 1e-3 / lam
    G = np.fft.fft2(counts.astype(np.float64), axes=(0, 1)) / (ny * nx)
    ky, kx = pixel_grid(calibration, n)
    disk = np.hypot(ky, kx) < k0
    bf = G[0, 0][disk].real.sum()
    qy, qx = scan_frequencies((ny, nx), calibration.scan_step_a)
    spectrum = np.zeros((ny, nx), complex)
    chi_k = chi(ky, kx, lam, ab)
    for iy in range(ny):
        for ix in range(nx):
            q = (qy[iy, ix], qx[iy, ix])
            minus = np.hypot(ky - q[0], kx - q[1]) < k0
            plus = np.hypot(ky + q[0], kx + q[1]) < k0
            left, right = disk & minus & ~plus, disk & plus & ~minus
            g = G[iy, ix]
            s = (-1j * g[left] * np.exp(1j * (chi(ky[left] - q[0], kx[left] - q[1], lam, ab) - chi_k[left]))).sum()
            s += (1j * g[right] * np.exp(1j * (chi_k[right] - chi(ky[right] + q[0], kx[right] + q[1], lam, ab)))).sum()
            n_trotter = left.sum() + right.sum()
            if n_trotter:
                spectrum[iy, ix] = s / (bf * n_trotter / disk.sum() if quantitative else bf)
    return np.fft.ifft2(spectrum).real * ny * nx


# ---------------------------------------------------------------------- exactness
@pytest.mark.parametrize("quantitative", [False, True])
def test_matches_brute_force_numpy_ssb(quantitative):
    # Odd scan width (irfft), rotated + flipped detector, every aberration term.
    counts, _, cal = simulated(-60.0, scan=(20, 17), detector=16, dose=1e4, rotation_quarter_turns=1, flip=True)
    ab = Aberrations(C10=-60, C12=15, phi12=30, C21=400, phi21=-20, C23=250, phi23=10, C30=3e4)
    got = ssb(as_dense(counts, cal, rows_per_block=6), cal, ab, quantitative=quantitative).phase.values
    want = brute_force_ssb(counts, cal, ab, quantitative)
    assert got.shape == want.shape == (20, 17)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_qx_chunking_and_row_blocks_do_not_change_the_result():
    counts, _, cal = simulated(-50.0, scan=(16, 16), detector=16, dose=1e4)
    ab = Aberrations(C10=-50)
    ref = ssb(as_dense(counts, cal, rows_per_block=16), cal, ab, qx_chunk=10_000).phase.values
    for rows, chunk in ((3, 1), (5, 7), (8, None)):
        r = ssb(as_dense(counts, cal, rows_per_block=rows), cal, ab, qx_chunk=chunk)
        if chunk:
            assert r.G.chunks[1][0] == min(chunk, len(r.q_x)) and len(r.G.chunks[2]) == 1
        np.testing.assert_allclose(r.phase.values, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


# ---------------------------------------------------------------------- laziness
def counted_dense(counts, cal):
    """A dense array whose blocks count how often they are computed."""
    calls = []

    def load(block, block_info=None):
        calls.append(block_info[None]["chunk-location"][0])
        return block

    dense = as_dense(counts, cal)
    return dense.copy(data=dense.data.map_blocks(load, dtype=np.float32)), calls


def test_building_the_graph_computes_nothing_and_phase_reads_each_block_once():
    counts, _, cal = simulated(scan=(16, 16), detector=16, dose=1e3)
    dense, calls = counted_dense(counts, cal)
    with raise_if_dask_computes():
        result = ssb(dense, cal, Aberrations(C10=-20))
        phase = result.phase
        assert isinstance(phase.data, da.Array) and calls == []
    with dask.config.set(scheduler="sync"):
        phase.compute()
    assert sorted(calls) == [0, 1]  # 16 rows, 8 per block: each block once


def test_refocus_reruns_only_the_reduction():
    counts, truth, cal = simulated(-100.0)
    dense, calls = counted_dense(counts, cal)
    result = ssb(dense, cal)  # built with no correction
    refocused = result.refocus(C10=-100.0)  # keeps G (one pass over the data), then reduces
    n_reads = len(calls)
    assert n_reads == 6
    names = {k[0] if isinstance(k, tuple) else k for k in refocused.data.__dask_graph__()}
    assert not any(n.startswith(("ssb-rfft-x", "rechunk")) for n in names)  # G is data now
    again = result.refocus(Aberrations(C10=-100.0)).values
    assert len(calls) == n_reads
    fresh = ssb(as_dense(counts, cal), cal, Aberrations(C10=-100.0)).phase.values
    np.testing.assert_allclose(refocused.values, fresh, rtol=0, atol=1e-6 * np.abs(fresh).max())
    np.testing.assert_array_equal(again, refocused.values)
    assert refocused.attrs["aberration_C10"] == -100.0


def test_reconstructions_computed_together_do_not_share_keys():
    a, _, cal = simulated(0.0, scan=(16, 16), detector=16, dose=1e4, seed=1)
    b, _, _ = simulated(-80.0, scan=(16, 16), detector=16, dose=1e4, seed=2)
    ra, rb = ssb(as_dense(a, cal), cal), ssb(as_dense(b, cal), cal, Aberrations(C10=-80.0))
    together = dask.compute(ra.phase.data, rb.phase.data, rb.refocus(C10=0.0).data)
    alone = ra.phase.values, rb.phase.values, rb.refocus(C10=0.0).values
    for t, s in zip(together, alone):
        np.testing.assert_array_equal(t, s)
    assert np.abs(together[1] - together[2]).max() > 0.1 * np.abs(together[1]).max()


# ---------------------------------------------------------------------- physics
@pytest.fixture(scope="module")
def in_focus():
    return simulated(0.0)


@pytest.fixture(scope="module")
def defocused():
    return simulated(-100.0)


def ssb_transfer(cal, n, shape):
    """The SNR weighting's transfer n_trotter(Q)/n_disk, counted directly on the pixel grid."""
    ky, kx = pixel_grid(cal, n)
    k0 = cal.semiangle_mrad * 1e-3 / cal.wavelength_a
    disk = np.hypot(ky, kx) < k0
    ky, kx = ky[disk], kx[disk]

    def transfer(qy, qx):
        minus = np.hypot(ky - qy[..., None], kx - qx[..., None]) < k0
        plus = np.hypot(ky + qy[..., None], kx + qx[..., None]) < k0
        return (minus != plus).sum(-1) / disk.sum()

    return transfer


def test_in_focus_weak_phase_object(in_focus):
    counts, truth, cal = in_focus
    phase = ssb(as_dense(counts, cal), cal)
    image = phase.phase.values
    # Default (SNR) weighting: the phase filtered by its transfer n_trotter/n_disk.
    expected = filtered(truth, cal.scan_step_a, ssb_transfer(cal, counts.shape[-1], truth.shape))
    assert pearson(image, expected) >= 0.97
    assert slope(image, expected) == pytest.approx(1.0, abs=0.1)
    # Positive at atoms: the strongest columns are the brightest places.
    atoms = truth > 0.7 * truth.max()
    assert image[atoms].mean() > image.mean() + 1.5 * image.std()
    assert pearson(image, band_limited(truth, cal.scan_step_a, 2 * phase.k0)) >= 0.94


def test_quantitative_has_unit_slope(in_focus):
    counts, truth, cal = in_focus
    result = ssb(as_dense(counts, cal), cal, quantitative=True)
    image = result.phase.values
    # Unit transfer for 0 < |Q| < 2α/λ: compare with the truth band-limited there (SSB's
    # band limit; the simulated object has no content beyond ≈ α/λ anyway).
    reference = band_limited(truth, cal.scan_step_a, 2 * result.k0)
    assert pearson(image, reference) >= 0.97
    assert slope(image, reference) == pytest.approx(1.0, abs=0.1)
    assert result.phase.attrs["weighting"] == "quantitative"


def test_defocus_sign_c10_negative_is_underfocus(defocused):
    counts, truth, cal = defocused
    result = ssb(as_dense(counts, cal), cal, quantitative=True)
    reference = band_limited(truth, cal.scan_step_a, 2 * result.k0)
    right = pearson(result.refocus(C10=-100.0).values, reference)
    wrong = pearson(result.refocus(C10=+100.0).values, reference)
    none = pearson(result.refocus(C10=0.0).values, reference)
    assert right >= 0.95
    assert wrong < 0.3 and none < 0.0


# ---------------------------------------------------------------------- pitfalls (DESIGN §4)
def test_scan_rotation_and_flip_come_from_the_calibration():
    counts, truth, cal = simulated(-100.0, rotation_quarter_turns=1, flip=True)
    ab = Aberrations(C10=-100.0)
    reference = band_limited(truth, cal.scan_step_a, 2 * ssb(as_dense(counts, cal), cal).k0)

    def r(c):
        return pearson(ssb(as_dense(counts, c), c, ab, quantitative=True).phase.values, reference)

    assert r(cal) >= 0.95
    assert r(cal.replace(flip=False)) < 0.7
    assert r(cal.replace(rotation_deg=0.0)) < 0.7


def test_flip_and_half_turn_in_focus(in_focus):
    counts, truth, cal = in_focus
    reference = band_limited(truth, cal.scan_step_a, 2 * ssb(as_dense(counts, cal), cal).k0)

    def r(c):
        return pearson(ssb(as_dense(counts, c), c, quantitative=True).phase.values, reference)

    assert abs(r(cal.replace(flip=True))) < 0.2  # a mirror in one axis: no correlation
    assert r(cal.replace(rotation_deg=180.0)) < -0.9  # inverted (and point-reflected)


def test_conjugated_G_inverts_the_image(in_focus):
    # The sideband/FFT-sign pitfall: conj(G) (or the other sideband with this one's formula)
    # turns the image over; ours correlates positively, the conjugate negatively.
    counts, truth, cal = in_focus
    result = ssb(as_dense(counts, cal), cal, quantitative=True)
    reference = band_limited(truth, cal.scan_step_a, 2 * result.k0)
    assert pearson(result.phase.values, reference) >= 0.97
    result.G = result.G.conj()
    assert pearson(result.phase.values, reference) < -0.5


def test_bf_centre_half_pixel_matters_under_defocus(defocused):
    counts, truth, cal = defocused
    ab = Aberrations(C10=-100.0)
    reference = band_limited(truth, cal.scan_step_a, 2 * ssb(as_dense(counts, cal), cal).k0)
    exact = pearson(ssb(as_dense(counts, cal), cal, ab, quantitative=True).phase.values, reference)
    # k = 0 at pixel N/2 − 0.5 instead of N/2 (the "centre of an even array" mistake).
    half = pearson(ssb(as_dense(counts, cal, shift_px=0.5), cal, ab, quantitative=True).phase.values, reference)
    assert exact >= 0.95
    assert half < exact - 0.08


def test_scan_frequencies_are_inverse_angstrom(defocused):
    counts, truth, cal = defocused
    ab = Aberrations(C10=-100.0)
    reference = band_limited(truth, cal.scan_step_a, 2 * ssb(as_dense(counts, cal), cal).k0)
    exact = pearson(ssb(as_dense(counts, cal), cal, ab).phase.values, reference)
    # Scan frequencies in cycles per pixel (a step of "1") fail under defocus.
    pixels = cal.replace(scan_step_a=(1.0, 1.0))
    wrong = pearson(ssb(as_dense(counts, pixels), pixels, ab).phase.values, reference)
    assert exact >= 0.95 and wrong < 0.0


# ---------------------------------------------------------------------- result object and errors
def test_result_is_a_labelled_dataarray(tmp_path):
    counts, _, cal = simulated(scan=(16, 12), detector=16, dose=1e3)
    result = ssb(as_dense(counts, cal), cal, {"C10": -30.0, "C30": 1e4})
    assert isinstance(result, SSBResult)
    phase = result.phase
    assert phase.dims == ("scan_y", "scan_x") and phase.shape == (16, 12) and phase.dtype == np.float32
    assert phase.attrs["units"] == "rad" and phase.attrs["weighting"] == "snr"
    assert phase.attrs["aberration_C10"] == -30.0 and phase.attrs["aberration_C30"] == 1e4
    np.testing.assert_allclose(phase.scan_x.values, np.arange(12) * cal.scan_step_a[1])
    assert phase.scan_y.attrs["units"] == "angstrom"
    xr.Dataset({"phase": phase}).to_zarr(tmp_path / "out.zarr")
    back = xr.open_zarr(tmp_path / "out.zarr")["phase"]
    np.testing.assert_array_equal(back.values, phase.values)
    assert back.attrs["units"] == "rad"
    assert result.transfer().compute()[0, 0] == 0  # no trotter at Q = 0


def test_g_at_is_the_scan_fft_on_the_detector():
    counts, _, cal = simulated(scan=(16, 16), detector=16, dose=1e4)
    result = ssb(as_dense(counts, cal), cal)
    G = np.fft.fft2(counts.astype(np.float64), axes=(0, 1)) / counts[..., 0, 0].size
    for iy, ix in ((3, 0), (13, 0), (2, 5), (14, 11)):  # (14, 11): q_x < 0, from G(−Q) = G(Q)*
        q_y, q_x = np.fft.fftfreq(16, d=cal.scan_step_a[0])[[iy, ix]]
        img = result.g_at(q_y, q_x)
        assert img.shape == (16, 16)
        inside = ~np.isnan(img)
        assert inside.sum() == len(result.k_y) and not inside[0, 0]  # the BF disk only
        np.testing.assert_allclose(img[inside], G[iy, ix][inside], rtol=0, atol=1e-5 * np.abs(G[iy, ix]).max())


def test_bad_input_is_named():
    counts, _, cal = simulated(scan=(8, 8), detector=16, dose=10)
    dense = as_dense(counts, cal)
    with pytest.raises(ValueError, match="dims"):
        ssb(dense.transpose("scan_x", "scan_y", "k_y", "k_x"), cal)
    with pytest.raises(ValueError, match="semi-angle"):
        ssb(dense, cal.replace(semiangle_mrad=None, bf_radius=None))
    with pytest.raises(TypeError, match="aberrations"):
        ssb(dense, cal, aberrations=3.0)
    with pytest.warns(UserWarning, match="cuts the BF disk"):
        ssb(dense.isel(k_y=slice(6, 11), k_x=slice(6, 11)), cal)
    with pytest.raises(ValueError, match="no detector pixel"):
        ssb(dense.isel(k_y=slice(0, 2), k_x=slice(0, 2)), cal)


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cupy_chunks_give_the_numpy_result(tmp_path):
    cupy = pytest.importorskip("cupy")
    counts, _, cal = simulated(-60.0, scan=(24, 20), detector=16, dose=1e4)
    dense = as_dense(counts, cal)
    on_gpu = to_gpu(dense)
    ab = Aberrations(C10=-60.0, C12=10.0, phi12=20.0)
    for quantitative in (False, True):
        want = ssb(dense, cal, ab, quantitative=quantitative).phase.values
        got = ssb(on_gpu, cal, ab, quantitative=quantitative).phase.data.compute()
        assert isinstance(got, cupy.ndarray)
        np.testing.assert_allclose(got.get(), want, rtol=0, atol=1e-5 * np.abs(want).max())
    kept = ssb(on_gpu, cal, scratch=tmp_path / "G.zarr").keep()  # through host Zarr and back
    got = kept.refocus(ab).data.compute()
    want = ssb(dense, cal, ab).phase.values
    np.testing.assert_allclose(got.get(), want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_sweep_finds_the_defocus_without_the_truth(defocused):
    counts, truth, cal = defocused
    result = ssb(as_dense(counts, cal), cal)
    sweep = result.sweep(np.arange(-200.0, 101.0, 20.0))
    assert sweep.phase.dims == ("C10", "scan_y", "scan_x") and isinstance(sweep.power.data, da.Array)
    best = float(sweep.power.idxmax())
    assert best == -100.0
    np.testing.assert_array_equal(sweep.phase.sel(C10=-100.0).values, result.refocus(C10=-100.0).values)
    with pytest.raises(ValueError, match="unknown aberration"):
        result.sweep([0.0], field="C99")
