"""Out of core for real: COM, riCOM and SSB of a store holding ≥ 4× the workers' total memory.

On a LocalCluster of worker processes (default: the ``local-lowmem`` profile, 2 workers × 1 GB
under dask's default memory thresholds — spill 60/70 %, pause 80 %, restart 95 %), with a
20-pixel BF disk on a 128² detector (SSB's dense crop 47², 1257 BF pixels). Prints the store
(events, decoded bytes, bytes on disk), the worker limit, each worker's memory at rest (a
worker process with stemdask's kernels compiled, before any data), then per product the wall
time, each worker's peak RSS, whether a worker died, and whether the result equals the same
graph run in this process on threads.

    python benchmarks/scale.py [--scan 512] [--epp 16000] [--profile local-lowmem] [--dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import dask
import distributed  # noqa: F401  (its config defaults: the memory thresholds printed)
import numpy as np
from dask.utils import format_bytes, parse_bytes

import stemdask
from stemdask.cluster import connect, load_profile
from stemdask.methods.ricom import ricom
from stemdask.methods.ssb import ssb
from stemdask.testing import peak_rss_per_worker, random_event_store, reset_peak_rss


def rss_now() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def products(path):
    ds = stemdask.open(path)
    com = ds.com()
    return {
        "COM": lambda: ds.com(),
        "riCOM (n=61)": lambda: ricom(com, ds.calibration, kernel_size=61).phase,
        "SSB": lambda: ssb(ds.densify(), ds.calibration).phase,
    }


def same(a, b) -> bool:
    """Equal to float32 round-off (SSB's FFTs are summed in another order on other chunks)."""
    pairs = [(a[v].values, b[v].values) for v in a.data_vars] if hasattr(a, "data_vars") else [(a.values, b.values)]
    return all(np.allclose(x, y, rtol=1e-4, atol=1e-5 * np.nanmax(np.abs(y))) for x, y in pairs)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=512, help="N×N positions")
    ap.add_argument("--detector", type=int, default=128, help="N×N pixels")
    ap.add_argument("--bf-radius", type=float, default=20.0, help="BF disk radius (px)")
    ap.add_argument("--epp", type=float, default=16000, help="electrons per position")
    ap.add_argument("--profile", default="local-lowmem")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the store (default: a temp dir)")
    ap.add_argument("--no-check", action="store_true", help="skip the in-process reference run")
    args = ap.parse_args(argv)

    profile = load_profile(args.profile)
    limit = parse_bytes(str(profile["memory_limit"]))
    n_workers = int(profile.get("n_workers", 1))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        store = random_event_store(Path(tmp) / "big.zarr", (args.scan, args.scan), args.detector, args.epp,
                                   bf_radius=args.bf_radius, bf_fraction=0.7)
        made = time.perf_counter() - t
        event_bytes = store.n_events * store.index_dtype.itemsize
        print(f"store             {store.n_events:,} events ({format_bytes(event_bytes)} decoded, "
              f"{format_bytes(store.nbytes_stored())} on disk; made in {made:.0f} s)")
        print(f"workers           {n_workers} × {format_bytes(limit)} = {format_bytes(n_workers * limit)} "
              f"(dask thresholds: {_thresholds(profile)}); event bytes / total = "
              f"{event_bytes / (n_workers * limit):.1f}×")
        reference = {}
        if not args.no_check:
            with dask.config.set(scheduler="threads"):
                for name, build in products(store.path).items():
                    t = time.perf_counter()
                    reference[name] = build().compute()
                    print(f"in process        {name:13s} {time.perf_counter() - t:6.1f} s (threads, reference)")
        with connect(args.profile) as client:
            small = random_event_store(Path(tmp) / "small.zarr", (16, 16), args.detector, 100, bf_radius=args.bf_radius)
            client.run(lambda: [p().compute(scheduler="sync") for p in products(small.path).values()])  # warm up
            rest = client.run(rss_now)
            print("at rest           " + ", ".join(format_bytes(v) for v in rest.values())
                  + " per worker (stemdask, numba kernels, zarr, xarray loaded)")
            for name, build in products(store.path).items():
                workers = set(client.scheduler_info()["workers"])
                client.run(reset_peak_rss)
                t = time.perf_counter()
                got = build().compute()
                wall = time.perf_counter() - t
                peaks = peak_rss_per_worker(client)
                died = workers - set(client.scheduler_info()["workers"])
                check = "" if name not in reference else f"; equal to in-process: {same(got, reference[name])}"
                print(f"{name:17s} wall {wall:6.1f} s, {store.n_events / wall / 1e6:5.0f} M events/s; peak RSS "
                      + ", ".join(format_bytes(p) for p in peaks.values())
                      + f" ({max(peaks.values()) / limit:.0%} of the limit); workers lost: {len(died)}{check}")


def _thresholds(profile) -> str:
    given = (profile.get("dask") or {}).items()
    cfg = {**dask.config.get("distributed.worker.memory"),
           **{k.rsplit(".", 1)[1]: v for k, v in given if k.startswith("distributed.worker.memory.")}}
    return ", ".join(f"{k} {cfg[k]}" for k in ("target", "spill", "pause", "terminate"))


if __name__ == "__main__":
    main()
