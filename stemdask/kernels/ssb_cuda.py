"""The SSB trotter sum on a GPU: a CUDA kernel (numba.cuda) that computes the trotter masks and
weights inline, for G chunks held as CuPy arrays.

Same maths as :func:`stemdask.kernels.ssb.ssb_partial` (see there and
:mod:`stemdask.kernels.ssb` for the weights): for every scan frequency Q one thread block of
:data:`THREADS` threads strides over the BF pixels — consecutive threads read consecutive
pixels of G(Q, ·), so reads are coalesced — decides for each pixel whether it lies in the left
lobe, the right lobe or neither from |k ∓ Q| < k0, evaluates χ as the polynomial of
:func:`~stemdask.kernels.ssb.chi_poly`, accumulates G·w in float64 and sums the block's
partial sums in shared memory. Nothing of size (Q, pixels) besides G itself is ever made, so a
refocus reads G once: the bound is the GPU's memory bandwidth.

The kernel runs on NumPy arrays too under numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``),
which is how it is tested on machines without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
from numba import cuda, float64

from .ssb import _lobes, array_module, chi_poly

#: Threads per block (one block per scan frequency Q); a power of two.
THREADS = 64

_chi_device = cuda.jit(device=True)(chi_poly.py_func)
_lobes_device = cuda.jit(device=True)(_lobes.py_func)


@cuda.jit
def _trotter_sums(g, k_y, k_x, chi_k, q_y, q_x, k02, c, out_re, out_im):
    nqx = q_x.shape[0]
    iy = cuda.blockIdx.x // nqx
    ix = cuda.blockIdx.x - iy * nqx
    t = cuda.threadIdx.x
    partial_re = cuda.shared.array(THREADS, float64)
    partial_im = cuda.shared.array(THREADS, float64)
    qy = q_y[iy]
    qx = q_x[ix]
    acc_re = 0.0
    acc_im = 0.0
    if qy * qy + qx * qx < 4.0 * k02:
        for p in range(t, k_y.shape[0], THREADS):
            in_minus, in_plus = _lobes_device(k_y[p], k_x[p], qy, qx, k02)
            if in_minus != in_plus:
                if in_minus:  # left lobe: −i·exp(iΔ), Δ = χ(k−Q) − χ(k)
                    d = _chi_device(k_y[p] - qy, k_x[p] - qx, c) - chi_k[p]
                    w_re, w_im = math.sin(d), -math.cos(d)
                else:  # right lobe: +i·exp(iΔ), Δ = χ(k) − χ(k+Q)
                    d = chi_k[p] - _chi_device(k_y[p] + qy, k_x[p] + qx, c)
                    w_re, w_im = -math.sin(d), math.cos(d)
                v = g[iy, ix, p]
                acc_re += v.real * w_re - v.imag * w_im
                acc_im += v.real * w_im + v.imag * w_re
    partial_re[t] = acc_re
    partial_im[t] = acc_im
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if t < step:
            partial_re[t] += partial_re[t + step]
            partial_im[t] += partial_im[t + step]
        cuda.syncthreads()
        step //= 2
    if t == 0:
        out_re[iy, ix] = partial_re[0]
        out_im[iy, ix] = partial_im[0]


def ssb_partial_cuda(g, k_y, k_x, q_y, q_x, k0, c):
    """Like :func:`stemdask.kernels.ssb.ssb_partial`, on the GPU: complex128 (nqy, nqx) of
    ``g``'s array module. ``g`` (nqy, nqx, npix) complex is a CuPy array (a NumPy one under the
    CUDA simulator); the other arguments are NumPy arrays or floats and are moved to the device."""
    xp = array_module(g)
    nqy, nqx, _ = g.shape
    k_y = np.asarray(k_y, dtype=np.float64)
    k_x = np.asarray(k_x, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    chi_k = chi_poly.py_func(k_y, k_x, c)
    device = [xp.asarray(a, dtype=xp.float64) for a in (k_y, k_x, chi_k, q_y, q_x, c)]
    out_re = xp.zeros((nqy, nqx), dtype=xp.float64)
    out_im = xp.zeros((nqy, nqx), dtype=xp.float64)
    if nqy * nqx:
        ky, kx, ck, qy, qx, coef = device
        _trotter_sums[nqy * nqx, THREADS](g, ky, kx, ck, qy, qx, float(k0) ** 2, coef, out_re, out_im)
    return out_re + 1j * out_im
