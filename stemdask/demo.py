"""``stemdask demo``: the whole pipeline on a built-in example, end to end.

simulate (known phase) → export the events as CSR (what a detector's software writes) →
ingest → calibrate → virtual BF/ADF, COM, iCOM, DPC, riCOM and SSB in one pass over the
events on a local Dask cluster → ``results.zarr`` (xarray) + ``results.png``.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import xarray as xr

from .calibrate import calibrate_store, calibration_lines
from .cluster import DEFAULT_TIMEOUT, connect
from .events import open as open_dataset
from .io import ingest
from .optics import Aberrations
from .outputs import OutputFolderError
from .plotting import image_panel
from .reconstruct import reconstruct, write_result
from .simulate import SimulationParams, export_csr, load_truth, simulate

PHASE_METHODS = ["icom", "dpc", "ricom", "ssb"]
#: A file marking a folder as the demo's own, which a later run may replace.
MARKER = ".stemdask-demo"


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def run_demo(out_dir: str | Path = "stemdask-demo", *, scan: int = 128, detector: int = 64, dose: float = 2000.0,
             c10: float = 0.0, seed: int = 1, cluster: str | None = "local",
             cluster_timeout: float = DEFAULT_TIMEOUT, progress: bool = True, overwrite: bool = True) -> dict:
    """Run the demo into ``out_dir``; returns paths, timings, each phase image's r with the truth
    and the calibration found.

    The sample has thermal diffuse scattering (``tds=0.05``), so its ADF image is bright at the
    columns as a real one is. ``c10`` (Å) is the simulated defocus only: reconstruct is given no
    C10, so SSB uses the estimate ``calibrate`` stored (and says so), as it would on real data.
    ``cluster``/``cluster_timeout``: as :func:`stemdask.cluster.connect`.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise FileExistsError(f"{out} exists and is not a stemdask demo folder; choose another --out")
        if not overwrite:
            raise FileExistsError(f"{out} already exists")
        shutil.rmtree(out)
    if not out.resolve().parent.is_dir():
        raise OutputFolderError(f"{out}: the folder {out.resolve().parent} does not exist (the demo creates only "
                                "its own folder)")
    out.mkdir(exist_ok=True)
    (out / MARKER).write_text("made by `stemdask demo`; the next demo run replaces this folder\n")
    say = print if progress else (lambda *a, **k: None)
    t0 = time.perf_counter()
    timings = {}

    params = SimulationParams(scan_shape=(scan, scan), detector=detector, dose=dose, max_phase=0.5,
                              aberrations=Aberrations(C10=c10), seed=seed, tds=0.05)
    say(f"1/5 simulating {scan}×{scan} positions × {detector}×{detector} px, {dose:g} e⁻/position, C10 {c10:g} Å")
    sim = simulate(out / "simulated.zarr", params, rows_per_block=16, progress=progress)
    export_csr(sim, out / "events.npz")
    truth = load_truth(sim.path)
    timings["simulate"] = time.perf_counter() - t0

    say("2/5 ingesting events.npz → events.zarr")
    t = time.perf_counter()
    optics = params.optics()
    # the simulation's own optics, given explicitly (ingest assumes nothing) and recorded as such
    store = ingest(out / "events.npz", out / "events.zarr", format="csr", progress=progress,
                   calibration={**optics, "origins": {k: "simulation" for k in optics}})
    shutil.rmtree(sim.path)
    timings["ingest"] = time.perf_counter() - t

    say("3/5 calibrating (BF disk, scan rotation/flip)")
    t = time.perf_counter()
    found = calibrate_store(store.path)
    for line in calibration_lines(found):
        say(f"    {line}")
    timings["calibrate"] = time.perf_counter() - t

    where = "the threaded scheduler" if cluster in (None, "none") else f"the Dask cluster {cluster!r}"
    say(f"4/5 reconstructing on {where}: virtual BF/ABF/ADF, COM, iCOM, DPC, riCOM, SSB (one pass over the events)")
    t = time.perf_counter()
    with connect(cluster, timeout=cluster_timeout):
        ds = open_dataset(store.path)
        # no C10: SSB takes the calibrated estimate, as on real data
        result = reconstruct(ds, ["virtual", "com", *PHASE_METHODS])
        result = result.rename(bf="virtual_bf", abf="virtual_abf", adf="virtual_adf")
        result.attrs["demo"] = json.dumps({"scan": scan, "detector": detector, "dose": dose, "c10": c10, "seed": seed})
        result["phase_truth"] = xr.DataArray(truth, dims=("scan_y", "scan_x"),
                                             attrs={"units": "rad", "long_name": "true phase (simulation)"})
        path = write_result(result, out / "results.zarr", overwrite=True, progress=progress)
    timings["reconstruct"] = time.perf_counter() - t

    say("5/5 plotting")
    saved = xr.open_zarr(path)
    names = ["virtual_bf", "virtual_adf", *(f"{m}_phase" for m in PHASE_METHODS), "phase_truth"]
    png = image_panel({n: saved[n] for n in names}, out / "results.png", title="stemdask demo (simulated, known phase)")
    scores = {m: _pearson(saved[f"{m}_phase"].values, truth) for m in PHASE_METHODS}
    timings["total"] = time.perf_counter() - t0
    say("correlation with the true phase: " + ", ".join(f"{m} r={r:.2f}" for m, r in scores.items()))
    say(f"results: {path}\nfigure:  {png}\nevents:  {store.path}\ntime:    {timings['total']:.0f} s")
    return {"results": str(path), "png": png, "store": str(store.path), "pearson_r": scores, "timings": timings,
            "calibration": {k: found[k] for k in ("rotation_deg", "flip", "rotation_reliable", "c10_estimate_a")}}
