"""Numba kernels of live riCOM: the kernel scatter and the centre of mass of dense frames.

(The COM of event lists is :func:`stemdask.kernels.events.center_of_mass`.)

* A pixel's coordinate is its index along each axis (pixel centres), so the centre of mass
  (COM) of a frame is ``Σ I·(k_y, k_x) / Σ I`` minus the reference ``(ref_y, ref_x)`` (px),
  as for events.
* Positions are numbered in scan order (row-major, scan_x fastest); a batch starts at the
  linear position ``start`` of an ``(ny, nx)`` image.
* The riCOM scatter takes the kernel already *flipped* (``kf[t] = k[-t]``, both components),
  so that position ``q`` adds ``kf[t] · COM(q)`` to image pixel ``q + t - h`` (``h = n // 2``)
  with contiguous, vectorisable inner loops. Pixels outside the ``ny × nx`` image are
  skipped, which is the zero-padded boundary of batch riCOM. The accumulator may be the
  whole image or a ring buffer of fewer rows: image row ``r`` lives in accumulator row
  ``r % acc.shape[0]`` (the caller keeps at most that many rows in flight).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, inline="always")
def _scatter_one(acc, ny, qy, qx, cy, cx, kfy, kfx):
    slots, nx = acc.shape
    n = kfy.shape[0]
    h = n // 2
    i0 = max(0, h - qy)
    i1 = min(n, ny + h - qy)
    j0 = max(0, h - qx)
    j1 = min(n, nx + h - qx)
    for i in range(i0, i1):
        # 1-D row views: LLVM vectorises this loop (≈ 6× faster than 2-D indexing)
        row = acc[(qy + i - h) % slots, qx - h + j0 : qx - h + j1]
        ky = kfy[i, j0:j1]
        kx = kfx[i, j0:j1]
        for j in range(row.shape[0]):
            row[j] += ky[j] * cy + kx[j] * cx


@numba.njit(nogil=True, cache=True)
def scatter_com(acc, ny, start, com_y, com_x, kfy, kfx):
    """Add the riCOM contributions of positions ``start .. start + len(com_y)`` to ``acc``.

    acc: (rows, nx) float64 accumulator of an ``(ny, nx)`` image (the image itself, or a
    ring buffer, see the module docstring), updated in place. com_y, com_x: the positions'
    COM in whatever units ``kfy, kfx`` (flipped kernel, (n, n), n odd) expect; a NaN COM
    (a position without electrons) contributes nothing.
    """
    nx = acc.shape[1]
    for i in range(com_y.shape[0]):
        if np.isnan(com_y[i]) or np.isnan(com_x[i]):
            continue
        p = start + i
        _scatter_one(acc, ny, p // nx, p % nx, com_y[i], com_x[i], kfy, kfx)


@numba.njit(nogil=True, cache=True, fastmath=True)
def com_from_frames(frames, ref_y, ref_x, zero):
    """COM (px, relative to ``(ref_y, ref_x)``) of dense frames (m, H, W).

    ``zero`` sets the accumulator type: ``np.int64(0)`` for integer frames up to 32 bits
    (exact and vectorised: ~5× faster than float sums), ``np.float64(0)`` otherwise; see
    :func:`accumulator_zero`. A frame without counts has COM NaN (as for events).
    Returns (com_y, com_x) float64 (m,).
    """
    m, hgt, wid = frames.shape
    com_y = np.full(m, np.nan)
    com_x = np.full(m, np.nan)
    for f in range(m):
        tot = zero
        sy = zero
        sx = zero
        for y in range(hgt):
            rs = zero
            rx = zero
            for x in range(wid):
                v = frames[f, y, x]
                rs += v
                rx += v * x
            tot += rs
            sy += rs * y
            sx += rx
        if tot > 0:
            com_y[f] = sy / tot - ref_y
            com_x[f] = sx / tot - ref_x
    return com_y, com_x


def accumulator_zero(dtype):
    """The ``zero`` for :func:`com_from_frames`: exact int64 sums for ≤ 32-bit integers."""
    dtype = np.dtype(dtype)
    if dtype.kind == "b" or (dtype.kind in "ui" and dtype.itemsize <= 4):
        return np.int64(0)
    return np.float64(0.0)
