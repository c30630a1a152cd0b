"""Calibration acceptance grid: is `calibrate` ever reliable and wrong? (issue 10)

    python benchmarks/calibration_grid.py [--quick] [--workers 2] [--json OUT.json]

Every case is simulated (``stemdask.simulate``, 64² positions × 64² px, thermal diffuse
scattering ``tds=0.05`` in every case, as every real sample has) and calibrated from the events
alone (:func:`stemdask.calibrate.calibrate`). The grid: rotation ∈ {0, 17, 90, 163, 241, 312}°,
flip both, C10 ∈ {−150, −100, 0, +100} Å, dose 200 and 2000 e⁻/position, seeds 0 and 1,
without faults and with :meth:`SimulationParams.realistic`'s (17° is replaced by each rotation:
off-centre disk, plane descan, a hot pixel, dead pixels and a dead column, a tilted-crystal
Bragg background). ``--quick``: rotations {17, 241}, seed 1 only; ``--seeds`` other seeds;
``--doses`` other doses (20 000 e⁻ shrinks the standard errors about 3×, so a systematic bias
that 2000 e⁻ hides shows as "wrong"); ``--faults yes|no`` one half of the grid.

Each case's orientation is classified

* **right**: ``rotation_reliable`` and θ within 1°, the flip right and a C10 estimate (if
  any) of the right sign within 10 %;
* **flagged**: not reliable (the stored rotation and flip are kept, and the CLI says so);
* **wrong**: reliable but θ ≥ 1° off, the flip wrong, or a C10 estimate of the wrong sign or
  off by more than 10 % — the outcome that must never happen;

and, separately, whether the BF centre (at the scan centre) and the descan (at every position)
are within 0.25 px of the truth and every hot/dead pixel inside the BF disk is masked. The
table prints counts per (faults, dose, C10); the totals last. Figures depend on the seed set,
not on the machine; the time per case is printed for scale.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROTATIONS = (0.0, 17.0, 90.0, 163.0, 241.0, 312.0)
C10S = (-150.0, -100.0, 0.0, 100.0)
DOSES = (200.0, 2000.0)
SEEDS = (0, 1)


def cases(quick: bool, seeds=SEEDS, doses=DOSES, faults=(False, True)) -> list[dict]:
    rotations, seeds = ((17.0, 241.0), (1,)) if quick else (ROTATIONS, tuple(seeds))
    return [{"rotation": r, "flip": f, "c10": c, "dose": d, "seed": s, "faults": x}
            for x, d, c, r, f, s in itertools.product(faults, doses, C10S, rotations, (False, True), seeds)]


def run_case(case: dict) -> dict:
    """Simulate and calibrate one case in a temporary folder; returns the case with its verdicts."""
    import dask
    import numpy as np

    import stemdask
    from stemdask.calibrate import calibrate
    from stemdask.optics import Aberrations, descan_offsets
    from stemdask.simulate import SimulationParams, load_faults, simulate

    kw = dict(scan_shape=(64, 64), detector=64, dose=case["dose"], seed=case["seed"], tds=0.05,
              rotation_deg=case["rotation"], flip=case["flip"], aberrations=Aberrations(C10=case["c10"]))
    p = SimulationParams.realistic(**kw) if case["faults"] else SimulationParams(**kw)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stemdask-grid-") as tmp, dask.config.set(scheduler="synchronous"):
        path = Path(tmp) / "s.zarr"
        simulate(path, p, progress=False)
        faults = load_faults(path)
        t1 = time.perf_counter()
        r, mask, _ = calibrate(stemdask.open(path))
        t2 = time.perf_counter()
    error = abs((r["rotation_deg"] - p.total_rotation_deg + 180) % 360 - 180)
    est = r["c10_estimate_a"]
    c10_ok = est is None or (case["c10"] != 0 and abs(est - case["c10"]) <= 0.1 * abs(case["c10"]))
    orientation_ok = error < 1.0 and r["flip"] == p.flip and c10_ok
    verdict = "flagged" if not r["rotation_reliable"] else ("right" if orientation_ok else "wrong")
    got = np.stack(descan_offsets(r["descan"], p.scan_shape))
    want = np.stack(descan_offsets(faults["descan"], p.scan_shape))
    defects = [h[:2] for h in faults["hot_pixels"]] + faults["dead_pixels"]
    lit = [(y, x) for y, x in defects if math.dist((y, x), faults["bf_center"]) < faults["bf_radius"]]
    px = r["parallax"] or {}
    return {**case, "verdict": verdict, "rotation_error_deg": error, "flip_found": r["flip"], "method": r["method"],
            "com_error_deg": abs((r["com_rotation_deg"] - p.total_rotation_deg + 90) % 180 - 90),
            "com_sigma_deg": r["com_rotation_sigma_deg"], "parallax_sigma_deg": px.get("rotation_sigma_deg"),
            "parallax_error_deg": (abs((px["rotation_deg"] - p.total_rotation_deg + 90) % 180 - 90)
                                   if r["method"].startswith("parallax") else None),
            "c10_estimate_a": est, "centre_ok": math.dist(r["bf_center"], faults["bf_center"]) < 0.25,
            "descan_ok": float(np.abs(got - want).max()) < 0.25, "defects_ok": all(mask[y, x] for y, x in lit),
            "notes": r["messages"], "simulate_s": t1 - t0, "calibrate_s": t2 - t1}


def table(results: list[dict]) -> str:
    rows = ["faults  dose   C10 Å | cases right flagged wrong | centre descan defects | wrong cases"]
    groups = itertools.groupby(sorted(results, key=lambda c: (c["faults"], c["dose"], c["c10"])),
                               key=lambda c: (c["faults"], c["dose"], c["c10"]))
    for (faults, dose, c10), members in groups:
        rows.append(_row(f"{'yes' if faults else 'no':6s} {dose:5.0f} {c10:+7.0f}", list(members)))
    rows.append(_row("all" + " " * 17, results))
    return "\n".join(rows)


def _row(label: str, group: list[dict]) -> str:
    n = {v: sum(c["verdict"] == v for c in group) for v in ("right", "flagged", "wrong")}
    ok = {k: sum(c[k] for c in group) for k in ("centre_ok", "descan_ok", "defects_ok")}
    wrong = [f"{c['rotation']:g}°/{'F' if c['flip'] else '-'}/s{c['seed']}" for c in group if c["verdict"] == "wrong"]
    return (f"{label} | {len(group):5d} {n['right']:5d} {n['flagged']:7d} {n['wrong']:5d} | "
            f"{ok['centre_ok']:6d} {ok['descan_ok']:6d} {ok['defects_ok']:7d} | {' '.join(wrong)}")


def sigma_check(results: list[dict]) -> str:
    """How well each route's standard error predicts its actual error (rms of error / σ: 1 is
    right, < 1 conservative), over the cases where that route measured (flip right, σ finite)."""
    lines = []
    for route in ("com", "parallax"):
        z = [c[f"{route}_error_deg"] / c[f"{route}_sigma_deg"] for c in results
             if c.get(f"{route}_error_deg") is not None and c.get(f"{route}_sigma_deg")
             and math.isfinite(c[f"{route}_sigma_deg"]) and c["flip_found"] == c["flip"]
             and c[f"{route}_sigma_deg"] < 5.0]
        if z:
            rms = math.sqrt(sum(v * v for v in z) / len(z))
            beyond = sum(v > 3 for v in z)
            lines.append(f"{route} θ: rms(error/σ) {rms:.2f} over {len(z)} cases (σ < 5°); {beyond} beyond 3σ")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="rotations 17° and 241°, seed 1 (64 cases)")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="simulation seeds (default 0 1)")
    ap.add_argument("--doses", type=float, nargs="+", default=list(DOSES),
                    help="e⁻ per position (default 200 2000; a higher dose shrinks σ, so a bias shows)")
    ap.add_argument("--faults", choices=["both", "yes", "no"], default="both",
                    help="the cases with the realistic faults, without, or both (default)")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default 2)")
    ap.add_argument("--json", help="also write every case's result here")
    args = ap.parse_args()
    faults = {"both": (False, True), "yes": (True,), "no": (False,)}[args.faults]
    todo = cases(args.quick, args.seeds, args.doses, faults)
    print(f"{len(todo)} cases on {args.workers} processes", flush=True)
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(args.workers) as pool:
        for i, res in enumerate(pool.map(run_case, todo), 1):
            results.append(res)
            if i % 16 == 0 or res["verdict"] == "wrong":
                print(f"  {i}/{len(todo)} done ({time.perf_counter() - t0:.0f} s)"
                      + (f"; WRONG: {res}" if res["verdict"] == "wrong" else ""), flush=True)
    print(table(results))
    print(sigma_check(results))
    cal = sorted(c["calibrate_s"] for c in results)
    print(f"calibrate per case: median {cal[len(cal) // 2]:.2f} s; wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
