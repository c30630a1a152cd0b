"""Synthetic 4D-STEM event data with a known phase: the project's ground truth.

Model (projection approximation, thin object):

* Object: a periodic thin phase object φ(r) (rad) — Gaussian atom columns (σ = 0.35 Å) on a
  perovskite-like lattice (heavy A column at the cell corner, B column at the centre, light
  O columns on the edges; cell ≈ 3.905 Å, adjusted so an integer number of cells fits the
  scan) plus defects that break every mirror, inversion and transpose symmetry (an A
  vacancy, a heavier substitution, an off-lattice adatom). It is defined in the *scan
  frame* and the scan covers exactly one period, so FFTs over the scan are exact.
  Transmission t = exp(iφ).
* Probe: ψ(k) = A(k)·exp(−iχ(k)) from a round aperture (semi-angle α, one-pixel soft edge)
  with aberrations in Krivanek notation (:mod:`stemdask.optics`; azimuths from the scan-x
  axis; C10 < 0 is underfocus, abTEM's convention), normalised to one electron.
* Far field: |FFT(ψ(r − R)·t(r))|² on a grid whose extent equals the detector's, binned by
  an odd factor so k = 0 sits at the centre of detector pixel (N/2, N/2).
* Events: Poisson(dose · intensity) per pixel, written straight into an event store, one
  row block per task. The true phase at every probe position is stored beside them
  (array ``phase_truth``, rad, read back with :func:`load_truth`), the applied detector
  faults in the provenance (:func:`load_faults`).

Geometry and frames. The real-space sampling dx = λ / (N · pixel) is set by the detector's
angular extent; the scan step is an integer number of dx (``scan_step_px``). A detector
vector d maps to the scan frame as s = R(θ)·F·d (``Calibration``'s convention: F mirrors x
when ``flip``, then R rotates counter-clockwise by θ = ``rotation_deg`` + 90°·
``rotation_quarter_turns``). The diffraction is computed exactly in the *grid frame* e = F·d
(the frame of the FFT grid, before the flip), in which the object is rotated by −θ: the
object phase is sampled on a regular grid-frame lattice of pixel dx covering the rotated
scan plus the probe window — a permutation of the scan-frame grid when θ is a multiple of
90°, else the same periodic sum of Gaussians evaluated in real space (agreeing with the
Fourier-built :func:`phase_object` to ~1e-6 rad). Probe positions are the rotated scan
positions: each takes its integer window and the probe is shifted by the sub-pixel remainder
with a Fourier phase ramp (exact for the band-limited probe); the probe's aberration
azimuths stay in the scan frame. The flip is an exact index mirror of the binned pattern.

Detector faults (all off by default; :meth:`SimulationParams.realistic` turns on a typical
set, :meth:`SimulationParams.faults` lists them):

* ``bf_offset_px`` and ``descan``: the far field lands shifted on the detector, by the
  constant offset plus the per-position descan (:func:`stemdask.optics.descan_offsets`),
  detector pixels, sub-pixel allowed. This is a pure shift of the far field (not a beam tilt
  at the sample): the exit wave is multiplied by exp(2πi δk·r), which translates its
  continuous far field by δk exactly, before the FFT and the binning.
* ``bragg``: a tilted-crystal Bragg-disk pattern, position independent apart from the descan
  (see :func:`bragg_pattern`), added to the coherent pattern before renormalising to one
  electron.
* ``hot_pixels`` add Poisson(rate) spurious events at every position; ``dead_pixels``,
  ``dead_columns``, ``dead_rows`` never count.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import scipy.fft
import zarr

from .errors import InvalidParameter
from .kernels.sampling import sample_events
from .optics import (
    Aberrations,
    Calibration,
    check_descan,
    chi,
    descan_offsets,
    wavelength_a,
)
from .progress import run_jobs
from .store import EventStore, create_store, open_store

TRUTH = "phase_truth"

#: Width (σ, Å) of the Gaussian atom columns.
ATOM_SIGMA_A = 0.35


@dataclasses.dataclass(frozen=True)
class SimulationParams:
    """Everything that defines a simulated dataset.

    scan_shape: (ny, nx) probe positions. detector: N (N×N pixels, N even).
    dose: mean electrons per position. energy_ev: beam energy (eV). semiangle_mrad: α.
    detector_pixel_mrad: detector sampling; default puts the detector edge at 2.4 α.
    aberrations: probe aberrations (Å). max_phase: phase of the strongest column (rad).
    scan_step_px: scan step in object pixels dx.
    rotation_deg, rotation_quarter_turns, flip: the detector frame relative to the scan frame
    (see :class:`stemdask.optics.Calibration`); the total rotation is
    ``rotation_deg + 90 · rotation_quarter_turns`` degrees, any angle, exact.
    bf_offset_px: (y, x) detector pixels: the BF-disk centre at the scan centre is
    (N/2, N/2) + bf_offset_px. descan: a ``Calibration.descan`` record (px), the extra
    per-position disk shift. hot_pixels: ((y, x, rate), …), rate in spurious events per
    position. dead_pixels: ((y, x), …); dead_columns: (x, …); dead_rows: (y, …).
    bragg: peak weight of the Bragg-disk pattern relative to the BF plateau (0: none);
    bragg_tilt: (y, x) Laue-circle centre in units of α/λ (see :func:`bragg_pattern`).
    tds: thermal diffuse scattering, the fraction of the electrons a column of phase
    ``max_phase`` scatters incoherently into the dark field (0: none; see :func:`tds_fraction`):
    what makes a real ADF image bright at the atom columns, where the phase is positive.
    seed: random seed.
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
    rotation_deg: float = 0.0
    bf_offset_px: tuple[float, float] = (0.0, 0.0)
    descan: dict | None = None
    hot_pixels: tuple = ()
    dead_pixels: tuple = ()
    dead_columns: tuple = ()
    dead_rows: tuple = ()
    bragg: float = 0.0
    bragg_tilt: tuple[float, float] = (0.6, 0.3)
    tds: float = 0.0

    def __post_init__(self):
        n = self.detector
        if n < 4 or n % 2:
            raise InvalidParameter(f"detector must be an even number of pixels ≥ 4, got {n}")
        if not (self.dose >= 0 and math.isfinite(self.dose)):
            raise InvalidParameter(f"dose must be ≥ 0 electrons per position, got {self.dose}")
        if len(self.scan_shape) != 2 or min(self.scan_shape) < 1:
            raise InvalidParameter(f"scan_shape must be two positive integers, got {self.scan_shape}")
        if self.scan_step_px < 1:
            raise InvalidParameter("scan_step_px must be a positive integer")
        if not math.isfinite(self.rotation_deg):
            raise InvalidParameter(f"rotation_deg must be finite, got {self.rotation_deg!r}")

        def pair(name, value):
            v = tuple(float(x) for x in value)
            if len(v) != 2 or not all(math.isfinite(x) for x in v):
                raise InvalidParameter(f"{name} must be two finite numbers (y, x), got {value!r}")
            return v

        def pixel(name, y, x):
            if not (0 <= int(y) < n and 0 <= int(x) < n) or int(y) != y or int(x) != x:
                raise InvalidParameter(f"{name} ({y}, {x}) is not a pixel of the {n}×{n} detector")
            return int(y), int(x)

        def line(name, values):
            out = tuple(int(v) for v in values)
            if any(not 0 <= v < n or v != w for v, w in zip(out, values)):
                raise InvalidParameter(f"{name} must be detector indices in [0, {n}), got {values!r}")
            return out

        hot = []
        for entry in self.hot_pixels:
            y, x, rate = entry
            if not (math.isfinite(rate) and rate >= 0):
                raise InvalidParameter(f"hot pixel rate must be ≥ 0 events per position, got {entry!r}")
            hot.append((*pixel("hot pixel", y, x), float(rate)))
        if hot and self.dose == 0:
            raise InvalidParameter("hot pixels need dose > 0 (their rate is stored relative to the dose)")
        if not (math.isfinite(self.bragg) and self.bragg >= 0):
            raise InvalidParameter(f"bragg must be ≥ 0, got {self.bragg!r}")
        if not (math.isfinite(self.max_phase) and 0 <= self.max_phase < math.pi):
            raise InvalidParameter(f"max_phase must be in [0, π) rad, got {self.max_phase!r}")
        if not (math.isfinite(self.tds) and 0 <= self.tds < 1):
            raise InvalidParameter(f"tds must be a fraction in [0, 1), got {self.tds!r}")
        descan = None
        if self.descan is not None:
            check_descan(self.descan)
            descan = {"model": str(self.descan["model"]),
                      "coef_y": [float(c) for c in self.descan["coef_y"]],
                      "coef_x": [float(c) for c in self.descan["coef_x"]]}
        # normalised to plain Python types: the record goes into JSON provenance as is
        for name, value in {
            "rotation_deg": float(self.rotation_deg),
            "bf_offset_px": pair("bf_offset_px", self.bf_offset_px),
            "descan": descan,
            "hot_pixels": tuple(hot),
            "dead_pixels": tuple(pixel("dead pixel", y, x) for y, x in self.dead_pixels),
            "dead_columns": line("dead_columns", self.dead_columns),
            "dead_rows": line("dead_rows", self.dead_rows),
            "bragg": float(self.bragg),
            "tds": float(self.tds),
            "bragg_tilt": pair("bragg_tilt", self.bragg_tilt),
        }.items():
            object.__setattr__(self, name, value)

    def __hash__(self):  # the descan record is a dict: hash the JSON form (equal fields, equal hash)
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    @classmethod
    def realistic(cls, **overrides) -> SimulationParams:
        """The faults every real dataset has: a 17° scan rotation, an off-centre BF disk
        ((2.6, −3.3) px), a plane descan of a few px across the field, a hot pixel inside the
        BF disk (20× a BF pixel's mean counts), two dead pixels, a dead column crossing the BF
        disk and a tilted-crystal Bragg pattern (``bragg=0.6``); and, as every real sample has,
        thermal diffuse scattering into the dark field (``tds=0.05``). ``overrides`` replace any
        field, the faults included; the fault pixels follow the (overridden) geometry."""
        faults = ("bf_offset_px", "hot_pixels", "dead_pixels", "dead_columns")
        base = cls(**{k: v for k, v in overrides.items() if k not in faults})
        n, r = base.detector, base.bf_radius_px
        oy, ox = overrides.get("bf_offset_px", (2.6, -3.3))
        cy, cx = n / 2 + oy, n / 2 + ox
        plateau_counts = base.dose / (math.pi * r * r)
        preset = {
            "rotation_deg": 17.0,
            "bf_offset_px": (oy, ox),
            "descan": {"model": "plane", "coef_y": [1.5, -2.0], "coef_x": [2.5, 1.0]},
            "hot_pixels": ((round(cy + 0.4 * r), round(cx - 0.3 * r), 20.0 * plateau_counts),),
            "dead_pixels": ((round(cy - 0.5 * r), round(cx + 0.2 * r)), (2, n - 3)),
            "dead_columns": (round(cx + 0.6 * r),),
            "bragg": 0.6,
            "tds": 0.05,
        }
        return dataclasses.replace(base, **{**preset, **overrides})

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
    def bf_radius_px(self) -> float:
        """BF-disk radius α / pixel (detector px)."""
        return self.semiangle_mrad / self.pixel_mrad

    @property
    def total_rotation_deg(self) -> float:
        """θ = rotation_deg + 90 · rotation_quarter_turns (degrees)."""
        return self.rotation_deg + 90.0 * self.rotation_quarter_turns

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
            bf_center=(n / 2 + self.bf_offset_px[0], n / 2 + self.bf_offset_px[1]),
            bf_radius=self.bf_radius_px,
            rotation_deg=self.total_rotation_deg,
            flip=self.flip,
            descan=self.descan,
            origins={f: "simulation" for f in ("energy_ev", "scan_step_a", "detector_pixel_mrad", "semiangle_mrad",
                                               "bf_center", "bf_radius", "rotation_deg", "flip", "descan")},
        )

    def optics(self) -> dict:
        """The optics a microscope would record with this data (``ingest(calibration=…)``):
        energy (eV), scan step (Å), semi-angle (mrad), detector pixel size (mrad/px)."""
        return {"energy_ev": self.energy_ev, "scan_step_a": (self.scan_step, self.scan_step),
                "semiangle_mrad": self.semiangle_mrad, "detector_pixel_mrad": self.pixel_mrad}

    def faults(self) -> dict:
        """The applied geometry and detector faults (JSON-serialisable): the true BF centre
        at the scan centre and radius (px), descan, rotation (deg, total) and flip, C10 (Å),
        hot pixels ([y, x] lists and their rates, events per position), every dead pixel as
        [y, x] (dead columns and rows expanded; also listed as such) and the Bragg weight."""
        n = self.detector
        dead = {tuple(d) for d in self.dead_pixels}
        dead |= {(y, x) for x in self.dead_columns for y in range(n)}
        dead |= {(y, x) for y in self.dead_rows for x in range(n)}
        return {
            "bf_center": list(self.calibration().bf_center),
            "bf_offset_px": list(self.bf_offset_px),
            "bf_radius": self.bf_radius_px,
            "descan": self.descan,
            "rotation_deg": self.total_rotation_deg,
            "flip": self.flip,
            "C10": self.aberrations.C10,
            "hot_pixels": [[y, x] for y, x, _ in self.hot_pixels],
            "hot_rates": [rate for _, _, rate in self.hot_pixels],
            "dead_pixels": [list(d) for d in sorted(dead)],
            "dead_columns": list(self.dead_columns),
            "dead_rows": list(self.dead_rows),
            "bragg": self.bragg,
            "bragg_tilt": list(self.bragg_tilt),
        }


# --- the object ---------------------------------------------------------------------------


def _atoms(p: SimulationParams):
    """Atom columns of one scan period: positions ys, xs (Å, scan frame), weights ws, the
    period (ly, lx) and the unit cell (ay, ax) (Å)."""
    u = p.scan_step_px
    ly, lx = p.scan_shape[0] * u * p.dx, p.scan_shape[1] * u * p.dx
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
    return np.asarray(ys), np.asarray(xs), np.asarray(ws), (ly, lx), (ay, ax)


def phase_object(p: SimulationParams) -> np.ndarray:
    """The periodic object phase φ (rad) on the scan-frame object grid (ny·u, nx·u), dx apart.

    Built in Fourier space (exact periodic sum of Gaussians, band-limited by construction),
    then offset and scaled to [0, max_phase].
    """
    ys, xs, ws, _, _ = _atoms(p)
    u = p.scan_step_px
    gy, gx = p.scan_shape[0] * u, p.scan_shape[1] * u
    ky = np.fft.fftfreq(gy, d=p.dx)
    kx = np.fft.rfftfreq(gx, d=p.dx)
    ey = np.exp(-2j * np.pi * np.outer(ys, ky))  # (atoms, gy)
    ex = np.exp(-2j * np.pi * np.outer(xs, kx))  # (atoms, gx//2+1)
    spectrum = (ey * ws[:, None]).T @ ex
    spectrum *= np.exp(-2 * np.pi**2 * ATOM_SIGMA_A**2 * (ky[:, None] ** 2 + kx[None, :] ** 2))
    phi = np.fft.irfft2(spectrum, s=(gy, gx))
    phi -= phi.min()
    return (phi * (p.max_phase / phi.max())).astype(np.float64)


def _rotation(p: SimulationParams) -> tuple[float, float]:
    """(cos θ, sin θ) of the total rotation, exact (integers) for multiples of 90°."""
    theta = p.total_rotation_deg
    if theta % 90 == 0:
        return [(1, 0), (0, 1), (-1, 0), (0, -1)][int(theta // 90) % 4]
    t = math.radians(theta)
    return math.cos(t), math.sin(t)


def _grid_to_scan(rot, v_y, v_x):
    """Grid-frame vectors → scan frame (rotate CCW by θ); the identity returns its inputs."""
    c, s = rot
    if (c, s) == (1, 0):
        return v_y, v_x
    return s * v_x + c * v_y, c * v_x - s * v_y


def _scan_to_grid(rot, v_y, v_x):
    """Inverse of :func:`_grid_to_scan`."""
    c, s = rot
    if (c, s) == (1, 0):
        return v_y, v_x
    return c * v_y - s * v_x, s * v_y + c * v_x


def _gaussian_sum(atoms, e_y: np.ndarray, e_x: np.ndarray, rot) -> np.ndarray:
    """The unnormalised periodic sum of Gaussian columns, Σ w·exp(−|r − a|²/2σ²) over every
    periodic image a, at the grid-frame points (e_y[i], e_x[j]) (Å), shape (len(e_y), len(e_x)).

    Isotropic Gaussians factorise along the grid axes in any frame, so this is one matrix
    product over the images that reach the grid (cut at 8σ, relative error < 1e-13).
    """
    ys, xs, ws, (ly, lx), _ = atoms
    cut = 8 * ATOM_SIGMA_A
    corners_y, corners_x = np.meshgrid([e_y.min(), e_y.max()], [e_x.min(), e_x.max()], indexing="ij")
    s_y, s_x = _grid_to_scan(rot, corners_y, corners_x)
    iy = np.arange(math.floor((s_y.min() - cut) / ly) - 1, math.ceil((s_y.max() + cut) / ly) + 1)
    ix = np.arange(math.floor((s_x.min() - cut) / lx) - 1, math.ceil((s_x.max() + cut) / lx) + 1)
    shape = (ys.size, iy.size, ix.size)
    img_y = np.broadcast_to(ys[:, None, None] + ly * iy[None, :, None], shape).ravel()
    img_x = np.broadcast_to(xs[:, None, None] + lx * ix[None, None, :], shape).ravel()
    w = np.broadcast_to(ws[:, None, None], shape).ravel()
    q_y, q_x = _scan_to_grid(rot, img_y, img_x)
    keep = ((q_y > e_y.min() - cut) & (q_y < e_y.max() + cut)
            & (q_x > e_x.min() - cut) & (q_x < e_x.max() + cut))
    q_y, q_x, w = q_y[keep], q_x[keep], w[keep]
    g_y = np.exp(-((e_y[:, None] - q_y[None]) ** 2) / (2 * ATOM_SIGMA_A**2))
    g_x = np.exp(-((e_x[:, None] - q_x[None]) ** 2) / (2 * ATOM_SIGMA_A**2))
    return (g_y * w) @ g_x.T


def object_on_grid(p: SimulationParams, a: np.ndarray, b: np.ndarray, obj: np.ndarray | None = None) -> np.ndarray:
    """φ (rad) at the grid-frame points (a[i]·dx, b[j]·dx) (a, b integer pixel indices of the
    grid frame, see the module docstring), shape (len(a), len(b)).

    A multiple of 90° permutes the scan-frame grid of :func:`phase_object` (``obj``, computed
    when None) exactly; any other angle evaluates the same Gaussian columns in real space with
    :func:`phase_object`'s normalisation, taken on the scan-frame grid.
    """
    rot = _rotation(p)
    u = p.scan_step_px
    gy, gx = p.scan_shape[0] * u, p.scan_shape[1] * u
    a, b = np.asarray(a), np.asarray(b)
    if all(float(v).is_integer() for v in rot):
        obj = phase_object(p) if obj is None else obj
        s_y, s_x = _grid_to_scan(rot, a[:, None], b[None, :])
        return obj[s_y % gy, s_x % gx]
    atoms = _atoms(p)
    ref = _gaussian_sum(atoms, np.arange(gy) * p.dx, np.arange(gx) * p.dx, (1, 0))
    lo, hi = ref.min(), ref.max()
    return (_gaussian_sum(atoms, a * p.dx, b * p.dx, rot) - lo) * (p.max_phase / (hi - lo))


def truth_on_scan(obj: np.ndarray, p: SimulationParams) -> np.ndarray:
    """The object phase at every probe position (rad)."""
    u = p.scan_step_px
    return obj[::u, ::u].astype(np.float32)


# --- the probe ----------------------------------------------------------------------------


def _probe_spectrum(p: SimulationParams) -> np.ndarray:
    """Probe spectrum ψ(k) = A(k)·exp(−iχ(k)) (M×M, unshifted FFT order, grid frame),
    Σ|ψ|² = 1; χ takes its azimuths in the scan frame, so the grid-frame k is rotated by θ."""
    m = p.bin_factor * p.detector
    k = np.fft.fftfreq(m, d=p.dx)
    k_y, k_x = np.meshgrid(k, k, indexing="ij")
    k_alpha = p.semiangle_mrad * 1e-3 / p.wavelength
    dk_sim = 1.0 / (m * p.dx)
    aperture = np.clip((k_alpha - np.hypot(k_y, k_x)) / dk_sim + 0.5, 0.0, 1.0)
    psi_k = aperture * np.exp(-1j * chi(*_grid_to_scan(_rotation(p), k_y, k_x), p.wavelength, p.aberrations))
    psi_k /= np.sqrt((np.abs(psi_k) ** 2).sum())
    return psi_k


def probe_real_space(p: SimulationParams) -> np.ndarray:
    """Probe ψ(r) (complex128, window M×M, centre at M/2), Σ|ψ|² = 1, in the grid frame (the
    scan frame rotated by −θ; the scan frame itself when θ = 0)."""
    return np.fft.fftshift(np.fft.ifft2(_probe_spectrum(p), norm="ortho"))


def _shifted_probes(psi_k: np.ndarray, r_y: np.ndarray, r_x: np.ndarray) -> np.ndarray:
    """Probes (P, M, M) complex64 centred at M/2 + (r_y[j], r_x[j]) object px: the spectrum
    ``psi_k`` times the phase ramp exp(−2πi k·δr) — an exact shift of the band-limited probe
    (the ramp includes the M/2 of the centring, so no fftshift)."""
    m = psi_k.shape[0]
    f = np.fft.fftfreq(m)
    ramp_y = np.exp(-2j * np.pi * (r_y[:, None] + m // 2) * f[None, :]).astype(np.complex64)
    ramp_x = np.exp(-2j * np.pi * (r_x[:, None] + m // 2) * f[None, :]).astype(np.complex64)
    spectra = psi_k.astype(np.complex64)[None] * ramp_y[:, :, None] * ramp_x[:, None, :]
    return scipy.fft.ifft2(spectra, norm="ortho", workers=1)


# --- the far field ------------------------------------------------------------------------


def _positions(p: SimulationParams, rows) -> tuple[np.ndarray, np.ndarray]:
    """Probe positions of ``rows`` in the grid frame (object px), each (len(rows), nx)."""
    u = p.scan_step_px
    iy = np.asarray(rows, dtype=np.int64)[:, None] * u
    ix = np.arange(p.scan_shape[1], dtype=np.int64)[None, :] * u
    return tuple(np.broadcast_to(v, (iy.size, ix.size)) for v in _scan_to_grid(_rotation(p), iy, ix))


def _far_field_shifts(p: SimulationParams, rows) -> tuple[np.ndarray, np.ndarray]:
    """Far-field shift δk (grid frame, detector px) at every position of ``rows``: the BF
    offset plus the descan (detector frame), mirrored by the flip, each (len(rows), nx)."""
    dy, dx = descan_offsets(p.descan, p.scan_shape, rows)
    dy, dx = dy + p.bf_offset_px[0], dx + p.bf_offset_px[1]
    return (dy, -dx) if p.flip else (dy, dx)


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every row of a dataset shares: the transmission on the grid-frame lattice
    (``origin`` = grid-frame pixel of element [0, 0]), the probe and its spectrum, and the
    Bragg pattern (detector frame, zero descan; None without one)."""

    transmission: np.ndarray
    origin: tuple[int, int]
    probe: np.ndarray
    probe_k: np.ndarray
    bragg: np.ndarray | None


def _setup(p: SimulationParams, obj: np.ndarray | None = None, probe: np.ndarray | None = None) -> _Setup:
    m = p.bin_factor * p.detector
    pos_y, pos_x = _positions(p, range(p.scan_shape[0]))
    lo_y, lo_x = (int(np.round(v - m // 2).min()) for v in (pos_y, pos_x))
    hi_y, hi_x = (int(np.round(v - m // 2).max()) + m for v in (pos_y, pos_x))
    phi = object_on_grid(p, np.arange(lo_y, hi_y), np.arange(lo_x, hi_x), obj)
    probe = probe_real_space(p) if probe is None else probe
    return _Setup(
        transmission=np.exp(1j * phi),
        origin=(lo_y, lo_x),
        probe=probe,
        probe_k=np.fft.fft2(np.fft.ifftshift(probe), norm="ortho"),
        bragg=bragg_pattern(p) if p.bragg else None,
    )


def _detector_frame(patterns: np.ndarray, p: SimulationParams) -> np.ndarray:
    """fftshift, bin by the odd factor keeping k = 0 at pixel N/2, apply the flip (an exact
    mirror about pixel N/2: stored pattern D(d) = grid-frame pattern P(F·d))."""
    b, n = p.bin_factor, p.detector
    pat = np.fft.fftshift(patterns, axes=(-2, -1))
    if b > 1:
        pat = np.roll(pat, ((b - 1) // 2, (b - 1) // 2), axis=(-2, -1))
        pat = pat.reshape(pat.shape[:-2] + (n, b, n, b)).sum(axis=(-3, -1))
    if p.flip:
        pat = pat[..., (-np.arange(n)) % n]
    return pat


def _shift_bilinear(image: np.ndarray, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """``image`` (N, N) translated by (dy[j], dx[j]) px with bilinear interpolation, zero
    outside: (len(dy), N, N). Separable: rows first, then columns. (Moves the Bragg pattern
    with the descan; it is a smooth background, so interpolation is accurate enough.)"""
    n = image.shape[0]
    pad = int(np.ceil(max(np.abs(dy).max(), np.abs(dx).max()))) + 2
    padded = np.pad(image, pad)
    i0y, i0x = np.floor(dy).astype(int), np.floor(dx).astype(int)
    fy, fx = (dy - i0y)[:, None, None], (dx - i0x)[:, None, None]
    src_y = np.arange(n)[None, :] - i0y[:, None] + pad  # source row of weight 1 − fy
    rows = (1 - fy) * padded[src_y] + fy * padded[src_y - 1]  # (P, N, N + 2 pad)
    src_x = (np.arange(n)[None, :] - i0x[:, None] + pad)[:, None, :]
    return ((1 - fx) * np.take_along_axis(rows, np.broadcast_to(src_x, (len(dy), n, n)), axis=2)
            + fx * np.take_along_axis(rows, np.broadcast_to(src_x - 1, (len(dy), n, n)), axis=2))


def _apply_faults(intensity: np.ndarray, setup: _Setup, p: SimulationParams, rows) -> np.ndarray:
    """Bragg pattern (renormalised to one electron), hot and dead pixels, in place."""
    if setup.bragg is not None:
        if p.descan is None:
            extra = np.broadcast_to(setup.bragg, intensity.shape)
        else:
            dy, dx = descan_offsets(p.descan, p.scan_shape, rows)
            extra = _shift_bilinear(setup.bragg, dy.ravel(), dx.ravel()).reshape(intensity.shape)
        intensity += extra
        intensity /= (1.0 + extra.sum((-2, -1)))[..., None, None]
    for y, x, rate in p.hot_pixels:
        intensity[..., y, x] += rate / p.dose
    for y, x in p.dead_pixels:
        intensity[..., y, x] = 0.0
    for x in p.dead_columns:
        intensity[..., :, x] = 0.0
    for y in p.dead_rows:
        intensity[..., y, :] = 0.0
    return intensity


def _rows(setup: _Setup, p: SimulationParams, rows: range) -> np.ndarray:
    """Expected intensities of ``rows`` (see :func:`diffraction_rows`): per position, the
    integer window of the grid-frame transmission, the probe shifted by the sub-pixel
    remainder, the far-field ramp, the FFT; then binning, flip and the detector faults."""
    m, n = setup.probe.shape[0], p.detector
    views = np.lib.stride_tricks.sliding_window_view(setup.transmission, (m, m))
    pos_y, pos_x = _positions(p, rows)
    w_y, w_x = np.round(pos_y - m // 2).astype(np.int64), np.round(pos_x - m // 2).astype(np.int64)
    r_y, r_x = pos_y - m // 2 - w_y, pos_x - m // 2 - w_x  # sub-pixel remainders (object px)
    k_y, k_x = _far_field_shifts(p, rows)  # detector px
    window_r = (np.arange(m) - m // 2) / n  # r / (N dx): the far-field ramp's cycles per detector px
    out = np.empty((len(rows), p.scan_shape[1], n, n))
    weight = np.abs(setup.probe) ** 2 / (np.abs(setup.probe) ** 2).sum() if p.tds else None
    mean_phase = np.empty((len(rows), p.scan_shape[1]))
    for i in range(len(rows)):
        windows = views[w_y[i] - setup.origin[0], w_x[i] - setup.origin[1]]
        sub_pixel, far_shift = np.any(r_y[i]) or np.any(r_x[i]), np.any(k_y[i]) or np.any(k_x[i])
        if not (sub_pixel or far_shift):
            exit_waves = (windows * setup.probe).astype(np.complex64)
        else:
            probes = _shifted_probes(setup.probe_k, r_y[i], r_x[i]) if sub_pixel else setup.probe.astype(np.complex64)
            exit_waves = windows.astype(np.complex64) * probes
            if far_shift:  # exit wave × exp(2πi δk·r)
                exit_waves *= np.exp(2j * np.pi * k_y[i][:, None] * window_r).astype(np.complex64)[:, :, None]
                exit_waves *= np.exp(2j * np.pi * k_x[i][:, None] * window_r).astype(np.complex64)[:, None, :]
        far = scipy.fft.fft2(exit_waves, norm="ortho", workers=1)
        out[i] = _detector_frame(np.abs(far) ** 2, p)
        if weight is not None:
            mean_phase[i] = np.einsum("xij,ij->x", np.angle(windows), weight)
    if weight is not None:
        t = tds_fraction(mean_phase, p)[..., None, None]
        out = (1.0 - t) * out + t * tds_pattern(p, rows)
    return _apply_faults(out, setup, p, rows)


def tds_fraction(mean_phase: np.ndarray, p: SimulationParams) -> np.ndarray:
    """Fraction of the electrons scattered incoherently into the dark field at each position:
    ``tds · ⟨φ⟩ / max_phase``, ⟨φ⟩ the object phase (rad) averaged over the probe intensity.

    The incoherent-imaging approximation of ADF-STEM: the thermal diffuse intensity grows
    with the projected potential under the probe (≈ Z^1.7 per column; linear in φ here).
    Its electrons come out of the coherent pattern; those scattered beyond the detector's edge
    are lost, as on a real detector.
    """
    if p.max_phase == 0:
        return np.zeros_like(mean_phase)  # vacuum
    return p.tds * np.clip(mean_phase, 0.0, None) / p.max_phase


def tds_pattern(p: SimulationParams, rows) -> np.ndarray:
    """Where the thermal diffuse electrons land (detector frame), for every position of
    ``rows``: (len(rows), nx, N, N), each the part on the detector of an annulus that sums to 1
    — around the position's BF-disk centre (the disk's offset and descan move it with the
    disk): zero inside 1.1 α, peaking at 1.7 α with a 0.6 α Gaussian width."""
    n, r = p.detector, p.bf_radius_px
    dy, dx = descan_offsets(p.descan, p.scan_shape, rows)
    cy = n / 2 + p.bf_offset_px[0] + np.broadcast_to(dy, (len(rows), p.scan_shape[1]))
    cx = n / 2 + p.bf_offset_px[1] + np.broadcast_to(dx, (len(rows), p.scan_shape[1]))
    pix = np.arange(n, dtype=np.float64)
    k = np.hypot(pix[:, None] - cy[..., None, None], pix[None, :] - cx[..., None, None])
    def annulus(dist):
        return np.where(dist > 1.1 * r, np.exp(-(((dist - 1.7 * r) / (0.6 * r)) ** 2)), 0.0)

    m = math.ceil(3.6 * r) + 2  # the whole annulus (beyond 3.5 r it is < 1e-9 of its peak)
    whole = annulus(np.hypot(*np.mgrid[-m:m + 1, -m:m + 1].astype(np.float64))).sum()
    return annulus(k) / whole


def diffraction_rows(p: SimulationParams, rows: range, obj: np.ndarray | None = None,
                     probe: np.ndarray | None = None) -> np.ndarray:
    """Expected intensity (rows, nx, N, N) float64 in electrons per incident electron: each
    pattern sums to ≈ 1 without hot/dead pixels (hot pixels add rate/dose).

    obj: :func:`phase_object` (computed when None; see :func:`object_on_grid` for how it is
    used); probe: :func:`probe_real_space` (computed when None) — both only save recomputing.
    """
    return _rows(_setup(p, obj, probe), p, rows)


def simulate_dense(p: SimulationParams) -> tuple[np.ndarray, np.ndarray]:
    """Expected intensities (ny, nx, N, N) and the true phase (ny, nx) — small cases only."""
    obj = phase_object(p)
    return diffraction_rows(p, range(p.scan_shape[0]), obj), truth_on_scan(obj, p)


# --- the Bragg pattern --------------------------------------------------------------------


def bragg_pattern(p: SimulationParams) -> np.ndarray:
    """The tilted-crystal Bragg-disk pattern (N, N) on the detector at zero descan, in the
    units of :func:`diffraction_rows` before renormalisation (the BF plateau is
    ≈ 1/(π r²) there).

    Disks of the BF-disk radius r (one-pixel soft edge) sit at every reciprocal-lattice vector
    g ≠ 0 of the object's unit cell (scan frame, Å⁻¹) whose disk reaches the detector, mapped
    like the BF disk (centre (N/2, N/2) + bf_offset_px, d = F·R(−θ)·g / dk), with weights
    exp(−|g − g_t|²/(2σ²)), g_t = bragg_tilt · α/λ (the Laue-circle centre of a tilted
    crystal), σ = α/λ. With this α the disks overlap many-fold (|g| ≈ a quarter of α/λ), so
    the sum is scaled to peak at ``bragg`` × the BF plateau: the tilt side is bright and spills
    over the BF-disk edge.
    """
    n, r = p.detector, p.bf_radius_px
    _, _, _, _, (ay, ax) = _atoms(p)
    k_alpha = p.semiangle_mrad * 1e-3 / p.wavelength
    reach = (n / 2 * math.sqrt(2) + r + np.hypot(*p.bf_offset_px)) * p.dk  # Å⁻¹
    h = np.arange(-math.ceil(reach * ay), math.ceil(reach * ay) + 1)
    k = np.arange(-math.ceil(reach * ax), math.ceil(reach * ax) + 1)
    g_y, g_x = (v.ravel() for v in np.meshgrid(h / ay, k / ax, indexing="ij"))
    nonzero = (g_y != 0) | (g_x != 0)
    g_y, g_x = g_y[nonzero], g_x[nonzero]
    t_y, t_x = p.bragg_tilt[0] * k_alpha, p.bragg_tilt[1] * k_alpha
    weight = np.exp(-((g_y - t_y) ** 2 + (g_x - t_x) ** 2) / (2 * k_alpha**2))
    e_y, e_x = _scan_to_grid(_rotation(p), g_y, g_x)
    c_y = n / 2 + p.bf_offset_px[0] + e_y / p.dk
    c_x = n / 2 + p.bf_offset_px[1] + (-e_x if p.flip else e_x) / p.dk
    inside = (c_y > -r) & (c_y < n + r) & (c_x > -r) & (c_x < n + r)
    d = np.arange(n)
    pattern = np.zeros((n, n))
    for cy, cx, w in zip(c_y[inside], c_x[inside], weight[inside]):
        pattern += w * np.clip(r - np.hypot(d[:, None] - cy, d[None, :] - cx) + 0.5, 0.0, 1.0)
    if not pattern.any():
        return pattern
    return pattern * (p.bragg / (math.pi * r * r) / pattern.max())


# --- into a store -------------------------------------------------------------------------


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

    ``kwargs`` are :class:`SimulationParams` fields (used when ``params`` is None). The
    store's provenance holds the parameters and :meth:`SimulationParams.faults` (read back
    with :func:`load_faults`); its calibration is the true one.
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
            "faults": p.faults(),
        },
    }
    store = create_store(
        path, (ny, nx), (n, n), p.calibration(), rows_per_block=rows_per_block,
        provenance=provenance, overwrite=overwrite,
    )
    obj = phase_object(p)
    setup = _setup(p, obj)
    truth = zarr.open_group(str(store.path), mode="r+").create_array(
        TRUTH, shape=(ny, nx), chunks=(ny, nx), dtype="float32", fill_value=0.0
    )
    truth[...] = truth_on_scan(obj, p)
    truth.attrs.update({"units": "rad", "long_name": "true object phase at each probe position"})

    def one_block(b: int) -> int:
        r0, r1 = store.block_rows(b)
        intensity = _rows(setup, p, range(r0, r1))
        counts, indices = sample_events(intensity.reshape(-1, n * n), float(p.dose), p.seed * 100003 + b)
        return store.write_block(b, counts.reshape(r1 - r0, nx), indices)

    run_jobs(one_block, range(store.n_blocks), desc="simulate", progress=progress)
    return store.finalize()


def export_csr(store: EventStore, path: str | os.PathLike) -> Path:
    """Write a store's events as the CSR ``.npz`` that ``ingest --format csr`` reads (indices,
    offsets, scan and detector shape; no optics: a detector's raw export)."""
    indices, offsets = store.to_csr()
    np.savez(path, indices=indices, offsets=offsets, scan_shape=np.array(store.scan_shape),
             detector_shape=np.array(store.detector_shape))
    return Path(path)


def load_truth(path: str | os.PathLike) -> np.ndarray:
    """The stored true phase (rad) of a simulated store, (ny, nx)."""
    g = zarr.open_group(str(path), mode="r")
    if TRUTH not in g:
        raise KeyError(f"{path}: has no {TRUTH!r} (not made by stemdask.simulate)")
    return g[TRUTH][...]


def load_faults(path: str | os.PathLike) -> dict:
    """The true geometry and detector faults of a simulated store (see
    :meth:`SimulationParams.faults`)."""
    sim = open_store(path).provenance.get("simulation", {})
    if "faults" not in sim:
        raise KeyError(f"{path}: has no simulation faults record (not made by stemdask.simulate)")
    return sim["faults"]
