"""Calibration speed: `calibrate` against one COM + PACBED pass over the same events (issue 10).

    python benchmarks/calibrate.py [--case DIR] [--repeat 3]

On the shared abTEM case (``../shared/data/abtem-srtio3-thin-defocus150``, 96² positions ×
96² px, dose 1000; ingested once into a temporary store) on the local threaded scheduler:

* one pass: ``dask.compute(ds.com(), ds.pacbed())`` — the least any calibration must read;
* calibrate: :func:`stemdask.calibrate.calibrate` (PACBED + binned dense patterns, the COM in
  the BF window, the defects, disk fit, descan, COM curl, parallax with its four-group error,
  ADF half turn), nothing written.

Prints the median of ``--repeat`` runs of each (after one warm-up run that compiles the
kernels) and their ratio; the acceptance is calibrate ≤ 2× one pass.

``--tile N``: the same events tiled N × N over the scan (the case is one period of a periodic
cell, so the tiled scan is the same crystal over N² cells). calibrate bins the scan to ≤ 128
positions a side for its dense patterns, so its image work stays about the same size while the
pass grows with the events: how the ratio goes where reading the data, not the image work, is
the cost. calibrate reads the events once, as the pass does, and also densifies them (binned
as it goes), so its data part alone is about 1.6× the pass.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import dask
import numpy as np

import stemdask
from stemdask.calibrate import calibrate
from stemdask.io.ingest import ingest

CASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "abtem-srtio3-thin-defocus150"


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up: numba compilation, caches
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _tiled(case: Path, n: int, out: Path) -> tuple[Path, int]:
    """The case's CSR events tiled n × n over the scan, written as a CSR ``.npz``; (path, side)."""
    z = np.load(case / "events_dose1000.npz")
    indices, offsets = z["indices"], z["offsets"]
    side = 96 * n
    yy, xx = np.divmod(np.arange(side * side), side)
    source = (yy % 96) * 96 + xx % 96
    counts = np.diff(offsets)[source]
    starts = np.repeat(offsets[source], counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    np.savez(out, indices=indices[starts + within], offsets=np.concatenate([[0], np.cumsum(counts)]))
    return out, side


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", type=Path, default=CASE, help="the abTEM case folder (default ../shared/...)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tile", type=int, default=1, help="tile the case's events N × N over the scan (default 1)")
    args = ap.parse_args()
    params = json.loads((args.case / "params.json").read_text())
    with tempfile.TemporaryDirectory(prefix="stemdask-bench-") as tmp:
        source, side = ((args.case / "events_dose1000.npz", 96) if args.tile == 1
                        else _tiled(args.case, args.tile, Path(tmp) / "tiled.npz"))
        store = ingest(source, Path(tmp) / "s.zarr", format="csr",
                       scan_shape=(side, side), detector_shape=(96, 96), progress=False,
                       calibration={"energy_ev": params["energy_eV"], "scan_step_a": params["scan"]["step_A"],
                                    "semiangle_mrad": params["semiangle_mrad"],
                                    "detector_pixel_mrad": params["detector"]["pixel_size_mrad"]})
        ds = stemdask.open(store.path)
        one_pass = _median_time(lambda: dask.compute(ds.com(reference=(48.0, 48.0)), ds.pacbed()), args.repeat)
        cal = _median_time(lambda: calibrate(ds), args.repeat)
        print(f"{store.n_events:,} events, {side}² × 96²; median of {args.repeat}")
        print(f"one COM + PACBED pass  {one_pass:8.3f} s")
        print(f"calibrate              {cal:8.3f} s  ({cal / one_pass:.1f}× one pass; acceptance ≤ 2×)")


if __name__ == "__main__":
    main()
