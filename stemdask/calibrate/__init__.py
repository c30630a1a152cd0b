"""Calibration from the data alone: detector defects, BF disk, descan, scan rotation, flip, defocus.

:func:`calibrate` reads the events one to four times:

1. the PACBED, and dense patterns of the whole detector binned to ≤ 40 px a side over a scan
   binned to ≤ 128 positions a side (binned as they are densified, each read decoded once),
   and the COM in the window the stored or nominal BF disk predicts (:func:`_planned_window`);
2. the COM inside the BF disk's window (radius + :data:`COM_MARGIN_PX`, masked pixels filled;
   repeated with a wider window when the fitted drift needs it, at most three times) — unless
   the fitted disk and the defects give the window pass 1 already read; with a vacuum scan
   (``vacuum=``) also its PACBED and COM.

From the PACBED: hot and dead pixels and lines (:func:`~stemdask.calibrate.disk.find_defects`),
joined with a user mask, then the BF disk from its edge
(:func:`~stemdask.calibrate.disk.fit_bf_disk`). From the window's COM: the descan
(:func:`~stemdask.calibrate.descan.fit_descan`) divided by the window's response K
(:func:`~stemdask.calibrate.descan.com_response`: a background that stays in the window
dilutes the move) — or from the vacuum scan's COM, free of the sample's own low-order COM —
and the whole detector's K stored with it (batch and live COM subtract K·offset); then,
with the window's own drift removed, the COM curl test. The dark field's electrons (Bragg
disks, thermal diffuse scattering) carry no phase-gradient signal but most of the COM's noise,
and a detector edge that cuts them unevenly adds a curl: hence the window.
From the dense patterns: the parallax of the BF images and the annular dark-field image that
decides the half turn (:mod:`stemdask.calibrate.orientation` explains the physics).

Two routes to the orientation, each checked against the ADF image (rules in :func:`_orientation`):

* **COM curl** (any defocus: the COM field is ∇φ blurred by the probe intensity): θ mod 180°
  and the flip; its iCOM image against the ADF image gives the half turn;
* **parallax** when the BF images are measurably shifted (defocused data): flip from det M,
  θ mod 180° and |C10| from M; the iCOM image in that orientation against the ADF image gives
  the half turn and with it the sign of C10.

A route is *confirmed* when its own evidence measured θ and the flip — θ to a standard
error ≤ :data:`MAX_SIGMA_DEG` (3σ within 1°); the parallax only where aligning the BF images
sharpens them (:data:`PARALLAX_MIN_GAIN`: in-focus crystals show DPC-like BF-image "shifts"
of about an ångström that are no parallax) — and the ADF image decides its half turn at
|z| ≥ :data:`~stemdask.calibrate.orientation.MIN_ADF_Z`. The ADF agreement decides only the
half turn: on a crystal a candidate rotated by a
symmetry of the lattice resembles the ADF image too, so θ and the flip rest on the COM and
the parallax alone, and ``rotation_reliable`` is true only when a route is confirmed and no
two measured orientations disagree. C10 is estimated where the parallax is measured, its
half turn decided and no orientation disagrees with it. Otherwise the stored rotation and flip are kept and the result
says why.
"""

from __future__ import annotations

import math
import os

import dask
import numpy as np

from ..errors import InvalidParameter
from ..optics import descan_gradient, descan_offsets
from ..store import open_store
from .descan import com_response, corrected, descan_span_px, fit_descan
from .disk import find_defects, fit_bf_disk, inpaint
from .orientation import MIN_ADF_Z, _wrap90, _wrap180, half_turn, icom_phase, parallax, probe_otf, rotation_from_com

#: Parallax is used when the shifts across the BF disk reach this many (binned) scan steps …
PARALLAX_MIN_SHIFT_STEPS = 2.0
#: … and M is this close to a scaled rotation or reflection (‖M − p·R·F‖ / ‖p·R·F‖) …
PARALLAX_MAX_SIMILARITY_ERROR = 0.2
#: … and aligning the BF images by M sharpens their mean this much (contrast power; in-focus
#: BF images are DPC-like and show apparent shifts of ~1 Å that align to nothing: ≤ 1.06 on
#: the simulator, against ≥ 4 at |C10| = 100 Å without a Bragg background, 1.3–1.8 with one).
PARALLAX_MIN_GAIN = 1.5
#: The COM rotation is measured when even the best angle leaves at most this fraction of the
#: field's solenoidal energy (noise-dominated COM: ≥ 0.95), and the flip when the other
#: flip leaves at least this factor more.
COM_MAX_CURL_FRACTION = 0.8
COM_MIN_FLIP_RATIO = 1.25
#: A rotation (COM curl or parallax) is trusted when its standard error is at most this: 3σ within 1°.
MAX_SIGMA_DEG = 1.0 / 3.0
#: COM and parallax must agree to this many degrees (θ mod 180°) when both measured one.
MAX_DISAGREEMENT_DEG = 3.0
#: A fitted descan is applied only when it moves the disk by at least this much (px): below it
#: the fit mostly measures the phase contrast's own low-order part (0.03 px on an in-focus
#: simulation with none), and subtracting that plane from the COM adds a quadratic ramp to
#: every integrated phase (iCOM r 0.96 → 0.79 there).
DESCAN_MIN_SPAN_PX = 0.1
#: The calibration's COM uses the detector pixels within the BF radius plus this many pixels of
#: the disk centre (room for the descan: a larger fitted drift repeats the pass with more room).
COM_MARGIN_PX = 4.0
#: Nominal semi-angle and measured radius × pixel size: warn above this relative difference.
RADIUS_TOLERANCE = 0.02
#: Pass-1 binning targets: detector ≤ this many binned pixels a side, scan ≤ this many positions.
DETECTOR_BINNED = 40
SCAN_BINNED = 128


def _binned_mask(mask: np.ndarray, y0: int, x0: int, b: int, n: int) -> np.ndarray:
    """(n, n) bool: output pixels of a densify crop (origin y0, x0, bin b) touching a masked pixel."""
    dy, dx = mask.shape
    out = np.zeros((n, n), bool)
    for a in range(n):
        ys = slice(max(y0 + a * b, 0), max(min(y0 + (a + 1) * b, dy), 0))
        for c in range(n):
            xs = slice(max(x0 + c * b, 0), max(min(x0 + (c + 1) * b, dx), 0))
            out[a, c] = bool(mask[ys, xs].any())
    return out


def _bin_image(img: np.ndarray, f: int) -> np.ndarray:
    """Block mean of a 2-D image by f × f (trailing rows/columns dropped), as ``bin_scan``."""
    if f == 1:
        return img
    ny, nx = (img.shape[0] // f) * f, (img.shape[1] // f) * f
    return img[:ny, :nx].reshape(ny // f, f, nx // f, f).mean(axis=(1, 3))


def calibrate(
    ds, mask=None, descan: str = "plane", detect_defects: bool = True, vacuum=None
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Calibrate an :class:`~stemdask.events.EventDataset`; see the module docstring.

    ``mask``: a user's bool (det_y, det_x) mask (True = exclude), joined with the defects
    found. ``descan``: "off", "plane" or "quadratic". ``vacuum``: an EventDataset of the same
    scan recorded without a sample (same scan settings and detector; any sampling of the same
    field): the descan is fitted to its COM instead. With a sample in the beam the COM's plane
    part is the descan *plus* the sample's own (the gradient of its quadratic part: 0.05–0.1 px
    on the simulator), which no fit can tell apart; the vacuum scan has no sample to leak in.
    Returns (result dict, JSON-serialisable; the detector mask used; its fill weights).
    """
    det = tuple(ds.detector_shape)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != det:
            raise InvalidParameter(f"the mask has shape {mask.shape}, the detector is {det[0]}×{det[1]}")
        mask = mask.astype(bool)
    cal = ds.calibration
    raw = ds.with_mask(None, None).with_calibration(descan=None).decode_once()  # PACBED, patterns, COM of each read
    b0 = max(1, math.ceil(max(det) / DETECTOR_BINNED))
    f = max(1, math.ceil(max(ds.scan_shape) / SCAN_BINNED))
    small = raw.bin_scan(f) if f > 1 else raw
    whole = small.densify(radius_px=max(det) / 2 + 1, center=(det[0] / 2, det[1] / 2), bin=b0)
    plan = _planned_window(cal, det)  # the COM window the stored or nominal disk predicts: read in this pass too
    planned_com = [] if plan is None else [raw.with_mask(~plan, np.zeros(det)).com(reference=(0.0, 0.0))]
    pacbed, dense, *planned_com = dask.compute(raw.pacbed().data, whole.data, *planned_com)
    pacbed = np.asarray(pacbed, dtype=np.float64)

    defects = (
        find_defects(pacbed)
        if detect_defects
        else {"mask": np.zeros(det, bool), "hot": np.zeros(det, bool), "dead": np.zeros(det, bool), "dead_rows": [],
              "dead_columns": []}
    )
    full_mask = defects["mask"] | (mask if mask is not None else False)
    try:
        disk = fit_bf_disk(pacbed, full_mask)
    except InvalidParameter as e:
        hint = " (the mask may hide it)" if mask is not None and mask.any() else ""
        raise InvalidParameter(f"{ds.store.path}: {e}{hint}") from None
    yy, xx = np.indices(det)
    in_disk = np.hypot(yy - disk["center"][0], xx - disk["center"][1]) < disk["radius"]
    if mask is not None and in_disk.any() and full_mask[in_disk].mean() > 0.5:
        raise InvalidParameter(
            f"the mask hides {100 * full_mask[in_disk].mean():.0f} % of the bright-field disk; "
            "nothing would be left to measure"
        )
    filled = inpaint(pacbed, full_mask) if full_mask.any() else pacbed
    fill = _fill_weights(filled, full_mask, ~full_mask)

    # the COM inside the disk's region: the descan (corrected for the window, see com_response)
    # and the orientation (its own drift fit removed)
    margin = COM_MARGIN_PX
    vacuum_record = None if vacuum is None else _vacuum_descan(vacuum, ds, full_mask, descan)
    for _ in range(3):
        keep, region_fill = _bf_window(full_mask, filled, disk, disk["radius"] + margin)
        if planned_com and np.array_equal(keep, plan) and not region_fill.any():
            bf_com = planned_com.pop()  # the window the first pass read was the right one
        else:
            bf_com = raw.with_mask(~keep, region_fill).com(reference=(0.0, 0.0)).compute()
        com_y, com_x = bf_com.com_y.values, bf_com.com_x.values
        own, c0 = fit_descan(com_y, com_x, descan)
        record = corrected(own, _response(filled, keep, region_fill)) if vacuum is None else vacuum_record
        drift = _max_drift_px(record, ds.scan_shape)
        if not math.isfinite(drift):
            raise InvalidParameter(f"{ds.store.path}: the descan fit is not finite (too few electrons in the BF disk?)")
        if drift <= margin - 1.0:
            break
        margin = drift + 2.0  # the disk leaves the region somewhere: again with room for it
    else:
        raise InvalidParameter(
            f"{ds.store.path}: the BF disk drifts {drift:.1f} px over the scan, more than the "
            "calibration can follow; try --descan off to see the raw drift, or check the scan"
        )
    fitted_span = descan_span_px(record, ds.scan_shape)
    if vacuum is None and record is not None and fitted_span < DESCAN_MIN_SPAN_PX:
        record = own = None  # below what the COM can tell from phase contrast: applying it would only add a ramp
    if record is not None:  # the whole detector's COM follows the disk by K (detector edge, mask fills)
        record["com_response"] = _response(filled, ~full_mask, fill).tolist()
    off_y, off_x = descan_offsets(record, ds.scan_shape)
    center = (disk["center"][0] - float(off_y.mean()), disk["center"][1] - float(off_x.mean()))
    own_y, own_x = descan_offsets(own, ds.scan_shape)  # the drift as this window sees it
    res_y, res_x = com_y - c0[0] - own_y, com_x - c0[1] - own_x

    result = {
        "bf_center": [float(center[0]), float(center[1])],
        "bf_radius": float(disk["radius"]),
        "bf_fit": {k: v for k, v in disk.items() if k not in ("center", "radius")},
        "defects": {"hot": np.argwhere(defects["hot"]).tolist(), "dead": np.argwhere(defects["dead"]).tolist(),
                    "dead_rows": defects["dead_rows"], "dead_columns": defects["dead_columns"],
                    "user_mask_pixels": int(mask.sum()) if mask is not None else 0,
                    "masked_pixels": int(full_mask.sum())},
        "descan": record,
        "descan_source": "sample COM" if vacuum is None else f"vacuum scan {vacuum.store.path}",
        "descan_span_px": descan_span_px(record, ds.scan_shape),
        "descan_fitted_span_px": fitted_span,
        "messages": [],
    }
    result.update(
        _orientation(
            ds, cal, small, f, whole, dense, full_mask, center, disk["radius"], record, res_y, res_x
        )
    )
    result["messages"] = result.pop("notes")
    if cal.semiangle_mrad is not None:
        measured = disk["radius"] * cal.detector_pixel_mrad
        rel = measured / cal.semiangle_mrad - 1
        result["radius_vs_semiangle"] = rel
        if abs(rel) > RADIUS_TOLERANCE:
            result["messages"].append(
                f"BF radius {disk['radius']:.2f} px × {cal.detector_pixel_mrad:g} mrad/px = {measured:.2f} mrad "
                f"differs by {100 * rel:+.1f} % from the nominal semi-angle {cal.semiangle_mrad:g} mrad: the pixel "
                "size or the semi-angle is wrong. SSB and virtual detectors use the measured radius (trotter "
                "boundaries, BF/ADF annuli); every reciprocal length (Å⁻¹) comes from the pixel size"
            )
    result["summary"] = _summary(result)
    return result, full_mask, fill


def _response(pattern, keep, fill) -> np.ndarray:
    """:func:`com_response`, refused when it is far from 1 (the window then hides the disk's move)."""
    k = com_response(pattern, keep, fill)
    eig = np.linalg.eigvals(k).real
    if eig.min() < 0.2 or eig.max() > 1.2:
        raise InvalidParameter(
            f"the COM window follows the disk by {eig.min():.2f}–{eig.max():.2f} of its move (expected "
            "≈ 1): the mask or the background hides the BF disk; check the mask"
        )
    return k


def _vacuum_descan(vacuum, ds, mask, model: str) -> dict | None:
    """The descan fitted to the whole-detector COM of a vacuum scan of the same field."""
    if tuple(vacuum.detector_shape) != tuple(ds.detector_shape):
        raise InvalidParameter(
            f"{vacuum.store.path}: the vacuum scan's detector is {vacuum.detector_shape}, "
            f"the sample's {ds.detector_shape}"
        )
    raw = vacuum.with_mask(None, None).with_calibration(descan=None)
    pacbed = np.asarray(raw.pacbed().compute().values, dtype=np.float64)
    filled = inpaint(pacbed, mask) if mask.any() else pacbed
    fill = _fill_weights(filled, mask, ~mask)
    com = raw.with_mask(mask, fill).com(reference=(0.0, 0.0)).compute()
    record, _ = fit_descan(com.com_y.values, com.com_x.values, model)
    # in vacuum the whole pattern is the disk: K corrects only the mask's static fill
    return corrected(record, _response(filled, ~mask, fill))


def _fill_weights(filled, masked, kept) -> np.ndarray:
    """Fill weights of the ``masked`` pixels (see :mod:`stemdask.reductions`): the inpainted PACBED
    ``filled`` relative to the ``kept`` pixels' sum; 0 elsewhere."""
    return np.where(masked, filled / filled[kept].sum(), 0.0)


def _bf_window(mask, filled, disk, radius) -> tuple[np.ndarray, np.ndarray]:
    """The pixels of the window (:func:`_window_outside`) around the PACBED's disk centre that
    are not masked (bool), and the fill weights of the masked ones among them (from the PACBED
    ``filled``)."""
    outside = _window_outside(mask.shape, disk["center"], radius)
    keep = ~(mask | outside)
    return keep, _fill_weights(filled, mask & ~outside, keep)


def _window_outside(shape, center, radius) -> np.ndarray:
    """Pixels farther than ⌈radius⌉ from ``center`` rounded to half a pixel: a whole-pixel
    geometry, so that the window planned from the stored or nominal disk before the PACBED is
    read (:func:`_planned_window`) is mostly the very window of the fitted disk."""
    cy, cx = (round(2 * c) / 2 for c in center)
    yy, xx = np.indices(shape)
    return np.hypot(yy - cy, xx - cx) > math.ceil(radius)


def _planned_window(cal, det) -> np.ndarray | None:
    """The COM window (bool, True = in) of the disk the calibration predicts — the stored BF disk,
    else the nominal one (semi-angle / pixel size at the detector centre, k = 0 at N/2) — with no
    masked pixels, or None where it predicts none. :func:`calibrate` computes its COM in the
    first pass and uses it where the fitted disk and the defects found give the same window."""
    if cal.bf_center is not None and cal.bf_radius is not None:
        center, radius = cal.bf_center, cal.bf_radius
    elif cal.semiangle_mrad and cal.detector_pixel_mrad:
        center, radius = (det[0] / 2, det[1] / 2), cal.semiangle_mrad / cal.detector_pixel_mrad
    else:
        return None
    return ~_window_outside(det, center, radius + COM_MARGIN_PX)


def _max_drift_px(record, scan_shape) -> float:
    """Largest distance (px) of the disk from its scan-mean position under the descan ``record``."""
    if record is None:
        return 0.0
    dy, dx = descan_offsets(record, scan_shape)
    return float(np.hypot(dy - dy.mean(), dx - dx.mean()).max())


def _agree(a: tuple[float, bool], b: tuple[float, bool], modulo: float = 360.0) -> bool:
    """Whether two (θ degrees, flip) orientations agree (θ within MAX_DISAGREEMENT_DEG, mod ``modulo``)."""
    d = (a[0] - b[0] + modulo / 2) % modulo - modulo / 2
    return a[1] == b[1] and abs(d) <= MAX_DISAGREEMENT_DEG


def _orientation(ds, cal, small, f, whole, dense, mask, center, radius, descan, res_y, res_x) -> dict:
    """Rotation, flip, half turn, C10 — and whether the evidence supports them (module docstring)."""
    notes = []
    span = descan_span_px(descan, ds.scan_shape)
    step = cal.scan_step_a
    small_step = small.calibration.scan_step_a
    lam = cal.wavelength_a
    rot = rotation_from_com(res_y, res_x, step)
    curl = rot["curl_fraction"]
    com_measured = curl[rot["flip"]] <= COM_MAX_CURL_FRACTION
    com_flip_ok = curl[not rot["flip"]] >= COM_MIN_FLIP_RATIO * curl[rot["flip"]]

    b0 = whole.attrs["bin"]
    y0, x0 = whole.attrs["crop_origin_px"]
    n = dense.shape[2]
    centres = np.arange(n) * b0 + (b0 - 1) / 2
    py, px = y0 + centres, x0 + centres
    r_px = np.hypot(py[:, None] - center[0], px[None, :] - center[1])
    bad = _binned_mask(mask, y0, x0, b0, n)
    inside = (r_px < radius - b0 - span - 0.5) & ~bad
    dark = (r_px > 1.3 * radius + span + b0) & ~bad & (r_px < min(ds.detector_shape) / 2 * 1.5)
    k_per_px = cal.detector_pixel_mrad * 1e-3 / lam  # Å⁻¹
    k_y, k_x = (py - center[0]) * k_per_px, (px - center[1]) * k_per_px
    semiangle = radius * cal.detector_pixel_mrad
    band = 2 * semiangle * 1e-3 / lam
    adf = None
    if dark.sum() >= 4:  # the dark pixels' sum: a float32 matrix-vector product (≤ 40² counts per position)
        adf = (dense.reshape(*dense.shape[:2], -1) @ dark.ravel().astype(dense.dtype)).astype(np.float64)
    else:
        notes.append("no dark-field pixels beyond the BF disk: the half turn cannot be decided from an ADF image")

    def measured(px) -> bool:  # the BF images are shifted copies: a parallax to use (θ's σ is needed)
        return (
            px["max_shift_a"] >= PARALLAX_MIN_SHIFT_STEPS * max(small_step)
            and px["similarity_error"] <= PARALLAX_MAX_SIMILARITY_ERROR
            and px["alignment_gain"] >= PARALLAX_MIN_GAIN
        )

    px_result = None
    if inside.sum() >= 4:
        gradient = descan_gradient(descan, ds.scan_shape, step)  # px per Å → Å⁻¹ per Å below
        px_result = parallax(dense, k_y, k_x, inside, small_step, lam, sigma_wanted=measured,
                             descan_gradient=None if gradient is None else gradient * k_per_px)
    defocused = px_result is not None and measured(px_result)
    if (
        px_result is not None
        and not defocused
        and px_result["max_shift_a"] >= PARALLAX_MIN_SHIFT_STEPS * max(small_step)
    ):
        notes.append(
            f"BF-image shifts up to {px_result['max_shift_a']:.2f} Å that are no parallax (aligning by them "
            f"sharpens the BF images {px_result['alignment_gain']:.2f}×, need ≥ {PARALLAX_MIN_GAIN}; "
            f"fit error {px_result['similarity_error']:.2f}, need ≤ {PARALLAX_MAX_SIMILARITY_ERROR}): "
            "treated as in focus, no C10 estimate"
        )
    out = {"curl_fraction": {str(k).lower(): float(v) for k, v in curl.items()},
           "com_rotation_deg": float(rot["rotation_deg"]), "com_rotation_sigma_deg": float(rot["rotation_sigma_deg"]),
           "parallax": px_result}

    def checked(theta, flip):
        """(θ after the half turn, the ADF agreement or None) of the iCOM image for (θ, flip):
        iCOM and ADF are both the object blurred by the probe intensity, at any defocus, so
        the probe's transfer at the parallax's |C10| (0 without one) weights their agreement."""
        if adf is None:
            return theta, None
        candidate = _bin_image(icom_phase(res_y, res_x, theta, flip, step), f)
        ht = half_turn(candidate[: adf.shape[0], : adf.shape[1]], adf, small_step, otf, band)
        return (theta if ht["keep"] else theta + 180.0), ht

    otf_c10 = px_result["c10_abs_a"] if defocused else 0.0
    transfer = {}  # the probe's transfer on half_turn's frequency grid, computed once for both routes

    def otf(q):
        key = q.tobytes()
        if key not in transfer:
            transfer[key] = probe_otf(q, lam, semiangle, otf_c10)
        return transfer[key]

    # route 1: the COM curl
    com_precise = rot["rotation_sigma_deg"] <= MAX_SIGMA_DEG
    com_ok = com_measured and com_flip_ok and com_precise
    com_theta, com_ht = checked(rot["rotation_deg"], rot["flip"])
    com_confirmed = com_ok and com_ht is not None and com_ht["decided"]
    if not com_measured:
        notes.append(
            f"the COM field is dominated by noise (curl fraction {curl[rot['flip']]:.2f} > {COM_MAX_CURL_FRACTION})"
        )
    elif not com_flip_ok:
        notes.append(f"the COM curl does not tell the flip apart (curl fractions {curl[False]:.2f} / {curl[True]:.2f})")
    elif not com_precise:
        notes.append(
            f"the COM rotation {rot['rotation_deg']:.1f}° (mod 180) is uncertain by ±{rot['rotation_sigma_deg']:.1f}° "
            f"(1σ; trusted at ≤ {MAX_SIGMA_DEG:.2f}°): more dose or positions would tell"
        )
    # route 2: the parallax (θ mod 180° and flip from M; the half turn from the iCOM image
    # with that orientation; the parallax member θ_p goes with C10 < 0)
    px_theta = px_ht = None
    sigma = px_result["rotation_sigma_deg"] if px_result is not None else None
    px_precise = defocused and sigma is not None and sigma <= MAX_SIGMA_DEG
    if defocused:
        c10_abs = px_result["c10_abs_a"]
        px_theta, px_ht = checked(px_result["rotation_deg"], px_result["flip"])
        if not px_precise:
            spread = (
                "of unknown precision (a pixel group's refinement left the lattice-safe neighbourhood)"
                if sigma is None
                else f"uncertain by ±{sigma:.1f}° (1σ; trusted at ≤ {MAX_SIGMA_DEG:.2f}°)"
            )
            notes.append(f"the parallax rotation {_wrap90(px_result['rotation_deg']):.1f}° (mod 180) is {spread}")
    px_confirmed = px_precise and px_ht is not None and px_ht["decided"]

    com_o = (com_theta, rot["flip"])
    px_o = None if px_theta is None else (px_theta, px_result["flip"])
    # every orientation measured (θ mod 180° and flip) must agree with each confirmed one
    conflict = com_measured and px_o is not None and not _agree(com_o, px_o, 180.0)
    if conflict:
        notes.append(
            f"the COM curl ({_wrap90(com_theta):.1f}° mod 180, flip {rot['flip']}) and the parallax "
            f"({_wrap90(px_theta):.1f}° mod 180, flip {px_result['flip']}) disagree"
        )
    if px_confirmed and com_confirmed and not _agree(com_o, px_o):
        conflict = True
        notes.append("the COM and the parallax images agree with the ADF image only at opposite half turns")
    if px_confirmed and not (conflict and com_confirmed):
        method, (theta, flip), ht = ("parallax+com" if com_confirmed else "parallax"), px_o, px_ht
    elif com_confirmed:
        method, (theta, flip), ht = "com", com_o, com_ht
    else:
        method, (theta, flip), ht = ("parallax", px_o, px_ht) if defocused else ("com", com_o, com_ht)
    reliable = (px_confirmed or com_confirmed) and not conflict
    routes = [(name, h) for name, h in (("COM", com_ht), ("parallax", px_ht)) if h is not None]
    if adf is not None and not conflict and not any(h["decided"] for _, h in routes):
        z = ", ".join(f"{name} z = {h['z']:.1f}" for name, h in routes)
        notes.append(f"the ADF image decides no half turn ({z}; need |z| ≥ {MIN_ADF_Z:g})")

    # C10's sign comes with the half turn at the parallax's θ_p (θ_p goes with C10 < 0): from the
    # final orientation when it is reliable, else from the parallax's own ADF agreement, which
    # decides it even where θ is not precise enough to be trusted
    c10 = None
    if defocused and reliable:
        c10 = -c10_abs if _agree((theta, flip), (px_result["rotation_deg"], px_result["flip"])) else c10_abs
    elif defocused and px_ht is not None and px_ht["decided"] and not conflict:
        c10 = -c10_abs if px_ht["keep"] else c10_abs
    elif defocused:
        why = "the COM and the parallax disagree" if conflict else "the ADF image does not decide it"
        notes.append(
            f"BF-image shifts up to {px_result['max_shift_a']:.2f} Å: |C10| = {c10_abs:.0f} Å, but not its "
            f"sign ({why}): no C10 estimate (SSB without --c10 picks the sign by its focus criterion)"
        )
    out.update(
        {
            "rotation_deg": float(_wrap180(theta)),
            "flip": bool(flip),
            "method": method,
            "rotation_reliable": bool(reliable),
            "c10_estimate_a": None if c10 is None else float(c10),
            "c10_magnitude_a": float(c10_abs) if defocused else None,
            "adf_agreement": None if ht is None else {"r": ht["r"], "z": ht["z"]},
            "adf_agreement_routes": {
                name: None if h is None else {"r": h["r"], "z": h["z"]}
                for name, h in (("com", com_ht), ("parallax", px_ht))
            },
            "notes": notes,
        }
    )
    return out


def _summary(r: dict) -> str:
    c10 = "none measured" if r["c10_estimate_a"] is None else f"{r['c10_estimate_a']:.1f} Å"
    d = r["defects"]
    return (
        f"BF centre ({r['bf_center'][0]:.2f}, {r['bf_center'][1]:.2f}) px, radius {r['bf_radius']:.2f} px "
        f"(edge fit rms {r['bf_fit']['rms_px']:.2f} px); masked {d['masked_pixels']} px "
        f"({len(d['hot'])} hot, {len(d['dead'])} dead, dead columns {d['dead_columns']}, rows {d['dead_rows']}); "
        f"descan {r['descan']['model'] if r['descan'] else 'off'} (moves ≤ {r['descan_span_px']:.2f} px); "
        f"rotation {r['rotation_deg']:.2f}°, flip {r['flip']} ({r['method']}, "
        f"{'reliable' if r['rotation_reliable'] else 'NOT reliable'}); C10 {c10}"
    )


def calibrate_store(
    path: str | os.PathLike,
    write: bool = True,
    mask=None,
    descan: str = "plane",
    vacuum: str | os.PathLike | None = None,
) -> dict:
    """Calibrate the store at ``path`` (:func:`calibrate`); with ``write`` store the BF disk, the
    detector mask, the descan, the C10 estimate and — only when ``rotation_reliable`` — the
    rotation and flip (otherwise the stored ones are kept and a message says so).

    Returns the result dict of :func:`calibrate` (JSON-serialisable), with ``messages`` (lines
    to show the user) and ``summary`` (one line).
    """
    from ..events import open as open_dataset

    ds = open_dataset(path)
    result, full_mask, fill = calibrate(
        ds, mask=mask, descan=descan, vacuum=None if vacuum is None else open_dataset(vacuum)
    )
    old = ds.calibration
    if not result["rotation_reliable"]:
        result["messages"].append(
            "rotation/flip NOT reliable (the lines above say why) — "
            + (f"kept the stored rotation {old.rotation_deg:g}°, flip {old.flip}" if write else "not stored")
            + " (set them with `stemdask calibrate --set rotation-deg=… --set flip=…` or `reconstruct --rotation-deg`)"
        )
    if write:
        store = open_store(path, mode="r+")
        changes = {"bf_center": tuple(result["bf_center"]), "bf_radius": result["bf_radius"],
                   "descan": result["descan"], "c10_estimate_a": result["c10_estimate_a"],
                   "rotation_reliable": result["rotation_reliable"],
                   "report": {k: v for k, v in result.items() if k != "messages"}}
        measured = ["bf_center", "bf_radius", "descan", "c10_estimate_a"]
        if result["rotation_reliable"]:
            changes.update(rotation_deg=result["rotation_deg"], flip=result["flip"])
            measured += ["rotation_deg", "flip"]
        changes["origins"] = {**old.origins, **{k: "measured" for k in measured}}
        store.set_detector_mask(full_mask if full_mask.any() else None, fill)
        store.set_calibration(store.calibration.replace(**changes))
    return result


def calibration_lines(found: dict) -> list[str]:
    """What ``calibrate_store`` found, as lines to print: the summary, each message, and
    exactly one line on the rotation/flip when they are not reliable."""
    lines = [str(found.get("summary", ""))]
    unreliable = [m for m in found.get("messages", []) if str(m).startswith("rotation/flip NOT reliable")]
    lines += [str(m) for m in found.get("messages", []) if m not in unreliable]
    if not found.get("rotation_reliable", False):
        lines.append(
            unreliable[0]
            if unreliable
            else "rotation/flip: NOT reliable; kept the stored rotation and flip — set them with "
            "`stemdask calibrate STORE --set rotation-deg=… --set flip=…` or `reconstruct --rotation-deg`"
        )
    return [line for line in lines if line]
