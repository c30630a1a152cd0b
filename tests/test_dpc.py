"""Regularised iterative DPC: sign and scale against the simulator, padding, regularisers, stopping."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from stemdask.kernels.dpc import dpc_phase
from stemdask.kernels.icom import integrate_com
from stemdask.methods.dpc import dpc

from helpers import WEAK, com_dataset, expected_com, pearson, probe_blurred, slope


def test_dpc_recovers_the_probe_blurred_phase_in_radians():
    cy, cx, truth = expected_com(WEAK)
    out = dpc(com_dataset(cy, cx, WEAK), WEAK.calibration(), iterations=200, tol=1e-6)
    assert isinstance(out.phase.data, da.Array)
    phase = out.phase.values
    blurred = probe_blurred(truth, WEAK)
    assert pearson(phase, truth) >= 0.95
    assert pearson(phase, blurred) > 0.9995
    assert slope(phase, blurred) == pytest.approx(1.0, abs=0.01)
    iy, ix = np.unravel_index(np.argmax(truth), truth.shape)
    assert phase[iy, ix] > np.percentile(phase, 95)  # positive at atoms
    assert out.phase.attrs["units"] == "rad"


def test_one_full_step_without_padding_is_fourier_integration():
    rng = np.random.default_rng(3)
    gy, gx = rng.normal(size=(2, 24, 30))
    a = dpc_phase(gy, gx, (0.3, 0.4), iterations=1, step=1.0, pad=0.0)
    b = integrate_com(gy, gx, (0.3, 0.4), pad="none")
    assert np.allclose(a, b, atol=1e-12)


def test_padding_handles_a_non_periodic_scan():
    """The COM of a crop of the object: wrap-around integration suffers, padded DPC does not."""
    cy, cx, truth = expected_com(WEAK)
    blurred = probe_blurred(truth, WEAK)
    crop = (slice(5, 45), slice(12, 60))
    s = WEAK.dk
    padded = dpc_phase(cy[crop] * s, cx[crop] * s, WEAK.scan_step, iterations=300, tol=1e-7, pad=0.5)
    plain = dpc_phase(cy[crop] * s, cx[crop] * s, WEAK.scan_step, iterations=300, tol=1e-7, pad=0.0)
    assert pearson(padded, blurred[crop]) > 0.995
    assert pearson(padded, blurred[crop]) > pearson(plain, blurred[crop]) + 0.01


def test_regularisers_damp_the_stated_frequencies():
    cy, cx, _ = expected_com(WEAK)
    s, step = WEAK.dk, WEAK.scan_step
    kw = dict(iterations=1, step=1.0, pad=0.0)
    base = np.fft.fft2(dpc_phase(cy * s, cx * s, step, **kw))
    q = np.hypot(*np.meshgrid(np.fft.fftfreq(64, step), np.fft.fftfreq(64, step), indexing="ij"))
    lam1 = 0.5**2  # Å⁻²: damps below 0.5 Å⁻¹
    low_cut = np.fft.fft2(dpc_phase(cy * s, cx * s, step, lambda1=lam1, **kw))
    lam2 = 1 / 1.5**2  # Å²: damps above 1.5 Å⁻¹
    high_cut = np.fft.fft2(dpc_phase(cy * s, cx * s, step, lambda2=lam2, **kw))
    sel = (q > 0) & (np.abs(base) > 1e-6 * np.abs(base).max())
    assert np.allclose(low_cut[sel], base[sel] * q[sel] ** 2 / (lam1 + q[sel] ** 2), rtol=1e-6, atol=1e-9)
    assert np.allclose(high_cut[sel], base[sel] / (1 + lam2 * q[sel] ** 2), rtol=1e-6, atol=1e-9)


def test_stopping_rule_on_the_relative_update():
    cy, cx, _ = expected_com(WEAK)
    s, step = WEAK.dk, WEAK.scan_step
    # with μ = 0.5 on periodic data the update halves each step: ‖Δ‖/‖φ‖ = 0.5^l / (1 − 0.5^l)
    loose = dpc_phase(cy * s, cx * s, step, iterations=500, tol=0.05, pad=0.0)
    five = dpc_phase(cy * s, cx * s, step, iterations=5, tol=0.0, pad=0.0)
    six = dpc_phase(cy * s, cx * s, step, iterations=6, tol=0.0, pad=0.0)
    # 0.5^5/(1 − 0.5^5) = 0.032 < 0.05 < 0.5^4/(1 − 0.5^4) = 0.067: stops after step 5
    assert np.allclose(loose, five, atol=1e-12) and not np.allclose(loose, six, atol=1e-6)


@pytest.mark.parametrize(
    "kw,match",
    [({"iterations": 0}, "iterations"), ({"step": 3.0}, "step"), ({"lambda1": -1.0}, "lambda1"),
     ({"lambda2": np.nan}, "lambda2"), ({"tol": -1.0}, "tol"), ({"pad": -0.1}, "pad")],
)
def test_bad_options_are_named(kw, match):
    cy, cx, _ = expected_com(WEAK)
    with pytest.raises(ValueError, match=match):
        dpc(com_dataset(cy, cx, WEAK), WEAK.calibration(), **kw)
