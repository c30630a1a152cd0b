"""Throughput of the O(C) reductions and densify, against the same products from dense frames.

A 4D-Camera-like store is generated straight from random numbers (not the physical
simulator): a 576×576 detector, ``--scan``² positions with Poisson(``--epp``) electrons each,
85 % uniform in a bright-field disk (radius ``--bf-radius`` px around (288, 288)) and 15 %
uniform over the detector, indices sorted within each position.

For COM, a 3-detector virtual pass (BF, ABF, ADF presets), PACBED and crop+bin densify
(``--bin``, radius 1.1·R + 1) it prints events/s:

* ``kernel 1 core`` — the numba kernel alone on row blocks already in memory, one thread;
* ``e2e 1 core``   — the full lazy graph (read, decompress, kernel) with dask's
  synchronous scheduler, i.e. one core;
* ``e2e N cores``  — the same with the threaded scheduler on all cores (and per core);
* ``dense NumPy``  — the same product from dense uint16 frames already in memory (a
  subset of ``--dense-rows`` rows), NumPy's best vectorised form, one thread; and the ratio
  kernel / dense.

Also a combined pass (COM + virtual + PACBED in one ``dask.compute``: one read per block).

    python benchmarks/reductions.py                      # 512² × 500 e⁻ ≈ 131 M events
    python benchmarks/reductions.py --scan 128 --epp 200 # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # NumPy baselines on one thread

import dask  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402

import stemdask  # noqa: E402
from stemdask import reduce  # noqa: E402
from stemdask.kernels import events as K  # noqa: E402
from stemdask.optics import Calibration  # noqa: E402
from stemdask.parallel import run_jobs  # noqa: E402
from stemdask.store import create_store  # noqa: E402

DET = 576


@numba.njit(nogil=True, cache=True)
def _events(counts, seed, center, radius, det):
    np.random.seed(seed)
    out = np.empty(counts.astype(np.int64).sum(), np.uint32)
    e = 0
    for p in range(counts.size):
        n = counts[p]
        for j in range(n):
            if np.random.random() < 0.85:
                while True:
                    y = center + radius * (2 * np.random.random() - 1)
                    x = center + radius * (2 * np.random.random() - 1)
                    if (y - center) ** 2 + (x - center) ** 2 < radius**2:
                        break
                iy, ix = int(y), int(x)
            else:
                iy, ix = np.random.randint(0, det), np.random.randint(0, det)
            out[e + j] = iy * det + ix
        out[e : e + n] = np.sort(out[e : e + n])
        e += n
    return out


def make_store(path: Path, scan: int, epp: float, bf_radius: float):
    cal = Calibration(scan_step_a=0.5, detector_pixel_mrad=0.25, semiangle_mrad=bf_radius * 0.25,
                      bf_center=(DET / 2, DET / 2), bf_radius=bf_radius)
    store = create_store(path, (scan, scan), (DET, DET), cal, max_events_per_position=int(epp * 2 + 64), overwrite=True)

    def one(b):
        r0, r1 = store.block_rows(b)
        rng = np.random.default_rng(b)
        counts = rng.poisson(epp, (r1 - r0, scan)).astype(np.uint32)
        return store.write_block(b, counts, _events(counts.ravel(), b, DET / 2, bf_radius, DET))

    run_jobs(one, range(store.n_blocks), desc="generate", progress=False)
    return store.finalize()


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def dense_frames(blocks, rows, nx):
    """Dense uint16 frames (P, DET, DET) of the first ``rows`` rows, and their event count."""
    blk = blocks[0]
    p = rows * nx
    counts = blk.counts.ravel()[:p].astype(np.int64)
    n = int(counts.sum())
    frames = np.zeros((p, DET * DET), np.uint16)
    pos = np.repeat(np.arange(p), counts)
    np.add.at(frames, (pos, blk.indices[:n].astype(np.int64)), 1)
    return frames.reshape(p, DET, DET), n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scan", type=int, default=512)
    ap.add_argument("--epp", type=float, default=500.0, help="mean electrons per position")
    ap.add_argument("--bf-radius", type=float, default=80.0, help="BF disk radius (px)")
    ap.add_argument("--bin", type=int, default=4, help="densify bin factor")
    ap.add_argument("--dense-rows", type=int, default=1, help="scan rows for the dense NumPy baseline")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", help="store path (default: a temporary directory, removed after)")
    args = ap.parse_args(argv)

    tmp = None
    if args.store:
        path = Path(args.store)
    else:
        tmp = tempfile.mkdtemp(prefix="stemdask-bench-")
        path = Path(tmp) / "events.zarr"
    try:
        t = time.perf_counter()
        store = make_store(path, args.scan, args.epp, args.bf_radius)
        n_events = store.n_events
        print(f"store: {args.scan}×{args.scan} scan, {DET}×{DET} detector, {n_events / 1e6:.1f} M events "
              f"({n_events / args.scan**2:.0f}/position), {store.n_blocks} row blocks of {store.rows_per_block} rows, "
              f"{store.nbytes_stored() / n_events:.2f} B/event on disk, generated in {time.perf_counter() - t:.1f} s")
        run(store, args)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run(store, args):
    ds = stemdask.open(store.path)
    cores = os.cpu_count() or 1
    n_events = store.n_events
    nx = args.scan
    # in-memory blocks for the kernel-only timings (a few blocks: enough for steady state)
    blocks = [store.read_block(b) for b in range(min(3, store.n_blocks))]
    block_events = sum(b.indices.size for b in blocks)
    center = ds.calibration.bf_center
    masks, _ = reduce.detector_masks(ds, {"bf": "bf", "abf": "abf", "adf": "adf"})
    labels, table = reduce.mask_groups(masks)
    dense_lazy = ds.densify(bin=args.bin)
    n_out = dense_lazy.shape[2]
    y0, x0 = dense_lazy.attrs["crop_origin_px"]
    lookup = K.densify_lookup(DET, DET, y0, x0, args.bin, n_out, n_out)

    kernels = {
        "COM": lambda b: K.center_of_mass(b.counts.ravel(), b.indices, DET, center[0], center[1]),
        "virtual ×3": lambda b: K.masked_counts(b.counts.ravel(), b.indices, labels, table),
        "PACBED": lambda b: K.histogram(b.indices, DET * DET),
        f"densify bin {args.bin}": lambda b: K.densify(b.counts.ravel(), b.indices, lookup, n_out, n_out),
    }
    lazy = {
        "COM": lambda: ds.com().to_array().data,
        "virtual ×3": lambda: ds.virtual_detectors({"bf": "bf", "abf": "abf", "adf": "adf"}).to_array().data,
        "PACBED": lambda: ds.pacbed().data,
        f"densify bin {args.bin}": lambda: ds.densify(bin=args.bin).data.sum(axis=(2, 3)),
    }
    frames, dense_n = dense_frames(blocks, min(args.dense_rows, store.rows_per_block), nx)
    yy, xx = np.indices((DET, DET))
    mask_matrix = masks.reshape(3, -1).T.astype(np.float32)
    span = n_out * args.bin

    def dense_com():
        f = frames.astype(np.float32)
        n = f.sum(axis=(1, 2))
        return (f.sum(axis=2) @ np.arange(DET, dtype=np.float32)) / n, (f.sum(axis=1) @ np.arange(DET, dtype=np.float32)) / n

    def dense_densify():
        win = np.zeros((frames.shape[0], span, span), np.float32)
        sy, sx = max(0, y0), max(0, x0)
        ey, ex = min(DET, y0 + span), min(DET, x0 + span)
        win[:, sy - y0 : ey - y0, sx - x0 : ex - x0] = frames[:, sy:ey, sx:ex]
        return win.reshape(-1, n_out, args.bin, n_out, args.bin).sum(axis=(2, 4))

    dense = {
        "COM": dense_com,
        "virtual ×3": lambda: frames.reshape(frames.shape[0], -1).astype(np.float32) @ mask_matrix,
        "PACBED": lambda: frames.sum(axis=0, dtype=np.uint64),
        f"densify bin {args.bin}": dense_densify,
    }
    print(f"cores: {cores}; dense baseline on {frames.shape[0]} positions ({dense_n / 1e6:.2f} M events, "
          f"{frames.nbytes / 1e6:.0f} MB of uint16 frames)")
    header = f"{'product':18s} {'kernel 1 core':>14s} {'e2e 1 core':>12s} {'e2e ' + str(cores) + ' cores':>14s} " \
             f"{'(per core)':>11s} {'dense NumPy':>12s} {'kernel/dense':>13s}"
    print(header)
    print("-" * len(header))
    for name in kernels:
        for b in blocks[:1]:
            kernels[name](b)  # compile / warm up
        t_kernel = best_of(lambda: [kernels[name](b) for b in blocks], args.repeat)
        with dask.config.set(scheduler="sync"):
            t_sync = best_of(lambda: lazy[name]().compute(), 1)
        with dask.config.set(scheduler="threads", num_workers=cores):
            t_threads = best_of(lambda: lazy[name]().compute(), args.repeat)
        dense[name]()
        t_dense = best_of(dense[name], args.repeat)
        k_rate = block_events / t_kernel
        d_rate = dense_n / t_dense
        print(f"{name:18s} {k_rate / 1e6:11.0f} M/s {n_events / t_sync / 1e6:9.0f} M/s "
              f"{n_events / t_threads / 1e6:11.0f} M/s {n_events / t_threads / cores / 1e6:8.0f} M/s "
              f"{d_rate / 1e6:9.1f} M/s {k_rate / d_rate:12.0f}×")
    with dask.config.set(scheduler="threads", num_workers=cores):
        t = best_of(lambda: dask.compute(ds.com(), ds.virtual_detectors({"bf": "bf", "abf": "abf", "adf": "adf"}),
                                         ds.pacbed()), args.repeat)
    print(f"combined COM + virtual ×3 + PACBED, one read per block: {n_events / t / 1e6:.0f} M events/s "
          f"on {cores} cores ({n_events / t / cores / 1e6:.0f} M/s per core), {t:.2f} s")
    with dask.config.set(scheduler="sync"):
        t = best_of(lambda: [store.read_block(b) for b in range(store.n_blocks)], 1)
    print(f"read + decompress alone, 1 core: {n_events / t / 1e6:.0f} M events/s")


if __name__ == "__main__":
    main()
