"""Array-module (NumPy or CuPy) SSB trotter reduction, used for CuPy chunks.

Same maths as :func:`stemdask.kernels.ssb.ssb_partial` (see there for the weights), written
with broadcasting so that it runs on whatever array module its ``g`` comes from — CuPy on a
GPU worker. Given NumPy arrays it runs on the CPU, which is how it is tested on machines
without CUDA.
"""

from __future__ import annotations

import numpy as np

from .ssb import chi_poly


def array_module(a):
    """``cupy`` if ``a`` is a CuPy array, else ``numpy``."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def ssb_partial_xp(g, k_y, k_x, q_y, q_x, k0, c, *, rows_per_batch: int = 16):
    """Like :func:`stemdask.kernels.ssb.ssb_partial`, vectorised; complex128 (nqy, nqx).

    ``g`` (nqy, nqx, npix) may be a CuPy array; the other arguments are NumPy arrays or
    floats and are moved to ``g``'s device. Works on ``rows_per_batch`` rows of Q at a time
    to bound the temporary (rows, nqx, npix) arrays.
    """
    xp = array_module(g)
    nqy, nqx, _ = g.shape
    ky, kx = xp.asarray(k_y, dtype=xp.float64), xp.asarray(k_x, dtype=xp.float64)
    qx = xp.asarray(q_x, dtype=xp.float64)[None, :, None]
    chi = chi_poly.py_func  # plain arithmetic: evaluates elementwise on any array module
    chi_k = chi(ky, kx, c)
    k02 = k0 * k0
    out = xp.zeros((nqy, nqx), dtype=xp.complex128)
    for y0 in range(0, nqy, rows_per_batch):
        qy = xp.asarray(q_y[y0 : y0 + rows_per_batch], dtype=xp.float64)[:, None, None]
        ym, xm, yp, xp_ = ky - qy, kx - qx, ky + qy, kx + qx
        in_minus = ym**2 + xm**2 < k02
        in_plus = yp**2 + xp_**2 < k02
        left = in_minus & ~in_plus
        right = in_plus & ~in_minus
        w = xp.where(left, -1j * xp.exp(1j * (chi(ym, xm, c) - chi_k)), 0)
        w = xp.where(right, 1j * xp.exp(1j * (chi_k - chi(yp, xp_, c))), w)
        q_ok = (qy**2 + qx**2 < 4 * k02)[..., 0]
        part = (g[y0 : y0 + rows_per_batch] * w).sum(axis=-1)
        out[y0 : y0 + rows_per_batch] = xp.where(q_ok, part, 0)
    return out
