"""The "ssb" method: CLI options, ``run(ds, **options)`` on an event store, ``stemdask reconstruct``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

import stemdask
from stemdask.cli import main, parse
from stemdask.cli.method_options import chosen_options
from stemdask.methods import NAMES, runner
from stemdask.methods.ssb import run as run_ssb
from stemdask.methods.ssb import ssb
from stemdask.optics import Aberrations
from stemdask.simulate import SimulationParams, load_truth, simulate
from stemdask.store import open_store

from helpers import as_dense, band_limited, pearson, r_detrended


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    p = SimulationParams(scan_shape=(32, 32), detector=32, dose=2000, max_phase=0.5,
                         aberrations=Aberrations(C10=-80.0), seed=3)
    return simulate(tmp_path_factory.mktemp("ssb") / "sim.zarr", p, rows_per_block=8, progress=False)


def dense_counts(store):
    """NumPy densify of the whole store (every detector pixel)."""
    indices, indptr = store.to_csr()
    ny, nx = store.scan_shape
    dy, dx = store.detector_shape
    pos = np.repeat(np.arange(ny * nx), np.diff(indptr))
    return np.bincount(pos * dy * dx + indices, minlength=ny * nx * dy * dx).reshape(ny, nx, dy, dx)


def test_options_and_registration():
    assert "ssb" in NAMES and runner("ssb") is run_ssb
    args = parse(
        ["reconstruct", "s.zarr", "--method", "ssb", "--out", "o.zarr", "--c10", "-150", "--c12", "20",
         "--c12-angle", "30", "--c21", "100", "--c21-angle", "-45", "--c23", "50", "--c23-angle", "10",
         "--c30", "1e4", "--bin", "2", "--quantitative"]
    )
    assert chosen_options(args, ["ssb"]) == {"ssb": {"c10": -150.0, "c12": 20.0, "c12_angle": 30.0, "c21": 100.0,
                                                     "c21_angle": -45.0, "c23": 50.0, "c23_angle": 10.0, "c30": 1e4,
                                                     "bin": 2, "quantitative": True}}
    defaults = parse(["reconstruct", "s.zarr", "--method", "ssb", "--out", "o.zarr"])
    assert chosen_options(defaults, ["ssb"]) == {"ssb": {}}  # the method's own defaults apply
    assert parse(["reconstruct", "s", "--method", "ssb", "--out", "o", "--c10", "auto"]).c10 == "auto"


def test_run_on_an_event_store_equals_the_pipeline_on_its_counts(store):
    ds = stemdask.open(store.path)
    result = run_ssb(ds, c10=-80.0)
    assert isinstance(result, xr.Dataset) and list(result.data_vars) == ["phase"]
    got = result["phase"].values
    cal = store.calibration
    want = ssb(as_dense(dense_counts(store), cal), cal, Aberrations(C10=-80.0)).phase.values
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    truth = band_limited(load_truth(store.path), cal.scan_step_a, 2 * 20e-3 / cal.wavelength_a)
    assert pearson(got, truth) >= 0.9


def test_reconstruct_cli_with_binning(store, tmp_path):
    out = tmp_path / "ssb.zarr"
    rc = main(["reconstruct", str(store.path), "--method", "ssb", "--out", str(out), "--c10", "-80",
               "--bin", "2", "--quantitative", "--quiet"])
    assert rc == 0
    phase = xr.open_zarr(out)["phase"]
    assert phase.shape == store.scan_shape and phase.attrs["units"] == "rad"
    assert phase.attrs["weighting"] == "quantitative" and phase.attrs["aberration_C10"] == -80.0
    cal = store.calibration
    truth = band_limited(load_truth(store.path), cal.scan_step_a, 2 * 20e-3 / cal.wavelength_a)
    assert pearson(phase.values, truth) >= 0.78


@pytest.mark.gpu
def test_cli_ssb_on_the_gpu_equals_the_cpu(tmp_path):
    """Events → COM → SSB with CuPy chunks on a dask-cuda worker equals the CPU path."""
    pytest.importorskip("dask_cuda")
    store = simulate(tmp_path / "s.zarr", SimulationParams(scan_shape=(32, 32), detector=32, dose=5e3,
                                                           aberrations=Aberrations(C10=-50.0)), progress=False)
    common = ["reconstruct", str(store.path), "--method", "com", "--method", "ssb", "--c10", "-50", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "cpu.zarr")]) == 0
    assert main([*common, "--gpu", "--cluster", "local-cuda", "--out", str(tmp_path / "gpu.zarr")]) == 0
    cpu, gpu = xr.open_zarr(tmp_path / "cpu.zarr"), xr.open_zarr(tmp_path / "gpu.zarr")
    np.testing.assert_allclose(gpu.phase.values, cpu.phase.values, atol=1e-5 * float(abs(cpu.phase).max()))
    np.testing.assert_array_equal(gpu.com_y.values, cpu.com_y.values)


@pytest.mark.slow
def test_ssb_without_c10_uses_what_calibrate_measured_and_says_so(abtem_case, abtem_dose1000, tmp_path, capsys):
    """On the abTEM case calibrate measures |C10| (the parallax) but, honestly, not its sign: that
    thin, phonon-free crystal has too little dark field at 96² positions for the ADF to decide the
    half turn. SSB without --c10 then picks the sign with the focus criterion for the stored
    orientation; with a stored signed estimate it uses that; --c10 auto searches around it.
    Dose 1000 only: at dose 50 calibrate cannot measure the parallax (test_calibrate's dose-50 test)."""
    import json

    from stemdask.calibrate import calibrate_store
    from stemdask.io.ingest import ingest

    params = json.loads((abtem_case / "params.json").read_text())
    store = ingest(abtem_dose1000, tmp_path / "s.zarr", format="csr", scan_shape=(96, 96),
                   detector_shape=(96, 96), progress=False,
                   calibration={"energy_ev": params["energy_eV"], "scan_step_a": params["scan"]["step_A"],
                                "semiangle_mrad": params["semiangle_mrad"],
                                "detector_pixel_mrad": params["detector"]["pixel_size_mrad"]})
    found = calibrate_store(store.path)
    assert found["c10_estimate_a"] is None and 130 < found["c10_magnitude_a"] < 170
    truth = np.load(abtem_case / "phase_truth.npy")
    capsys.readouterr()
    assert main(["reconstruct", str(store.path), "--method", "ssb", "--out", str(tmp_path / "u.zarr"), "--quiet"]) == 0
    assert "measured |C10|" in capsys.readouterr().err
    unsigned = xr.open_zarr(tmp_path / "u.zarr").phase
    assert abs(unsigned.attrs["aberration_C10"] - params["C10_A"]) <= 10.0  # the sign is right
    assert r_detrended(unsigned.values, truth) >= 0.9
    # a signed estimate stored (as calibrate stores a decided one) is used as it is
    s = open_store(store.path, mode="r+")
    s.set_calibration(s.calibration.replace(c10_estimate_a=-139.6))
    assert main(["reconstruct", str(store.path), "--method", "ssb", "--out", str(tmp_path / "a.zarr"), "--quiet"]) == 0
    assert "stored estimate" in capsys.readouterr().err
    stored = xr.open_zarr(tmp_path / "a.zarr").phase
    assert stored.attrs["c10_source"].startswith("stored estimate") and stored.attrs["aberration_C10"] == -139.6
    assert main(["reconstruct", str(store.path), "--method", "ssb", "--out", str(tmp_path / "z.zarr"), "--c10", "0",
                 "--quiet"]) == 0
    r_focus = pearson(xr.open_zarr(tmp_path / "z.zarr").phase.values, truth)
    assert pearson(stored.values, truth) > r_focus + 0.3
    # --c10 auto: the focus criterion, searched around the stored estimate.
    assert main(["reconstruct", str(store.path), "--method", "ssb", "--out", str(tmp_path / "f.zarr"), "--c10", "auto",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    line = re.search(r"ssb: C10 = (-?[\d.]+) Å \(auto: focus criterion over (-?[\d.]+)…(-?[\d.]+) Å, start "
                     r"(-?[\d.]+) Å from the stored estimate \(stemdask calibrate, parallax\)\)", err)
    assert line and "warning" not in err, err
    _, lo, hi, start = map(float, line.groups())
    assert start == pytest.approx(-139.6, abs=0.05)
    assert lo < start - 99 and hi > start + 99 and hi - lo < 250  # ±100 Å (2 λ/α² here: 100.2 Å)
    focused = xr.open_zarr(tmp_path / "f.zarr").phase
    assert focused.attrs["c10_source"].startswith("auto (focus criterion Σphase²")
    assert abs(focused.attrs["aberration_C10"] - params["C10_A"]) <= 10.0  # measured −146.0 Å
    assert r_detrended(focused.values, truth) >= 0.9  # the abTEM SSB test's comparison; measured 0.912
