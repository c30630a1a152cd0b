"""Throughput of the O(C) reductions and densify, against the same products from dense frames.

A 4D-Camera-like store is generated straight from random numbers (not the physical
simulator): a 576×576 detector, ``--scan``² positions with Poisson(``--epp``) electrons each,
85 % uniform in a bright-field disk (radius ``--bf-radius`` px around (288, 288)) and 15 %
uniform over the detector, indices sorted within each position.

For COM, a 3-detector virtual pass (BF, ABF, ADF presets), PACBED and crop+bin densify
(each of ``--bins``, radius 1.1·R + 1) it prints events/s:

* ``kernel 1 core`` — the numba kernel alone (densify: with its output allocation) on row
  blocks already in memory, one thread;
* ``e2e /CPU-s``   — the full lazy graph (read, decompress, kernel) on all cores with the
  threaded scheduler, events per CPU-second of the whole process (user + system): the
  honest "per core" figure (zarr decompresses in its own threads too);
* ``e2e wall``     — the same run's events per wall-clock second on all cores;
* ``dense NumPy``  — the same product from dense uint16 frames already in memory (a
  subset of ``--dense-rows`` rows), NumPy's best vectorised form, one thread; and the ratios
  kernel / dense and e2e-per-CPU-second / dense.

Also a combined pass (COM + virtual + PACBED in one ``dask.compute``: one read per block, each
product decoding its chunks; and the same with ``decode_once()``: decoded once per read),
read alone and read + decode alone, and the cost of allocating and zeroing densify's float32 output
alone (it is written once per pixel whatever the events: it bounds densify when the output
is large compared with the events).

    python benchmarks/reductions.py                      # 512² × 500 e⁻ ≈ 131 M events
    python benchmarks/reductions.py --scan 128 --epp 200 # quick
    python benchmarks/reductions.py --out-of-core 600MB  # COM on 3× the workers' memory
    python benchmarks/reductions.py --codec lz4:5:shuffle  # the same with another store codec
    python benchmarks/reductions.py --checksum-cost --repeat 5  # COM with / without read verification
"""

from __future__ import annotations

import argparse
import math
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
from stemdask import reductions  # noqa: E402
from stemdask.kernels import events as K  # noqa: E402
from stemdask.optics import Calibration  # noqa: E402
from stemdask.progress import run_jobs  # noqa: E402
from stemdask.store import FORMAT_VERSION, create_store  # noqa: E402
from stemdask.testing import peak_rss_bytes, reset_peak_rss  # noqa: E402

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


def make_store(path: Path, scan: int, epp: float, bf_radius: float, format_version: int = FORMAT_VERSION):
    cal = Calibration(scan_step_a=0.5, detector_pixel_mrad=0.25, semiangle_mrad=bf_radius * 0.25,
                      bf_center=(DET / 2, DET / 2), bf_radius=bf_radius)
    store = create_store(path, (scan, scan), (DET, DET), cal,
                         overwrite=True, format_version=format_version)

    def one(b):
        r0, r1 = store.block_rows(b)
        rng = np.random.default_rng(b)
        counts = rng.poisson(epp, (r1 - r0, scan)).astype(np.uint32)
        return store.write_block(b, counts, _events(counts.ravel(), b, DET / 2, bf_radius, DET))

    run_jobs(one, range(store.n_blocks), desc="generate", progress=False)
    return store.finalize()


def best_of(fn, repeat):
    """Best (wall, CPU) seconds of ``repeat`` calls; CPU = process time of all threads."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - w, time.process_time() - c))
    return best


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
    ap.add_argument("--bins", type=int, nargs="+", default=[4, 8], help="densify bin factors")
    ap.add_argument("--dense-rows", type=int, default=1, help="scan rows for the dense NumPy baseline")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--store", help="store path (default: a temporary directory, removed after)")
    ap.add_argument("--out-of-core", metavar="WORKER_MEMORY",
                    help="instead: COM on a LocalCluster of --workers processes with this memory_limit each "
                         "(e.g. 600MB), on a dataset whose events take 3× the workers' total memory "
                         "(--scan is chosen for that)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--codec", metavar="CNAME:CLEVEL:SHUFFLE",
                    help="an experiment: write the store with this Blosc codec instead of the store's own "
                         "(e.g. lz4:5:shuffle; patches stemdask.store._compressors in this process only)")
    ap.add_argument("--checksum-cost", action="store_true",
                    help="instead: COM events per CPU-second on the same events stored with verification "
                         "(format 2: chunk and block CRC-32C on every read) and without (format 1)")
    ap.add_argument("--read-path", action="store_true",
                    help="instead: reading the entries directly (stemdask.chunk_reads) against through zarr — "
                         "row-block reads and COM end to end, events per CPU-second, in one run")
    args = ap.parse_args(argv)
    if args.codec:
        from zarr.codecs import BloscCodec, Crc32cCodec

        import stemdask.store

        cname, clevel, shuffle = args.codec.split(":")
        stemdask.store._compressors = lambda version: [BloscCodec(cname=cname, clevel=int(clevel), shuffle=shuffle)] + (
            [Crc32cCodec()] if version >= 2 else [])
    if args.out_of_core:
        from dask.utils import parse_bytes

        limit = parse_bytes(args.out_of_core)
        args.scan = math.ceil(math.sqrt(3 * args.workers * limit / 4 / args.epp) * 1.02)

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
        if args.out_of_core:
            out_of_core(store, args, limit)
        elif args.read_path:
            read_path(store, args)
        elif args.checksum_cost:
            checksum_cost(store, make_store(path.with_name("v1.zarr"), args.scan, args.epp, args.bf_radius, 1), args)
        else:
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
    presets = {"bf": "bf", "abf": "abf", "adf": "adf"}
    masks, _, _ = reductions.detector_masks(ds, presets)
    labels, table = reductions.mask_groups(masks)
    frames, dense_n = dense_frames(blocks, min(args.dense_rows, store.rows_per_block), nx)
    mask_matrix = masks.reshape(3, -1).T.astype(np.float32)
    axis = np.arange(DET, dtype=np.float32)

    def dense_com():
        f = frames.astype(np.float32)
        n = f.sum(axis=(1, 2))
        return (f.sum(axis=2) @ axis) / n, (f.sum(axis=1) @ axis) / n

    products = {  # name: (kernel on one block, lazy product, dense NumPy baseline)
        "COM": (lambda b: K.center_of_mass(b.counts.ravel(), b.indices, DET, center[0], center[1], n_pixels=DET * DET),
                lambda: ds.com().to_array().data, dense_com),
        "virtual ×3": (lambda b: K.masked_counts(b.counts.ravel(), b.indices, None, labels, table),
                       lambda: ds.virtual_detectors(presets).to_array().data,
                       lambda: frames.reshape(frames.shape[0], -1).astype(np.float32) @ mask_matrix),
        "PACBED": (lambda b: K.histogram(b.indices, None, DET * DET), lambda: ds.pacbed().data,
                   lambda: frames.sum(axis=0, dtype=np.uint64)),
    }
    out_sizes = {}
    for b in args.bins:
        products[f"densify bin {b}"] = densify_product(ds, frames, b, out_sizes)
    print(f"cores: {cores}; dense baseline on {frames.shape[0]} positions ({dense_n / 1e6:.2f} M events, "
          f"{frames.nbytes / 1e6:.0f} MB of uint16 frames)")
    header = (f"{'product':16s} {'kernel 1 core':>14s} {'e2e /CPU-s':>11s} {'e2e wall':>10s} "
              f"{'dense NumPy':>12s} {'kernel/dense':>13s} {'e2e/dense':>10s}")
    print(header)
    print("-" * len(header))
    for name, (kernel, lazy, dense) in products.items():
        kernel(blocks[0])  # compile / warm up
        t_kernel, _ = best_of(lambda: [kernel(b) for b in blocks], args.repeat)
        with dask.config.set(scheduler="threads", num_workers=cores):
            t_wall, t_cpu = best_of(lambda: lazy().compute(), args.repeat)
        dense()
        t_dense, _ = best_of(dense, args.repeat)
        k_rate, cpu_rate, d_rate = block_events / t_kernel, n_events / t_cpu, dense_n / t_dense
        print(f"{name:16s} {k_rate / 1e6:10.0f} M/s {cpu_rate / 1e6:7.0f} M/s {n_events / t_wall / 1e6:6.0f} M/s "
              f"{d_rate / 1e6:8.1f} M/s {k_rate / d_rate:12.0f}× {cpu_rate / d_rate:9.0f}×")
    general = [lambda b: K.center_of_mass_kept(b.counts.ravel(), b.indices, None, DET, 0.0, 0.0, K.ALL_PIXELS),
               lambda b: K.center_of_mass_unmasked(b.counts.ravel(), b.indices, None, DET, 0.0, 0.0)]
    (t_kept, _), (t_unmasked, _) = (best_of(lambda: [k(b) for b in blocks], args.repeat) for k in general)
    print(f"COM kernel, 1 core: without a mask {block_events / t_unmasked / 1e6:.0f} M/s, the general (mask-capable) "
          f"kernel {block_events / t_kept / 1e6:.0f} M/s → {t_kept / t_unmasked:.2f}×")
    for label, d in (("", ds), (", decode_once()", ds.decode_once())):
        with dask.config.set(scheduler="threads", num_workers=cores):
            t_wall, t_cpu = best_of(lambda: dask.compute(d.com(), d.virtual_detectors(presets), d.pacbed()),
                                    args.repeat)
        print(f"combined COM + virtual ×3 + PACBED, one read per block{label}: {n_events / t_cpu / 1e6:.0f} M events "
              f"per CPU-second, {n_events / t_wall / 1e6:.0f} M/s wall on {cores} cores")
    with dask.config.set(scheduler="threads", num_workers=cores):
        t_wall, t_cpu = best_of(lambda: ds.counts().compute(), args.repeat)  # reads hand on encoded chunks
        d_wall, d_cpu = best_of(lambda: ds.decode_once().counts().compute(), args.repeat)  # and decoded
    print(f"read + check alone (the counts product, which decodes no entry): {n_events / t_cpu / 1e6:.0f} M events "
          f"per CPU-second; read + check + decode (the same of decode_once()): {n_events / d_cpu / 1e6:.0f} M "
          f"({n_events / d_wall / 1e6:.0f} M/s wall on {cores} cores)")
    per_block = blocks[0].counts.size
    for b, n_out in out_sizes.items():
        t, _ = best_of(lambda: np.zeros((per_block, n_out, n_out), np.float32).fill(0), args.repeat)
        print(f"densify bin {b}: allocating one block's float32 output ({per_block}×{n_out}×{n_out}, "
              f"{per_block * n_out * n_out * 4 / 1e6:.0f} MB) alone: {t * 1e3:.0f} ms "
              f"= {blocks[0].indices.size / t / 1e6:.0f} M events/s ceiling")


def read_path(store, args):
    """Entries read directly (stemdask.chunk_reads) against through zarr's pipeline, alternating:
    "zarr" opens every handle (the benchmark's and the read tasks') with no direct readers."""
    from stemdask import chunk_reads

    ds = stemdask.open(store.path)
    direct_of = chunk_reads.DirectChunks.of

    def read_all():
        handle = stemdask.store.open_store(store.path)
        for b in range(handle.n_blocks):
            handle.read_block(b)

    com = lambda: ds.com().compute(scheduler="threads")  # noqa: E731
    figures = {}
    for label in ("direct", "zarr", "direct", "zarr"):
        chunk_reads.DirectChunks.of = direct_of if label == "direct" else (lambda array, folder: None)
        stemdask.store._READ_HANDLES.clear()
        try:
            for what, fn in (("read", read_all), ("COM", com)):
                _, cpu = best_of(fn, args.repeat)
                figures[(label, what)] = max(figures.get((label, what), 0), store.n_events / cpu)
        finally:
            chunk_reads.DirectChunks.of = direct_of
            stemdask.store._READ_HANDLES.clear()
    for what in ("read", "COM"):
        d, z = figures[("direct", what)], figures[("zarr", what)]
        print(f"{what:5s} direct {d / 1e6:5.0f} M events/CPU-s, through zarr {z / 1e6:5.0f} M → {d / z:.2f}×")


def checksum_cost(verified, unverified, args):
    """COM end to end (read + verify + decode + kernel) per CPU-second, the same events with and
    without the read checks, timed alternately (the machine is shared) and the best of each kept."""
    cores = os.cpu_count() or 1
    assert verified.version >= 2 and unverified.version == 1
    datasets = {"with verification": stemdask.open(verified.path), "without (format 1)": stemdask.open(unverified.path)}
    best = dict.fromkeys(datasets, float("inf"))
    with dask.config.set(scheduler="threads", num_workers=cores):
        for ds in datasets.values():
            ds.com().to_array().compute()  # warm up
        for _ in range(args.repeat):
            for name, ds in datasets.items():
                best[name] = min(best[name], best_of(lambda: ds.com().to_array().compute(), 1)[1])
    rates = {name: verified.n_events / t for name, t in best.items()}
    for name, rate in rates.items():
        print(f"COM e2e {name:20s} {rate / 1e6:6.0f} M events per CPU-second")
    slower = 1 - rates["with verification"] / rates["without (format 1)"]
    print(f"verification costs {100 * slower:.1f} % of COM throughput ({cores} cores, best of {args.repeat})")


def out_of_core(store, args, limit):
    """COM under small worker memory limits: completes, bounded peak RSS, same result."""
    import threading

    import distributed
    import psutil

    event_bytes = store.n_events * store.index_dtype.itemsize + store.scan_shape[0] * store.scan_shape[1] * 4
    total = args.workers * limit
    print(f"events in memory: {event_bytes / 1e9:.2f} GB = {event_bytes / total:.1f}× the workers' total "
          f"memory_limit ({args.workers} × {limit / 1e6:.0f} MB); row block ≈ "
          f"{event_bytes / store.n_blocks / 1e6:.0f} MB")
    t = time.perf_counter()
    expected = stemdask.open(store.path).com().compute(scheduler="threads")
    print(f"threaded scheduler in this process: {time.perf_counter() - t:.1f} s")
    with distributed.LocalCluster(n_workers=args.workers, threads_per_worker=1, memory_limit=limit, processes=True,
                                  dashboard_address=None, silence_logs=50) as cluster, \
            distributed.Client(cluster) as client:
        before = set(client.scheduler_info()["workers"])
        procs = [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        trace, done = [], threading.Event()

        def poll():  # worker RSS every 50 ms while COM runs
            while not done.is_set():
                trace.append(max(p.memory_info().rss for p in procs))
                time.sleep(0.05)

        client.run(reset_peak_rss)
        poller = threading.Thread(target=poll)
        poller.start()
        t = time.perf_counter()
        got = stemdask.open(store.path).com().compute()
        elapsed = time.perf_counter() - t
        done.set()
        poller.join()
        peaks = client.run(peak_rss_bytes)
        restarted = set(client.scheduler_info()["workers"]) != before
    same = np.array_equal(got.com_y.values, expected.com_y.values, equal_nan=True) and \
        np.array_equal(got.com_x.values, expected.com_x.values, equal_nan=True)
    print(f"LocalCluster COM: {elapsed:.1f} s, {store.n_events / elapsed / 1e6:.0f} M events/s; worker RSS "
          f"(sampled every 50 ms) at start {trace[0] / 1e6:.0f} MB, median {np.median(trace) / 1e6:.0f} MB, "
          f"max {max(trace) / 1e6:.0f} MB; kernel's peak RSS (VmHWM, catches transients) "
          f"{max(peaks.values()) / 1e6:.0f} MB; limit {limit / 1e6:.0f} MB; workers restarted: {restarted}; "
          f"result equals the threaded one: {same}")


def densify_product(ds, frames, b, out_sizes):
    lazy = ds.densify(bin=b)
    n_out = lazy.shape[2]
    out_sizes[b] = n_out
    y0, x0 = lazy.attrs["crop_origin_px"]
    lookup = K.densify_lookup(DET, DET, y0, x0, b, n_out, n_out)
    span = n_out * b

    def dense():
        win = np.zeros((frames.shape[0], span, span), np.float32)
        sy, sx = max(0, y0), max(0, x0)
        ey, ex = min(DET, y0 + span), min(DET, x0 + span)
        win[:, sy - y0 : ey - y0, sx - x0 : ex - x0] = frames[:, sy:ey, sx:ex]
        return win.reshape(-1, n_out, b, n_out, b).sum(axis=(2, 4))

    return (lambda blk: reductions._block_densify(blk, lookup, n_out),
            lambda: ds.densify(bin=b).data.sum(axis=(2, 3)), dense)


if __name__ == "__main__":
    main()
