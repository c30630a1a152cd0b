"""Method "icom": the phase by Fourier integration of the COM field (kernels:
:mod:`stemdask.kernels.icom`). A global operation: the COM (an O(events) reduction, per row
block) is integrated in one task (:func:`~stemdask.kernels.icom.integrate_com`) when the
field fits one (:data:`WHOLE_FIELD_CHUNKS` chunk targets); a larger field is integrated by
its separable parts — the transform along x of row chunks, a rechunk (p2p under distributed)
to column chunks for the transform along y, the solve and its inverse, a rechunk back to rows
for the inverse along x — so no task holds more than a few chunks."""

from __future__ import annotations

from typing import Literal

import dask.array as da
import numpy as np
import xarray as xr

from ..chunk_plan import chunk_length, regular_chunks
from ..errors import InvalidParameter
from ..events import EventDataset, chunk_target
from ..kernels.icom import PADS, check_filter, forward_x, frequencies_x, integrate_com, inverse_x, scan_steps, solve_y
from ..optics import Calibration
from . import PositiveFloat
from .com import ComReference, phase_dataset, scan_frame_com, whole_field

#: A COM field is integrated in one task when its float64 bytes are at most this many chunk
#: targets (the task holds about eight field-sized arrays: the inputs, their transforms, the
#: result).
WHOLE_FIELD_CHUNKS = 2


def icom(com: xr.Dataset, calibration: Calibration, *, pad: str = "mirror",
         highpass: float | None = None, lowpass: float | None = None,
         distributed: bool | None = None) -> xr.Dataset:
    """Lazy iCOM ``phase`` (rad) of a detector-frame COM Dataset (``EventDataset.com()``).

    ``pad``: "mirror" or "none"; ``highpass``, ``lowpass``: Gaussian cut-offs (Å⁻¹) or None;
    ``distributed``: integrate by row and column chunks (True), in one task (False), or the
    first when the field is larger than :data:`WHOLE_FIELD_CHUNKS` chunk targets (None).
    """
    if pad not in PADS:
        raise InvalidParameter(f"iCOM pad must be one of {PADS}, got {pad!r}")
    check_filter("iCOM highpass", highpass)
    check_filter("iCOM lowpass", lowpass)
    gy, gx = scan_frame_com(com, calibration)
    target = chunk_target()
    if distributed is None:
        distributed = gy.size * 8 > WHOLE_FIELD_CHUNKS * target
    options = {"pad": pad, "highpass": highpass, "lowpass": lowpass}
    if distributed:
        data = integrate_by_chunks(gy.data, gx.data, scan_steps(calibration.scan_step_a), target, **options)
    else:
        data = whole_field(integrate_com, gy, gx, step_a=calibration.scan_step_a, **options)
    params = {"pad": pad, "highpass_inv_a": highpass, "lowpass_inv_a": lowpass}
    filters = "".join(f", {name} {v:g} Å⁻¹" for name, v in (("high-pass", highpass), ("low-pass", lowpass)) if v)
    return phase_dataset(data, gy, "icom", f"iCOM phase ({pad} pad{filters})", params)


def integrate_by_chunks(com_y: da.Array, com_x: da.Array, step: tuple[float, float], target: int, *, pad: str,
                        highpass: float | None, lowpass: float | None) -> da.Array:
    """iCOM (rad) of a scan-frame COM field (Å⁻¹) by row chunks, then column chunks, then row
    chunks again, each about ``target`` bytes (module doc); equal to the one-task integral."""
    ny, nx = com_y.shape
    dtype = np.dtype(np.complex128 if pad == "none" else np.float64)  # of the transformed field
    rows = regular_chunks(ny, chunk_length(ny, nx * dtype.itemsize, target))
    cols_n = nx // 2 + 1 if pad == "none" else nx
    cols = regular_chunks(cols_n, chunk_length(cols_n, ny * dtype.itemsize, target))
    com_y, com_x = (a.astype(np.float64).rechunk((rows, nx)) for a in (com_y, com_x))
    fy, fx = (c.map_blocks(forward_x, pad, axis, chunks=(rows, (cols_n,)), dtype=dtype, meta=np.empty((0, 0), dtype))
              for axis, c in enumerate((com_y, com_x)))
    q_x = da.from_array(frequencies_x(nx, step[1], pad), chunks=(cols,))
    solved = da.map_blocks(solve_y, fy.rechunk((ny, cols)), fx.rechunk((ny, cols)), q_x, step[0], pad, highpass,
                           lowpass, dtype=dtype, meta=np.empty((0, 0), dtype))
    return solved.rechunk((rows, cols_n)).map_blocks(inverse_x, nx, pad, chunks=(rows, (nx,)), dtype=np.float64)


def run(ds: EventDataset, *, com_reference: ComReference = "mean", icom_pad: Literal["mirror", "none"] = "mirror",
        icom_highpass: PositiveFloat | None = None, icom_lowpass: PositiveFloat | None = None) -> xr.Dataset:
    """Integrated COM phase (rad) by Fourier integration: variable phase.

    Parameters
    ----------
    com_reference
        as for :func:`stemdask.methods.com.run`; mean here: a constant COM is no phase contrast
    icom_pad
        padding against wrap-around: mirror (even extension of the phase) or none (for data
        that really are periodic)
    icom_highpass
        Gaussian high-pass cut-off, Å⁻¹ (none: no high-pass)
    icom_lowpass
        Gaussian low-pass cut-off, Å⁻¹ (none: no low-pass)
    """
    return icom(ds.com(reference=com_reference, units="px"), ds.calibration, pad=icom_pad,
                highpass=icom_highpass, lowpass=icom_lowpass)
