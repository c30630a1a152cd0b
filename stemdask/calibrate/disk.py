"""The bright-field disk in a PACBED, and the detector's defects: pure NumPy/SciPy functions.

* **Defects** (:func:`find_defects`): a pixel's sum over the scan is compared with the
  percentiles of its 5×5 neighbourhood (the pixel itself left out), robust against the disk
  edge, Bragg disks and neighbouring defects. *Dead*: it counts ≤ 5 % of the 25th percentile
  while that is significant (≥ ``min_expected`` electrons over the scan, where a Poisson
  count that low is impossible). *Hot*: it counts ≥ 3× the 75th percentile plus 20 standard
  deviations. A row or column
  whose significant pixels are mostly dead is masked whole (dead readout line).
* **Filling** (:func:`inpaint`): masked pixels of a pattern take the mean of their unmasked
  neighbours, repeated outwards (normalised convolution), so a dead column inside the disk
  does not cut it.
* **BF disk** (:func:`fit_bf_disk`): not a threshold (overlapping Bragg disks of a tilted
  crystal, brighter than half the BF plateau, drag a thresholded disk by pixels) but the
  disk's *edge*: along 180 rays from a first centre, the radius of the steepest fall of the
  (σ = 1 px smoothed, filled) PACBED within 0.5–1.5 R, located sub-pixel by a parabola; then a
  circle fitted to those edge points with outliers (rays where a Bragg disk continues the
  disk) rejected at 3 median absolute deviations, twice re-sampled from the new centre.
  A Bragg disk that overlaps the BF disk still leaves the BF edge as the steepest fall on
  almost every ray (the BF plateau is the brightest region), and a ray that picks a Bragg
  edge instead is an outlier of the circle. The quality is the RMS distance of the inlier
  edge points from the circle (px) and the fraction of rays that are inliers.
  For a hard aperture edge the steepest fall is the aperture radius; for abTEM's soft
  amplitude taper it reads ≈ 0.2 px inside the nominal radius.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..errors import InvalidParameter

#: Defect thresholds (see the module docstring).
DEAD_FRACTION = 0.05
HOT_FACTOR = 3.0
HOT_SIGMAS = 20.0
MIN_EXPECTED = 30.0


def _ring_percentile(img: np.ndarray, percentile: float, size: int = 5) -> np.ndarray:
    footprint = np.ones((size, size), bool)
    footprint[size // 2, size // 2] = False
    return ndimage.percentile_filter(img, percentile, footprint=footprint, mode="nearest")


def find_defects(pacbed: np.ndarray, min_expected: float = MIN_EXPECTED) -> dict:
    """Hot and dead pixels, dead rows and columns of a detector from its PACBED (a sum of
    counts over the scan). Returns {hot, dead: bool (det_y, det_x), dead_rows, dead_columns:
    lists of indices, mask: hot | dead (with whole dead lines)}."""
    img = np.asarray(pacbed, dtype=np.float64)
    if img.ndim != 2 or not np.isfinite(img).all():
        raise InvalidParameter("PACBED must be a finite 2-D image")
    # next to the disk edge half the neighbourhood is dark: a dead pixel is far below even its
    # darker neighbours (25th percentile), a hot one far above even its brighter ones (75th)
    low, high = _ring_percentile(img, 25), _ring_percentile(img, 75)
    significant = low >= min_expected
    dead = significant & (img <= DEAD_FRACTION * low)
    hot = img >= HOT_FACTOR * high + HOT_SIGMAS * np.sqrt(high + 1.0)
    lines = {}
    for axis, name in ((0, "dead_columns"), (1, "dead_rows")):
        n_sig = significant.sum(axis=axis)
        n_dead = dead.sum(axis=axis)
        lines[name] = [int(i) for i in np.flatnonzero((n_sig >= 3) & (n_dead > 0.5 * n_sig))]
    mask = hot | dead
    mask[:, lines["dead_columns"]] = True
    mask[lines["dead_rows"], :] = True
    return {"hot": hot, "dead": dead & ~hot, "mask": mask, **lines}


def inpaint(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``img`` with its ``mask``-ed pixels replaced by the mean of unmasked neighbours (3×3),
    repeated outwards until every masked pixel has a value."""
    out = np.asarray(img, dtype=np.float64).copy()
    todo = np.asarray(mask, dtype=bool).copy()
    if todo.all():
        raise InvalidParameter("the mask covers every detector pixel")
    kernel = np.ones((3, 3))
    while todo.any():
        known = (~todo).astype(np.float64)
        total = ndimage.convolve(out * known, kernel, mode="constant")
        weight = ndimage.convolve(known, kernel, mode="constant")
        fill = todo & (weight > 0)
        out[fill] = total[fill] / weight[fill]
        todo &= ~fill
    return out


def _coarse_disk(smooth: np.ndarray) -> tuple[float, float, float]:
    """Centre (y, x) and radius of the largest region above half the smoothed maximum."""
    bright = smooth > 0.5 * smooth.max()
    labels, n = ndimage.label(bright)
    if n == 0:
        raise InvalidParameter("no bright-field disk found in the PACBED")
    sizes = np.bincount(labels.ravel())[1:]
    region = labels == 1 + int(np.argmax(sizes))
    if region.sum() < 5:
        raise InvalidParameter("no bright-field disk found in the PACBED (fewer than 5 bright pixels)")
    yy, xx = np.nonzero(region)
    return float(yy.mean()), float(xx.mean()), math.sqrt(region.sum() / math.pi)


def _edge_points(img: np.ndarray, smooth: np.ndarray, cy: float, cx: float, radius: float, n_rays: int = 180):
    """Edge radius along each ray: (angles, radii, fall strength).

    The steepest fall of the smoothed profile within 0.5–1.5 R locates the edge; it is then
    refined on the unsmoothed profile to where it crosses half-way between its levels 2.5 px
    inside and outside (the edge of an area-sampled hard aperture, unbiased by the pixel grid).
    """
    step = 0.125
    r = np.arange(0.5 * radius - 3, 1.5 * radius + 3 + step, step)
    theta = np.linspace(0, 2 * np.pi, n_rays, endpoint=False)
    ys = cy + np.sin(theta)[:, None] * r[None, :]
    xs = cx + np.cos(theta)[:, None] * r[None, :]
    grad = np.gradient(ndimage.map_coordinates(smooth, [ys, xs], order=1, mode="nearest"), step, axis=1)
    search = (r >= 0.5 * radius) & (r <= 1.5 * radius)
    i = np.argmin(np.where(search[None, :], grad, np.inf), axis=1)
    fall = -grad[np.arange(n_rays), i]
    raw = ndimage.map_coordinates(img, [ys, xs], order=1, mode="nearest")
    w = int(round(2.5 / step))
    radii = np.empty(n_rays)
    for k in range(n_rays):
        lo, hi = max(i[k] - w, 0), min(i[k] + w, r.size - 1)
        seg = raw[k, lo : hi + 1]
        half = 0.5 * (raw[k, lo] + raw[k, hi])
        below = np.flatnonzero(seg < half)
        j = below[0] if below.size else seg.size - 1
        if j == 0:
            radii[k] = r[lo]
            continue
        a, b = seg[j - 1], seg[j]
        radii[k] = r[lo + j - 1] + step * ((a - half) / (a - b) if a != b else 0.5)
    return theta, radii, fall


def _fit_circle(y: np.ndarray, x: np.ndarray) -> tuple[float, float, float]:
    """Least-squares (Kåsa) circle through points: centre (y, x), radius."""
    a = np.column_stack([2 * y, 2 * x, np.ones_like(y)])
    (cy, cx, c), *_ = np.linalg.lstsq(a, y**2 + x**2, rcond=None)
    return float(cy), float(cx), float(math.sqrt(max(c + cy**2 + cx**2, 0.0)))


def fit_bf_disk(pacbed: np.ndarray, mask: np.ndarray | None = None, passes: int = 3) -> dict:
    """BF-disk centre (y, x) px (pixel centres at integers) and radius (px) from its edge.

    ``mask``: detector pixels to ignore (filled by :func:`inpaint` first). Returns
    {center, radius, rms_px (inlier edge points' distance from the circle), inlier_fraction,
    center_error_px (≈ rms/√(inliers/2)), edge_contrast (median fall at the edge over the
    plateau, per px)}. Raises ValueError when no disk is found.
    """
    img = np.asarray(pacbed, dtype=np.float64)
    if img.ndim != 2 or not np.isfinite(img).all() or img.max() <= 0:
        raise InvalidParameter("PACBED must be a finite 2-D image with some counts")
    if mask is not None and np.any(mask):
        img = inpaint(img, mask)
    smooth = ndimage.gaussian_filter(img, 1.0)
    cy, cx, radius = _coarse_disk(smooth)
    for _ in range(passes):
        theta, r, fall = _edge_points(img, smooth, cy, cx, radius)
        py, px = cy + r * np.sin(theta), cx + r * np.cos(theta)
        keep = fall > 0
        for _ in range(3):
            if keep.sum() < 8:
                raise InvalidParameter("no bright-field disk edge found in the PACBED")
            cy, cx, radius = _fit_circle(py[keep], px[keep])
            resid = np.hypot(py - cy, px - cx) - radius
            mad = np.median(np.abs(resid[keep] - np.median(resid[keep])))
            keep = (fall > 0) & (np.abs(resid) <= max(3 * 1.4826 * mad, 0.3))
    rms = float(np.sqrt(np.mean(resid[keep] ** 2)))
    yy, xx = np.meshgrid(np.arange(img.shape[0]) - cy, np.arange(img.shape[1]) - cx, indexing="ij")
    inner = np.hypot(yy, xx) < 0.6 * radius
    plateau = float(np.median(img[inner])) if inner.any() else float(img.max())
    return {
        "center": (cy, cx),
        "radius": radius,
        "rms_px": rms,
        "inlier_fraction": float(keep.mean()),
        "center_error_px": rms / math.sqrt(max(keep.sum() / 2, 1)),
        "edge_contrast": float(np.median(fall[keep]) / plateau) if plateau > 0 else 0.0,
    }
