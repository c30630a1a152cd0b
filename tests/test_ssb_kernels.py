"""SSB kernels against brute-force NumPy: χ polynomial, trotter sums, trotter counts, the CUDA kernel
(numba's CUDA simulator here, CuPy on a GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdask.kernels.ssb import chi_coefficients, chi_poly, ssb_partial, trotter_counts
from stemdask.kernels.ssb_cuda import ssb_partial_cuda
from stemdask.optics import Aberrations, chi, wavelength_a

LAM = wavelength_a(300e3)

coefficient = st.floats(-2e4, 2e4, allow_nan=False)
angle = st.floats(-360, 360, allow_nan=False)
aberrations = st.builds(Aberrations, C10=coefficient, C12=coefficient, phi12=angle, C21=coefficient,
                        phi21=angle, C23=coefficient, phi23=angle, C30=st.floats(-1e7, 1e7, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(ab=aberrations, k=st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=2))
def test_chi_poly_equals_optics_chi(ab, k):
    c = chi_coefficients(ab, LAM)
    expected = chi(k[0], k[1], LAM, ab)
    assert chi_poly(k[0], k[1], c) == pytest.approx(float(expected), rel=1e-9, abs=1e-9 * (1 + abs(expected)))


def brute_trotter_sum(g, k_y, k_x, q_y, q_x, k0, ab):
    """Direct loops with optics.chi: Σ over left lobe of −i·G·e^{i(χ(k−Q)−χ(k))}, right lobe of
    +i·G·e^{i(χ(k)−χ(k+Q))} (weak-phase SSB, derivation in stemdask.methods.ssb)."""
    out = np.zeros(g.shape[:2], complex)
    for iy, qy in enumerate(q_y):
        for ix, qx in enumerate(q_x):
            for p in range(len(k_y)):
                ky, kx = k_y[p], k_x[p]
                minus = np.hypot(ky - qy, kx - qx) < k0
                plus = np.hypot(ky + qy, kx + qx) < k0
                c_k = chi(ky, kx, LAM, ab)
                if minus and not plus:
                    out[iy, ix] += -1j * g[iy, ix, p] * np.exp(1j * (chi(ky - qy, kx - qx, LAM, ab) - c_k))
                elif plus and not minus:
                    out[iy, ix] += 1j * g[iy, ix, p] * np.exp(1j * (c_k - chi(ky + qy, kx + qx, LAM, ab)))
    return out


def random_case(seed, nqy=5, nqx=4, npix=30):
    rng = np.random.default_rng(seed)
    k0 = 1.0
    r = k0 * np.sqrt(rng.uniform(0, 1, npix))
    t = rng.uniform(0, 2 * np.pi, npix)
    k_y, k_x = r * np.sin(t), r * np.cos(t)
    q_y = rng.uniform(-1.2, 1.2, nqy) * k0
    q_x = rng.uniform(0, 1.2, nqx) * k0
    g = (rng.normal(size=(nqy, nqx, npix)) + 1j * rng.normal(size=(nqy, nqx, npix))).astype(np.complex64)
    return g, k_y, k_x, q_y, q_x, k0


@pytest.mark.parametrize("seed", range(3))
def test_ssb_partial_matches_brute_force(seed):
    g, k_y, k_x, q_y, q_x, k0 = random_case(seed)
    ab = Aberrations(C10=-150 + 100 * seed, C12=30, phi12=20, C21=500, phi21=-40, C23=300, phi23=70, C30=2e4)
    got = ssb_partial(g, k_y, k_x, q_y, q_x, k0, chi_coefficients(ab, LAM))
    want = brute_trotter_sum(g, k_y, k_x, q_y, q_x, k0, ab)
    assert np.abs(want).max() > 1  # lobes were hit
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * np.abs(want).max() * 100)


@pytest.mark.parametrize("seed", range(3))
def test_trotter_counts_matches_brute_force(seed):
    _, k_y, k_x, q_y, q_x, k0 = random_case(seed, npix=200)
    got = trotter_counts(k_y, k_x, q_y, q_x, k0)
    d_minus = np.hypot(k_y - q_y[:, None, None], k_x - q_x[None, :, None]) < k0
    d_plus = np.hypot(k_y + q_y[:, None, None], k_x + q_x[None, :, None]) < k0
    want = (d_minus != d_plus).sum(axis=-1)
    assert want.max() > 0
    np.testing.assert_array_equal(got, want)


def test_cuda_trotter_sum_matches_numba_under_the_cuda_simulator():
    """The GPU kernel (masks and weights inline, one block per Q, shared-memory sums) run by
    numba's CUDA simulator on NumPy arrays, in a process of its own (the simulator is chosen
    when numba is imported)."""
    script = """
import numpy as np
from stemdask.kernels.ssb import chi_coefficients, ssb_partial
from stemdask.kernels.ssb_cuda import ssb_partial_cuda
from stemdask.optics import Aberrations
rng = np.random.default_rng(4)
k0, n = 0.5, 90
r, t = k0 * np.sqrt(rng.random(n)), 2 * np.pi * rng.random(n)
k_y, k_x = r * np.sin(t), r * np.cos(t)
q_y, q_x = np.fft.fftfreq(4, 0.35), np.fft.rfftfreq(6, 0.35)[1:4]  # a q_x chunk: not from 0
g = (rng.normal(size=(4, 3, n)) + 1j * rng.normal(size=(4, 3, n))).astype(np.complex64)
c = chi_coefficients(Aberrations(C10=-80, C12=20, phi12=33, C30=1e4, C23=200, phi23=15), 0.0197)
got, want = ssb_partial_cuda(g, k_y, k_x, q_y, q_x, k0, c), ssb_partial(g, k_y, k_x, q_y, q_x, k0, c)
assert got.dtype == np.complex128 and got.shape == want.shape == (4, 3)
assert np.abs(want).max() > 1 and (want == 0).any()  # trotters and frequencies beyond 2 k0
np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
print("ok")
"""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


@pytest.mark.gpu
def test_cupy_trotter_sum_matches_numba():
    cupy = pytest.importorskip("cupy")
    g, k_y, k_x, q_y, q_x, k0 = random_case(1, nqy=9)
    c = chi_coefficients(Aberrations(C10=-80, C12=20, phi12=33), LAM)
    got = ssb_partial_cuda(cupy.asarray(g), k_y, k_x, q_y, q_x, k0, c)
    assert isinstance(got, cupy.ndarray)
    want = ssb_partial(g, k_y, k_x, q_y, q_x, k0, c)
    np.testing.assert_allclose(got.get(), want, rtol=0, atol=1e-5 * np.abs(want).max())
