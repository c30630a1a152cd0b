"""Descan: how the bright-field disk moves over the scan, fitted as a smooth field.

The COM of a pattern, measured from a fixed detector point, is the disk's own offset plus
the phase-contrast deflection ∇φ/2π blurred by the probe. Over the scan the deflection
averages out (it is the gradient of a bounded phase), while the descan is a low-order
polynomial of the scan position (the scan coils' crosstalk into the projector: a plane, or
a quadratic for a large field), so a least-squares polynomial in the centred scan fractions
(:func:`stemdask.optics.scan_fractions`) of the COM measures it, the phase contrast leaking
in only through its own low-order polynomial part — small and, for a periodic object over a
whole number of periods, exactly zero. Positions without electrons (NaN) and outliers (beyond
4 robust standard deviations of the residual) are left out of the fit.
"""

from __future__ import annotations

import numpy as np

from ..optics import DESCAN_TERMS, descan_offsets, descan_terms, scan_fractions

MODELS = ("off", *DESCAN_TERMS)


def fit_descan(com_y: np.ndarray, com_x: np.ndarray, model: str = "plane") -> tuple[dict | None, np.ndarray]:
    """Fit the descan of an absolute COM field (detector px, (ny, nx) each).

    Returns (the ``Calibration.descan`` record or None for ``model="off"``, the COM at the
    scan centre (y, x) px — the constant term). The record's offsets have no constant term.
    """
    if model not in MODELS:
        raise ValueError(f"descan model must be one of {MODELS}, got {model!r}")
    com_y = np.asarray(com_y, dtype=np.float64)
    com_x = np.asarray(com_x, dtype=np.float64)
    good = np.isfinite(com_y) & np.isfinite(com_x)
    if good.sum() < 10:
        raise ValueError("too few positions with electrons to fit the descan")
    if model == "off":
        return None, np.array([np.median(com_y[good]), np.median(com_x[good])])
    u, v = scan_fractions(com_y.shape)
    design = np.concatenate([np.ones((1,) + u.shape), descan_terms(model, u, v)]).reshape(-1, u.size).T
    target = np.stack([com_y.ravel(), com_x.ravel()], axis=1)
    use = good.ravel()
    for _ in range(3):
        coef, *_ = np.linalg.lstsq(design[use], target[use], rcond=None)
        resid = np.hypot(*(target - design @ coef).T)
        scale = 1.4826 * np.median(resid[use]) + 1e-12
        use = good.ravel() & (resid <= 4 * scale)
    record = {"model": model, "coef_y": [float(c) for c in coef[1:, 0]], "coef_x": [float(c) for c in coef[1:, 1]]}
    return record, coef[0]


def descan_span_px(descan: dict | None, scan_shape) -> float:
    """The largest distance (px) the disk moves from its scan-centre position."""
    dy, dx = descan_offsets(descan, scan_shape)
    return float(np.hypot(dy, dx).max())
