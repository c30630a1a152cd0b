"""The realistic-detector mode of the simulator: any scan rotation, off-centre disk, descan,
hot/dead pixels, Bragg pattern — each checked against an independent NumPy measurement."""

import dataclasses
import functools
import json

import numpy as np
import pytest

from stemdask import open_store
from stemdask.optics import (
    Aberrations,
    descan_offsets,
    detector_to_scan_frame,
    scan_to_detector_frame,
)
from stemdask.simulate import (
    SimulationParams,
    bragg_pattern,
    load_faults,
    object_on_grid,
    phase_object,
    simulate,
    simulate_dense,
)

SMALL = {"scan_shape": (16, 16), "detector": 32, "max_phase": 0.3}
DESCAN = {"model": "plane", "coef_y": [1.5, -2.0], "coef_x": [2.5, 1.0]}


@functools.lru_cache(maxsize=16)
def dense_p(p: SimulationParams):
    return simulate_dense(p)


def dense(**kwargs):
    return dense_p(SimulationParams(**{**SMALL, **kwargs}))


def com(intensity, center):
    """Centre of mass (y, x) of each pattern relative to ``center`` (px)."""
    n = intensity.shape[-1]
    k = np.arange(n)
    tot = intensity.sum((-2, -1))
    cy = (intensity.sum(-1) * k).sum(-1) / tot - center[0]
    cx = (intensity.sum(-2) * k).sum(-1) / tot - center[1]
    return cy, cx


def disk_centroid(pattern):
    """Centroid (y, x) of the BF disk thresholded softly: weights rise linearly from 0 at a
    quarter to 1 at three quarters of the plateau (the median of the top decile), so the
    pixelated edge does not bias the sub-pixel centre."""
    plateau = np.median(np.sort(pattern.ravel())[-pattern.size // 10 :])
    w = np.clip((pattern / plateau - 0.25) / 0.5, 0.0, 1.0)
    y, x = np.indices(pattern.shape)
    return (w * y).sum() / w.sum(), (w * x).sum() / w.sum()


def pearson(a, b):
    return np.corrcoef(np.ravel(a), np.ravel(b))[0, 1]


def test_defaults_are_unchanged_and_rotations_compose():
    p = SimulationParams(**SMALL)
    assert p.calibration().rotation_deg == 0.0 and p.calibration().descan is None
    q = SimulationParams(**SMALL, rotation_deg=30.0, rotation_quarter_turns=1)
    assert q.calibration().rotation_deg == 120.0
    assert np.array_equal(dense(rotation_deg=30.0, rotation_quarter_turns=1)[0], dense(rotation_deg=120.0)[0])


@pytest.mark.parametrize("flip", [False, True])
def test_rotation_deg_90_is_the_quarter_turn_and_the_general_path_agrees(flip):
    quarter, _ = dense(rotation_quarter_turns=1, flip=flip)
    assert np.array_equal(dense(rotation_deg=90.0, flip=flip)[0], quarter)
    # just off 90°: the object is evaluated in real space on a rotated grid, probes shifted by
    # sub-pixel ramps — it must reproduce the exact (permuted-grid) quarter turn
    general, _ = dense(rotation_deg=90.0 - 1e-7, flip=flip)
    assert np.abs(general - quarter).max() < 1e-5 * quarter.max()


def test_real_space_object_matches_the_fourier_object():
    p = SimulationParams(**SMALL, rotation_deg=1e-9)  # not a quarter turn: real-space evaluation
    gy, gx = p.scan_shape
    phi = object_on_grid(p, np.arange(gy), np.arange(gx))
    assert np.abs(phi - phase_object(p)).max() < 1e-6 * p.max_phase


@pytest.mark.parametrize("theta,flip", [(63.0, False), (241.0, True), (17.0, True)])
def test_any_rotation_turns_the_com_field(theta, flip):
    p = SimulationParams(**SMALL, rotation_deg=theta, flip=flip, bf_offset_px=(1.3, -0.6))
    intensity, truth = dense_p(p)
    n = p.detector
    cy, cx = com(intensity, (n / 2 + 1.3, n / 2 - 0.6))
    gy, gx = np.gradient(truth.astype(float))
    sy, sx = detector_to_scan_frame(cy, cx, theta, flip)
    assert pearson(sy, gy) > 0.95 and pearson(sx, gx) > 0.95
    if abs(np.cos(np.deg2rad(theta))) < 0.6:  # ignoring the rotation ruins the field
        wy, wx = detector_to_scan_frame(cy, cx, 0.0, flip)
        assert pearson(wy, gy) < 0.6 and pearson(wx, gx) < 0.6
    # the flip alone is not a rotation: mapping with the wrong flip ruins it
    fy, fx = detector_to_scan_frame(cy, cx, theta, not flip)
    assert min(pearson(fy, gy), pearson(fx, gx)) < 0.5


@pytest.mark.parametrize("flip", [False, True])
def test_pacbed_disk_centre_is_the_offset(flip):
    offset = (2.6, -3.3)
    p = SimulationParams(**SMALL, rotation_deg=17.0, flip=flip, bf_offset_px=offset, descan=DESCAN)
    intensity, _ = dense_p(p)
    dy, dx = descan_offsets(DESCAN, p.scan_shape)
    expect = (p.detector / 2 + offset[0] + dy.mean(), p.detector / 2 + offset[1] + dx.mean())
    got = disk_centroid(intensity.mean((0, 1)))
    assert np.allclose(got, expect, atol=0.05)
    assert p.calibration().bf_center == pytest.approx((p.detector / 2 + offset[0], p.detector / 2 + offset[1]))


@pytest.mark.parametrize("flip", [False, True])
def test_disk_follows_the_descan(flip):
    # a pure shift of the far field: the COM moves by exactly the descan, object and all
    p = SimulationParams(**SMALL, rotation_deg=17.0, flip=flip, bf_offset_px=(-1.2, 0.7), descan=DESCAN,
                         aberrations=Aberrations(C10=-40.0))
    shifted, _ = dense_p(p)
    still, _ = dense_p(dataclasses.replace(p, descan=None))
    dy, dx = descan_offsets(DESCAN, p.scan_shape)
    assert np.ptp(dy) > 2 and np.ptp(dx) > 2  # the descan moves the disk by pixels
    (ay, ax), (by, bx) = com(shifted, (0, 0)), com(still, (0, 0))
    assert np.abs(ay - by - dy).max() < 0.01 and np.abs(ax - bx - dx).max() < 0.01
    # per position, a quadratic descan: the disk centre on a weak object
    quad = {"model": "quadratic", "coef_y": [0.5, 1.0, 3.0, -2.0, 1.0], "coef_x": [-1.0, 0.5, -2.0, 1.5, 2.5]}
    q = dataclasses.replace(p, max_phase=0.05, descan=quad, aberrations=Aberrations())
    intensity, _ = dense_p(q)
    n = q.detector
    dy, dx = descan_offsets(quad, q.scan_shape)
    got = np.array([disk_centroid(pat) for pat in intensity.reshape(-1, n, n)])
    assert np.abs(got[:, 0] - (n / 2 - 1.2 + dy.ravel())).max() < 0.1
    assert np.abs(got[:, 1] - (n / 2 + 0.7 + dx.ravel())).max() < 0.1


def test_hot_and_dead_pixels():
    hot, rate = (18, 13), 3.0
    p = SimulationParams(**SMALL, dose=500.0)
    faulty = dataclasses.replace(p, hot_pixels=((*hot, rate),), dead_pixels=((15, 17), (1, 30)),
                                 dead_columns=(20,), dead_rows=(3,))
    clean, _ = dense_p(p)
    bad, _ = dense_p(faulty)
    assert np.allclose(bad[..., hot[0], hot[1]] - clean[..., hot[0], hot[1]], rate / p.dose)
    assert not bad[..., 15, 17].any() and not bad[..., 1, 30].any()
    assert not bad[..., :, 20].any() and not bad[..., 3, :].any()
    ok = np.ones((32, 32), bool)
    ok[15, 17] = ok[1, 30] = ok[hot] = False
    ok[:, 20] = ok[3, :] = False
    assert np.array_equal(bad[..., ok], clean[..., ok])


def test_bragg_pattern_is_brighter_on_the_tilt_side():
    theta, flip = 17.0, True
    p = SimulationParams(**{**SMALL, "max_phase": 0.0}, rotation_deg=theta, flip=flip, bf_offset_px=(1.0, -2.0))
    withb = dataclasses.replace(p, bragg=0.6)
    clean, _ = dense_p(p)
    bright, _ = dense_p(withb)
    assert np.allclose(bright.sum((-2, -1)), 1.0, atol=1e-5)  # renormalised to one electron
    b = bragg_pattern(withb)
    n, r = p.detector, p.bf_radius_px
    plateau = clean[0, 0, int(n / 2 + 1), int(n / 2 - 2)]
    assert plateau == pytest.approx(1 / (np.pi * r * r), rel=0.05)
    assert b.max() == pytest.approx(0.6 * plateau, rel=0.05)  # overlaps reach > half the plateau
    # the tilt direction, in detector px from the disk centre
    ty, tx = scan_to_detector_frame(0.6, 0.3, theta, flip)
    u = np.array([ty, tx]) / np.hypot(ty, tx)
    centre = np.array([n / 2 + 1.0, n / 2 - 2.0])

    def at(dist):
        y, x = np.round(centre + dist * u).astype(int)
        return b[y, x]

    assert at(r + 1.5) > 0.3 * plateau > 1.5 * at(-(r + 1.5))  # bright just outside the BF edge on the tilt side
    assert at(0.5 * r) > at(-0.5 * r)
    # relative weights are kept: the BF plateau to Bragg ratio survives the renormalisation
    y, x = np.round(centre + (r + 1.5) * u).astype(int)
    assert bright[0, 0, y, x] / bright[0, 0, int(centre[0]), int(centre[1])] == pytest.approx(
        b[y, x] / (plateau + b[int(centre[0]), int(centre[1])]), rel=0.05)


def test_realistic_store_records_its_faults(tmp_path):
    p = SimulationParams.realistic(scan_shape=(8, 8), detector=32, dose=400.0)
    assert p.total_rotation_deg == 17.0 and p.bragg == 0.6 and p.descan["model"] == "plane"
    (hy, hx, rate), = p.hot_pixels
    cy, cx = p.calibration().bf_center
    assert np.hypot(hy - cy, hx - cx) < p.bf_radius_px - 1  # hot pixel inside the BF disk
    assert abs(p.dead_columns[0] - cx) < p.bf_radius_px  # dead column crosses the disk
    assert len(p.dead_pixels) == 2
    assert SimulationParams.realistic(detector=32, rotation_deg=5.0).rotation_deg == 5.0
    simulate(tmp_path / "r.zarr", p, rows_per_block=4, progress=False)
    faults = load_faults(tmp_path / "r.zarr")
    assert json.loads(json.dumps(faults)) == faults
    assert faults["bf_center"] == pytest.approx([16 + 2.6, 16 - 3.3])
    assert faults["rotation_deg"] == 17.0 and faults["flip"] is False and faults["C10"] == 0.0
    assert faults["descan"] == p.descan and faults["hot_pixels"] == [[hy, hx]]
    assert len(faults["dead_pixels"]) == 2 + 32  # two pixels and a column
    assert all(list(d) in faults["dead_pixels"] for d in p.dead_pixels)
    s = open_store(tmp_path / "r.zarr")
    assert s.calibration.rotation_deg == 17.0 and s.calibration.descan == p.descan
    # the events show the faults
    hist = sum(np.bincount(np.asarray(blk.indices, dtype=np.int64), minlength=32 * 32) for blk in s.iter_blocks())
    mean = hist.reshape(32, 32) / 64
    assert mean[hy, hx] > 0.7 * rate
    assert all(mean[y, x] == 0 for y, x in p.dead_pixels)
    assert not mean[:, p.dead_columns[0]].any()


def test_bad_fault_parameters():
    with pytest.raises(ValueError, match="hot pixel"):
        SimulationParams(detector=32, hot_pixels=((40, 3, 1.0),))
    with pytest.raises(ValueError, match="dead pixel"):
        SimulationParams(detector=32, dead_pixels=((3, -1),))
    with pytest.raises(ValueError, match="descan"):
        SimulationParams(descan={"model": "plane", "coef_y": [1.0], "coef_x": [0.0, 0.0]})
    with pytest.raises(ValueError, match="bf_offset_px"):
        SimulationParams(bf_offset_px=(float("nan"), 0.0))


def test_thermal_diffuse_scattering_makes_the_adf_image_follow_the_phase():
    """With ``tds`` the dark field carries tds·⟨φ⟩/max_phase of the electrons, in an annulus
    outside the BF disk; what falls beyond the detector's edge is lost."""
    from stemdask.simulate import tds_pattern

    p = SimulationParams(**SMALL, bf_offset_px=(1.5, -2.0), descan=DESCAN, tds=0.1)
    ring = tds_pattern(p, range(p.scan_shape[0]))
    on_detector = ring.sum(axis=(-2, -1))
    assert np.all(on_detector <= 1.0 + 1e-9) and on_detector.min() > 0.3  # the edge cuts the annulus
    p_big = dataclasses.replace(p, detector=128, detector_pixel_mrad=p.pixel_mrad)  # the same annulus, all on it
    whole = tds_pattern(p_big, range(p.scan_shape[0])).sum(axis=(-2, -1))
    assert np.allclose(whole, 1.0, atol=0.02)  # the hard inner edge at 1.1 α on the pixel grid: ±1 % with the centre
    n, r = p.detector, p.bf_radius_px
    yy, xx = np.indices((n, n))
    centre = np.hypot(yy - (n / 2 + 1.5), xx - (n / 2 - 2.0))
    assert ring[:, :, centre < 1.1 * r - 2.5].max() == 0.0  # the descan moves the disk ≤ 2.5 px
    intensity, truth = simulate_dense(p)
    plain, _ = simulate_dense(dataclasses.replace(p, tds=0.0))
    total, plain_total = intensity.sum(axis=(-2, -1)), plain.sum(axis=(-2, -1))
    assert np.all(total <= plain_total + 1e-9) and np.all(total >= plain_total - 0.1 * (1 - on_detector.min()) - 1e-9)
    far = np.hypot(yy - n / 2, xx - n / 2) > 1.5 * r
    extra = intensity[..., far].sum(-1) - plain[..., far].sum(-1)
    assert extra.max() <= 0.1 + 1e-9 and extra.min() >= -1e-9
    assert np.corrcoef(extra.ravel(), truth.ravel())[0, 1] > 0.9  # ADF bright where the phase is positive


def test_tds_must_be_a_fraction():
    with pytest.raises(ValueError, match="tds"):
        SimulationParams(**SMALL, tds=1.5)


def test_cli_simulate_realistic_options_reach_the_store(tmp_path, capsys):
    from stemdask.cli import main

    out = tmp_path / "r.zarr"
    assert main(["simulate", str(out), "--scan", "8", "8", "--detector", "32", "--quiet", "--realistic",
                 "--rotation-deg", "241", "--flip", "--descan", "plane", "1", "0", "0", "-1", "--tds", "0.02",
                 "--dead-row", "3"]) == 0
    assert "faults: rotation 241°, flip True" in capsys.readouterr().out
    faults = load_faults(out)
    assert faults["rotation_deg"] == 241.0 and faults["flip"] is True
    assert faults["descan"] == {"model": "plane", "coef_y": [1.0, 0.0], "coef_x": [0.0, -1.0]}
    assert faults["dead_rows"] == [3] and len(faults["hot_pixels"]) == 1  # the preset's hot pixel stays
    assert open_store(out).provenance["simulation"]["tds"] == 0.02
    for bad, message in [(["--descan", "plane", "1", "2"], "give 4 coefficients"),
                         (["--descan", "cubic", "1"], "model must be one of"),
                         (["--dead-pixel", "40", "3"], "not a pixel"), (["--tds", "2"], "tds must be a fraction")]:
        argv = ["simulate", str(tmp_path / "b.zarr"), "--scan", "4", "4", "--detector", "32", "--quiet", *bad]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "b.zarr").exists()
