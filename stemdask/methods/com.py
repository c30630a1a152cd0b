"""Method "com": the centre of mass of each pattern; and the COM field the phase methods integrate.

:func:`run` gives the COM in the detector frame (px). The phase methods (iCOM, DPC, riCOM)
start from :func:`scan_frame_com`: the COM (px or mrad) with NaN (positions without
electrons) set to 0, in Å⁻¹ (px × detector Å⁻¹/px, or mrad × 10⁻³/λ), rotated and flipped
into the scan frame by the calibration (:func:`stemdask.optics.detector_to_scan_frame`).
For a thin object that field is ∇φ/2π, so each phase method returns ``phase`` in rad,
positive where the projected potential is positive.
"""

from __future__ import annotations

from typing import Literal

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import InvalidParameter
from ..events import EventDataset
from ..optics import Calibration, check_scan_step, detector_to_scan_frame

DIMS = ("scan_y", "scan_x")
ComReference = Literal["bf", "mean"]


def run(ds: EventDataset, *, com_reference: ComReference = "bf") -> xr.Dataset:
    """Centre of mass per position, detector frame (px): variables com_y, com_x.

    Parameters
    ----------
    com_reference
        what the COM is measured from: the calibrated BF-disk centre (bf) or the mean COM
        over the scan (mean)
    """
    return ds.com(reference=com_reference, units="px")


def scan_frame_com(com: xr.Dataset, calibration: Calibration) -> tuple[xr.DataArray, xr.DataArray]:
    """Detector-frame COM (``com_y``, ``com_x`` with ``units`` "px" or "mrad") → scan frame, Å⁻¹.

    Positions without electrons (NaN COM) become 0, i.e. no deflection.
    """
    missing = [v for v in ("com_y", "com_x") if v not in com]
    if missing:
        raise InvalidParameter(f"COM dataset lacks {missing}; expected the output of EventDataset.com()")
    if com.com_y.dims != DIMS:
        raise InvalidParameter(f"COM must have dims {DIMS}, got {com.com_y.dims}")
    check_scan_step(calibration, com)
    units = com.com_y.attrs.get("units")
    if units == "px":
        scale = calibration.detector_pixel_inv_a
    elif units == "mrad":
        scale = 1e-3 / calibration.wavelength_a
    else:
        raise InvalidParameter(f"COM units must be 'px' or 'mrad', got {units!r}")
    cy = com.com_y.fillna(0.0) * scale
    cx = com.com_x.fillna(0.0) * scale
    gy, gx = detector_to_scan_frame(cy, cx, calibration.rotation_deg, calibration.flip)
    return gy, gx


def phase_dataset(data: da.Array, like: xr.DataArray, method: str, long_name: str, params: dict) -> xr.Dataset:
    """A method's result: ``phase`` (rad) on ``like``'s scan coordinates, its parameters in attrs."""
    phase = xr.DataArray(
        data, dims=DIMS, coords={d: like.coords[d] for d in DIMS if d in like.coords},
        attrs={"units": "rad", "long_name": long_name, "method": method,
               **{k: ("none" if v is None else v) for k, v in params.items()}},
    )
    return xr.Dataset({"phase": phase}, attrs={"method": method})


def whole_field(fn, gy: xr.DataArray, gx: xr.DataArray, **kwargs) -> da.Array:
    """``fn(com_y, com_x, **kwargs)`` on the whole 2-D field, as one lazy task (iCOM and DPC
    are global operations: the COM is rechunked to one chunk)."""
    ay = da.asarray(gy.data).rechunk(-1)
    ax = da.asarray(gx.data).rechunk(-1)
    return da.map_blocks(fn, ay, ax, dtype=np.float64, meta=np.empty((0, 0), np.float64), **kwargs)
