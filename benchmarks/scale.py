"""Out-of-core proof: COM, riCOM and SSB on a store holding ≥ 4× the workers' total memory.

Prints the events, the event bytes, the memory limit, each worker's peak RSS and the wall
time per product, on a LocalCluster of worker processes (default: the ``local-lowmem``
profile, 2 workers × 300 MB).

    python benchmarks/scale.py [--scan 512] [--epp 2400] [--profile local-lowmem]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dask.utils import format_bytes, parse_bytes

import stemdask
from stemdask.cluster import connect, load_profile
from stemdask.methods.ricom import ricom
from stemdask.methods.ssb import ssb
from stemdask.testing import peak_rss_per_worker, random_event_store


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=512, help="N×N positions")
    ap.add_argument("--detector", type=int, default=512, help="N×N pixels (> 256 → uint32 indices)")
    ap.add_argument("--epp", type=float, default=2400, help="electrons per position")
    ap.add_argument("--profile", default="local-lowmem")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the store (default: a temp dir)")
    args = ap.parse_args(argv)

    profile = load_profile(args.profile)
    limit = parse_bytes(str(profile["memory_limit"]))
    total_limit = limit * int(profile.get("n_workers", 1))
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        t = time.perf_counter()
        store = random_event_store(Path(tmp) / "big.zarr", (args.scan, args.scan), args.detector, args.epp,
                                   rows_per_block=4)
        made = time.perf_counter() - t
        event_bytes = store.n_events * store.index_dtype.itemsize
        print(f"events            {store.n_events:,} ({format_bytes(event_bytes)} of indices, "
              f"{format_bytes(store.nbytes_stored())} on disk; made in {made:.1f} s)")
        print(
            f"memory limit      {profile.get('n_workers')} workers × {format_bytes(limit)} = "
            f"{format_bytes(total_limit)}"
            f"  → event bytes / total limit = {event_bytes / total_limit:.1f}×"
        )
        with connect(args.profile) as client:
            ds = stemdask.open(store.path)
            for name, build in [
                ("COM", lambda: ds.com()),
                ("COM + riCOM (n=61)", lambda: ricom(ds.com(), ds.calibration, kernel_size=61).phase),
                ("SSB", lambda: ssb(ds.densify(), ds.calibration).phase),
            ]:
                t = time.perf_counter()
                build().compute()
                wall = time.perf_counter() - t
                print(f"{name:18s} wall {wall:6.1f} s   {store.n_events / wall / 1e6:6.1f} M events/s")
            peaks = peak_rss_per_worker(client)
        for addr, peak in sorted(peaks.items()):
            print(f"peak RSS          {addr}: {format_bytes(peak)}")


if __name__ == "__main__":
    main()
