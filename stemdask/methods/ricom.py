"""Method "ricom": real-time integrated COM (Yu et al. 2022) in batch — the kernel
(:func:`stemdask.kernels.ricom.ricom_kernel`) correlated with the scan-frame COM by
``map_overlap`` over the COM's chunks (a local operation, depth n // 2)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import InvalidParameter
from ..events import EventDataset
from ..kernels.ricom import correlate_zero_padded, ricom_kernel
from ..optics import Calibration
from . import PositiveFloat, PositiveInt
from .com import ComReference, phase_dataset, scan_frame_com

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
        raise InvalidParameter(f"com_y and com_x must be 2-D of one shape, got {com_y.shape} and {com_x.shape}")
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


def ricom(com: xr.Dataset, calibration: Calibration, *, kernel_size: int = 61,
          kmin: float | None = None, kmax: float | None = None) -> xr.Dataset:
    """Lazy riCOM ``phase`` (rad) of a detector-frame COM Dataset (``EventDataset.com()``).

    The band-pass (kmin, kmax in Å⁻¹) is folded into the kernel on a grid of a few kernel widths
    (:data:`stemdask.kernels.ricom.BAND_PASS_WIDTHS`), whatever the scan size.
    """
    gy, gx = scan_frame_com(com, calibration)
    kernel = ricom_kernel(kernel_size, calibration.scan_step_a, kmin, kmax)
    data = ricom_dask(gy.data, gx.data, kernel)
    params = {"kernel_size": int(kernel_size), "kmin_inv_a": kmin, "kmax_inv_a": kmax}
    return phase_dataset(data, gy, "ricom", ricom_long_name(kernel_size, kmin, kmax), params)


def ricom_long_name(kernel_size: int, kmin: float | None, kmax: float | None) -> str:
    """``riCOM phase (kernel 61, band 0.05–∞ Å⁻¹)``: the image's name with what changes it."""
    band = "" if kmin is None and kmax is None else \
        f", band {kmin or 0:g}–{'∞' if kmax is None else format(kmax, 'g')} Å⁻¹"
    return f"riCOM phase (kernel {int(kernel_size)}{band})"


def run(ds: EventDataset, *, com_reference: ComReference = "mean", kernel_size: PositiveInt = 61,
        kmin: float | None = None, kmax: PositiveFloat | None = None) -> xr.Dataset:
    """Real-time integrated COM phase (rad, Yu et al. 2022), in batch: variable phase.

    Parameters
    ----------
    com_reference
        as for :func:`stemdask.methods.com.run`; mean here: a constant COM is no phase contrast
    kernel_size
        kernel full width n, scan pixels (odd, ≥ 3)
    kmin
        band-pass lower cut-off, Å⁻¹ (none: no lower cut-off)
    kmax
        band-pass upper cut-off, Å⁻¹ (none: no upper cut-off)
    """
    return ricom(ds.com(reference=com_reference, units="px"), ds.calibration, kernel_size=kernel_size,
                 kmin=kmin, kmax=kmax)
