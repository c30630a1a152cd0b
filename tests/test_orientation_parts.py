"""The parallax's building blocks against brute force: whole-plane sums on the half plane, peaks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdask.calibrate.orientation import AlignedPower, HalfPlane, _form, _peaks


def _whole_plane_power(images, k, flip, v, step):
    """Σ over the whole fft2 plane of |mean_j S_j·e^{iφ_j}|², φ_j = 2π(f_y·d_y/step_y + f_x·d_x/step_x),
    every frequency as ``fftfreq`` assigns it (the Nyquist ones at −½)."""
    spec = np.fft.fft2(images)
    f_y = np.fft.fftfreq(images.shape[1])[:, None] / step[0]
    f_x = np.fft.fftfreq(images.shape[2])[None, :] / step[1]
    d = k @ _form(v[0], v[1], flip).T
    phase = np.exp(2j * np.pi * (f_y[None] * d[:, 0, None, None] + f_x[None] * d[:, 1, None, None]))
    return float(np.sum(np.abs((spec * phase).mean(axis=0)) ** 2))


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (6, 5), (9, 6)])
@pytest.mark.parametrize("flip", [False, True])
def test_aligned_power_on_the_half_plane_is_the_whole_planes(shape, flip):
    rng = np.random.default_rng(sum(shape) + flip)
    n, step = 5, (0.3, 0.2)
    images = rng.normal(size=(n, *shape))
    k = rng.normal(size=(n, 2))
    plane = HalfPlane(*shape, step)
    power = AlignedPower(plane.extend(np.fft.rfft2(images)), k, flip, plane)
    v = np.array([0.7, -0.4])
    p, grad, hess = power(v)
    assert p == pytest.approx(_whole_plane_power(images, k, flip, v, step), rel=1e-12)
    h = 1e-6
    for i in range(2):
        e = np.eye(2)[i] * h
        up, down = _whole_plane_power(images, k, flip, v + e, step), _whole_plane_power(images, k, flip, v - e, step)
        num = (up - down) / (2 * h)
        assert grad[i] == pytest.approx(num, rel=1e-5, abs=1e-8)
        num_h = (power(v + e)[1] - power(v - e)[1]) / (2 * h)
        np.testing.assert_allclose(hess[i], num_h, rtol=1e-5, atol=1e-8)
    assert plane.power(power.spec.mean(axis=0), dc=False) == pytest.approx(
        np.sum(np.abs(np.fft.fft2(images).mean(axis=0)) ** 2) - np.abs(np.fft.fft2(images).mean(axis=0)[0, 0]) ** 2)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (6, 5)])
def test_fold_gives_the_real_part_of_the_whole_planes_cross_correlation(shape):
    rng = np.random.default_rng(len(shape) + shape[0])
    step = (0.25, 0.25)
    images = rng.normal(size=(4, *shape))
    plane = HalfPlane(*shape, step)
    shifts = rng.normal(size=(4, 2))
    a = plane.shifted(plane.extend(np.fft.rfft2(images)), shifts).mean(axis=0)
    cc = np.fft.irfft2(np.fft.rfft2(images[0]) * plane.fold(a).conj(), s=shape)
    # brute force: the shifted mean on the whole plane (fftfreq's frequencies)
    f_y = np.fft.fftfreq(shape[0])[:, None] / step[0]
    f_x = np.fft.fftfreq(shape[1])[None, :] / step[1]
    whole = np.mean([np.fft.fft2(im) * np.exp(2j * np.pi * (f_y * s[0] + f_x * s[1])) for im, s in zip(images, shifts)],
                    axis=0)
    np.testing.assert_allclose(cc, np.fft.ifft2(np.fft.fft2(images[0]) * whole.conj()).real, atol=1e-12)


def _peak_brute(cc, center, window):
    ny, nx = cc.shape
    best = None
    for y in range(ny):
        for x in range(nx):
            sy, sx = (y + ny / 2) % ny - ny / 2, (x + nx / 2) % nx - nx / 2
            if (sy - center[0]) ** 2 + (sx - center[1]) ** 2 <= window**2 and (best is None or cc[y, x] > cc[best]):
                best = (y, x)
    if best is None:
        best = (int(round(center[0])) % ny, int(round(center[1])) % nx)
    y, x = best
    c0 = cc[y, x]

    def sub(a, b):
        den = a - 2 * c0 + b
        return float(np.clip(0.5 * (a - b) / den, -0.5, 0.5)) if den < 0 else 0.0

    return ((y + ny / 2) % ny - ny / 2 + sub(cc[y - 1, x], cc[(y + 1) % ny, x]),
            (x + nx / 2) % nx - nx / 2 + sub(cc[y, x - 1], cc[y, (x + 1) % nx]))


@given(st.integers(4, 9), st.integers(4, 9), st.floats(0.3, 6.0), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_peaks_find_each_windowed_maximum_with_its_parabolic_offset(ny, nx, window, seed):
    rng = np.random.default_rng(seed)
    cc = rng.normal(size=(3, ny, nx))
    centers = rng.uniform(-6, 6, size=(3, 2))
    got = _peaks(cc, centers, window)
    np.testing.assert_allclose(got, [_peak_brute(c, m, window) for c, m in zip(cc, centers)], atol=1e-12)


def _curl_form_whole_plane(v_y, v_x, step, flip):
    """The 2×2 solenoidal-energy form of :func:`rotation_from_com`, by brute force: each basis
    field rotated in real space, mirror-extended and transformed with fft2 over the whole plane."""
    from stemdask.kernels.icom import mirror_extend
    from stemdask.optics import detector_to_scan_frame

    basis = []
    for angle in (0.0, 90.0):
        g_y, g_x = mirror_extend(*detector_to_scan_frame(v_y, v_x, angle, flip))
        k_y = np.fft.fftfreq(g_y.shape[0], step[0])[:, None]
        k_x = np.fft.fftfreq(g_y.shape[1], step[1])[None, :]
        k = np.hypot(k_y, k_x)
        k[0, 0] = 1.0
        t = (k_x * np.fft.fft2(g_y) - k_y * np.fft.fft2(g_x)) / k
        t[0, 0] = 0.0
        basis.append(t)
    return np.array([[np.vdot(a, b).real for b in basis] for a in basis])


@pytest.mark.parametrize("shape", [(6, 6), (5, 8), (7, 4)])
@pytest.mark.parametrize("flip", [False, True])
def test_curl_form_on_the_half_plane_is_the_whole_planes(shape, flip):
    from stemdask.calibrate.orientation import _curl_bases

    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    v_y, v_x = rng.normal(size=shape), rng.normal(size=shape)
    step = (0.3, 0.2)
    weights, bases = _curl_bases(v_y, v_x, step)
    got = np.array([[np.sum(weights * a * b) for b in bases[flip]] for a in bases[flip]])
    np.testing.assert_allclose(got, _curl_form_whole_plane(v_y, v_x, step, flip), rtol=1e-12)
