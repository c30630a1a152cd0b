"""Ingest throughput and on-disk size: CSR npz and stempy HDF5 → event store.

Synthetic 4D Camera-like data: a 576×576 detector, ``--scan``² positions with Poisson
(``--epp``) electrons each, 85 % in a bright-field disk (radius 80 px) and 15 % spread over
the detector, indices sorted within each position. Prints events/s for each ingest
(end-to-end: source SHA-256, read, checks, CRC, compress, write, finalize; best of
``--repeat`` runs, with the CPU time of that run, from files in the page cache), bytes per
event on disk, and the same for a plain-NumPy baseline measured in the same run (``np.save`` of
indices + offsets: no checks, no compression). Also a deflated npz (``np.savez_compressed``,
extracted once to scratch, see ``stemdask.io.npzfile``). ``--profile`` times the parts of
one row block's write path and alternative Blosc settings; ``--codec zstd:1:bitshuffle``
reruns the ingests with another store codec (an experiment: patches
``stemdask.store._compressor`` in this process only).

``--encodings`` measures instead the stored bytes per position of counted dense frames
(``.npy`` uint16, Poisson counts, ingested with ``encoding="auto"``) at a Merlin-like
50 counts/pixel (64×64 scan, 64×64 detector: against the raw dense uint16 frames) and at a
4D Camera-like 0.01 counts/pixel (16×16 scan, 576×576 detector: against the same events in
a format-2 events store, the layout before weighted entries).

    python benchmarks/ingest.py                 # 320² × 500 e⁻ ≈ 51 M events
    python benchmarks/ingest.py --scan 128 --epp 100   # quick
    python benchmarks/ingest.py --encodings     # bytes/position, weighted vs events
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import h5py
import numpy as np

DET = (576, 576)


def make_events(scan: int, epp: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_pos = scan * scan
    counts = rng.poisson(epp, n_pos)
    n = int(counts.sum())
    disk = rng.random(n) < 0.85
    r = 80 * np.sqrt(rng.random(n))
    phi = 2 * np.pi * rng.random(n)
    ky = np.where(disk, 288 + r * np.sin(phi), rng.uniform(0, DET[0], n)).astype(np.int64)
    kx = np.where(disk, 288 + r * np.cos(phi), rng.uniform(0, DET[1], n)).astype(np.int64)
    idx = np.clip(ky, 0, DET[0] - 1) * DET[1] + np.clip(kx, 0, DET[1] - 1)
    key = np.repeat(np.arange(n_pos, dtype=np.int64), counts) << 20 | idx
    key.sort()
    indices = (key & ((1 << 20) - 1)).astype(np.uint32)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return indices, offsets


def write_stempy(path, indices, offsets, scan):
    vlen = h5py.vlen_dtype(np.uint32)
    frames = np.empty(offsets.size - 1, dtype=object)
    frames[:] = np.split(indices, offsets[1:-1])
    with h5py.File(path, "w") as f:
        f.attrs["version"] = 1
        g = f.create_group("electron_events")
        sp = g.create_dataset("scan_positions", data=np.arange(frames.size, dtype=np.int32))
        sp.attrs["Nx"], sp.attrs["Ny"] = scan, scan
        fr = g.create_dataset("frames", (frames.size,), dtype=vlen)
        fr[...] = frames
        fr.attrs["Nx"], fr.attrs["Ny"] = DET


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def best_of(fn, repeat):
    """(result, best wall seconds, CPU seconds of that run) over ``repeat`` runs."""
    best = None
    for _ in range(repeat):
        c = time.process_time()
        out, t = timed(fn)
        if best is None or t < best[1]:
            best = (out, t, time.process_time() - c)
    return best


def report(name, n, seconds, cpu, nbytes, base_rate=None):
    rate = n / seconds
    extra = f"  {rate / base_rate:5.2f}× baseline" if base_rate else ""
    print(f"{name:44s} {seconds:6.2f} s {rate / 1e6:6.1f} M ev/s  CPU {cpu / n * 1e9:5.1f} ns/ev "
          f"{nbytes / n:5.2f} B/ev{extra}")
    return rate


def deflated_access(deflated, offsets, scan, workdir):
    """Deflated npz: extract once to scratch (what ingest does) vs. each block decompressing
    the member from its start up to its slice (zipfile seek), one thread."""
    import zipfile

    from stemdask.io.npzfile import NpzArrays
    from stemdask.store import default_rows_per_block

    rows = default_rows_per_block((scan, scan))
    npz = NpzArrays(deflated, workdir)
    _, t_extract = timed(lambda: np.asarray(npz.array("indices")[:1]))
    npz.close()
    t_seek = 0.0
    with zipfile.ZipFile(deflated) as z:
        for r0 in range(0, scan, rows):
            a, b = offsets[r0 * scan], offsets[min(r0 + rows, scan) * scan]
            with z.open("indices.npy") as f:
                version = np.lib.format.read_magic(f)
                np.lib.format.read_array_header_1_0(f) if version == (1, 0) else np.lib.format.read_array_header_2_0(f)
                start = f.tell()

                def read():
                    f.seek(start + 4 * a)
                    return np.frombuffer(f.read(4 * (b - a)), np.uint32)

                _, t = timed(read)
                t_seek += t
    n = offsets[-1]
    print(f"\ndeflated npz, {n / 1e6:.0f} M events: extract once {t_extract:.2f} s; "
          f"seek+decompress per block {t_seek:.2f} s (grows with the number of blocks)")


def profile(indices, offsets, scan, workdir):
    """Time the parts of writing one row block, and alternative Blosc settings (one core)."""
    import numcodecs
    import zarr
    from zarr.codecs import BloscCodec

    from stemdask.store import default_rows_per_block

    rows = default_rows_per_block((scan, scan))
    a, b = offsets[0], offsets[rows * scan]
    block = np.ascontiguousarray(indices[a:b])
    n = block.size
    print(f"\nprofile: one block of {rows} rows = {n / 1e6:.1f} M events ({block.nbytes / 1e6:.0f} MB)")
    _, t = timed(lambda: (block.min(), block.max()))
    print(f"  min/max check          {n / t / 1e6:8.0f} M events/s")
    _, t = timed(lambda: zlib.crc32(block))
    print(f"  CRC-32                 {n / t / 1e6:8.0f} M events/s")
    for cname, clevel, shuffle in [("zstd", 3, "bitshuffle"), ("zstd", 1, "bitshuffle"), ("lz4", 5, "bitshuffle"),
                                   ("zstd", 1, "shuffle"), ("lz4", 5, "shuffle")]:
        modes = {"bitshuffle": numcodecs.Blosc.BITSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE}
        codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=modes[shuffle])
        numcodecs.blosc.set_nthreads(1)
        enc, t = timed(lambda: codec.encode(block))
        print(
            f"  blosc {cname}/{clevel}/{shuffle:10s} {n / t / 1e6:6.0f} M events/s (1 thread)  "
            f"{len(enc) / n:5.2f} B/event"
        )
        for chunk in (1 << 18, 1 << 20, 1 << 22):
            path = workdir / f"prof_{cname}{clevel}{shuffle}_{chunk}.zarr"
            arr = zarr.create_array(str(path), shape=(n,), chunks=(chunk,), dtype="uint32",
                                    compressors=[BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle)])
            _, t = timed(lambda: arr.__setitem__(slice(0, n), block))
            print(f"      zarr write, chunks of {chunk:>8d}: {n / t / 1e6:6.0f} M events/s")
            shutil.rmtree(path)


def bench_encodings(workdir: Path) -> None:
    from stemdask.io import ingest
    from stemdask.store import create_store

    rng = np.random.default_rng(7)
    for cpp, scan, det in [(50.0, 64, 64), (0.01, 16, 576)]:
        frames = rng.poisson(cpp, (scan, scan, det, det)).astype(np.uint16)
        src = workdir / f"dense_{cpp:g}.npy"
        np.save(src, frames)
        del frames
        store = ingest(src, workdir / "enc.zarr", overwrite=True, progress=False, assume_defaults=True)
        per = store.nbytes_stored() / scan**2
        raw = det * det * 2
        line = (
            f"{cpp:g} counts/px, {scan}² scan × {det}² detector: auto → {store.encoding}, "
            f"{per:,.0f} B/position stored; raw dense uint16 {raw:,} B/position ({per / raw:.3f}×)"
        )
        if store.encoding == "events":
            indices, offsets = store.to_csr()
            old = create_store(workdir / "v2.zarr", store.scan_shape, store.detector_shape, overwrite=True,
                               rows_per_block=store.rows_per_block, format_version=2)
            counts = np.diff(offsets).reshape(store.scan_shape)
            for b in range(old.n_blocks):
                r0, r1 = old.block_rows(b)
                old.write_block(b, counts[r0:r1], indices[offsets[r0 * scan] : offsets[r1 * scan]])
            old_per = old.finalize().nbytes_stored() / scan**2
            line += f"; format-2 events store {old_per:,.0f} B/position ({per / old_per:.3f}×)"
        print(line)
        src.unlink()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scan", type=int, default=320, help="scan is SCAN×SCAN positions")
    ap.add_argument("--epp", type=float, default=500.0, help="mean electrons per position")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument("--repeat", type=int, default=3, help="report the best of this many runs (shared machines)")
    ap.add_argument("--profile", action="store_true", help="also time the write path's parts")
    ap.add_argument("--codec", action="append", default=[], metavar="CNAME:CLEVEL:SHUFFLE",
                    help="also ingest with this Blosc codec instead of the store's (repeatable)")
    ap.add_argument("--encodings", action="store_true", help="only: stored bytes/position, weighted vs events")
    args = ap.parse_args()

    from stemdask.io import ingest

    workdir = Path(args.dir or tempfile.mkdtemp(prefix="stemdask-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.encodings:
            bench_encodings(workdir)
            return
        (indices, offsets), t = timed(lambda: make_events(args.scan, args.epp))
        n = int(offsets[-1])
        print(
            f"data: {args.scan}×{args.scan} scan, {DET[0]}×{DET[1]} detector, {n / 1e6:.1f} M events "
            f"({n / offsets.size:.0f}/position), made in {t:.1f} s; {os.cpu_count()} CPUs"
        )
        csr = workdir / "events.npz"
        np.savez(csr, indices=indices, offsets=offsets, scan_shape=[args.scan] * 2, detector_shape=DET)
        stempy = workdir / "events_stempy.h5"
        _, t = timed(lambda: write_stempy(stempy, indices, offsets, args.scan))
        print(
            f"wrote {csr.name} ({csr.stat().st_size / 1e6:.0f} MB) and {stempy.name} "
            f"({stempy.stat().st_size / 1e6:.0f} MB, {t:.1f} s)\n"
        )

        def baseline():
            src = np.load(csr)  # the same bytes, read and written back plainly
            np.save(workdir / "base_indices.npy", src["indices"])
            np.save(workdir / "base_offsets.npy", src["offsets"])

        _, t, cpu = best_of(baseline, args.repeat)
        base_bytes = sum((workdir / f).stat().st_size for f in ("base_indices.npy", "base_offsets.npy"))
        base_rate = report("NumPy baseline (np.load + np.save)", n, t, cpu, base_bytes)

        deflated = workdir / "events_deflated.npz"
        np.savez_compressed(deflated, indices=indices, offsets=offsets, scan_shape=[args.scan] * 2, detector_shape=DET)
        runs = [("CSR npz → store", csr), ("stempy HDF5 v1 → store", stempy), ("CSR npz (deflated) → store", deflated)]
        for name, src in runs:
            store, t, cpu = best_of(
                lambda: ingest(src, workdir / "store.zarr", overwrite=True, progress=False, assume_defaults=True),
                args.repeat,
            )
            assert store.n_events == n
            report(name, n, t, cpu, store.nbytes_stored(), base_rate)
        for codec in args.codec:
            from zarr.codecs import BloscCodec

            import stemdask.store

            cname, clevel, shuffle = codec.split(":")
            stemdask.store._compressor = lambda: BloscCodec(cname=cname, clevel=int(clevel), shuffle=shuffle)
            for name, src in runs[:2]:
                store, t, cpu = best_of(
                    lambda: ingest(src, workdir / "store.zarr", overwrite=True, progress=False, assume_defaults=True),
                    args.repeat,
                )
                report(f"{name} [{codec}]", n, t, cpu, store.nbytes_stored(), base_rate)
        del indices
        if args.profile:
            deflated_access(deflated, offsets, args.scan, workdir)
            indices = np.load(csr)["indices"]
            profile(indices, offsets, args.scan, workdir)
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
