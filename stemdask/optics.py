"""Electron optics: wavelength, calibration record, reciprocal-space grids, aberrations.

Conventions (used by the simulator and every reconstruction):

* Energies in eV, wavelengths and aberration coefficients in Å, detector sampling in
  mrad per pixel (and Å⁻¹ per pixel = mrad / 1000 / λ), angles in degrees in the API.
* Aberrations in Krivanek notation. With the scattering angle ω = λ|k| and the azimuth
  φ = atan2(k_y, k_x) (measured from the scan-x axis towards scan-y),

      χ(k) = 2π/λ · Σ_{n,m} C_nm ω^(n+1) / (n+1) · cos(m (φ − φ_nm)).

  Implemented: C10 (defocus), C12 (two-fold astigmatism), C21 (axial coma), C23 (three-fold
  astigmatism), C30 (spherical). The probe is ψ(k) = A(k)·exp(−iχ(k)), abTEM's convention.
  **C10 < 0 is underfocus** (the crossover lies below the entrance surface); abTEM's
  ``defocus`` equals −C10.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from .errors import InvalidParameter

#: Electron rest energy (eV), Planck constant × speed of light (eV·Å).
_MC2_EV = 510998.95
_HC_EV_A = 12398.419843320026


def wavelength_a(energy_ev: float) -> float:
    """Relativistic electron wavelength (Å) at an accelerating voltage ``energy_ev`` (eV)."""
    if not (math.isfinite(energy_ev) and energy_ev > 0):
        raise InvalidParameter(f"energy must be a positive number of eV, got {energy_ev!r}")
    return _HC_EV_A / math.sqrt(energy_ev * (2 * _MC2_EV + energy_ev))


@dataclasses.dataclass
class Calibration:
    """What turns pixels into physics. Stored in an event store's attrs.

    energy_ev: beam energy (eV). scan_step_a: (y, x) scan step (Å).
    detector_pixel_mrad: detector sampling (mrad per pixel, square pixels).
    semiangle_mrad: probe convergence semi-angle (mrad), or None if unknown.
    bf_center: (y, x) detector pixel of k = 0 (sub-pixel), or None until calibrated.
    bf_radius: bright-field disk radius (px), or None until calibrated.
    rotation_deg, flip: map detector vectors into the scan frame: first, if ``flip``,
    k_x → −k_x; then rotate by ``rotation_deg`` (counter-clockwise in the (x, y) plane).
    descan: how the BF-disk centre moves over the scan, or None (it does not):
    ``{"model": "plane" | "quadratic", "coef_y": [...], "coef_x": [...]}``, see
    :func:`descan_offsets` — the disk centre at scan position (iy, ix) is
    ``bf_center + offset(iy, ix)``; ``bf_center`` is the centre at the middle of the scan.
    An optional ``"com_response"`` 2×2 matrix K says how the whole-detector COM (with the
    detector mask) follows the disk: the COM subtracts K·offset (1 without it; a detector
    edge cutting a diffuse background, or a mask's static fill, make it smaller).
    c10_estimate_a: the defocus C10 (Å) measured by :mod:`stemdask.calibrate` (parallax), or None.
    rotation_reliable: whether the stored rotation/flip are supported by the data (None: never
    measured). origins: how each field was obtained, field name → one of :data:`ORIGINS`.
    report: the last calibration's measurements and fit qualities (JSON-serialisable).
    """

    energy_ev: float = 300e3
    scan_step_a: tuple[float, float] = (1.0, 1.0)
    detector_pixel_mrad: float = 1.0
    semiangle_mrad: float | None = None
    bf_center: tuple[float, float] | None = None
    bf_radius: float | None = None
    rotation_deg: float = 0.0
    flip: bool = False
    descan: dict | None = None
    c10_estimate_a: float | None = None
    rotation_reliable: bool | None = None
    origins: dict = dataclasses.field(default_factory=dict)
    report: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        def positive(name, value):
            v = float(value)
            if not (math.isfinite(v) and v > 0):
                raise InvalidParameter(f"calibration {name} must be a positive finite number, got {value!r}")
            return v

        self.energy_ev = positive("energy_ev", self.energy_ev)
        step = self.scan_step_a
        if np.ndim(step) == 0:
            step = (step, step)
        self.scan_step_a = tuple(positive("scan_step_a", s) for s in step)
        if len(self.scan_step_a) != 2:
            raise InvalidParameter(f"scan_step_a must be a number or (y, x), got {step!r}")
        self.detector_pixel_mrad = positive("detector_pixel_mrad", self.detector_pixel_mrad)
        if self.semiangle_mrad is not None:
            self.semiangle_mrad = positive("semiangle_mrad", self.semiangle_mrad)
        if self.bf_center is not None:
            c = tuple(float(v) for v in self.bf_center)
            if len(c) != 2 or not all(math.isfinite(v) for v in c):
                raise InvalidParameter(f"bf_center must be (y, x) finite pixels, got {self.bf_center!r}")
            self.bf_center = c
        if self.bf_radius is not None:
            self.bf_radius = positive("bf_radius", self.bf_radius)
        if not math.isfinite(float(self.rotation_deg)):
            raise InvalidParameter(f"rotation_deg must be finite, got {self.rotation_deg!r}")
        self.rotation_deg = float(self.rotation_deg)
        self.flip = bool(self.flip)
        if self.descan is not None:
            check_descan(self.descan)
        if self.c10_estimate_a is not None and not math.isfinite(float(self.c10_estimate_a)):
            raise InvalidParameter(f"c10_estimate_a must be finite, got {self.c10_estimate_a!r}")
        bad = {k: v for k, v in dict(self.origins).items() if v not in ORIGINS}
        if bad:
            raise InvalidParameter(f"calibration origins must be among {ORIGINS}, got {bad}")
        self.origins = dict(self.origins)

    @property
    def wavelength_a(self) -> float:
        return wavelength_a(self.energy_ev)

    @property
    def detector_pixel_inv_a(self) -> float:
        """Detector sampling in Å⁻¹ per pixel (small-angle: mrad / 1000 / λ)."""
        return self.detector_pixel_mrad * 1e-3 / self.wavelength_a

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scan_step_a"] = list(self.scan_step_a)
        if self.bf_center is not None:
            d["bf_center"] = list(self.bf_center)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Calibration":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "Calibration":
        return dataclasses.replace(self, **changes)


#: How a calibration field was obtained (``Calibration.origins``).
ORIGINS = ("source metadata", "command line", "assumed", "measured", "set after ingest", "simulation")

#: Polynomial terms of each descan model, in the scan fractions (u, v) of :func:`descan_offsets`.
DESCAN_TERMS = {"plane": ("u", "v"), "quadratic": ("u", "v", "u2", "uv", "v2")}


def check_descan(descan: dict) -> None:
    """Raise ValueError unless ``descan`` is a valid ``Calibration.descan`` record."""
    model = descan.get("model") if isinstance(descan, dict) else None
    if model not in DESCAN_TERMS:
        raise InvalidParameter(f"descan model must be one of {sorted(DESCAN_TERMS)}, got {descan!r}")
    for key in ("coef_y", "coef_x"):
        coef = descan.get(key)
        if coef is None or len(coef) != len(DESCAN_TERMS[model]) or not all(math.isfinite(float(c)) for c in coef):
            raise InvalidParameter(f"descan {key} must be {len(DESCAN_TERMS[model])} finite numbers (px), got {coef!r}")
    k = descan.get("com_response")
    if k is not None and (np.shape(k) != (2, 2) or not np.all(np.isfinite(np.asarray(k, dtype=float)))):
        raise InvalidParameter(f"descan com_response must be a finite 2×2 matrix, got {k!r}")


def descan_terms(model: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The descan polynomial's terms (n_terms, *u.shape) at scan fractions ``u, v``."""
    values = {"u": u, "v": v, "u2": u * u, "uv": u * v, "v2": v * v}
    return np.stack([values[t] for t in DESCAN_TERMS[model]])


def scan_fractions(scan_shape, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """Scan positions as centred fractions of the scan: ``u = (iy − (ny − 1)/2) / ny`` (and
    ``v`` for ix), (len(rows), nx) each; ``rows`` (default all) selects scan rows."""
    ny, nx = scan_shape
    iy = np.arange(ny, dtype=np.float64) if rows is None else np.asarray(rows, dtype=np.float64)
    ix = np.arange(nx, dtype=np.float64)
    u = np.broadcast_to(((iy - (ny - 1) / 2) / ny)[:, None], (iy.size, nx))
    v = np.broadcast_to(((ix - (nx - 1) / 2) / nx)[None, :], (iy.size, nx))
    return u, v


def descan_offsets(descan: dict | None, scan_shape, rows=None) -> tuple[np.ndarray, np.ndarray]:
    """BF-centre offset (px, detector frame) at every scan position of ``rows``: (dy, dx), each
    (len(rows), nx) float64; zeros when ``descan`` is None.

    The offset is a polynomial without constant term in the centred scan fractions
    ``u, v`` (:func:`scan_fractions`), so it does not depend on the scan's sampling: the
    same record serves a scan-binned dataset (up to the bins' centres).
    """
    u, v = scan_fractions(scan_shape, rows)
    if descan is None:
        return np.zeros(u.shape), np.zeros(u.shape)
    terms = descan_terms(descan["model"], u, v)
    dy = np.tensordot(np.asarray(descan["coef_y"], dtype=np.float64), terms, axes=1)
    dx = np.tensordot(np.asarray(descan["coef_x"], dtype=np.float64), terms, axes=1)
    return dy, dx


def descan_gradient(descan: dict | None, scan_shape, step_a) -> np.ndarray | None:
    """The descan's linear part: D (2, 2), detector px per Å of probe position, rows (dy, dx),
    columns (scan y, scan x) — the least-squares plane through :func:`descan_offsets` over the
    scan of step ``step_a`` (y, x) Å (for a quadratic descan, its mean gradient); None without
    a descan."""
    if descan is None:
        return None
    dy, dx = descan_offsets(descan, scan_shape)
    ny, nx = scan_shape
    r_y, r_x = np.meshgrid(np.arange(ny) * step_a[0], np.arange(nx) * step_a[1], indexing="ij")
    design = np.column_stack([r_y.ravel(), r_x.ravel(), np.ones(ny * nx)])
    coef, *_ = np.linalg.lstsq(design, np.column_stack([dy.ravel(), dx.ravel()]), rcond=None)
    return coef[:2].T


@dataclasses.dataclass(frozen=True)
class Aberrations:
    """Aberration coefficients (Å) and azimuths (degrees), Krivanek notation.

    C10 < 0 is underfocus (abTEM ``defocus`` = −C10).
    """

    C10: float = 0.0
    C12: float = 0.0
    phi12: float = 0.0
    C21: float = 0.0
    phi21: float = 0.0
    C23: float = 0.0
    phi23: float = 0.0
    C30: float = 0.0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not math.isfinite(getattr(self, f.name)):
                raise InvalidParameter(f"aberration {f.name} must be finite, got {getattr(self, f.name)!r}")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def label(self) -> str:
        """``C10 −150 Å, C12 20 Å @ 30°``: C10 always, the other non-zero coefficients (for titles)."""
        parts = [f"C10 {self.C10:g} Å"]
        for name, angle in (("C12", "phi12"), ("C21", "phi21"), ("C23", "phi23"), ("C30", None)):
            value = getattr(self, name)
            if value:
                parts.append(f"{name} {value:g} Å" + (f" @ {getattr(self, angle):g}°" if angle else ""))
        return ", ".join(parts).replace("-", "−")


def chi(k_y: np.ndarray, k_x: np.ndarray, wavelength: float, ab: Aberrations) -> np.ndarray:
    """Aberration phase χ (rad) at spatial frequencies ``k_y, k_x`` (Å⁻¹), see module docstring."""
    k_y = np.asarray(k_y, dtype=float)
    k_x = np.asarray(k_x, dtype=float)
    w = wavelength * np.hypot(k_y, k_x)
    phi = np.arctan2(k_y, k_x)
    terms = (
        ab.C10 * w**2 / 2
        + ab.C12 * w**2 / 2 * np.cos(2 * (phi - np.deg2rad(ab.phi12)))
        + ab.C21 * w**3 / 3 * np.cos(phi - np.deg2rad(ab.phi21))
        + ab.C23 * w**3 / 3 * np.cos(3 * (phi - np.deg2rad(ab.phi23)))
        + ab.C30 * w**4 / 4
    )
    return 2 * np.pi / wavelength * terms


def detector_to_scan_frame(v_y, v_x, rotation_deg: float, flip: bool):
    """Map detector-frame vectors (y, x components) into the scan frame.

    ``flip`` mirrors x first (v_x → −v_x), then the vector is rotated by ``rotation_deg``
    counter-clockwise in the (x, y) plane. Works on NumPy and dask arrays alike.
    """
    if flip:
        v_x = -v_x
    t = np.deg2rad(rotation_deg)
    c, s = np.cos(t), np.sin(t)
    return s * v_x + c * v_y, c * v_x - s * v_y


def scan_to_detector_frame(v_y, v_x, rotation_deg: float, flip: bool):
    """Inverse of :func:`detector_to_scan_frame`."""
    t = np.deg2rad(rotation_deg)
    c, s = np.cos(t), np.sin(t)
    d_y, d_x = c * v_y - s * v_x, s * v_y + c * v_x
    if flip:
        d_x = -d_x
    return d_y, d_x


def check_scan_step(calibration: Calibration, data) -> None:
    """Raise if ``data``'s scan coordinates (xarray coords ``scan_y``/``scan_x``, Å) are not
    spaced by ``calibration.scan_step_a``; data without such coords pass.

    Methods take frequencies from the calibration; a calibration from another sampling
    (e.g. the unbinned dataset's for scan-binned data) would silently scale Q and the phase.
    """
    for name, step in zip(("scan_y", "scan_x"), calibration.scan_step_a):
        if name not in data.coords or data.coords[name].size < 2:
            continue
        spacing = float(np.median(np.diff(np.asarray(data.coords[name], dtype=float))))
        if not math.isclose(spacing, step, rel_tol=1e-6):
            raise InvalidParameter(
                f"{name} coordinates are {spacing:.6g} Å apart but the calibration's scan step is {step:.6g} Å; "
                "pass the calibration of this data (e.g. ds.bin_scan(f).calibration for binned data)"
            )
