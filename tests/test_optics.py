import math

import numpy as np
import pytest

from stemdask.optics import (
    Aberrations,
    Calibration,
    chi,
    detector_to_scan_frame,
    scan_to_detector_frame,
    wavelength_a,
)


def test_wavelength_300kev_matches_reference():
    # abTEM's value for the shared case (params.json): 0.01968748889772767 Å
    assert wavelength_a(300e3) == pytest.approx(0.01968748889772767, rel=1e-6)
    # 200 keV textbook value 0.02508 Å
    assert wavelength_a(200e3) == pytest.approx(0.025079, rel=1e-4)


def test_chi_defocus_matches_abtem_convention():
    # abTEM: chi = -pi * lambda * k^2 * defocus, defocus = -C10
    lam = wavelength_a(300e3)
    k = np.linspace(0, 1.5, 7)
    got = chi(k, 0 * k, lam, Aberrations(C10=-150.0))
    assert np.allclose(got, -np.pi * lam * k**2 * 150.0)


def test_chi_astigmatism_and_coma_azimuths():
    lam = wavelength_a(300e3)
    ab = Aberrations(C12=40.0, phi12=30.0)
    k = 0.8
    # maximal along phi12, minimal (negative) 90 deg away
    along = chi(k * math.sin(math.radians(30)), k * math.cos(math.radians(30)), lam, ab)
    across = chi(k * math.sin(math.radians(120)), k * math.cos(math.radians(120)), lam, ab)
    amp = 2 * np.pi / lam * 40.0 * (lam * k) ** 2 / 2
    assert along == pytest.approx(amp) and across == pytest.approx(-amp)
    coma = chi(0.0, k, lam, Aberrations(C21=1000.0))
    assert coma == pytest.approx(2 * np.pi / lam * 1000.0 * (lam * k) ** 3 / 3)
    assert chi(0.0, -k, lam, Aberrations(C21=1000.0)) == pytest.approx(-coma)


@pytest.mark.parametrize("rot", [0.0, 90.0, 33.0, 180.0])
@pytest.mark.parametrize("flip", [False, True])
def test_frame_transforms_are_inverse(rot, flip):
    rng = np.random.default_rng(1)
    vy, vx = rng.normal(size=(2, 10))
    sy, sx = detector_to_scan_frame(vy, vx, rot, flip)
    back = scan_to_detector_frame(sy, sx, rot, flip)
    assert np.allclose(back, (vy, vx))
    assert np.allclose(np.hypot(sy, sx), np.hypot(vy, vx))


def test_quarter_turn_is_counter_clockwise_in_xy():
    sy, sx = detector_to_scan_frame(np.array(0.0), np.array(1.0), 90.0, False)
    assert (float(sy), float(sx)) == pytest.approx((1.0, 0.0), abs=1e-12)
    sy, sx = detector_to_scan_frame(np.array(0.0), np.array(1.0), 0.0, True)
    assert (float(sy), float(sx)) == pytest.approx((0.0, -1.0))


@pytest.mark.parametrize(
    "bad", [dict(energy_ev=-1), dict(scan_step_a=float("nan")), dict(detector_pixel_mrad=0),
            dict(semiangle_mrad=-2), dict(bf_center=(1.0, float("inf"))), dict(rotation_deg=float("nan"))]
)
def test_bad_calibration_is_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Calibration(**bad)


def test_calibration_round_trips_dict():
    c = Calibration(energy_ev=200e3, scan_step_a=(0.3, 0.25), detector_pixel_mrad=0.5, bf_center=(10.5, 11), flip=True)
    assert Calibration.from_dict(c.to_dict()) == c
    assert c.detector_pixel_inv_a == pytest.approx(0.5e-3 / wavelength_a(200e3))


def test_descan_gradient_is_the_planes_slope_per_angstrom():
    from stemdask.optics import descan_gradient, descan_offsets

    record = {"model": "plane", "coef_y": [1.5, -2.0], "coef_x": [2.5, 1.0]}
    shape, step = (16, 12), (0.25, 0.5)
    dy, dx = descan_offsets(record, shape)
    got = descan_gradient(record, shape, step)
    want = [[(dy[1, 0] - dy[0, 0]) / step[0], (dy[0, 1] - dy[0, 0]) / step[1]],
            [(dx[1, 0] - dx[0, 0]) / step[0], (dx[0, 1] - dx[0, 0]) / step[1]]]
    np.testing.assert_allclose(got, want, rtol=1e-9)
    assert descan_gradient(None, shape, step) is None
