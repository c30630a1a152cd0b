"""DPC: the phase from the centre-of-mass field by regularised gradient descent.

Pelz et al. 2022 (the seed paper, section V) solve arg min_φ ‖∇φ/2π − COM‖² over the scan
with the preconditioned gradient step

    φ ← φ + μ · F⁻¹{ q · F{R} / (i (λ1 + |q|² + λ2 |q|⁴)) },   R = M·(COM − ∇φ/2π),

with COM in the scan frame in **Å⁻¹**, q in cycles per Å, φ in **rad**. ``M`` is 1 on the
scan and 0 on the zero padding around it (``pad``: the fraction of each scan side added on
both sides), so the edges of a non-periodic scan do not wrap around: the padding is free to
take whatever values make the measured gradient consistent. With λ1 = λ2 = 0, μ = 1 and no
padding one step is exact Fourier integration (:mod:`stemdask.kernels.icom`).

Regularisation: ``lambda1`` (Å⁻²) damps spatial frequencies below √λ1 (a high-pass: slow
background, e.g. from a COM reference error); ``lambda2`` (Å²) damps those above
λ2^(−1/2) (a low-pass against noise). Stopping rule: stop when the relative update
‖μ Δφ‖ / ‖φ‖ (over the padded grid) falls below ``tol``, or after ``iterations`` steps.
φ is kept as its spectrum, so a step costs four real FFTs (on all cores: ``workers=-1``).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.fft

from ..errors import InvalidParameter
from .icom import scan_steps, spectral_grid


def check_dpc_options(iterations: int, step: float, lambda1: float, lambda2: float, tol: float, pad: float) -> None:
    """Raise ValueError naming the first bad DPC option."""
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
        raise InvalidParameter(f"DPC iterations must be a positive integer, got {iterations!r}")
    if not (math.isfinite(step) and 0 < step <= 2):
        raise InvalidParameter(f"DPC step μ must be in (0, 2] (the iteration diverges beyond), got {step!r}")
    for name, v in (("lambda1", lambda1), ("lambda2", lambda2), ("tol", tol), ("pad", pad)):
        if not (math.isfinite(v) and v >= 0):
            raise InvalidParameter(f"DPC {name} must be a finite number ≥ 0, got {v!r}")


def dpc_phase(
    com_y: np.ndarray,
    com_x: np.ndarray,
    step_a,
    iterations: int = 100,
    step: float = 0.5,
    lambda1: float = 0.0,
    lambda2: float = 0.0,
    tol: float = 1e-4,
    pad: float = 0.25,
) -> np.ndarray:
    """DPC phase (rad), (ny, nx) float64, from a scan-frame COM field in Å⁻¹ (see module doc)."""
    check_dpc_options(iterations, step, lambda1, lambda2, tol, pad)
    a = scan_steps(step_a)
    com_y = np.asarray(com_y, dtype=np.float64)
    com_x = np.asarray(com_x, dtype=np.float64)
    if com_y.shape != com_x.shape or com_y.ndim != 2:
        raise InvalidParameter(f"com_y and com_x must be 2-D of one shape, got {com_y.shape} and {com_x.shape}")
    ny, nx = com_y.shape
    py, px = math.ceil(pad * ny), math.ceil(pad * nx)
    shape = (ny + 2 * py, nx + 2 * px)
    inside = (slice(py, py + ny), slice(px, px + nx))
    qy, qx, q2 = spectral_grid(shape, a)
    precond = lambda1 + q2 + lambda2 * q2**2
    precond[0, 0] = 1.0  # q = 0 carries no gradient: the mean phase is never updated
    spec = np.zeros(qy.shape[:1] + qx.shape[1:], complex)  # rfft2 of φ on the padded grid
    # Parseval weights of the half spectrum: columns other than 0 and Nyquist stand for two
    weight = np.full(qx.shape, 2.0)
    weight[:, 0] = 1.0
    if shape[1] % 2 == 0:
        weight[:, -1] = 1.0
    resid_y = np.zeros(shape)
    resid_x = np.zeros(shape)
    for _ in range(int(iterations)):
        # residual on the scan only; the padding carries no measurement
        resid_y[inside] = com_y - scipy.fft.irfft2(1j * qy * spec, s=shape, workers=-1)[inside]
        resid_x[inside] = com_x - scipy.fft.irfft2(1j * qx * spec, s=shape, workers=-1)[inside]
        update = step * (qy * scipy.fft.rfft2(resid_y, workers=-1) + qx * scipy.fft.rfft2(resid_x, workers=-1)) \
            / (1j * precond)
        spec += update
        norm = (weight * np.abs(spec) ** 2).sum()
        if norm > 0 and (weight * np.abs(update) ** 2).sum() <= tol**2 * norm:
            break
    return scipy.fft.irfft2(spec, s=shape)[inside]
