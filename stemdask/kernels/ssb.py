"""Single-sideband (SSB) ptychography kernels: plain arrays in, plain arrays out.

Notation (weak phase object, numpy's forward FFT everywhere, see
:mod:`stemdask.methods.ssb` for the derivation): G(k, Q) is the scan-FFT of the
intensity at detector frequency k (Å⁻¹, scan frame, k = 0 at the BF centre) and scan
frequency Q (Å⁻¹). With the probe P(k) = A(k)·exp(−iχ(k)) and the object spectrum Φ(Q),

    G(k, Q) = iΦ(Q)·[P(k − Q)·P*(k) − P(k)·P*(k + Q)]        (Q ≠ 0)

so in the two double-overlap ("trotter") lobes of the bright-field disk |k| < k0

    left  L(Q): |k − Q| < k0, |k + Q| ≥ k0:  Φ ∝ G · (−i)·exp(i[χ(k − Q) − χ(k)])
    right R(Q): |k + Q| < k0, |k − Q| ≥ k0:  Φ ∝ G · (+i)·exp(i[χ(k) − χ(k + Q)])

:func:`ssb_partial` sums G times these unit-modulus weights over the pixels of one
detector chunk; :func:`trotter_counts` counts the pixels of both lobes (the transfer).

χ is the aberration function of :func:`stemdask.optics.chi`, evaluated here as the
equivalent polynomial in (k_y, k_x) (no trigonometry per pixel pair):
:func:`chi_coefficients` turns :class:`~stemdask.optics.Aberrations` into the polynomial's
coefficients and :func:`chi_poly` evaluates it.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ..optics import Aberrations

#: Layout of the χ polynomial coefficients (all multiplied by 2π/λ already):
#: χ = c0·k² + c1·(kx² − ky²) + c2·2kx·ky + k²·(c3·kx + c4·ky)
#:     + c5·(kx³ − 3kx·ky²) + c6·(3kx²·ky − ky³) + c7·k⁴,   k² = kx² + ky².
N_CHI_COEFFICIENTS = 8


def chi_coefficients(ab: Aberrations, wavelength: float) -> np.ndarray:
    """Polynomial coefficients (float64, :data:`N_CHI_COEFFICIENTS`) of χ(k) in rad, k in Å⁻¹.

    Same χ as :func:`stemdask.optics.chi` (Krivanek notation, angles from scan x towards
    scan y): with ω = λk, ω²cos 2(φ − φ12) = λ²[(kx² − ky²)cos 2φ12 + 2kx·ky sin 2φ12], etc.
    """
    lam = float(wavelength)
    s = 2 * math.pi / lam
    t12, t21, t23 = (math.radians(a) for a in (ab.phi12, ab.phi21, ab.phi23))
    return np.array(
        [
            s * ab.C10 * lam**2 / 2,
            s * ab.C12 * lam**2 / 2 * math.cos(2 * t12),
            s * ab.C12 * lam**2 / 2 * math.sin(2 * t12),
            s * ab.C21 * lam**3 / 3 * math.cos(t21),
            s * ab.C21 * lam**3 / 3 * math.sin(t21),
            s * ab.C23 * lam**3 / 3 * math.cos(3 * t23),
            s * ab.C23 * lam**3 / 3 * math.sin(3 * t23),
            s * ab.C30 * lam**4 / 4,
        ]
    )


def array_module(a):
    """``cupy`` if ``a`` is a CuPy array (G on a GPU), else ``numpy``."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


@numba.njit(nogil=True, cache=True)
def chi_poly(k_y, k_x, c):
    """χ (rad) at one frequency (k_y, k_x) (Å⁻¹) from :func:`chi_coefficients` ``c``."""
    k2 = k_x * k_x + k_y * k_y
    return (
        c[0] * k2
        + c[1] * (k_x * k_x - k_y * k_y)
        + c[2] * 2.0 * k_x * k_y
        + k2 * (c[3] * k_x + c[4] * k_y)
        + c[5] * (k_x * k_x * k_x - 3.0 * k_x * k_y * k_y)
        + c[6] * (3.0 * k_x * k_x * k_y - k_y * k_y * k_y)
        + c[7] * k2 * k2
    )


@numba.njit(nogil=True, cache=True, inline="always")
def _lobes(ky, kx, qy, qx, k02):
    """(|k − Q|² < k0², |k + Q|² < k0²): whether pixel k sees the −Q and the +Q disk."""
    ym, xm = ky - qy, kx - qx
    yp, xp = ky + qy, kx + qx
    return ym * ym + xm * xm < k02, yp * yp + xp * xp < k02


@numba.njit(nogil=True, cache=True)
def ssb_partial(g, k_y, k_x, q_y, q_x, k0, c):
    """Weighted trotter sum of one detector chunk: Σ_k G(Q, k)·w(k, Q), complex128 (nqy, nqx).

    g: complex (nqy, nqx, npix), G at scan frequencies ``q_y`` (nqy,) × ``q_x`` (nqx,) (Å⁻¹)
    and detector pixels at scan-frame frequencies ``k_y, k_x`` (npix,) (Å⁻¹), all inside the
    BF disk (|k| < k0). w = −i·exp(i[χ(k−Q) − χ(k)]) on the left lobe, +i·exp(i[χ(k) −
    χ(k+Q)]) on the right lobe, 0 elsewhere (module docstring); ``c`` from
    :func:`chi_coefficients`. Frequencies with |Q| ≥ 2·k0 have no trotter and give 0.
    """
    nqy, nqx, npix = g.shape
    out = np.zeros((nqy, nqx), dtype=np.complex128)
    k02 = k0 * k0
    chi_k = np.empty(npix)
    for p in range(npix):
        chi_k[p] = chi_poly(k_y[p], k_x[p], c)
    for iy in range(nqy):
        qy = q_y[iy]
        for ix in range(nqx):
            qx = q_x[ix]
            if qy * qy + qx * qx >= 4.0 * k02:
                continue
            acc_re = 0.0
            acc_im = 0.0
            for p in range(npix):
                in_minus, in_plus = _lobes(k_y[p], k_x[p], qy, qx, k02)
                if in_minus == in_plus:
                    continue
                if in_minus:  # left lobe: −i·exp(iΔ), Δ = χ(k−Q) − χ(k)
                    d = chi_poly(k_y[p] - qy, k_x[p] - qx, c) - chi_k[p]
                    w_re, w_im = math.sin(d), -math.cos(d)
                else:  # right lobe: +i·exp(iΔ), Δ = χ(k) − χ(k+Q)
                    d = chi_k[p] - chi_poly(k_y[p] + qy, k_x[p] + qx, c)
                    w_re, w_im = -math.sin(d), math.cos(d)
                v = g[iy, ix, p]
                acc_re += v.real * w_re - v.imag * w_im
                acc_im += v.real * w_im + v.imag * w_re
            out[iy, ix] = complex(acc_re, acc_im)
    return out


@numba.njit(nogil=True, cache=True)
def trotter_counts(k_y, k_x, q_y, q_x, k0):
    """Pixels (float64 (nqy, nqx)) in both trotter lobes of each scan frequency Q.

    Same geometry as :func:`ssb_partial`: pixels ``k_y, k_x`` (Å⁻¹, all inside |k| < k0)
    where exactly one of |k − Q|, |k + Q| is < k0; 0 for |Q| ≥ 2·k0.
    """
    nqy, nqx, npix = len(q_y), len(q_x), len(k_y)
    out = np.zeros((nqy, nqx))
    k02 = k0 * k0
    for iy in range(nqy):
        qy = q_y[iy]
        for ix in range(nqx):
            qx = q_x[ix]
            if qy * qy + qx * qx >= 4.0 * k02:
                continue
            n = 0
            for p in range(npix):
                in_minus, in_plus = _lobes(k_y[p], k_x[p], qy, qx, k02)
                if in_minus != in_plus:
                    n += 1
            out[iy, ix] = n
    return out
