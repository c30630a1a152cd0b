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
That extension's Fourier transform is a cosine transform of φ (DCT-II) and sine/cosine
transforms of the COM components (DST-II along their own axis), so the mirror integral is
computed on the ny × nx grid itself (:func:`integrate_mirrored`: 3–4× faster than the FFT of
the extended grid at 2048²). It is the FFT integral of the extension without its Nyquist
row and column, where the extension's symmetry has no frequency (for φ even about the
mirror they are zero; the FFT gives them the odd Nyquist part of the noise).
``pad="none"`` is right for data that really are periodic (simulations over one period).

Optional Gaussian filters, cut-offs in Å⁻¹: ``highpass`` K multiplies Φ by
1 − exp(−|q|²/2K²), ``lowpass`` K by exp(−|q|²/2K²).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

from ..errors import InvalidParameter

PADS = ("mirror", "none")


def scan_steps(step_a) -> tuple[float, float]:
    """The scan step (y, x) in Å from a number or a pair; must be positive and finite."""
    step = (step_a, step_a) if np.ndim(step_a) == 0 else tuple(step_a)
    if len(step) != 2 or not all(math.isfinite(float(s)) and float(s) > 0 for s in step):
        raise InvalidParameter(f"scan step must be a positive number of Å or (y, x), got {step_a!r}")
    return float(step[0]), float(step[1])


def check_filter(name: str, value: float | None) -> float | None:
    """A filter cut-off (Å⁻¹) must be a positive finite number, or None for no filter."""
    if value is None:
        return None
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise InvalidParameter(f"{name} must be a positive spatial frequency in Å⁻¹, got {value!r}")
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
        raise InvalidParameter(f"iCOM pad must be one of {PADS}, got {pad!r}")
    highpass = check_filter("iCOM highpass", highpass)
    lowpass = check_filter("iCOM lowpass", lowpass)
    com_y = np.asarray(com_y, dtype=np.float64)
    com_x = np.asarray(com_x, dtype=np.float64)
    if com_y.shape != com_x.shape or com_y.ndim != 2:
        raise InvalidParameter(f"com_y and com_x must be 2-D of one shape, got {com_y.shape} and {com_x.shape}")
    if pad == "mirror":
        return integrate_mirrored(com_y, com_x, step, highpass, lowpass)
    shape = com_y.shape
    qy, qx, q2 = spectral_grid(shape, step)
    num = qy * scipy.fft.rfft2(com_y) + qx * scipy.fft.rfft2(com_x)
    q2[0, 0] = 1.0
    phi = num / (1j * q2)
    phi[0, 0] = 0.0
    return scipy.fft.irfft2(phi * _filters(q2, highpass, lowpass), s=shape)


def integrate_mirrored(com_y: np.ndarray, com_x: np.ndarray, step: tuple[float, float],
                       highpass: float | None = None, lowpass: float | None = None) -> np.ndarray:
    """iCOM (rad) of the mirror extension (module doc) by cosine/sine transforms on the scan
    grid itself. With C = DCT-II of φ (both axes), A = DST-II along y × DCT-II along x of COM_y
    and B = DCT-II along y × DST-II along x of COM_x (scipy's unnormalised transforms), the
    extension's Φ = (q·F{COM})/(i|q|²) reads ``C[k, l] = −(q_y·A[k−1, l] + q_x·B[k, l−1]) / |q|²``
    with q = (k / 2ny·step_y, l / 2nx·step_x), k < ny, l < nx; φ = IDCT-II of C."""
    ny, nx = com_y.shape
    a = scipy.fft.dct(scipy.fft.dst(com_y, type=2, axis=0), type=2, axis=1)
    b = scipy.fft.dst(scipy.fft.dct(com_x, type=2, axis=0), type=2, axis=1)
    qy = (np.arange(ny) / (2 * ny * step[0]))[:, None]
    qx = (np.arange(nx) / (2 * nx * step[1]))[None, :]
    q2 = qy**2 + qx**2
    c = np.zeros((ny, nx))
    c[1:, :] -= qy[1:] * a[:-1, :]
    c[:, 1:] -= qx[:, 1:] * b[:, :-1]
    q2[0, 0] = 1.0
    c /= q2
    c[0, 0] = 0.0
    return scipy.fft.idctn(c * _filters(q2, highpass, lowpass), type=2)


def _filters(q2: np.ndarray, highpass: float | None, lowpass: float | None) -> np.ndarray | float:
    """The optional Gaussian high-/low-pass factors at |q|² (module doc); 1 without either."""
    factor = 1.0
    if highpass is not None:
        factor = factor * -np.expm1(-q2 / (2 * highpass**2))
    if lowpass is not None:
        factor = factor * np.exp(-q2 / (2 * lowpass**2))
    return factor
