"""COM integration methods "icom", "dpc" and "ricom": lazy xarray results from a COM field.

Pipeline (every step lazy): ``ds.com()`` (detector frame, px or mrad) → NaN (positions
without electrons) to 0 → Å⁻¹ (px × detector Å⁻¹/px, or mrad × 10⁻³/λ) →
:func:`stemdask.optics.detector_to_scan_frame` with the calibration's rotation/flip → the
integration. For a thin object the scan-frame COM in Å⁻¹ is ∇φ/2π, so every method returns
``phase`` in rad, positive where the projected potential is positive.

iCOM and DPC are global operations on the whole 2-D field: the COM (an O(events) reduction)
is computed per row block, then rechunked to one chunk and integrated in one task. riCOM is
local: ``map_overlap`` with depth n // 2 over the COM chunks.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import xarray as xr

from ..optics import Calibration, check_scan_step, detector_to_scan_frame
from . import add_option, register
from .dpc import check_dpc_options, dpc_phase
from .icom import PADS, check_filter, integrate_com
from .reductions import com_options as _com_options
from .ricom import ricom_dask, ricom_kernel

DIMS = ("scan_y", "scan_x")


def scan_frame_com(com: xr.Dataset, calibration: Calibration) -> tuple[xr.DataArray, xr.DataArray]:
    """Detector-frame COM (``com_y``, ``com_x`` with ``units`` "px" or "mrad") → scan frame, Å⁻¹.

    Positions without electrons (NaN COM) become 0, i.e. no deflection.
    """
    missing = [v for v in ("com_y", "com_x") if v not in com]
    if missing:
        raise ValueError(f"COM dataset lacks {missing}; expected the output of EventDataset.com()")
    if com.com_y.dims != DIMS:
        raise ValueError(f"COM must have dims {DIMS}, got {com.com_y.dims}")
    check_scan_step(calibration, com)
    units = com.com_y.attrs.get("units")
    if units == "px":
        scale = calibration.detector_pixel_inv_a
    elif units == "mrad":
        scale = 1e-3 / calibration.wavelength_a
    else:
        raise ValueError(f"COM units must be 'px' or 'mrad', got {units!r}")
    cy = com.com_y.fillna(0.0) * scale
    cx = com.com_x.fillna(0.0) * scale
    gy, gx = detector_to_scan_frame(cy, cx, calibration.rotation_deg, calibration.flip)
    return gy, gx


def _phase_dataset(data: da.Array, like: xr.DataArray, method: str, long_name: str, params: dict) -> xr.Dataset:
    phase = xr.DataArray(
        data, dims=DIMS, coords={d: like.coords[d] for d in DIMS if d in like.coords},
        attrs={"units": "rad", "long_name": long_name, "method": method,
               **{k: ("none" if v is None else v) for k, v in params.items()}},
    )
    return xr.Dataset({"phase": phase}, attrs={"method": method})


def _global(fn, gy: xr.DataArray, gx: xr.DataArray, **kwargs) -> da.Array:
    """``fn(com_y, com_x, **kwargs)`` on the whole 2-D field, as one lazy task."""
    ay = da.asarray(gy.data).rechunk(-1)
    ax = da.asarray(gx.data).rechunk(-1)
    return da.map_blocks(fn, ay, ax, dtype=np.float64, meta=np.empty((0, 0), np.float64), **kwargs)


def icom(com: xr.Dataset, calibration: Calibration, *, pad: str = "mirror",
         highpass: float | None = None, lowpass: float | None = None) -> xr.Dataset:
    """Lazy iCOM ``phase`` (rad) by Fourier integration (:mod:`stemdask.methods.icom`)."""
    if pad not in PADS:
        raise ValueError(f"iCOM pad must be one of {PADS}, got {pad!r}")
    check_filter("iCOM highpass", highpass)
    check_filter("iCOM lowpass", lowpass)
    gy, gx = scan_frame_com(com, calibration)
    data = _global(integrate_com, gy, gx, step_a=calibration.scan_step_a, pad=pad, highpass=highpass, lowpass=lowpass)
    params = {"pad": pad, "highpass_inv_a": highpass, "lowpass_inv_a": lowpass}
    return _phase_dataset(data, gy, "icom", "iCOM phase (Fourier-integrated COM)", params)


def dpc(com: xr.Dataset, calibration: Calibration, *, iterations: int = 100, step: float = 0.5,
        lambda1: float = 0.0, lambda2: float = 0.0, tol: float = 1e-4, pad: float = 0.25) -> xr.Dataset:
    """Lazy DPC ``phase`` (rad) by regularised gradient descent (:mod:`stemdask.methods.dpc`)."""
    check_dpc_options(iterations, step, lambda1, lambda2, tol, pad)
    gy, gx = scan_frame_com(com, calibration)
    params = {"iterations": int(iterations), "step": step, "lambda1_inv_a2": lambda1,
              "lambda2_a2": lambda2, "tol": tol, "pad": pad}
    data = _global(dpc_phase, gy, gx, step_a=calibration.scan_step_a, iterations=int(iterations), step=step,
                   lambda1=lambda1, lambda2=lambda2, tol=tol, pad=pad)
    return _phase_dataset(data, gy, "dpc", "DPC phase (regularised gradient descent)", params)


def ricom(com: xr.Dataset, calibration: Calibration, *, kernel_size: int = 61,
          kmin: float | None = None, kmax: float | None = None) -> xr.Dataset:
    """Lazy riCOM ``phase`` (rad): ``map_overlap`` of the kernel (:mod:`stemdask.methods.ricom`).

    The band-pass (kmin, kmax in Å⁻¹) is folded into the kernel on a grid of the scan's size.
    """
    gy, gx = scan_frame_com(com, calibration)
    kernel = ricom_kernel(kernel_size, calibration.scan_step_a, kmin, kmax, grid_shape=gy.shape)
    data = ricom_dask(gy.data, gx.data, kernel)
    params = {"kernel_size": int(kernel_size), "kmin_inv_a": kmin, "kmax_inv_a": kmax}
    return _phase_dataset(data, gy, "ricom", f"riCOM phase (kernel {int(kernel_size)})", params)


# ---------------------------------------------------------------------- CLI registration
def _com(ds, args) -> xr.Dataset:
    return ds.com(reference=getattr(args, "com_reference", None) or "mean", units="px")


def _icom_options(p):
    _com_options(p)
    add_option(p, "--icom-pad", default="mirror", choices=list(PADS),
               help="iCOM padding against wrap-around: mirror (default) or none (periodic data)")
    add_option(p, "--icom-highpass", type=float, metavar="K",
               help="iCOM Gaussian high-pass cut-off (Å⁻¹)")
    add_option(p, "--icom-lowpass", type=float, metavar="K", help="iCOM Gaussian low-pass cut-off (Å⁻¹)")


def _dpc_options(p):
    _com_options(p)
    add_option(p, "--dpc-iterations", type=int, default=100, metavar="N", help="DPC maximum iterations (default 100)")
    add_option(p, "--dpc-step", type=float, default=0.5, metavar="MU", help="DPC gradient step μ (default 0.5)")
    add_option(p, "--dpc-lambda1", type=float, default=0.0, metavar="L1",
               help="DPC low-frequency regularisation λ1 (Å⁻², default 0)")
    add_option(p, "--dpc-lambda2", type=float, default=0.0, metavar="L2",
               help="DPC high-frequency regularisation λ2 (Å², default 0)")
    add_option(p, "--dpc-tol", type=float, default=1e-4, metavar="T",
               help="DPC stops when the relative update falls below T (default 1e-4)")
    add_option(p, "--dpc-pad", type=float, default=0.25, metavar="F",
               help="DPC zero padding, fraction of each scan side (default 0.25)")


def _ricom_options(p):
    _com_options(p)
    add_option(p, "--kernel-size", type=int, default=61, metavar="N", help="riCOM kernel full width, odd (default 61)")
    add_option(p, "--kmin", type=float, metavar="K", help="riCOM band-pass lower cut-off (Å⁻¹)")
    add_option(p, "--kmax", type=float, metavar="K", help="riCOM band-pass upper cut-off (Å⁻¹)")


@register("icom", "integrated COM phase by Fourier integration", _icom_options)
def run_icom(ds, args) -> xr.Dataset:
    return icom(_com(ds, args), ds.calibration, pad=args.icom_pad,
                highpass=args.icom_highpass, lowpass=args.icom_lowpass)


@register("dpc", "DPC phase by regularised gradient descent (Pelz et al. 2022)", _dpc_options)
def run_dpc(ds, args) -> xr.Dataset:
    return dpc(_com(ds, args), ds.calibration, iterations=args.dpc_iterations, step=args.dpc_step,
               lambda1=args.dpc_lambda1, lambda2=args.dpc_lambda2, tol=args.dpc_tol, pad=args.dpc_pad)


@register("ricom", "real-time integrated COM (Yu et al. 2022), batch", _ricom_options)
def run_ricom(ds, args) -> xr.Dataset:
    return ricom(_com(ds, args), ds.calibration, kernel_size=args.kernel_size, kmin=args.kmin, kmax=args.kmax)
