"""riCOM kernels (Yu et al. 2022): the kernel, its response, batch correlation, and the numba
scatter of live riCOM.

Units and conventions (the same for batch and live riCOM, :mod:`stemdask.live_ricom`):

* Input: the COM field in the **scan frame** (rotation/flip already applied) in **Å⁻¹**;
  for a thin object COM = ∇φ / 2π (φ in rad, r in Å).
* Kernel (paper eq. 4): for the offset ``s = r − r_p`` (Å) from the output position ``r_p``
  to a contributing position ``r``, ``k(s) = a_y·a_x · (r_p − r) / |r_p − r|²`` (Å; ``a`` the
  scan steps), full width ``n`` (odd) scan pixels, ``k(0) = 0``. riCOM is the
  cross-correlation ``I(r_p) = Σ_s k(s)·COM(r_p + s)``, with zero COM beyond the scan. An
  infinite kernel is the exact inverse of the gradient (the 2-D Green's function:
  φ(r_p) = ∫ (r_p − r)/|r_p − r|² · ∇φ(r)/2π d²r), so riCOM is in **rad** and equals the
  phase at high spatial frequencies; a finite kernel suppresses low frequencies, as paper
  eq. 6–7 describe (:func:`ricom_transfer` gives the exact response). The paper's kernel
  carries a/2π instead of a² because its COM has other units; the shape is the same.
* Band-pass (paper eq. 8–9): ``kmin``, ``kmax`` are spatial frequencies in **Å⁻¹** (cycles per
  Å; in cycles per scan pixel multiply by the step). The hard mask
  ``kmin ≤ |q| ≤ kmax`` is applied to the kernel on a frequency grid of
  :data:`BAND_PASS_WIDTHS` kernel widths (or ``grid_shape``, at least n; the paper uses the
  scan's size, which costs two FFTs of the whole scan and changes the kernel with the scan),
  and the filtered kernel is cut back to n × n around its centre — so the cut-off becomes a
  slope, as the paper notes. The grid's frequency step is 1/(4·n·a), a quarter of the lowest
  frequency the n-wide kernel passes.

Live riCOM (numba; the COM of event lists is :func:`stemdask.kernels.events.center_of_mass`):

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

import math

import numba
import numpy as np
import scipy.fft

from ..errors import InvalidParameter
from .icom import scan_steps, spectral_grid


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


#: The band-pass is built on a grid of this many kernel widths (each axis).
BAND_PASS_WIDTHS = 4


def ricom_kernel(
    n: int,
    step_a=1.0,
    kmin: float | None = None,
    kmax: float | None = None,
    grid_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The riCOM kernel (2, n, n) float64: components (k_y, k_x) in Å, index ``h = n // 2`` at s = 0.

    ``step_a``: scan step (Å), a number or (y, x). ``kmin``, ``kmax``: optional band-pass
    (Å⁻¹, see module docstring) applied on a ``grid_shape`` frequency grid (default
    :data:`BAND_PASS_WIDTHS` · n on each axis, whatever the scan).
    """
    if isinstance(n, bool) or int(n) != n or n < 3 or n % 2 == 0:
        raise InvalidParameter(f"riCOM kernel size must be an odd integer ≥ 3 (full width in scan pixels), got {n!r}")
    n = int(n)
    ay, ax = scan_steps(step_a)
    h = n // 2
    sy = (np.arange(n) - h)[:, None] * ay
    sx = (np.arange(n) - h)[None, :] * ax
    r2 = sy**2 + sx**2
    r2[h, h] = np.inf
    kernel = -ay * ax * np.stack(np.broadcast_arrays(sy / r2, sx / r2))
    if kmin is None and kmax is None:
        return kernel
    return _band_pass(kernel, (ay, ax), kmin, kmax, grid_shape)


def _band_pass(kernel, step, kmin, kmax, grid_shape):
    """Paper eq. 8–9: convolve the kernel with the filter F⁻¹{kmin ≤ |q| ≤ kmax}, keep n × n."""
    kmin = 0.0 if kmin is None else float(kmin)
    kmax = math.inf if kmax is None else float(kmax)
    if not (kmin >= 0 and kmax > kmin) or math.isnan(kmax):
        raise InvalidParameter(f"band-pass needs 0 ≤ kmin < kmax (Å⁻¹), got kmin={kmin}, kmax={kmax}")
    n = kernel.shape[-1]
    h = n // 2
    grid = (BAND_PASS_WIDTHS * n,) * 2 if grid_shape is None else tuple(max(int(g), n) for g in grid_shape)
    padded = np.zeros((2,) + grid)
    padded[:, :n, :n] = kernel
    padded = np.roll(padded, (-h, -h), axis=(1, 2))  # s = 0 at grid index (0, 0)
    q = np.sqrt(spectral_grid(grid, step)[2])
    mask = (q >= kmin) & (q <= kmax)
    filtered = scipy.fft.irfft2(scipy.fft.rfft2(padded) * mask, s=grid)
    return np.roll(filtered, (h, h), axis=(1, 2))[:, :n, :n].copy()


def ricom_transfer(kernel: np.ndarray, shape: tuple[int, int], step_a=1.0) -> np.ndarray:
    """Exact phase transfer H(q) of riCOM with ``kernel`` on a periodic ``shape`` scan.

    For φ = exp(2πi q·r), COM = i q φ and riCOM = H(q)·φ with
    H(q) = i Σ_s (q · k(s)) exp(2πi q·s) (real for an odd kernel). Returned in numpy FFT
    layout (``fftfreq(shape[i], step)``), float64; H → 1 for |q| ≫ 1/(n·a), H(0) = 0.
    """
    ay, ax = scan_steps(step_a)
    n = kernel.shape[-1]
    h = n // 2
    if shape[0] < n or shape[1] < n:
        raise InvalidParameter(f"transfer grid {shape} is smaller than the kernel ({n} × {n})")
    padded = np.zeros((2,) + tuple(shape))
    padded[:, :n, :n] = kernel
    padded = np.roll(padded, (-h, -h), axis=(1, 2))
    kt = np.fft.ifft2(padded) * (shape[0] * shape[1])  # Σ_s k(s) exp(+2πi q·s)
    qy = np.fft.fftfreq(shape[0], d=ay)[:, None]
    qx = np.fft.fftfreq(shape[1], d=ax)[None, :]
    return (1j * (qy * kt[0] + qx * kt[1])).real


def line_integral_weight(m, n: int, size: int):
    """Paper eq. 7: N/(2πm)·[1 − cos((n − 1)/2 · 2πm/N)], the line-integration estimate of the
    kernel's weight at frequency index ``m`` of an ``size``-pixel (N) image, kernel width n."""
    m = np.asarray(m, dtype=float)
    return size / (2 * np.pi * m) * (1 - np.cos((n - 1) / 2 * 2 * np.pi * m / size))


def correlate_zero_padded(com_y: np.ndarray, com_x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """riCOM of one 2-D COM block: ``Σ_s k(s)·COM(p + s)``, COM zero outside the block.

    A linear (not circular) FFT convolution with the flipped kernel on a grid that holds the
    block plus the kernel, float64 out, the block's shape. Written with :mod:`scipy.fft` rather
    than :func:`scipy.signal.fftconvolve` because the two components share one inverse
    transform (their spectra are summed first): 1.5–2× faster per block than ``fftconvolve``
    or ``oaconvolve`` of each component (1024², n = 61; equal to 2e-14).
    """
    com_y = np.asarray(com_y, dtype=np.float64)
    com_x = np.asarray(com_x, dtype=np.float64)
    n = kernel.shape[-1]
    h = n // 2
    ny, nx = com_y.shape
    grid = (scipy.fft.next_fast_len(ny + n - 1, real=True), scipy.fft.next_fast_len(nx + n - 1, real=True))
    flipped = kernel[:, ::-1, ::-1]  # correlation = convolution with the flipped kernel
    spec = scipy.fft.rfft2(flipped, s=grid)
    acc = scipy.fft.rfft2(com_y, s=grid) * spec[0]
    acc += scipy.fft.rfft2(com_x, s=grid) * spec[1]
    return scipy.fft.irfft2(acc, s=grid)[h : h + ny, h : h + nx]
