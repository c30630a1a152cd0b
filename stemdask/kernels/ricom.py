"""Numba kernels of live riCOM: per-position centre of mass and the kernel scatter.

Conventions shared by every function here:

* A detector pixel's linear index is ``k_y * det_x + k_x``; a pixel's coordinate is its
  index along each axis (pixel centres), so the centre of mass (COM) of a pattern is
  ``Σ I·(k_y, k_x) / Σ I`` minus the reference ``(ref_y, ref_x)`` (px). A position without
  electrons has COM 0 (it contributes nothing to riCOM).
* Positions are numbered in scan order (row-major, scan_x fastest); a batch starts at the
  linear position ``start`` of an ``(ny, nx)`` image.
* The riCOM scatter takes the kernel already *flipped* (``kf[t] = k[-t]``, both components),
  so that position ``q`` adds ``kf[t] · COM(q)`` to image pixel ``q + t - h`` (``h = n // 2``)
  with contiguous, vectorisable inner loops. Pixels outside the image are skipped, which is
  the zero-padded boundary of batch riCOM. The image accumulates in place.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, inline="always")
def _scatter_one(image, qy, qx, cy, cx, kfy, kfx):
    ny, nx = image.shape
    n = kfy.shape[0]
    h = n // 2
    i0 = max(0, h - qy)
    i1 = min(n, ny + h - qy)
    j0 = max(0, h - qx)
    j1 = min(n, nx + h - qx)
    for i in range(i0, i1):
        row = qy + i - h
        off = qx - h
        for j in range(j0, j1):
            image[row, off + j] += kfy[i, j] * cy + kfx[i, j] * cx


@numba.njit(nogil=True, cache=True)
def scatter_com(image, start, com_y, com_x, kfy, kfx):
    """Add the riCOM contributions of positions ``start .. start + len(com_y)`` to ``image``.

    image: (ny, nx) float64, updated in place. com_y, com_x: the positions' COM in whatever
    units ``kfy, kfx`` (flipped kernel, (n, n), n odd) expect.
    """
    nx = image.shape[1]
    for i in range(com_y.shape[0]):
        p = start + i
        _scatter_one(image, p // nx, p % nx, com_y[i], com_x[i], kfy, kfx)


@numba.njit(nogil=True, cache=True)
def scatter_events(image, start, indices, counts, det_x, ref_y, ref_x, kfy, kfx):
    """COM of each position from its events, then its riCOM scatter — one pass, no copies.

    indices: linear detector indices of consecutive positions, ``counts[i]`` events for
    position ``start + i``. COM in px relative to ``(ref_y, ref_x)``, so ``kfy, kfx`` must
    convert detector-frame px into the image's units. Returns the (com_y, com_x) (px) of
    the batch.
    """
    nx = image.shape[1]
    m = counts.shape[0]
    com_y = np.zeros(m)
    com_x = np.zeros(m)
    e = 0
    for i in range(m):
        c = np.int64(counts[i])
        if c > 0:
            sy = 0
            sx = 0
            for k in range(e, e + c):
                v = np.int64(indices[k])
                sy += v // det_x
                sx += v % det_x
            com_y[i] = sy / c - ref_y
            com_x[i] = sx / c - ref_x
            e += c
            p = start + i
            _scatter_one(image, p // nx, p % nx, com_y[i], com_x[i], kfy, kfx)
    return com_y, com_x


@numba.njit(nogil=True, cache=True)
def com_from_frames(frames, ref_y, ref_x):
    """COM (px, relative to ``(ref_y, ref_x)``) of dense frames (m, H, W), any numeric dtype.

    A frame without counts has COM 0. Returns (com_y, com_x) float64 (m,).
    """
    m, hgt, wid = frames.shape
    com_y = np.zeros(m)
    com_x = np.zeros(m)
    for f in range(m):
        tot = 0.0
        sy = 0.0
        sx = 0.0
        for y in range(hgt):
            rs = 0.0
            rx = 0.0
            for x in range(wid):
                v = np.float64(frames[f, y, x])
                rs += v
                rx += v * x
            tot += rs
            sy += rs * y
            sx += rx
        if tot > 0:
            com_y[f] = sy / tot - ref_y
            com_x[f] = sx / tot - ref_x
    return com_y, com_x
