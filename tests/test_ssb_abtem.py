"""SSB on the independent abTEM SrTiO3 case (multislice, C10 = −150 Å, Poisson events)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import stemdask
from stemdask.methods.ssb import ssb
from stemdask.optics import Aberrations, Calibration
from stemdask.store import create_store


@pytest.fixture(scope="module")
def case(abtem_case, tmp_path_factory):
    """The dose-1000 events in an event store (calibration from params.json) and the truth."""
    params = json.loads((abtem_case / "params.json").read_text())
    det = params["detector"]
    cal = Calibration(
        energy_ev=params["energy_eV"], scan_step_a=params["scan"]["step_A"],
        detector_pixel_mrad=det["pixel_size_mrad"], semiangle_mrad=params["semiangle_mrad"],
        bf_center=det["bf_center_px_yx"], bf_radius=det["bf_radius_px"],
    )
    events = np.load(abtem_case / "events_dose1000.npz")
    indices, offsets = events["indices"], events["offsets"]
    ny, nx = params["scan"]["shape_yx"]
    store = create_store(tmp_path_factory.mktemp("abtem") / "events.zarr", (ny, nx), tuple(det["shape_yx"]), cal,
                         rows_per_block=16)
    counts = np.diff(offsets).reshape(ny, nx)
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        store.write_block(b, counts[r0:r1], indices[offsets[r0 * nx] : offsets[r1 * nx]])
    store.finalize()
    truth = np.load(abtem_case / "phase_truth.npy").astype(np.float64)
    return stemdask.open(store.path), truth, params


def detrended(a):
    """``a`` minus its least-squares 2nd-order polynomial background."""
    y, x = np.mgrid[: a.shape[0], : a.shape[1]] / max(a.shape)
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], -1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(basis, a.ravel().astype(float), rcond=None)
    return a - (basis @ coef).reshape(a.shape)


def r_detrended(image, truth) -> float:
    return float(np.corrcoef(detrended(image).ravel(), detrended(truth).ravel())[0, 1])


def test_abtem_defocus_150_corrected_through_densify(case):
    ds, truth, params = case
    assert params["C10_A"] == -150.0  # abTEM defocus = +150 Å = underfocus
    result = ssb(ds.densify(), ds.calibration, Aberrations(C10=params["C10_A"]))
    assert r_detrended(result.phase.values, truth) >= 0.88
    assert r_detrended(result.refocus(C10=0.0).values, truth) < 0.0  # no correction
    assert r_detrended(result.refocus(C10=+150.0).values, truth) < 0.3  # abTEM's defocus taken as C10
    # Positive potential → positive phase: the heavy columns are bright.
    image = detrended(result.phase.values)
    columns = truth > np.percentile(truth, 99)
    assert image[columns].mean() > image.mean() + image.std()


def test_abtem_focus_criterion_finds_c10_without_the_truth(case):
    ds, _, params = case
    sweep = ssb(ds.densify(), ds.calibration).sweep(np.arange(-300.0, 101.0, 25.0))
    assert float(sweep.power.idxmax()) == params["C10_A"]
