"""SSB benchmark: events → phase, refocus, peak memory, bytes moved, and a NumPy baseline.

    python benchmarks/ssb.py [--cases 256x32 512x24] [--dir DIR] [--dose 100] [--random 2048x24]
                             [--no-baseline] [--scaling 256 512 1024 2048] [--gpu]

For each case (scan² × detector²) a simulated event store is made once in ``--dir`` (kept
between runs); ``--random`` cases are random events with the simulator's BF-disk geometry
(the disk edge at 1/2.4 of the detector half-width), fast to make at any size. Timed on the
local threaded scheduler:

* end-to-end: ``stemdask.open`` → ``densify`` (default crop) → ``ssb`` → phase computed;
* keep: computing G once and keeping it in memory (part of the first refocus);
* refocus: one new C10 on the kept G (the trotter sums only), and the bytes it moves: every
  task's inputs and output, against the bytes of G;
* NumPy baseline, one process, on the same dense crop already in memory: full scan FFT of
  the BF pixels, then a per-scan-row vectorised trotter sum with ``optics.chi`` — the
  straightforward implementation; the ratio says how much faster stemdask is.
* ``--scaling``: end-to-end time of random-event cases at those scan sizes (detector 24²,
  100 e⁻/position) and the exponent of a power-law fit against the number of positions.

Peak memory is the process's peak RSS above its level before the step, sampled every 10 ms
(the threaded scheduler runs in this process: it is the one worker's).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import dask
import numpy as np
import psutil
from dask.callbacks import Callback
from dask.core import get_dependencies

import stemdask
from stemdask.methods.ssb import ssb, to_gpu
from stemdask.optics import Aberrations, chi, detector_to_scan_frame
from stemdask.simulate import SimulationParams, simulate
from stemdask.testing import random_event_store

C10 = -100.0


class PeakRSS:
    """Context manager: peak RSS (bytes) above the starting RSS while inside."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra = self.peak - self.start


class BytesMoved(Callback):
    """Dask callback: the bytes every task reads (its inputs) and writes (its output)."""

    def _start(self, dsk):
        self.read = self.written = 0

    def _posttask(self, key, result, dsk, state, worker_id):
        self.written += _nbytes(result)
        self.read += sum(_nbytes(state["cache"].get(dep, dsk.get(dep))) for dep in get_dependencies(dsk, key))


def _nbytes(value) -> int:
    """Bytes of an array, or of the data a graph holds as a literal (a kept G's chunks)."""
    return int(getattr(getattr(value, "value", value), "nbytes", 0) or 0)


def random_store(path: Path, scan: int, detector: int, dose: float):
    """Random events with the simulator's BF-disk geometry (radius detector / 4.8 px)."""
    if not (path / "zarr.json").exists():
        t = time.perf_counter()
        random_event_store(path, (scan, scan), detector, dose, bf_radius=detector / 4.8, bf_fraction=0.7)
        print(f"  made {path.name} (random events) in {time.perf_counter() - t:.1f} s")
    return stemdask.open(path)


def make_store(path: Path, scan: int, detector: int, dose: float):
    if not (path / "zarr.json").exists():
        t = time.perf_counter()
        p = SimulationParams(scan_shape=(scan, scan), detector=detector, dose=dose, max_phase=0.5,
                             aberrations=Aberrations(C10=C10))
        simulate(path, p, overwrite=True, progress=False)
        print(f"  simulated {path.name} in {time.perf_counter() - t:.1f} s")
    return stemdask.open(path)


def numpy_ssb(dense: np.ndarray, k_y_mrad, k_x_mrad, cal, ab: Aberrations) -> tuple[np.ndarray, float, float]:
    """Single-process NumPy SSB (SNR weighting); returns (phase, fft seconds, reduction seconds)."""
    lam = cal.wavelength_a
    k0 = cal.semiangle_mrad * 1e-3 / lam
    dy, dx = np.meshgrid(k_y_mrad, k_x_mrad, indexing="ij")
    ky, kx = detector_to_scan_frame(dy, dx, cal.rotation_deg, cal.flip)
    ky, kx = ky * 1e-3 / lam, kx * 1e-3 / lam
    disk = np.hypot(ky, kx) < k0
    ky, kx = ky[disk], kx[disk]
    ny, nx = dense.shape[:2]
    t0 = time.perf_counter()
    G = np.fft.fft2(dense[:, :, disk], axes=(0, 1)) / (ny * nx)
    t1 = time.perf_counter()
    bf = G[0, 0].real.sum()
    qy = np.fft.fftfreq(ny, d=cal.scan_step_a[0])
    qx = np.fft.fftfreq(nx, d=cal.scan_step_a[1])[:, None]
    chi_k = chi(ky, kx, lam, ab)
    spectrum = np.zeros((ny, nx), complex)
    for iy in range(ny):
        minus = np.hypot(ky - qy[iy], kx - qx) < k0
        plus = np.hypot(ky + qy[iy], kx + qx) < k0
        w = np.where(minus & ~plus, -1j * np.exp(1j * (chi(ky - qy[iy], kx - qx, lam, ab) - chi_k)), 0)
        w = np.where(plus & ~minus, 1j * np.exp(1j * (chi_k - chi(ky + qy[iy], kx + qx, lam, ab))), w)
        spectrum[iy] = (G[iy] * w).sum(-1)
    phase = np.fft.ifft2(spectrum / bf).real * ny * nx
    return phase, t1 - t0, time.perf_counter() - t1


def host(phase) -> np.ndarray:
    """The computed phase on the host (a CuPy result is copied back: the timing includes it)."""
    data = phase.data.compute()
    return data.get() if hasattr(data, "get") else np.asarray(data)


def run_case(ds, baseline: bool = True, gpu: bool = False) -> float:
    """Time one case (on the GPU: the dense patterns moved to CuPy, G and the trotter sums on
    the device); returns the end-to-end seconds."""
    (scan, _), (detector, _) = ds.scan_shape, ds.detector_shape
    print(f"case {scan}x{scan} scan x {detector}x{detector} detector, {ds.store.n_events / scan**2:.0f} e/position")
    cal = ds.calibration
    ab = Aberrations(C10=C10)
    dask.config.set(scheduler="threads")
    # Warm-up (numba caches, imports) on a small slice.
    dense_of = (lambda d: to_gpu(d)) if gpu else (lambda d: d)
    host(ssb(dense_of(ds.densify().isel(scan_y=slice(0, 16), scan_x=slice(0, 16))), cal, ab).phase)

    with PeakRSS() as mem:
        t = time.perf_counter()
        result = ssb(dense_of(ds.densify()), cal, ab)
        host(result.phase)  # computed for the timing
        e2e = time.perf_counter() - t
    print(f"  end-to-end events → phase: {e2e:.2f} s, peak +{mem.extra / 2**20:.0f} MiB "
          f"(G {result.G.nbytes / 2**20:.0f} MiB, {len(result.k_y)} BF pixels, crop {ds.densify().shape[2:]})")
    with PeakRSS() as mem:
        t = time.perf_counter()
        result.keep()
        keep = time.perf_counter() - t
    print(f"  keep G (events → G in memory): {keep:.2f} s, peak +{mem.extra / 2**20:.0f} MiB")
    times = []
    for c10 in (C10 + 10, C10 - 10, C10):
        t = time.perf_counter()
        refocused = host(result.refocus(C10=c10))
        times.append(time.perf_counter() - t)
    print(f"  refocus (kept G): {min(times):.3f} s best of 3, {np.median(times):.3f} s median")
    with BytesMoved() as moved:
        host(result.refocus(C10=C10 + 5))
    g = result.G.nbytes
    print(f"  refocus moves {(moved.read + moved.written) / 2**20:.0f} MiB ({moved.read / 2**20:.0f} read, "
          f"{moved.written / 2**20:.0f} written) = {(moved.read + moved.written) / g:.3f}× the bytes of G "
          f"({g / 2**20:.0f} MiB in {len(result.G.chunks[1])} q_x chunks)")
    if not baseline:
        return e2e

    dense = ds.densify()
    dense_np = dense.values
    with PeakRSS() as mem:
        t = time.perf_counter()
        ref, t_fft, t_red = numpy_ssb(dense_np, dense.k_y.values, dense.k_x.values, cal, ab)
        t_np = time.perf_counter() - t
    diff = np.abs(ref - refocused).max() / np.abs(ref).max()
    print(f"  NumPy single process (dense already in memory): {t_np:.2f} s (FFT {t_fft:.2f} s, trotter sums "
          f"{t_red:.2f} s), peak +{mem.extra / 2**20:.0f} MiB; max |Δphase|/max = {diff:.1e}")
    print(f"  ratio NumPy / stemdask: end-to-end {t_np / e2e:.1f}x (stemdask includes reading + densifying), "
          f"refocus {t_red / min(times):.1f}x")
    return e2e


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["256x32", "512x24"], metavar="SCANxDET")
    parser.add_argument("--dir", default=os.environ.get("STEMDASK_BENCH_DIR", "/tmp/stemdask-bench"))
    parser.add_argument("--dose", type=float, default=100.0, help="electrons per position")
    parser.add_argument("--random", nargs="*", default=[], metavar="SCANxDET", help="random-event cases")
    parser.add_argument("--no-baseline", action="store_true", help="skip the NumPy baseline")
    parser.add_argument("--gpu", action="store_true", help="G and the trotter sums on the GPU (CuPy)")
    parser.add_argument("--scaling", nargs="*", type=int, default=[], metavar="SCAN",
                        help="scan sizes of the scaling fit (random events, 24² detector)")
    args = parser.parse_args()
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPUs, dask threads scheduler")
    for case in args.cases:
        scan, det = (int(v) for v in case.lower().split("x"))
        run_case(make_store(directory / f"ssb-{scan}x{det}.zarr", scan, det, args.dose), not args.no_baseline,
                 args.gpu)
    for case in args.random:
        scan, det = (int(v) for v in case.lower().split("x"))
        run_case(random_store(directory / f"random-{scan}x{det}.zarr", scan, det, args.dose), False, args.gpu)
    if args.scaling:
        times = [run_case(random_store(directory / f"random-{n}x24.zarr", n, 24, 100.0), False, args.gpu)
                 for n in args.scaling]
        positions = np.array(args.scaling, float) ** 2
        exponent = np.polyfit(np.log(positions), np.log(times), 1)[0]
        print("scaling: " + ", ".join(f"{n}² {t:.2f} s" for n, t in zip(args.scaling, times))
              + f"; time ∝ positions^{exponent:.2f}")


if __name__ == "__main__":
    main()
