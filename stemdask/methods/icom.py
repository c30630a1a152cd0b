"""Method "icom": the phase by Fourier integration of the COM field (kernel:
:func:`stemdask.kernels.icom.integrate_com`). A global operation: the COM (an O(events)
reduction, per row block) is rechunked to one chunk and integrated in one task."""

from __future__ import annotations

from typing import Literal

import xarray as xr

from ..errors import InvalidParameter
from ..events import EventDataset
from ..kernels.icom import PADS, check_filter, integrate_com
from ..optics import Calibration
from . import PositiveFloat
from .com import ComReference, phase_dataset, scan_frame_com, whole_field


def icom(com: xr.Dataset, calibration: Calibration, *, pad: str = "mirror",
         highpass: float | None = None, lowpass: float | None = None) -> xr.Dataset:
    """Lazy iCOM ``phase`` (rad) of a detector-frame COM Dataset (``EventDataset.com()``).

    ``pad``: "mirror" or "none"; ``highpass``, ``lowpass``: Gaussian cut-offs (Å⁻¹) or None.
    """
    if pad not in PADS:
        raise InvalidParameter(f"iCOM pad must be one of {PADS}, got {pad!r}")
    check_filter("iCOM highpass", highpass)
    check_filter("iCOM lowpass", lowpass)
    gy, gx = scan_frame_com(com, calibration)
    data = whole_field(integrate_com, gy, gx, step_a=calibration.scan_step_a, pad=pad, highpass=highpass,
                       lowpass=lowpass)
    params = {"pad": pad, "highpass_inv_a": highpass, "lowpass_inv_a": lowpass}
    filters = "".join(f", {name} {v:g} Å⁻¹" for name, v in (("high-pass", highpass), ("low-pass", lowpass)) if v)
    return phase_dataset(data, gy, "icom", f"iCOM phase ({pad} pad{filters})", params)


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
