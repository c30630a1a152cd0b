"""Live session throughput from the Merlin data socket, end to end, and latency to the snapshot.

A :class:`stemdask.testing.merlin.MerlinReplayServer` in this process (its own thread) sends
``--scan``² frames of 256×256 6-bit counts (processed ``U08`` data, as the MerlinEM sends
them; a pool of 512 distinct Poisson frames in a BF disk, cycled) as fast as the socket
takes them; a :class:`stemdask.live_session.LiveSession` reads them through
:class:`stemdask.live_sources.MerlinSocket` and computes riCOM (n = ``--kernel``) + virtual
BF/ADF (+ the ``image`` annulus) + COM. Figures, each a separate run:

1. frames/s end to end (connect → last frame in the snapshot), without saving;
2. the same with ``--save`` (written to a store row block by row block, in the encoding
   ``stemdask ingest`` would choose for these frames; its size on disk);
3. the same with live SSB (``--method ssb``: a ≤ ``--ssb-crop``² crop of every position, here
   31×31 at bin 3 for the 40 px disk, its scan-x FFT made row by row) and the time from the
   last frame to the SSB phase;
4. latency from a batch's first frame being complete in the socket buffer to its
   contribution being in the snapshot (median, 99th percentile, max over batches), at
   full speed and with the detector paced at ``--paced`` frames/s.

The server and the session share this machine's cores (2 on the reference machine).

    python benchmarks/live.py            # 256×256 scan
    python benchmarks/live.py --quick    # 64×64 scan
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stemdask.live_session import LiveSession
from stemdask.live_sources import MerlinSocket
from stemdask.optics import Calibration
from stemdask.testing.merlin import MerlinReplayServer, acquisition_header, encode_frames

DET = 256
CAL = Calibration(scan_step_a=0.2, detector_pixel_mrad=0.5, bf_center=(DET / 2, DET / 2), bf_radius=40.0)


def frame_pool(n: int = 512, electrons: float = 200.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:DET, :DET]
    disk = np.hypot(yy - DET / 2, xx - DET / 2) < 40
    rate = disk * electrons / disk.sum() + 0.002
    frames = np.minimum(rng.poisson(rate, size=(n, DET, DET)), 63)
    return encode_frames(frames, counter_depth=6)


def run(pool, scan, kernel, save=None, rate=None, ssb_crop=None):
    n = scan * scan
    methods = ("ricom", "virtual", "com") + (("ssb",) if ssb_crop else ())
    session = LiveSession((scan, scan), (DET, DET), CAL, kernel_size=kernel, save=save, overwrite=True,
                          methods=methods, ssb_crop=ssb_crop or 32)
    with MerlinReplayServer(pool, hdr=acquisition_header(n, 6), n_frames=n, rate=rate) as server:
        t0 = time.perf_counter()
        with MerlinSocket(server.url, batch_frames=scan) as src:
            session.started = t0
            session.run(src)
        dt = time.perf_counter() - t0
    if save:
        session.finish()
    lat = np.array(session.latencies) * 1e3
    return n / dt, lat, session


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=256)
    ap.add_argument("--kernel", type=int, default=61)
    ap.add_argument("--paced", type=float, default=5000.0, help="detector rate for the paced latency run (frames/s)")
    ap.add_argument("--ssb-crop", type=int, default=32, help="largest crop side kept for live SSB (px)")
    ap.add_argument("--electrons", type=float, default=200.0,
                    help="mean electrons per frame in the BF disk (default 200; ≳ 10000: --save stores weighted)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    scan = 64 if args.quick else args.scan
    pool = frame_pool(electrons=args.electrons)
    run(pool, 16, args.kernel, ssb_crop=args.ssb_crop)  # compile / load the numba caches
    print(
        f"{os.cpu_count()} cores; {scan}×{scan} scan of {DET}×{DET} 6-bit frames "
        f"({pool.shape[1] / 1e3:.1f} kB each, {args.electrons:g} e⁻ in the BF disk), "
        f"riCOM n = {args.kernel} + virtual BF/ABF/ADF + COM"
    )
    fps, lat, _ = run(pool, scan, args.kernel)
    print(
        f"socket → snapshot, no save:  {fps:8,.0f} frames/s; latency median {np.median(lat):.1f} ms, "
        f"p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms"
    )
    tmp = tempfile.mkdtemp(prefix="stemdask-live-bench-")
    try:
        fps, lat, session = run(pool, scan, args.kernel, save=os.path.join(tmp, "s.zarr"))
        stored = sum(f.stat().st_size for f in Path(tmp, "s.zarr").rglob("*") if f.is_file())
        print(
            f"socket → snapshot, --save:   {fps:8,.0f} frames/s; latency median {np.median(lat):.1f} ms, "
            f"p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.1f} ms; store {session._writer.encoding}, "
            f"{stored / 2**20:,.0f} MiB on disk"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fps, lat, session = run(pool, scan, args.kernel, ssb_crop=args.ssb_crop)
    w = session.live_ssb.window
    print(
        f"socket → snapshot, + SSB:    {fps:8,.0f} frames/s; {w.n}×{w.n} crops (bin {w.bin}), "
        f"{session.live_ssb.nbytes / 2**20:,.0f} MiB kept; SSB phase {session.ssb_seconds:.2f} s after the last frame"
    )
    fps, lat, _ = run(pool, min(scan, 64), args.kernel, rate=args.paced)
    print(
        f"detector paced at {args.paced:,.0f}/s: {fps:8,.0f} frames/s; latency median {np.median(lat):.2f} ms, "
        f"p99 {np.percentile(lat, 99):.2f} ms, max {lat.max():.2f} ms"
    )


if __name__ == "__main__":
    main()
