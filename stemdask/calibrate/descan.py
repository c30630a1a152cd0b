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

from ..errors import InvalidParameter
from ..optics import DESCAN_TERMS, descan_offsets, descan_terms, scan_fractions

MODELS = ("off", *DESCAN_TERMS)


def fit_descan(com_y: np.ndarray, com_x: np.ndarray, model: str = "plane") -> tuple[dict | None, np.ndarray]:
    """Fit the descan of an absolute COM field (detector px, (ny, nx) each).

    Returns (the ``Calibration.descan`` record or None for ``model="off"``, the COM at the
    scan centre (y, x) px — the constant term). The record's offsets have no constant term.
    """
    if model not in MODELS:
        raise InvalidParameter(f"descan model must be one of {MODELS}, got {model!r}")
    com_y = np.asarray(com_y, dtype=np.float64)
    com_x = np.asarray(com_x, dtype=np.float64)
    good = np.isfinite(com_y) & np.isfinite(com_x)
    if good.sum() < 10:
        raise InvalidParameter("too few positions with electrons to fit the descan")
    if model == "off":
        return None, np.array([np.median(com_y[good]), np.median(com_x[good])])
    u, v = scan_fractions(com_y.shape)
    design = np.concatenate([np.ones((1,) + u.shape), descan_terms(model, u, v)]).reshape(-1, u.size).T
    target = np.stack([com_y.ravel(), com_x.ravel()], axis=1)
    use = good.ravel()
    for _ in range(3):  # least squares by the normal equations: a few centred monomials, well conditioned
        kept = design * use[:, None]
        normal = kept.T @ design
        if np.linalg.matrix_rank(normal) < normal.shape[0]:  # positions that do not fix every term
            coef, *_ = np.linalg.lstsq(design[use], target[use], rcond=None)
        else:
            coef = np.linalg.solve(normal, kept.T @ np.where(use[:, None], target, 0.0))
        resid = np.hypot(*(target - design @ coef).T)
        scale = 1.4826 * np.median(resid[use]) + 1e-12
        use = good.ravel() & (resid <= 4 * scale)
    record = {"model": model, "coef_y": [float(c) for c in coef[1:, 0]], "coef_x": [float(c) for c in coef[1:, 1]]}
    return record, coef[0]


def descan_span_px(descan: dict | None, scan_shape) -> float:
    """The largest distance (px) the disk moves from its scan-centre position."""
    dy, dx = descan_offsets(descan, scan_shape)
    return float(np.hypot(dy, dx).max())


def com_response(pattern: np.ndarray, keep: np.ndarray, fill: np.ndarray, step_px: float = 0.5) -> np.ndarray:
    """How the COM measured through a detector window follows a shift of the pattern: the 2×2
    matrix K with δCOM = K·δ (px per px), from the pattern (e.g. the PACBED) shifted by
    ±``step_px`` along each axis (cubic spline; what is shifted in at the window's edge comes
    from its own neighbourhood).

    ``keep`` (det_y, det_x) bool: the pixels counted; ``fill``: the masked pixels' fill weights
    (as :mod:`stemdask.reductions` applies them: COM = (mean of the kept + Σ fill·position) /
    (1 + Σ fill)). K = 1 for a pattern wholly inside an unmasked window; intensity at the
    window's edge (a Bragg or diffuse background that does not leave the window as the disk
    moves) and static fills shrink it — a COM-measured descan divided by K is the disk's move.
    """
    from scipy import ndimage

    yy, xx = np.indices(pattern.shape, dtype=np.float64)
    f0, fy, fx = float(fill.sum()), float((fill * yy).sum()), float((fill * xx).sum())

    def com(p):
        p = np.where(keep, p, 0.0)
        n = p.sum()
        return np.array([((p * yy).sum() / n + fy) / (1 + f0), ((p * xx).sum() / n + fx) / (1 + f0)])

    k = np.empty((2, 2))
    for j in range(2):
        d = np.zeros(2)
        d[j] = step_px
        plus = ndimage.shift(pattern, d, order=3, mode="nearest")
        minus = ndimage.shift(pattern, -d, order=3, mode="nearest")
        k[:, j] = (com(plus) - com(minus)) / (2 * step_px)
    return k


def corrected(record: dict | None, response: np.ndarray) -> dict | None:
    """The descan ``record`` fitted to a windowed COM, turned into the disk's own move (K⁻¹·)."""
    if record is None:
        return None
    inv = np.linalg.inv(response)
    coef = inv @ np.array([record["coef_y"], record["coef_x"]], dtype=np.float64)
    return {"model": record["model"], "coef_y": [float(c) for c in coef[0]], "coef_x": [float(c) for c in coef[1]]}
