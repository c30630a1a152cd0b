"""SSB's automatic defocus: ``focus_c10`` and ``stemdask reconstruct --method ssb --c10 auto``.

Checked against the truth: stemdask's simulator (C10 = −100 Å, no stored estimate) and the
independent abTEM SrTiO3 case (C10 = −150 Å).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr

from stemdask.cli import main, parse
from stemdask.methods.ssb import depth_of_focus_a, focus_c10, ssb
from stemdask.optics import Aberrations
from stemdask.simulate import SimulationParams, load_truth, simulate

from helpers import as_dense, band_limited, pearson, r_detrended

AUTO_LINE = re.compile(r"ssb: C10 = (-?[\d.]+) Å \(auto: focus criterion over (-?[\d.]+)…(-?[\d.]+) Å, "
                       r"start (-?[\d.]+) Å from the default \(no estimate stored\)\)")


@pytest.fixture(scope="module")
def defocused_store(tmp_path_factory):
    """A simulated event store at C10 = −100 Å (no stored C10 estimate)."""
    p = SimulationParams(scan_shape=(32, 32), detector=32, dose=2000, max_phase=0.5,
                         aberrations=Aberrations(C10=-100.0), seed=3)
    return simulate(tmp_path_factory.mktemp("focus") / "sim.zarr", p, rows_per_block=8, progress=False)


def test_auto_c10_on_the_simulator_finds_the_defocus(defocused_store, tmp_path, capsys):
    store = defocused_store
    assert store.calibration.c10_estimate_a is None
    out = tmp_path / "auto.zarr"
    capsys.readouterr()
    assert main(["reconstruct", str(store.path), "--method", "ssb", "--out", str(out), "--c10", "auto",
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    line = AUTO_LINE.search(err)
    assert line, err
    assert "warning" not in err
    c10, lo, hi, start = map(float, line.groups())
    assert (lo, hi, start) == (-300.0, 300.0, 0.0)
    phase = xr.open_zarr(out).phase
    assert phase.attrs["aberration_C10"] == pytest.approx(c10, abs=0.05)
    assert abs(phase.attrs["aberration_C10"] + 100.0) <= 5.0  # measured: −98.1 Å (λ/α² = 49 Å)
    assert phase.attrs["c10_source"].startswith("auto (focus criterion Σphase², searched -300.0…300.0 Å")
    assert phase.attrs["c10_search_range_a"] == [-300.0, 300.0] and phase.attrs["c10_at_edge"] is False
    assert phase.attrs["semiangle_source"] == "measured BF radius"
    cal = store.calibration
    truth = band_limited(load_truth(store.path), cal.scan_step_a, 2 * 20e-3 / cal.wavelength_a)
    assert pearson(phase.values, truth) >= 0.9  # measured 0.925


def test_focus_c10_at_the_edge_of_the_range_says_so(defocused_store):
    import stemdask

    ds = stemdask.open(defocused_store.path)
    result = ssb(ds.densify(), ds.calibration)
    with pytest.warns(UserWarning, match="edge of the searched C10 range .* may be outside"):
        c10, info = focus_c10(result, start=100.0, span=150.0)  # −250…250 would hold −100; −50…250 does not
    assert info["at_edge"] and info["range"] == (-50.0, 250.0) and c10 == pytest.approx(-50.0, abs=1.0)
    assert info["warnings"] and "may be outside" in info["warnings"][0]
    c10, info = focus_c10(result, start=0.0, span=150.0, warn=False)
    assert not info["at_edge"] and not info["warnings"] and abs(c10 + 100.0) <= 5.0
    assert info["step"] <= depth_of_focus_a(result) / 2 and info["contrast"] > 3
    with pytest.raises(ValueError, match="positive span"):
        focus_c10(result, span=0.0)


def test_auto_c10_at_the_edge_warns_on_stderr(defocused_store, tmp_path, capsys):
    out = tmp_path / "edge.zarr"
    capsys.readouterr()
    assert main(["reconstruct", str(defocused_store.path), "--method", "ssb", "--out", str(out), "--c10", "auto",
                 "--c10-span", "50", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "over -50.0…50.0 Å" in err
    warning = [ln for ln in err.splitlines() if ln.startswith("ssb: warning:")]
    assert len(warning) == 1 and "lower edge" in warning[0] and "may be outside" in warning[0]
    phase = xr.open_zarr(out).phase
    assert phase.attrs["c10_at_edge"] is True and "OPTIMUM AT THE EDGE" in phase.attrs["c10_source"]


def test_c10_option_takes_a_number_or_auto(capsys):
    common = ["reconstruct", "s.zarr", "--method", "ssb", "--out", "o.zarr"]
    assert parse([*common, "--c10", "auto"]).c10 == "auto"
    assert parse([*common, "--c10", "AUTO"]).c10 == "auto"
    assert parse([*common, "--c10", "-150"]).c10 == -150.0
    assert not hasattr(parse(common), "c10")  # not given: the method's own default applies
    for bad, option in ((["--c10", "foo"], "--c10"), (["--c10", "nan"], "--c10"), (["--c10-span", "-3"], "--c10-span")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            parse([*common, *bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        errors = [ln for ln in err.splitlines() if "error" in ln]
        assert errors == [err.splitlines()[-1]]  # argparse's usage, then one error line
        assert errors[0].startswith(f"stemdask reconstruct: error: argument {option}: expected a")
        assert repr(bad[1]) in errors[0]


def test_focus_c10_on_the_abtem_case(abtem_ssb_case):
    dose, ds, truth, params = abtem_ssb_case
    result = ssb(ds.densify(), ds.calibration)
    c10, info = focus_c10(result, start=0.0)  # no estimate: the default ±300 Å
    assert info["range"] == (-300.0, 300.0) and not info["at_edge"] and not info["flat"]
    assert abs(c10 - params["C10_A"]) <= 10.0  # measured −146.0 Å (dose 1000), −145.3 Å (dose 50); λ/α² = 49 Å
    # dose 1000: measured 0.912 (0.911 at −150 Å). Dose 50: measured 0.556 (0.554 at −150 Å); no
    # correction −0.037, the wrong sign −0.014, C10 50 Å off ≤ 0.30 — all fail ≥ 0.45.
    assert r_detrended(result.refocus(C10=c10).values, truth) >= {1000: 0.9, 50: 0.45}[dose]



def test_focus_c10_on_noise_only_says_the_criterion_is_flat():
    from stemdask.simulate import simulate_dense

    p = SimulationParams(scan_shape=(24, 24), detector=16, max_phase=0.0)  # vacuum: Poisson noise only
    intensity, _ = simulate_dense(p)
    counts = np.random.default_rng(0).poisson(intensity * 1000).astype(np.float32)
    cal = p.calibration()
    with pytest.warns(UserWarning, match="criterion is flat .* not to be trusted"):
        _, info = focus_c10(ssb(as_dense(counts, cal), cal))
    assert info["flat"] and info["contrast"] < 1.2  # measured 1.15; a real object: ≥ 1.5 (abTEM at dose 50)
