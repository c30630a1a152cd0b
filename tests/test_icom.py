"""iCOM against the simulator's known phase: sign, scale (rad), units, rotation/flip, padding.

Its helpers (``expected_com``, ``probe_blurred``, ``com_dataset``, ``WEAK``) are in ``helpers.py``,
shared with the DPC and riCOM tests. Physics used: for a phase object the COM (Å⁻¹) is exactly
|ψ|² ⋆ ∇φ / 2π, so the integrated COM is the true phase cross-correlated with the probe
intensity — iCOM must match that with slope 1 (a check of sign, units and scale).
"""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdask.kernels.icom import integrate_com, mirror_extend
from stemdask.methods.com import scan_frame_com
from stemdask.methods.icom import icom
from stemdask.optics import scan_to_detector_frame
from stemdask.simulate import SimulationParams
from stemdask.testing import raise_if_dask_computes

from helpers import WEAK, com_dataset, expected_com, pearson, probe_blurred, slope


def test_icom_is_the_probe_blurred_phase_in_radians():
    cy, cx, truth = expected_com(WEAK)
    cal = WEAK.calibration()
    phase = icom(com_dataset(cy, cx, WEAK), cal, pad="none").phase.values
    blurred = probe_blurred(truth, WEAK)
    assert pearson(phase, truth) >= 0.95
    assert pearson(phase, blurred) > 0.9999
    assert slope(phase, blurred) == pytest.approx(1.0, abs=0.01)  # rad, no free scale
    # against the unblurred truth the slope is the probe's blur (≈ 0.72 at 20 mrad), not a unit error
    assert 0.6 < slope(phase, truth) < 0.85
    # positive at atoms: the strongest true column is a maximum of the image
    iy, ix = np.unravel_index(np.argmax(truth), truth.shape)
    assert phase[iy, ix] > np.percentile(phase, 95)


def test_mirror_padding_on_periodic_data_stays_accurate():
    cy, cx, truth = expected_com(WEAK)
    phase = icom(com_dataset(cy, cx, WEAK), WEAK.calibration(), pad="mirror").phase.values
    assert pearson(phase, probe_blurred(truth, WEAK)) > 0.999


def test_mirror_padding_beats_wraparound_on_a_non_periodic_field():
    """A smooth non-periodic phase (a tilted Gaussian bump): wrap-around breaks it, the mirror does not."""
    ny, nx, step = 48, 64, 0.3
    y, x = np.meshgrid(np.arange(ny) * step, np.arange(nx) * step, indexing="ij")
    phi = 0.4 * np.exp(-((y - 5) ** 2 + (x - 12) ** 2) / 8.0) + 0.03 * x + 0.02 * y
    gy = (0.4 * np.exp(-((y - 5) ** 2 + (x - 12) ** 2) / 8.0) * (-(y - 5) / 4.0) + 0.02) / (2 * np.pi)
    gx = (0.4 * np.exp(-((y - 5) ** 2 + (x - 12) ** 2) / 8.0) * (-(x - 12) / 4.0) + 0.03) / (2 * np.pi)
    mirrored = integrate_com(gy, gx, step, pad="mirror")
    wrapped = integrate_com(gy, gx, step, pad="none")
    err_m = np.abs((mirrored - mirrored.mean()) - (phi - phi.mean())).max()
    err_w = np.abs((wrapped - wrapped.mean()) - (phi - phi.mean())).max()
    assert err_m < 0.02 * np.ptp(phi)
    assert err_w > 5 * err_m


def test_mirror_extension_is_the_gradient_of_the_even_extension():
    rng = np.random.default_rng(1)
    phi = rng.normal(size=(6, 5))
    even = np.concatenate([phi, phi[::-1]], 0)
    even = np.concatenate([even, even[:, ::-1]], 1)
    gy, gx = np.gradient(phi)
    ey, ex = mirror_extend(gy, gx)
    # the derivative of the even extension: odd reflection along its own axis
    assert np.allclose(ey[6:, :5], -gy[::-1]) and np.allclose(ey[:6, 5:], gy[:, ::-1])
    assert np.allclose(ex[:6, 5:], -gx[:, ::-1]) and np.allclose(ex[6:, :5], gx[::-1])
    assert even.shape == ey.shape == ex.shape


@settings(max_examples=25, deadline=None)
@given(ny=st.integers(2, 24), nx=st.integers(2, 24), sy=st.floats(0.05, 2.0), sx=st.floats(0.05, 2.0),
       filtered=st.booleans(), seed=st.integers(0, 2**16))
def test_mirror_integral_equals_the_fft_of_the_mirror_extension(ny, nx, sy, sx, filtered, seed):
    """The cosine/sine-transform integral on the scan grid against brute force: the FFT
    integral over the 2ny × 2nx mirror extension, its Nyquist row and column (no frequency of
    the extension's symmetry) set to zero."""
    gy, gx = np.random.default_rng(seed).normal(size=(2, ny, nx))
    hp, lp = (0.3 / max(sy, sx), 2.0 / max(sy, sx)) if filtered else (None, None)
    ey, ex = mirror_extend(gy, gx)
    qy = np.fft.fftfreq(2 * ny, sy)[:, None]
    qx = np.fft.fftfreq(2 * nx, sx)[None, :]
    q2 = qy**2 + qx**2
    spectrum = (qy * np.fft.fft2(ey) + qx * np.fft.fft2(ex)) / (1j * np.where(q2 > 0, q2, 1.0))
    spectrum[0, 0] = spectrum[ny, :] = spectrum[:, nx] = 0.0
    if filtered:
        spectrum *= -np.expm1(-q2 / (2 * hp**2)) * np.exp(-q2 / (2 * lp**2))
    want = np.fft.ifft2(spectrum).real[:ny, :nx]
    got = integrate_com(gy, gx, (sy, sx), pad="mirror", highpass=hp, lowpass=lp)
    assert np.allclose(got, want, rtol=0, atol=1e-10 * max(np.abs(want).max(), 1e-300))


def test_filters_cut_the_stated_frequencies():
    cy, cx, _ = expected_com(WEAK)
    cal = WEAK.calibration()
    full = integrate_com(cy * cal.detector_pixel_inv_a, cx * cal.detector_pixel_inv_a, cal.scan_step_a, pad="none")
    k = 0.5  # Å⁻¹
    low = integrate_com(
        cy * cal.detector_pixel_inv_a, cx * cal.detector_pixel_inv_a, cal.scan_step_a, pad="none", lowpass=k
    )
    high = integrate_com(
        cy * cal.detector_pixel_inv_a, cx * cal.detector_pixel_inv_a, cal.scan_step_a, pad="none", highpass=k
    )
    q = np.hypot(
        *np.meshgrid(np.fft.fftfreq(64, cal.scan_step_a[0]), np.fft.fftfreq(64, cal.scan_step_a[1]), indexing="ij")
    )
    f_full, f_low, f_high = (np.fft.fft2(a) for a in (full, low, high))
    sel = (q > 0) & (np.abs(f_full) > 1e-6 * np.abs(f_full).max())
    g = np.exp(-(q[sel] ** 2) / (2 * k**2))
    assert np.allclose(f_low[sel], f_full[sel] * g, atol=1e-9 * np.abs(f_full).max())
    assert np.allclose(f_high[sel], f_full[sel] * (1 - g), atol=1e-9 * np.abs(f_full).max())


@pytest.mark.parametrize("quarter_turns,flip", [(1, False), (2, False), (3, True), (0, True)])
def test_rotation_and_flip_are_undone(quarter_turns, flip):
    p = SimulationParams(scan_shape=(32, 32), detector=32, max_phase=0.3)
    q = SimulationParams(
        scan_shape=(32, 32), detector=32, max_phase=0.3, rotation_quarter_turns=quarter_turns, flip=flip
    )
    ref = icom(com_dataset(*expected_com(p)[:2], p), p.calibration(), pad="none").phase.values
    turned = icom(com_dataset(*expected_com(q)[:2], q), q.calibration(), pad="none").phase.values
    assert np.allclose(turned, ref, atol=1e-4 * np.ptp(ref))
    # ignoring the calibrated rotation/flip ruins the image
    wrong = icom(
        com_dataset(*expected_com(q)[:2], q), q.calibration().replace(rotation_deg=0.0, flip=False), pad="none"
    ).phase.values
    assert pearson(wrong, ref) < 0.6


def test_px_and_mrad_inputs_agree():
    cy, cx, _ = expected_com(WEAK)
    cal = WEAK.calibration()
    a = icom(com_dataset(cy, cx, WEAK, units="px"), cal).phase.values
    b = icom(com_dataset(cy, cx, WEAK, units="mrad"), cal).phase.values
    assert np.allclose(a, b, atol=1e-9)


def test_scan_frame_com_maps_units_rotation_and_missing_positions():
    p = SimulationParams(scan_shape=(4, 5), detector=32, rotation_quarter_turns=1)
    cal = p.calibration()
    rng = np.random.default_rng(0)
    sy, sx = rng.normal(size=(2, 4, 5))  # a scan-frame field (Å⁻¹)
    dy, dx = scan_to_detector_frame(sy, sx, cal.rotation_deg, cal.flip)
    dy[0, 0] = dx[0, 0] = np.nan  # a position without electrons
    com = com_dataset(dy / cal.detector_pixel_inv_a, dx / cal.detector_pixel_inv_a, p)
    gy, gx = scan_frame_com(com, cal)
    sy[0, 0] = sx[0, 0] = 0.0  # no electrons: no deflection
    assert np.allclose(gy.values, sy) and np.allclose(gx.values, sx)


def test_icom_graph_is_lazy_and_has_physical_coords():
    cy, cx, _ = expected_com(WEAK)
    com = com_dataset(cy, cx, WEAK)
    with raise_if_dask_computes():
        out = icom(com, WEAK.calibration())
        assert isinstance(out.phase.data, da.Array)
        assert out.phase.dims == ("scan_y", "scan_x")
        assert out.phase.attrs["units"] == "rad"
        assert np.allclose(out.scan_x.values, np.arange(64) * WEAK.scan_step)
    with raise_if_dask_computes(max_computes=1) as counter:
        out.compute()
    assert counter.total_computes == 1


@pytest.mark.parametrize("pad", ["mirror", "none"])
def test_a_field_too_large_for_one_task_is_integrated_by_row_and_column_chunks(pad):
    """With a chunk target far below the field, iCOM is lazy, runs in row and column chunks
    (no task holds the whole field) and equals the one-task integral."""
    cy, cx, truth = expected_com(WEAK)
    com = com_dataset(cy, cx, WEAK)
    whole = icom(com, WEAK.calibration(), pad=pad, highpass=0.02).phase
    assert whole.data.npartitions == 1
    with dask.config.set({"stemdask.chunk-bytes": 64 * 8 * 8}):  # 8 float64 rows (or columns) of 64 per chunk
        with raise_if_dask_computes():
            split = icom(com, WEAK.calibration(), pad=pad, highpass=0.02).phase
    assert max(split.data.chunks[0]) <= 8 < 64 and split.attrs == whole.attrs  # (4 rows: complex, with pad none)
    column_chunks = [layer for name, layer in split.data.dask.layers.items() if name.startswith("solve_y")]
    assert column_chunks and all(len(layer) > 1 for layer in column_chunks)
    np.testing.assert_allclose(split.values, whole.values, rtol=0, atol=1e-12 * np.abs(whole.values).max())
    assert pearson(split.values, probe_blurred(truth, WEAK)) > 0.95  # and it is the phase


def test_bad_input_is_named():
    cy, cx, _ = expected_com(WEAK)
    cal = WEAK.calibration()
    with pytest.raises(ValueError, match="pad"):
        icom(com_dataset(cy, cx, WEAK), cal, pad="zero")
    with pytest.raises(ValueError, match="highpass"):
        icom(com_dataset(cy, cx, WEAK), cal, highpass=-1.0)
    bad_units = com_dataset(cy, cx, WEAK)
    bad_units["com_y"].attrs["units"] = "deg"
    with pytest.raises(ValueError, match="units"):
        icom(bad_units, cal)
    with pytest.raises(ValueError, match="lacks"):
        icom(com_dataset(cy, cx, WEAK)[["com_y"]], cal)
    with pytest.raises(ValueError, match="scan step"):
        integrate_com(cy, cx, step_a=0.0)
    with pytest.raises(ValueError, match="one shape"):
        integrate_com(cy, cx[:-1], step_a=1.0)


def test_cli_runs_icom_dpc_and_ricom_on_an_event_store(tmp_path):
    """End to end: Poisson events in a store → `stemdask reconstruct` → phases positive at atoms."""
    from stemdask.cli import main
    from stemdask.simulate import load_truth, simulate

    p = SimulationParams(scan_shape=(48, 48), detector=32, dose=2000, seed=3)
    simulate(tmp_path / "s.zarr", p, progress=False)
    out = tmp_path / "r.zarr"
    argv = ["reconstruct", str(tmp_path / "s.zarr"), "--method", "icom", "--method", "dpc", "--method", "ricom",
            "--kernel-size", "21", "--kmin", "0.05", "--dpc-iterations", "50", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    result = xr.open_zarr(out)
    truth = load_truth(tmp_path / "s.zarr")
    for name, r_min in (("icom_phase", 0.9), ("dpc_phase", 0.9), ("ricom_phase", 0.85)):
        assert result[name].attrs["units"] == "rad"
        assert pearson(result[name].values, truth) > r_min, name
    assert result["ricom_phase"].attrs["kernel_size"] == 21 and result["ricom_phase"].attrs["kmin_inv_a"] == 0.05
    # a wrong scan rotation (the calibrated one is 0°) ruins the image
    assert main(argv[:-3] + ["--out", str(tmp_path / "w.zarr"), "--rotation-deg", "90", "--quiet"]) == 0
    wrong = xr.open_zarr(tmp_path / "w.zarr")
    assert pearson(wrong["icom_phase"].values, truth) < 0.5


def test_registered_methods_build_without_reading_the_store(tmp_path, monkeypatch):
    """run(ds, **options) of icom, dpc and ricom only builds graphs: no row block is read until compute."""
    import stemdask.events
    from stemdask.methods import runner
    from stemdask.simulate import simulate
    from stemdask.store import EventStore

    p = SimulationParams(scan_shape=(24, 24), detector=16, dose=500)
    simulate(tmp_path / "s.zarr", p, rows_per_block=8, progress=False)
    reads = []
    original = EventStore.read_rows
    monkeypatch.setattr(EventStore, "read_rows", lambda self, pieces, index, **kw: reads.append(index)
                        or original(self, pieces, index, **kw))
    ds = stemdask.events.open(tmp_path / "s.zarr")
    options = {"icom": {}, "dpc": {}, "ricom": {"kernel_size": 9}}
    with raise_if_dask_computes():
        results = {m: runner(m)(ds, **options[m]) for m in ("icom", "dpc", "ricom")}
    assert reads == []
    for m, res in results.items():
        assert res.phase.attrs["method"] == m and res.phase.dims == ("scan_y", "scan_x")
    xr.merge(list(results.values()), compat="override").compute()
    assert sorted(set(reads)) == list(range(len(ds.row_chunks)))  # every chunk of rows read
