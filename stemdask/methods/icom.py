"""iCOM: the phase from the centre-of-mass field by Fourier integration.

Input: the COM field in the **scan frame** in **Å⁻¹** (for a thin object COM = ∇φ/2π, so
F{COM} = i q Φ with q in cycles per Å). The least-squares integral is

    Φ(q) = (q_y·F{COM_y} + q_x·F{COM_x}) / (i |q|²),   Φ(0) = 0,

returned in **rad** (positive where the projected potential is positive).

Padding against wrap-around: a scan is not periodic, and plain FFT integration makes the
left edge talk to the right one. ``pad="mirror"`` integrates the even (half-sample
symmetric) extension of φ over a 2ny × 2nx grid instead — the COM component along the
mirrored axis changes sign in the mirror image — which is periodic by construction, so no
edge jump leaks in (better than zero padding, which creates a jump of the gradient itself).
``pad="none"`` is right for data that really are periodic (simulations over one period).

Optional Gaussian filters, cut-offs in Å⁻¹: ``highpass`` K multiplies Φ by
1 − exp(−|q|²/2K²), ``lowpass`` K by exp(−|q|²/2K²).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

PADS = ("mirror", "none")


def scan_steps(step_a) -> tuple[float, float]:
    """The scan step (y, x) in Å from a number or a pair; must be positive and finite."""
    step = (step_a, step_a) if np.ndim(step_a) == 0 else tuple(step_a)
    if len(step) != 2 or not all(math.isfinite(float(s)) and float(s) > 0 for s in step):
        raise ValueError(f"scan step must be a positive number of Å or (y, x), got {step_a!r}")
    return float(step[0]), float(step[1])


def check_filter(name: str, value: float | None) -> float | None:
    """A filter cut-off (Å⁻¹) must be a positive finite number, or None for no filter."""
    if value is None:
        return None
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive spatial frequency in Å⁻¹, got {value!r}")
    return v


def mirror_extend(com_y: np.ndarray, com_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The COM field of the even extension of φ, (2ny, 2nx): periodic, no edge jumps."""

    def ext(g, odd_axis):
        sy = -1.0 if odd_axis == 0 else 1.0
        sx = -1.0 if odd_axis == 1 else 1.0
        top = np.concatenate([g, sx * g[:, ::-1]], axis=1)
        return np.concatenate([top, sy * top[::-1]], axis=0)

    return ext(com_y, 0), ext(com_x, 1)


def spectral_grid(shape: tuple[int, int], step: tuple[float, float]):
    """(q_y, q_x, |q|²) for an rfft2 of ``shape`` sampled ``step`` Å apart (cycles per Å)."""
    qy = np.fft.fftfreq(shape[0], d=step[0])[:, None]
    qx = np.fft.rfftfreq(shape[1], d=step[1])[None, :]
    return qy, qx, qy**2 + qx**2


def integrate_com(
    com_y: np.ndarray,
    com_x: np.ndarray,
    step_a,
    pad: str = "mirror",
    highpass: float | None = None,
    lowpass: float | None = None,
) -> np.ndarray:
    """iCOM phase (rad), (ny, nx) float64, from a scan-frame COM field in Å⁻¹ (see module doc)."""
    step = scan_steps(step_a)
    if pad not in PADS:
        raise ValueError(f"iCOM pad must be one of {PADS}, got {pad!r}")
    highpass = check_filter("iCOM highpass", highpass)
    lowpass = check_filter("iCOM lowpass", lowpass)
    com_y = np.asarray(com_y, dtype=np.float64)
    com_x = np.asarray(com_x, dtype=np.float64)
    if com_y.shape != com_x.shape or com_y.ndim != 2:
        raise ValueError(f"com_y and com_x must be 2-D of one shape, got {com_y.shape} and {com_x.shape}")
    ny, nx = com_y.shape
    if pad == "mirror":
        com_y, com_x = mirror_extend(com_y, com_x)
    shape = com_y.shape
    qy, qx, q2 = spectral_grid(shape, step)
    num = qy * scipy.fft.rfft2(com_y) + qx * scipy.fft.rfft2(com_x)
    q2[0, 0] = 1.0
    phi = num / (1j * q2)
    phi[0, 0] = 0.0
    if highpass is not None:
        phi *= -np.expm1(-q2 / (2 * highpass**2))
    if lowpass is not None:
        phi *= np.exp(-q2 / (2 * lowpass**2))
    return scipy.fft.irfft2(phi, s=shape)[:ny, :nx]
