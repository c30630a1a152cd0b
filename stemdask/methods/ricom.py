"""riCOM — real-time integrated centre of mass (Yu et al. 2022): kernel, response, batch riCOM.

Units and conventions (the same for batch and live riCOM, :mod:`stemdask.live`):

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
  ``kmin ≤ |q| ≤ kmax`` is applied to the kernel on a frequency grid the size of the scan
  (``grid_shape``, at least n), and the filtered kernel is cut back to n × n around its
  centre — so the cut-off becomes a slope, as the paper notes.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import scipy.fft

from .icom import scan_steps, spectral_grid


def ricom_kernel(
    n: int,
    step_a=1.0,
    kmin: float | None = None,
    kmax: float | None = None,
    grid_shape: tuple[int, int] | None = None,
) -> np.ndarray:
    """The riCOM kernel (2, n, n) float64: components (k_y, k_x) in Å, index ``h = n // 2`` at s = 0.

    ``step_a``: scan step (Å), a number or (y, x). ``kmin``, ``kmax``: optional band-pass
    (Å⁻¹, see module docstring) applied on a ``grid_shape`` frequency grid (default n × n;
    pass the scan shape, as the paper does).
    """
    if isinstance(n, bool) or int(n) != n or n < 3 or n % 2 == 0:
        raise ValueError(f"riCOM kernel size must be an odd integer ≥ 3 (full width in scan pixels), got {n!r}")
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
        raise ValueError(f"band-pass needs 0 ≤ kmin < kmax (Å⁻¹), got kmin={kmin}, kmax={kmax}")
    n = kernel.shape[-1]
    h = n // 2
    grid = (n, n) if grid_shape is None else tuple(max(int(g), n) for g in grid_shape)
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
        raise ValueError(f"transfer grid {shape} is smaller than the kernel ({n} × {n})")
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

    One FFT per component (linear, not circular: the FFT grid holds the block plus the
    kernel), float64 out, same shape as the block.
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


#: Smallest block side, in kernel widths, that batch riCOM works on (see :func:`ricom_dask`).
MIN_BLOCK_KERNELS = 4


def ricom_dask(com_y, com_x, kernel: np.ndarray) -> da.Array:
    """Batch riCOM of (lazy) scan-frame COM arrays: ``map_overlap`` with depth n // 2, boundary 0.

    Equals :func:`correlate_zero_padded` of the whole field whatever the chunking. Axes with
    chunks thinner than ``MIN_BLOCK_KERNELS`` kernel widths are rechunked to that (so the
    output's chunks can differ from the COM's). float64 out.
    """
    com_y = da.asarray(com_y)
    com_x = da.asarray(com_x)
    if com_y.shape != com_x.shape or com_y.ndim != 2:
        raise ValueError(f"com_y and com_x must be 2-D of one shape, got {com_y.shape} and {com_x.shape}")
    n = kernel.shape[-1]
    h = n // 2
    # an axis shorter than the kernel's reach becomes one chunk: its block then holds every
    # neighbour and needs no overlap (dask refuses a depth beyond the array)
    depth = {ax: (0 if h >= size else h) for ax, size in enumerate(com_y.shape)}
    # blocks of at least MIN_BLOCK_KERNELS·n along each axis: each block's FFT also covers its
    # 2h halo, which would dominate thin blocks (32 rows + 60 halo: 3× slower for n = 61)
    target = {ax: (-1 if d == 0 else min(size, max(MIN_BLOCK_KERNELS * n, max(com_y.chunks[ax]))))
              for ax, (d, size) in enumerate(zip(depth.values(), com_y.shape))
              if d == 0 or min(com_y.chunks[ax]) < MIN_BLOCK_KERNELS * n}
    com_y = com_y.rechunk(target) if target else com_y
    com_x = com_x.rechunk(com_y.chunks)
    return da.map_overlap(
        correlate_zero_padded, com_y, com_x, depth=depth, boundary=0, dtype=np.float64,
        meta=np.empty((0, 0), np.float64), kernel=kernel,
    )
