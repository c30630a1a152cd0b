"""Acceptance (issue 10): SSB, iCOM and riCOM on data with a real detector's faults come within
0.02 (Pearson r against the truth) of the same sample recorded without them, with the right sign.

The same sample both times: scan rotation 17° and thermal diffuse scattering; for SSB also
with a tilted-crystal Bragg background (``bragg=0.6``: it carries 1.2× the BF disk's electrons
out to the detector edge, and the whole-detector COM of iCOM and riCOM drowns in its noise —
r ≈ 0 on the *clean* recording too — so there they are compared without it). The faulted
recording adds an off-centre BF disk, a plane descan of a few
pixels, a hot pixel, dead pixels and a dead column (:meth:`SimulationParams.realistic`). The
clean store carries the true calibration; the faulted one forgets it and is calibrated from
its events by `stemdask calibrate` (BF disk, defects, descan). The descan comes from a vacuum
scan with the same faults (``--descan-from``), as a microscopist records one: with the sample
in the beam, the COM's plane part holds the sample's own too (0.05–0.1 px here), which iCOM
integrates into a bowl (r 0.94 → 0.75) and no fit can tell from a descan; SSB, which uses the
descan only to place each position's crop, is also checked with the sample's own fit. At
C10 = −100 Å the parametrised test compares SSB only: iCOM and riCOM of that 64² scan reach
r ≈ 0.1 even on the clean recording (the defocused probe is wider than the columns' spacing),
and at 2000 e⁻ their r moves by ±0.07 with the Poisson draw; they are compared at 20 000 e⁻
over three seeds in :func:`test_faults_cost_icom_and_ricom_at_most_002_of_r_at_defocus`. Where
calibrate reports the
orientation as not reliable it keeps the stored one, so the operator sets the microscope's
known scan rotation with `calibrate --set` — as the CLI's message says — and the test does so.
"""

import dataclasses

import numpy as np
import pytest
import xarray as xr

from stemdask.calibrate.orientation import probe_otf
from stemdask.cli import main
from stemdask.optics import Aberrations
from stemdask.simulate import SimulationParams, load_truth, simulate
from stemdask.store import open_store

METHODS = ("ssb", "icom", "ricom")


def _pearson(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def _reconstruct(store, out, c10, methods) -> dict:
    assert main(["reconstruct", str(store), *[a for m in methods for a in ("--method", m)], "--c10", str(c10),
                 "--out", str(out), "--quiet"]) == 0
    result = xr.open_zarr(out)
    truth = load_truth(store)
    return {m: _pearson(result[f"{m}_phase" if len(methods) > 1 else "phase"].values, truth) for m in methods}


def _recordings(tmp_path, capsys, *, c10, bragg, dose, seed, vacuum=True, name="") -> tuple:
    """The same sample recorded clean and with the realistic faults (rotation 17°), the faulted
    store calibrated from its events as a microscopist would (``--descan-from`` a vacuum scan
    with the same faults unless ``vacuum`` is False, the known rotation set where calibrate
    says its own is not reliable): (clean path, faulted path, faulted params)."""
    faulted = SimulationParams.realistic(scan_shape=(64, 64), detector=64, dose=dose, seed=seed, bragg=bragg,
                                         aberrations=Aberrations(C10=c10))
    clean = dataclasses.replace(faulted, bf_offset_px=(0.0, 0.0), descan=None, hot_pixels=(), dead_pixels=(),
                                dead_columns=())
    paths = tmp_path / f"clean{name}.zarr", tmp_path / f"faulted{name}.zarr"
    simulate(paths[0], clean, progress=False)
    simulate(paths[1], faulted, progress=False)
    store = open_store(paths[1], mode="r+")
    store.set_calibration(store.calibration.replace(bf_center=None, bf_radius=None, descan=None, rotation_deg=0.0,
                                                    flip=False, origins={}))
    reference = []
    if vacuum:
        simulate(tmp_path / f"vacuum{name}.zarr", dataclasses.replace(faulted, max_phase=0.0, bragg=0.0),
                 progress=False)
        reference = ["--descan-from", str(tmp_path / f"vacuum{name}.zarr")]
    capsys.readouterr()
    assert main(["calibrate", str(paths[1]), *reference]) == 0
    found = open_store(paths[1]).calibration
    if not found.rotation_reliable:
        assert "NOT reliable" in capsys.readouterr().out
        assert main(["calibrate", str(paths[1]), "--set", "rotation-deg=17", "--set", "flip=false"]) == 0
    else:
        assert abs((found.rotation_deg - 17 + 180) % 360 - 180) < 1 and found.flip is False
    return *paths, faulted


@pytest.mark.slow
@pytest.mark.parametrize("c10, bragg, methods, vacuum", [
    (0.0, 0.0, METHODS, True), (-100.0, 0.0, ("ssb",), True),
    (0.0, 0.6, ("ssb",), True), (-100.0, 0.6, ("ssb",), False)])
def test_faults_cost_at_most_002_of_r(tmp_path, capsys, c10, bragg, methods, vacuum):
    clean, faulted, _ = _recordings(tmp_path, capsys, c10=c10, bragg=bragg, dose=2000, seed=2, vacuum=vacuum)
    r_clean = _reconstruct(clean, tmp_path / "clean-result.zarr", c10, methods)
    r_faulted = _reconstruct(faulted, tmp_path / "faulted-result.zarr", c10, methods)
    print(f"r clean {r_clean}, faulted {r_faulted}")
    for m in methods:
        assert r_clean[m] > 0.5, (m, r_clean)  # the right sign: atoms bright
        assert r_faulted[m] >= r_clean[m] - 0.02, (m, r_faulted, r_clean)


def _probe_blurred(truth: np.ndarray, p: SimulationParams) -> np.ndarray:
    """The truth as a COM method sees it at this focus: blurred by the probe intensity's transfer."""
    ny, nx = truth.shape
    q = np.hypot(np.fft.fftfreq(ny, p.scan_step)[:, None], np.fft.rfftfreq(nx, p.scan_step)[None, :])
    otf = probe_otf(q, p.wavelength, p.semiangle_mrad, p.aberrations.C10)
    return np.fft.irfft2(np.fft.rfft2(truth) * otf, s=truth.shape)


@pytest.mark.slow
def test_faults_cost_icom_and_ricom_at_most_002_of_r_at_defocus(tmp_path, capsys):
    """iCOM and riCOM at C10 = −100 Å, faulted against clean, over seeds 2–4 at 20 000 e⁻.

    At 2000 e⁻ one recording's Poisson noise alone moves r by ±0.07 from seed to seed — more
    than the 0.02 to resolve — so the dose is 20 000 e⁻ and the mean of the paired differences
    over three seeds is compared, against the truth as the acceptance states it. The −100 Å
    probe (≈ 2 Å radius) blurs SrTiO₃'s 1.95 Å column spacing, so that r is only ≈ 0.1 on both
    recordings; against the truth blurred by the probe intensity's transfer
    (:func:`~stemdask.calibrate.orientation.probe_otf`) — what a COM method recovers at this
    focus — clean reaches r ≈ 0.9, and the faulted recording must keep the sign and most of it
    (≥ 0.7). There the difference is not resolved at this dose: the clean recording with the
    dead column merely left out, and the faulted one with it left out, differ by up to 0.05 —
    two Poisson draws — so it is printed, not asserted to 0.02."""
    methods = ("icom", "ricom")
    gaps = {(m, against): [] for m in methods for against in ("truth", "blurred")}
    for seed in (2, 3, 4):
        clean, faulted, p = _recordings(tmp_path, capsys, c10=-100.0, bragg=0.0, dose=20000, seed=seed,
                                        name=str(seed))
        truth = load_truth(clean)
        blurred = _probe_blurred(truth, p)
        r = {}
        for label, store in (("clean", clean), ("faulted", faulted)):
            out = tmp_path / f"{label}{seed}-result.zarr"
            assert main(["reconstruct", str(store), "--method", "icom", "--method", "ricom", "--out", str(out),
                         "--quiet"]) == 0
            result = xr.open_zarr(out)
            r[label] = {(m, against): _pearson(result[f"{m}_phase"].values, ref) for m in methods
                        for against, ref in (("truth", truth), ("blurred", blurred))}
        print(f"seed {seed}: clean {r['clean']}, faulted {r['faulted']}")
        for m in methods:  # the right sign, and the blurred truth's detail kept
            assert r["clean"][(m, "truth")] > 0 and r["faulted"][(m, "truth")] > 0, (seed, m, r)
            assert r["clean"][(m, "blurred")] > 0.8 and r["faulted"][(m, "blurred")] > 0.7, (seed, m, r)
        for key in gaps:
            gaps[key].append(r["faulted"][key] - r["clean"][key])
    mean = {key: float(np.mean(v)) for key, v in gaps.items()}
    print(f"faulted − clean, mean over seeds 2–4: {mean}")
    assert all(mean[(m, "truth")] >= -0.02 for m in methods), mean
