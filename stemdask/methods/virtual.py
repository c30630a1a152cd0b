"""Method "virtual": annular virtual detector images (electrons) from the events
(:func:`stemdask.reductions.virtual_detectors`, one pass over the events for all of them)."""

from __future__ import annotations

import math

import xarray as xr

from ..errors import InvalidParameter
from ..events import EventDataset
from ..reductions import PRESETS, Annulus


def run(ds: EventDataset, *, inner_mrad: float | None = None, outer_mrad: float | None = None) -> xr.Dataset:
    """Virtual detector images (electrons): BF, ABF and ADF, or one annulus 'image'.

    Without inner_mrad/outer_mrad: the named annuli of the calibrated BF-disk radius R —
    variables bf [0, R), abf [R/2, R), adf [1.2 R, detector edge) — each named by its angles
    (mrad) in its long_name. With either: one annulus, variable image.

    Parameters
    ----------
    inner_mrad
        inner angle of one annular detector around the BF centre, mrad (none: 0 when an
        outer angle is given, else the named BF/ABF/ADF annuli)
    outer_mrad
        outer angle of that detector, mrad (none: the detector edge)
    """
    if inner_mrad is None and outer_mrad is None:
        if ds.calibration.bf_radius is None:
            raise InvalidParameter(f"{ds.store.path}: no BF-disk radius calibrated for the BF/ABF/ADF detectors; "
                                   "run `stemdask calibrate` or give --inner-mrad/--outer-mrad")
        return ds.virtual_detectors({name: name for name in PRESETS})
    annulus = Annulus(0.0 if inner_mrad is None else inner_mrad, math.inf if outer_mrad is None else outer_mrad,
                      "mrad")
    return ds.virtual_detectors({"image": annulus})
