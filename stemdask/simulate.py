"""Synthetic 4D-STEM event data with a known phase: the project's ground truth.

Model (projection approximation, thin object):

* Object: a periodic thin phase object φ(r) (rad) — Gaussian atom columns on a
  perovskite-like lattice (heavy A column at the cell corner, B column at the centre, light
  O columns on the edges) plus defects that break every mirror, inversion and transpose
  symmetry (an A vacancy, a heavier substitution, an off-lattice adatom). The scan covers
  exactly one period, so FFTs over the scan are exact. Transmission t = exp(iφ).
* Probe: ψ(k) = A(k)·exp(−iχ(k)) from a round aperture (semi-angle α, one-pixel soft edge)
  with aberrations in Krivanek notation (:mod:`stemdask.optics`; C10 < 0 is underfocus,
  abTEM's convention), normalised to one electron.
* Far field: |FFT(ψ(r − R)·t(r))|² on a grid whose extent equals the detector's, binned by
  an odd factor so k = 0 sits at the centre of detector pixel (N/2, N/2).
* Events: Poisson(dose · intensity) per pixel, written straight into an event store, one
  row block per task. The true phase at every probe position is stored beside them
  (array ``phase_truth``, rad) and read back with :func:`load_truth`.

Geometry: the real-space sampling dx = λ / (N · pixel) is set by the detector's angular
extent; the scan step is an integer number of dx (``scan_step_px``).
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import scipy.fft
import zarr

from .kernels.sampling import sample_events
from .optics import Aberrations, Calibration, chi, wavelength_a
from .parallel import run_jobs
from .store import EventStore, create_store

TRUTH = "phase_truth"


@dataclasses.dataclass(frozen=True)
class SimulationParams:
    """Everything that defines a simulated dataset.

    scan_shape: (ny, nx) probe positions. detector: N (N×N pixels, N even).
    dose: mean electrons per position. energy_ev: beam energy (eV). semiangle_mrad: α.
    detector_pixel_mrad: detector sampling; default puts the detector edge at 2.4 α.
    aberrations: probe aberrations (Å). max_phase: phase of the strongest column (rad).
    scan_step_px: scan step in object pixels dx. rotation_quarter_turns, flip: the detector
    frame relative to the scan frame (see :class:`stemdask.optics.Calibration`) — exact
    transforms, to test calibration. seed: random seed.
    """

    scan_shape: tuple[int, int] = (64, 64)
    detector: int = 64
    dose: float = 1000.0
    energy_ev: float = 300e3
    semiangle_mrad: float = 20.0
    detector_pixel_mrad: float | None = None
    aberrations: Aberrations = Aberrations()
    max_phase: float = 0.5
    scan_step_px: int = 1
    rotation_quarter_turns: int = 0
    flip: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.detector < 4 or self.detector % 2:
            raise ValueError(f"detector must be an even number of pixels ≥ 4, got {self.detector}")
        if not (self.dose >= 0 and math.isfinite(self.dose)):
            raise ValueError(f"dose must be ≥ 0 electrons per position, got {self.dose}")
        if len(self.scan_shape) != 2 or min(self.scan_shape) < 1:
            raise ValueError(f"scan_shape must be two positive integers, got {self.scan_shape}")
        if self.scan_step_px < 1:
            raise ValueError("scan_step_px must be a positive integer")

    @property
    def wavelength(self) -> float:
        return wavelength_a(self.energy_ev)

    @property
    def pixel_mrad(self) -> float:
        return self.detector_pixel_mrad or 2 * 2.4 * self.semiangle_mrad / self.detector

    @property
    def dk(self) -> float:
        """Detector sampling (Å⁻¹ per pixel)."""
        return self.pixel_mrad * 1e-3 / self.wavelength

    @property
    def dx(self) -> float:
        """Object sampling (Å): the detector's angular extent sets it."""
        return 1.0 / (self.detector * self.dk)

    @property
    def scan_step(self) -> float:
        return self.scan_step_px * self.dx

    @property
    def bin_factor(self) -> int:
        """Odd oversampling of the far field so the probe fits the simulation window."""
        c10 = abs(self.aberrations.C10) + abs(self.aberrations.C12)
        needed = 10.0 + 4 * self.semiangle_mrad * 1e-3 * c10  # Å
        b = max(1, math.ceil(needed * self.dk))
        return b if b % 2 else b + 1

    def calibration(self) -> Calibration:
        """The calibration a perfectly calibrated microscope would record for this data."""
        n = self.detector
        return Calibration(
            energy_ev=self.energy_ev,
            scan_step_a=(self.scan_step, self.scan_step),
            detector_pixel_mrad=self.pixel_mrad,
            semiangle_mrad=self.semiangle_mrad,
            bf_center=(n / 2, n / 2),
            bf_radius=self.semiangle_mrad / self.pixel_mrad,
            rotation_deg=90.0 * self.rotation_quarter_turns,
            flip=self.flip,
        )


def phase_object(p: SimulationParams) -> np.ndarray:
    """The periodic object phase φ (rad) on the object grid (ny·u, nx·u), dx apart.

    Built in Fourier space (exact periodic sum of Gaussians, band-limited by construction).
    """
    u = p.scan_step_px
    gy, gx = p.scan_shape[0] * u, p.scan_shape[1] * u
    ly, lx = gy * p.dx, gx * p.dx
    cells_y, cells_x = max(1, round(ly / 3.905)), max(1, round(lx / 3.905))
    ay, ax = ly / cells_y, lx / cells_x
    basis = [(0.0, 0.0, 1.0), (0.5, 0.5, 0.55), (0.5, 0.0, 0.25), (0.0, 0.5, 0.25)]
    ys, xs, ws = [], [], []
    for cy in range(cells_y):
        for cx in range(cells_x):
            for fy, fx, w in basis:
                if (cy, cx, fy, fx) == (1 % cells_y, 1 % cells_x, 0.0, 0.0):
                    continue  # A-site vacancy
                if (cy, cx, fy, fx) == ((cells_y - 2) % cells_y, 0, 0.0, 0.0):
                    w = 1.6  # heavier substitution
                ys.append((cy + fy) * ay)
                xs.append((cx + fx) * ax)
                ws.append(w)
    ys.append(0.31 * ly + 0.37 * ay)  # off-lattice adatom
    xs.append(0.62 * lx + 0.21 * ax)
    ws.append(0.7)
    ys, xs, ws = map(np.asarray, (ys, xs, ws))
    sigma = 0.35  # Å
    ky = np.fft.fftfreq(gy, d=p.dx)
    kx = np.fft.rfftfreq(gx, d=p.dx)
    ey = np.exp(-2j * np.pi * np.outer(ys, ky))  # (atoms, gy)
    ex = np.exp(-2j * np.pi * np.outer(xs, kx))  # (atoms, gx//2+1)
    spectrum = (ey * ws[:, None]).T @ ex
    spectrum *= np.exp(-2 * np.pi**2 * sigma**2 * (ky[:, None] ** 2 + kx[None, :] ** 2))
    phi = np.fft.irfft2(spectrum, s=(gy, gx))
    phi -= phi.min()
    return (phi * (p.max_phase / phi.max())).astype(np.float64)


def probe_real_space(p: SimulationParams) -> np.ndarray:
    """Probe ψ(r) (complex128, window M×M, centre at M/2), Σ|ψ|² = 1."""
    m = p.bin_factor * p.detector
    k = np.fft.fftfreq(m, d=p.dx)
    k_y, k_x = np.meshgrid(k, k, indexing="ij")
    k_alpha = p.semiangle_mrad * 1e-3 / p.wavelength
    dk_sim = 1.0 / (m * p.dx)
    aperture = np.clip((k_alpha - np.hypot(k_y, k_x)) / dk_sim + 0.5, 0.0, 1.0)
    psi_k = aperture * np.exp(-1j * chi(k_y, k_x, p.wavelength, p.aberrations))
    psi_k /= np.sqrt((np.abs(psi_k) ** 2).sum())
    return np.fft.fftshift(np.fft.ifft2(psi_k, norm="ortho"))


def _detector_frame(patterns: np.ndarray, p: SimulationParams) -> np.ndarray:
    """fftshift, bin by the odd factor keeping k = 0 at pixel N/2, apply rotation/flip."""
    b, n = p.bin_factor, p.detector
    pat = np.fft.fftshift(patterns, axes=(-2, -1))
    if b > 1:
        pat = np.roll(pat, ((b - 1) // 2, (b - 1) // 2), axis=(-2, -1))
        pat = pat.reshape(pat.shape[:-2] + (n, b, n, b)).sum(axis=(-3, -1))
    q = p.rotation_quarter_turns % 4
    if q or p.flip:
        # Stored detector-frame pattern D and scan-frame pattern S: D(d) = S(R·F·d), with F
        # the x mirror and R the rotation of Calibration (exact for quarter turns).
        d = np.arange(n) - n // 2
        d_y, d_x = np.meshgrid(d, d, indexing="ij")
        if p.flip:
            d_x = -d_x
        c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][q]
        s_y, s_x = s * d_x + c * d_y, c * d_x - s * d_y
        pat = pat[..., (s_y + n // 2) % n, (s_x + n // 2) % n]
    return pat


def diffraction_rows(p: SimulationParams, rows: range, obj: np.ndarray | None = None,
                     probe: np.ndarray | None = None) -> np.ndarray:
    """Expected intensity (rows, nx, N, N) float64, each pattern summing to ≈ 1."""
    obj = phase_object(p) if obj is None else obj
    probe = probe_real_space(p) if probe is None else probe
    m = probe.shape[0]
    u = p.scan_step_px
    t = np.exp(1j * obj)
    t = np.pad(t, ((m // 2, m // 2), (m // 2, m // 2)), mode="wrap")
    nx = p.scan_shape[1]
    out = np.empty((len(rows), nx, p.detector, p.detector))
    for i, iy in enumerate(rows):
        strip = t[iy * u : iy * u + m]
        windows = np.lib.stride_tricks.sliding_window_view(strip, (m, m))[0, : nx * u : u]
        exit_waves = (windows * probe).astype(np.complex64)
        far = scipy.fft.fft2(exit_waves, norm="ortho", workers=1)
        out[i] = _detector_frame(np.abs(far) ** 2, p)
    return out


def simulate_dense(p: SimulationParams) -> tuple[np.ndarray, np.ndarray]:
    """Expected intensities (ny, nx, N, N) and the true phase (ny, nx) — small cases only."""
    obj = phase_object(p)
    return diffraction_rows(p, range(p.scan_shape[0]), obj), truth_on_scan(obj, p)


def truth_on_scan(obj: np.ndarray, p: SimulationParams) -> np.ndarray:
    """The object phase at every probe position (rad)."""
    u = p.scan_step_px
    return obj[::u, ::u].astype(np.float32)


def simulate(
    path: str | os.PathLike,
    params: SimulationParams | None = None,
    *,
    rows_per_block: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **kwargs,
) -> EventStore:
    """Simulate a dataset straight into an event store at ``path`` and return it (finalized).

    ``kwargs`` are :class:`SimulationParams` fields (used when ``params`` is None).
    """
    p = params or SimulationParams(**kwargs)
    ny, nx = p.scan_shape
    n = p.detector
    provenance = {
        "source": "stemdask.simulate",
        "simulation": {
            **{k: v for k, v in dataclasses.asdict(p).items() if k != "aberrations"},
            "aberrations": p.aberrations.to_dict(),
            "scan_step_a": p.scan_step,
            "object_sampling_a": p.dx,
        },
    }
    store = create_store(
        path, (ny, nx), (n, n), p.calibration(), rows_per_block=rows_per_block,
        max_events_per_position=max(4 * n * n, int(4 * p.dose) + 1024),
        provenance=provenance, overwrite=overwrite,
    )
    obj = phase_object(p)
    probe = probe_real_space(p)
    truth = zarr.open_group(str(store.path), mode="r+").create_array(
        TRUTH, shape=(ny, nx), chunks=(ny, nx), dtype="float32", fill_value=0.0
    )
    truth[...] = truth_on_scan(obj, p)
    truth.attrs.update({"units": "rad", "long_name": "true object phase at each probe position"})

    def one_block(b: int) -> int:
        r0, r1 = store.block_rows(b)
        intensity = diffraction_rows(p, range(r0, r1), obj, probe)
        counts, indices = sample_events(intensity.reshape(-1, n * n), float(p.dose), p.seed * 100003 + b)
        return store.write_block(b, counts.reshape(r1 - r0, nx), indices)

    run_jobs(one_block, range(store.n_blocks), desc="simulate", progress=progress)
    return store.finalize()


def load_truth(path: str | os.PathLike) -> np.ndarray:
    """The stored true phase (rad) of a simulated store, (ny, nx)."""
    g = zarr.open_group(str(path), mode="r")
    if TRUTH not in g:
        raise KeyError(f"{path}: has no {TRUTH!r} (not made by stemdask.simulate)")
    return g[TRUTH][...]


def random_event_store(
    path: str | os.PathLike,
    scan_shape: tuple[int, int],
    detector: int,
    events_per_position: float,
    *,
    rows_per_block: int | None = None,
    bf_radius: float = 4.0,
    seed: int = 0,
    overwrite: bool = False,
) -> EventStore:
    """A store of any size, fast: Poisson(``events_per_position``) events per position at
    scattered detector pixels, no physics — for scale tests and benchmarks.

    The calibration declares a ``bf_radius``-pixel BF disk at the detector centre (1 mrad/px,
    semi-angle = ``bf_radius`` mrad, 0.5 Å steps) so dense methods get a small, known input.
    """
    rng = np.random.default_rng(seed)
    ny, nx = scan_shape
    cal = Calibration(scan_step_a=0.5, detector_pixel_mrad=1.0, semiangle_mrad=float(bf_radius),
                      bf_center=(detector / 2, detector / 2), bf_radius=float(bf_radius))
    store = create_store(path, scan_shape, (detector, detector), cal, rows_per_block=rows_per_block,
                         max_events_per_position=int(4 * events_per_position) + 1024,
                         provenance={"source": "stemdask.simulate.random_event_store"}, overwrite=overwrite)
    n_pix = detector * detector
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        counts = rng.poisson(events_per_position, size=(r1 - r0, nx)).astype(np.uint32)
        indices = (np.arange(int(counts.sum()), dtype=np.int64) * 7919 + b) % n_pix
        store.write_block(b, counts, indices)
    return store.finalize()
