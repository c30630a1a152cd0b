"""Methods "virtual" (an annular virtual detector) and "com" (centre of mass) for ``stemdask reconstruct``."""

from __future__ import annotations

import math

import xarray as xr

from . import add_option, register


def _virtual_options(p) -> None:
    add_option(p, "--inner-mrad", type=float, default=0.0, metavar="MRAD",
               help="virtual detector inner angle around the BF centre (mrad, default 0)")
    add_option(p, "--outer-mrad", type=float, default=math.inf, metavar="MRAD",
               help="virtual detector outer angle (mrad, default: the detector edge)")


def com_options(p) -> None:
    """``--com-reference``: shared by every method that starts from the COM."""
    add_option(p, "--com-reference", default=None, choices=["bf", "mean"],
               help="COM reference: the calibrated BF-disk centre or the mean COM (default: bf for the com "
                    "product, mean for the phase methods — a constant COM is no phase contrast but a bias, "
                    "e.g. of a diffuse background the detector edge cuts unevenly)")


@register("virtual", "annular virtual detector image (electrons), variable 'image'", _virtual_options)
def run_virtual(ds, args) -> xr.Dataset:
    image = ds.virtual(inner=args.inner_mrad, outer=args.outer_mrad, units="mrad", name="image")
    return image.to_dataset()


@register("com", "centre of mass (detector frame, px), variables 'com_y', 'com_x'", com_options)
def run_com(ds, args) -> xr.Dataset:
    return ds.com(reference=args.com_reference or "bf", units="px")
