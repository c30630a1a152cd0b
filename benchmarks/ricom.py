"""riCOM throughput: live from events, batch of a large COM field, live from dense frames.

Prints, each with a plain-NumPy baseline measured in the same run:

1. live riCOM from electron events (``--epp`` electrons per position, a 256×256 detector,
   events in a BF disk of radius 40 px) with an n = ``--kernel`` kernel: positions/s on one
   core (the numba kernels run in the calling thread), fed one scan row per update, over
   the whole scan (where the image edges clip the kernel) and for interior rows (the whole
   kernel inside). Baseline (interior rows): NumPy COM + a NumPy slice-add scatter per position.
2. batch riCOM of a ``--field``² COM field: ``ricom_dask`` (map_overlap, row chunks of 32)
   on the threaded scheduler (all cores), and one whole-field FFT correlation on one thread;
   and building the band-passed kernel on a grid of 4 kernel widths against the scan's grid.
   Baseline: direct correlation by ``scipy.ndimage.correlate`` (C, zero boundary).
3. COM + riCOM from dense 256×256 uint16 frames (``LiveRiCOM.push_frames``): frames/s on one
   core, over the scan and for an interior row. Baseline (interior row): NumPy COM
   (vectorised over a batch of frames) + NumPy scatter per frame.
   (For scale: the C++ riCOM program of Yu et al. reports ≈ 7k frames/s on one core.)
4. COM + riCOM end to end from a Merlin-like ``.mib`` file (``--file-frames`` 256×256 U16
   frames, 12-bit counter, ≈ ``--file-cpp`` counts/pixel), the way ``stemdask live FILE.mib``
   reads it (:class:`stemdask.live_sources.FileReplay` → ``LiveRiCOM.push_frames``): frames/s
   on one core, read and decode included (from the page cache: the file is read once before),
   and the read + decode alone, so the ratio says what COM + riCOM add to reading the file.

    python benchmarks/ricom.py            # full sizes
    python benchmarks/ricom.py --quick    # smaller scan/field, same figures
"""

from __future__ import annotations

import argparse
import os
import time

import dask
import dask.array as da
import numpy as np
import scipy.ndimage

from stemdask.kernels.events import center_of_mass
from stemdask.kernels.ricom import accumulator_zero, com_from_frames, correlate_zero_padded, ricom_kernel, scatter_com
from stemdask.live_ricom import LiveRiCOM
from stemdask.methods.ricom import ricom_dask
from stemdask.optics import Calibration

DET = 256
CAL = Calibration(scan_step_a=0.2, detector_pixel_mrad=0.5, bf_center=(DET / 2, DET / 2), bf_radius=40.0)


def best_time(fn, repeats: int = 3) -> float:
    """The shortest of ``repeats`` runs of ``fn()`` (s): the machine is shared, noise only adds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def make_events(n_pos: int, epp: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(epp, n_pos).astype(np.uint32)
    n = int(counts.sum())
    r = 40 * np.sqrt(rng.random(n))
    t = 2 * np.pi * rng.random(n)
    ky = np.clip(np.round(DET / 2 + r * np.sin(t)), 0, DET - 1).astype(np.int64)
    kx = np.clip(np.round(DET / 2 + r * np.cos(t)), 0, DET - 1).astype(np.int64)
    return counts, (ky * DET + kx).astype(np.uint16 if DET * DET <= 65536 else np.uint32)


def numpy_scatter(image, start, com_y, com_x, kfy, kfx):
    """The baseline scatter: one NumPy slice-add per position (same maths as the numba kernel)."""
    ny, nx = image.shape
    n = kfy.shape[0]
    h = n // 2
    for i, (cy, cx) in enumerate(zip(com_y, com_x)):
        qy, qx = divmod(start + i, nx)
        i0, i1 = max(0, h - qy), min(n, ny + h - qy)
        j0, j1 = max(0, h - qx), min(n, nx + h - qx)
        image[qy + i0 - h : qy + i1 - h, qx + j0 - h : qx + j1 - h] += kfy[i0:i1, j0:j1] * cy + kfx[i0:i1, j0:j1] * cx


def bench_live_events(scan: int, epp: float, n: int) -> None:
    counts, indices = make_events(scan * scan, epp)
    offsets = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    warm = LiveRiCOM((scan, scan), (DET, DET), CAL, kernel_size=n)
    warm.push_events(indices[: offsets[scan]], counts[:scan])  # compile outside the timing

    def stream():
        live = LiveRiCOM((scan, scan), (DET, DET), CAL, kernel_size=n)
        for r in range(scan):
            p0, p1 = r * scan, (r + 1) * scan
            live.push_events(indices[offsets[p0] : offsets[p1]], counts[p0:p1])

    whole = scan * scan / best_time(stream)
    kfy, kfx = warm._kfy, warm._kfx

    # interior rows (the whole kernel inside the image), ours and the baseline
    r0, rows = scan // 2 - 2, 4
    p0, p1 = r0 * scan, (r0 + rows) * scan
    ev, cnt = indices[offsets[p0] : offsets[p1]], counts[p0:p1]

    def ours_inside():
        cy, cx = center_of_mass(cnt, ev, DET, *CAL.bf_center)
        scatter_com(np.zeros((scan, scan)), scan, p0, cy, cx, kfy, kfx)

    def numpy_inside():
        cy, cx = np.empty(p1 - p0), np.empty(p1 - p0)
        for i, p in enumerate(range(p0, p1)):
            e = indices[offsets[p] : offsets[p + 1]].astype(np.int64)
            cy[i] = (e // DET).mean() - CAL.bf_center[0]
            cx[i] = (e % DET).mean() - CAL.bf_center[1]
        numpy_scatter(np.zeros((scan, scan)), p0, cy, cx, kfy, kfx)

    ours = (p1 - p0) / best_time(ours_inside)
    base = (p1 - p0) / best_time(numpy_inside)
    print(f"live riCOM from events   {scan}×{scan} scan, {counts.mean():.0f} e/position, n = {n}, 1 core: "
          f"{whole:,.0f} positions/s over the scan (edges clip the kernel), {ours:,.0f} positions/s "
          f"inside; NumPy baseline inside {base:,.0f} positions/s → {ours / base:.0f}×")


def bench_batch(field: int, n: int) -> None:
    rng = np.random.default_rng(1)
    com = scipy.ndimage.gaussian_filter(rng.normal(size=(2, field, field)), (0, 2, 2))
    kernel = ricom_kernel(n, CAL.scan_step_a)
    lazy = ricom_dask(da.from_array(com[0], chunks=(32, field)), da.from_array(com[1], chunks=(32, field)), kernel)
    with dask.config.set(scheduler="threads"):
        out = lazy.compute()
        t_dask = best_time(lazy.compute)
    whole = correlate_zero_padded(com[0], com[1], kernel)
    t_fft = best_time(lambda: correlate_zero_padded(com[0], com[1], kernel))
    t0 = time.perf_counter()
    direct = (scipy.ndimage.correlate(com[0], kernel[0], mode="constant")
              + scipy.ndimage.correlate(com[1], kernel[1], mode="constant"))
    t_direct = time.perf_counter() - t0
    err = max(np.abs(out - direct).max(), np.abs(whole - direct).max()) / np.abs(direct).max()
    print(f"batch riCOM              {field}×{field} COM field, n = {n}: map_overlap {t_dask:.2f} s "
          f"({field * field / t_dask / 1e6:.2f} M positions/s, {os.cpu_count()} cores), whole-field FFT "
          f"{t_fft:.2f} s (1 thread); direct-correlation baseline {t_direct:.2f} s → {t_direct / t_dask:.0f}× "
          f"(max rel. difference {err:.1e})")
    band = (0.05, 1.5)  # Å⁻¹
    t_grid = best_time(lambda: ricom_kernel(n, CAL.scan_step_a, *band))
    t_scan = best_time(lambda: ricom_kernel(n, CAL.scan_step_a, *band, grid_shape=(field, field)))
    print(f"band-pass kernel         n = {n}, {band[0]}–{band[1]} Å⁻¹: on a grid of 4 kernel widths "
          f"{t_grid * 1e3:.1f} ms; on the {field}² scan's grid (the paper's) {t_scan * 1e3:.1f} ms")


def bench_frames(rows: int, n: int, batch_frames: int = 256) -> None:
    nx = batch_frames
    rng = np.random.default_rng(2)
    frames = np.zeros((batch_frames, DET, DET), np.uint16)
    counts, indices = make_events(batch_frames, 100.0, seed=3)
    pos = np.repeat(np.arange(batch_frames), counts)
    np.add.at(frames.reshape(batch_frames, -1), (pos, indices.astype(np.int64)), 1)
    frames += rng.poisson(0.01, frames.shape).astype(np.uint16)  # dark noise: every pixel is read
    warm = LiveRiCOM((2, nx), (DET, DET), CAL, kernel_size=n)
    warm.push_frames(frames[:2])

    def stream():
        live = LiveRiCOM((rows, nx), (DET, DET), CAL, kernel_size=n)
        for _ in range(rows):
            live.push_frames(frames)

    whole = rows * nx / best_time(stream)
    kfy, kfx = warm._kfy, warm._kfx

    # one interior row (the whole kernel inside the image), ours and the baseline
    p0 = (rows // 2) * nx
    y = np.arange(DET, dtype=np.float64)

    def ours_inside():
        cy, cx = com_from_frames(frames, *CAL.bf_center, accumulator_zero(frames.dtype))
        scatter_com(np.zeros((rows, nx)), rows, p0, cy, cx, kfy, kfx)

    def numpy_inside():
        f = frames.astype(np.float64)
        tot = f.sum((1, 2))
        cy = f.sum(2) @ y / tot - CAL.bf_center[0]
        cx = f.sum(1) @ y / tot - CAL.bf_center[1]
        numpy_scatter(np.zeros((rows, nx)), p0, cy, cx, kfy, kfx)

    ours = batch_frames / best_time(ours_inside)
    base = batch_frames / best_time(numpy_inside)
    print(f"COM + riCOM from frames  {DET}×{DET} uint16, {rows}×{nx} scan, n = {n}, 1 core: {whole:,.0f} frames/s "
          f"over the scan, {ours:,.0f} frames/s inside; NumPy baseline inside {base:,.0f} frames/s "
          f"→ {ours / base:.0f}×")


def bench_mib_file(n_frames: int, cpp: float, n: int, folder: str) -> None:
    from stemdask.live_sources import FileReplay
    from stemdask.testing.merlin import write_mib

    rng = np.random.default_rng(5)
    path = os.path.join(folder, "bench-ricom.mib")
    nx = 256
    rows = max(1, n_frames // nx)
    n_frames = rows * nx
    with open(path, "wb"):
        pass
    chunks = []
    for a in range(0, n_frames, 1024):
        chunks.append(rng.poisson(cpp, (min(1024, n_frames - a), DET, DET)).clip(0, 4095).astype(np.uint16))
    write_mib(path, np.concatenate(chunks), counter_depth=12)
    del chunks

    def read_only():
        with FileReplay(path) as src:
            for _ in src.batches(n_frames):
                pass

    def end_to_end():
        live = LiveRiCOM((rows, nx), (DET, DET), CAL, kernel_size=n)
        with FileReplay(path) as src:
            for _, frames in src.batches(n_frames):
                live.push_frames(frames)

    end_to_end()  # warm: page cache and numba
    read = n_frames / best_time(read_only)
    whole = n_frames / best_time(end_to_end)
    print(
        f"COM + riCOM from a .mib  {n_frames} frames {DET}×{DET} U16 at {cpp:g} counts/px "
        f"({os.path.getsize(path) / 1e9:.2f} GB), n = {n}, 1 core: {whole:,.0f} frames/s end to end "
        f"(read + decode alone {read:,.0f} frames/s: COM + riCOM cost {read / whole:.2f}× reading it)"
    )
    os.remove(path)
    os.remove(os.path.splitext(path)[0] + ".hdr")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scan", type=int, default=256, help="live: scan side (positions = scan²)")
    ap.add_argument("--epp", type=float, default=100.0, help="live: electrons per position")
    ap.add_argument("--field", type=int, default=1024, help="batch: COM field side")
    ap.add_argument("--frame-rows", type=int, default=128, help="frames: scan rows of 256 frames")
    ap.add_argument("--kernel", type=int, default=61, help="kernel full width n")
    ap.add_argument("--file-frames", type=int, default=8192, help=".mib: frames in the file (whole rows of 256)")
    ap.add_argument("--file-cpp", type=float, default=5.0, help=".mib: mean counts per pixel")
    ap.add_argument("--tmp", default="/tmp", help=".mib: folder for the file (removed afterwards)")
    ap.add_argument("--only-file", action="store_true", help="only the .mib measurement")
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    args = ap.parse_args()
    if args.quick:
        args.scan, args.field, args.frame_rows, args.file_frames = 128, 512, 64, 2048
    if args.only_file:
        bench_mib_file(args.file_frames, args.file_cpp, args.kernel, args.tmp)
        return
    bench_live_events(args.scan, args.epp, args.kernel)
    bench_batch(args.field, args.kernel)
    bench_frames(args.frame_rows, args.kernel)
    bench_mib_file(args.file_frames, args.file_cpp, args.kernel, args.tmp)


if __name__ == "__main__":
    main()
