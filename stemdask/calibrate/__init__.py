"""Calibration from the data alone: detector defects, BF disk, descan, scan rotation, flip, defocus.

:func:`calibrate` makes two passes over the events:

1. the PACBED, and dense patterns of the whole detector binned to ≤ 40 px a side over a scan
   binned to ≤ 128 positions a side;
2. the COM of every position with the detector mask applied (excluded and filled, see
   :mod:`stemdask.reduce`).

From the PACBED: hot and dead pixels and lines (:func:`~stemdask.calibrate.disk.find_defects`),
joined with a user mask, then the BF disk from its edge
(:func:`~stemdask.calibrate.disk.fit_bf_disk`). From the COM: the descan
(:func:`~stemdask.calibrate.descan.fit_descan`), then, with it removed, the COM curl test.
From the dense patterns: the parallax of the BF images and the annular dark-field image that
decides the half turn (:mod:`stemdask.calibrate.orientation` explains the physics).

Which evidence decides (the rules are in :func:`_orientation`):

* **parallax** when the BF images are measurably shifted (defocused data): flip from det M,
  θ mod 180° and |C10| from M, the half turn and the sign of C10 from the ADF;
* otherwise the **COM curl**: θ mod 180° and the flip, the half turn from the ADF.

``rotation_reliable`` is true only when every step was decided by its evidence (thresholds
below, each measured on the simulator and the abTEM case), and when COM and parallax both
measured an orientation they agree. Otherwise the stored rotation and flip are kept and the
result says why.
"""

from __future__ import annotations

import math
import os

import dask
import numpy as np

from ..optics import descan_offsets
from ..store import open_store
from .descan import descan_span_px, fit_descan
from .disk import find_defects, fit_bf_disk, inpaint
from .orientation import (half_turn, icom_phase, parallax, probe_otf, rotation_from_com, skewness,
                          _wrap180, _wrap90)

#: Parallax is used when the shifts across the BF disk reach this many (binned) scan steps …
PARALLAX_MIN_SHIFT_STEPS = 2.0
#: … and M is this close to a scaled rotation or reflection (‖M − p·R·F‖ / ‖p·R·F‖).
PARALLAX_MAX_SIMILARITY_ERROR = 0.2
#: The COM rotation is measured when even the best angle leaves at most this fraction of the
#: field's solenoidal energy (noise-dominated COM: ≥ 0.95), and the flip when the other
#: flip leaves at least this factor more.
COM_MAX_CURL_FRACTION = 0.8
COM_MIN_FLIP_RATIO = 1.25
#: COM and parallax must agree to this many degrees (θ mod 180°) when both measured one.
MAX_DISAGREEMENT_DEG = 3.0
#: A fitted descan is applied only when it moves the disk by at least this much (px): below it
#: the fit mostly measures the phase contrast's own low-order part (0.03 px on an in-focus
#: simulation with none), and subtracting that plane from the COM adds a quadratic ramp to
#: every integrated phase (iCOM r 0.96 → 0.79 there).
DESCAN_MIN_SPAN_PX = 0.1
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


def calibrate(ds, mask=None, descan: str = "plane", detect_defects: bool = True) -> tuple[dict, np.ndarray, np.ndarray]:
    """Calibrate an :class:`~stemdask.events.EventDataset`; see the module docstring.

    ``mask``: a user's bool (det_y, det_x) mask (True = exclude), joined with the defects
    found. ``descan``: "off", "plane" or "quadratic". Returns (result dict, JSON-serialisable;
    the detector mask used; its fill weights).
    """
    det = tuple(ds.detector_shape)
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != det:
            raise ValueError(f"the mask has shape {mask.shape}, the detector is {det[0]}×{det[1]}")
        mask = mask.astype(bool)
    cal = ds.calibration
    raw = ds.with_mask(None, None).with_calibration(descan=None)
    b0 = max(1, math.ceil(max(det) / DETECTOR_BINNED))
    f = max(1, math.ceil(max(ds.scan_shape) / SCAN_BINNED))
    small = raw.bin_scan(f) if f > 1 else raw
    whole = small.densify(radius_px=max(det) / 2 + 1, center=(det[0] / 2, det[1] / 2), bin=b0)
    pacbed, dense = dask.compute(raw.pacbed().data, whole.data)
    pacbed = np.asarray(pacbed, dtype=np.float64)

    defects = find_defects(pacbed) if detect_defects else {"mask": np.zeros(det, bool), "hot": np.zeros(det, bool),
                                                           "dead": np.zeros(det, bool), "dead_rows": [], "dead_columns": []}
    full_mask = defects["mask"] | (mask if mask is not None else False)
    try:
        disk = fit_bf_disk(pacbed, full_mask)
    except ValueError as e:
        hint = " (the mask may hide it)" if mask is not None and mask.any() else ""
        raise ValueError(f"{ds.store.path}: {e}{hint}") from None
    yy, xx = np.indices(det)
    in_disk = np.hypot(yy - disk["center"][0], xx - disk["center"][1]) < disk["radius"]
    if mask is not None and in_disk.any() and full_mask[in_disk].mean() > 0.5:
        raise ValueError(f"the mask hides {100 * full_mask[in_disk].mean():.0f} % of the bright-field disk; "
                         "nothing would be left to measure")
    filled = inpaint(pacbed, full_mask) if full_mask.any() else pacbed
    fill = np.where(full_mask, filled / filled[~full_mask].sum(), 0.0)

    com = raw.with_mask(full_mask, fill).com(reference=(0.0, 0.0)).compute()
    com_y, com_x = com.com_y.values, com.com_x.values
    record, c0 = fit_descan(com_y, com_x, descan)
    fitted_span = descan_span_px(record, ds.scan_shape)
    if record is not None and fitted_span < DESCAN_MIN_SPAN_PX:
        record = None  # below what the COM can tell from phase contrast: applying it would only add a ramp
    off_y, off_x = descan_offsets(record, ds.scan_shape)
    center = (disk["center"][0] - float(off_y.mean()), disk["center"][1] - float(off_x.mean()))
    res_y, res_x = com_y - c0[0] - off_y, com_x - c0[1] - off_x

    result = {
        "bf_center": [float(center[0]), float(center[1])], "bf_radius": float(disk["radius"]),
        "bf_fit": {k: v for k, v in disk.items() if k not in ("center", "radius")},
        "defects": {"hot": np.argwhere(defects["hot"]).tolist(), "dead": np.argwhere(defects["dead"]).tolist(),
                    "dead_rows": defects["dead_rows"], "dead_columns": defects["dead_columns"],
                    "user_mask_pixels": int(mask.sum()) if mask is not None else 0,
                    "masked_pixels": int(full_mask.sum())},
        "descan": record, "descan_span_px": descan_span_px(record, ds.scan_shape), "descan_fitted_span_px": fitted_span,
        "messages": [],
    }
    result.update(_orientation(ds, cal, small, f, whole, dense, full_mask, center, disk["radius"],
                               result["descan_span_px"], res_y, res_x))
    result["messages"] = result.pop("notes")
    if cal.semiangle_mrad is not None:
        measured = disk["radius"] * cal.detector_pixel_mrad
        rel = measured / cal.semiangle_mrad - 1
        result["radius_vs_semiangle"] = rel
        if abs(rel) > RADIUS_TOLERANCE:
            result["messages"].append(
                f"BF radius {disk['radius']:.2f} px × {cal.detector_pixel_mrad:g} mrad/px = {measured:.2f} mrad differs by "
                f"{100 * rel:+.1f} % from the nominal semi-angle {cal.semiangle_mrad:g} mrad: the pixel size or the "
                "semi-angle is wrong. SSB and virtual detectors use the measured radius (trotter boundaries, BF/ADF "
                "annuli); every reciprocal length (Å⁻¹) comes from the pixel size")
    result["summary"] = _summary(result)
    return result, full_mask, fill


def _orientation(ds, cal, small, f, whole, dense, mask, center, radius, span, res_y, res_x) -> dict:
    """Rotation, flip, half turn, C10 — and whether the evidence supports them (module docstring)."""
    notes = []
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
    k_y = (py - center[0]) * cal.detector_pixel_mrad * 1e-3 / lam
    k_x = (px - center[1]) * cal.detector_pixel_mrad * 1e-3 / lam
    semiangle = radius * cal.detector_pixel_mrad
    band = 2 * semiangle * 1e-3 / lam
    adf = dense[:, :, dark].sum(axis=2).astype(np.float64) if dark.sum() >= 4 else None
    if adf is None:
        notes.append("no dark-field pixels beyond the BF disk: the half turn cannot be decided from an ADF image")

    px_result = None
    if inside.sum() >= 4:
        px_result = parallax(dense, k_y, k_x, inside, small_step, lam)
    defocused = (px_result is not None
                 and px_result["max_shift_a"] >= PARALLAX_MIN_SHIFT_STEPS * max(small_step)
                 and px_result["similarity_error"] <= PARALLAX_MAX_SIMILARITY_ERROR)
    out = {"curl_fraction": {str(k).lower(): float(v) for k, v in curl.items()},
           "parallax": None if px_result is None else {k: v for k, v in px_result.items() if k != "tcbf"}}
    if defocused:
        method, flip, c10_abs = "parallax", px_result["flip"], px_result["c10_abs_a"]
        theta = px_result["rotation_deg"]  # the member that goes with C10 < 0
        q2 = np.fft.fftfreq(dense.shape[0], small_step[0])[:, None] ** 2 + np.fft.fftfreq(dense.shape[1], small_step[1])[None, :] ** 2
        ctf = np.sin(np.pi * lam * (-c10_abs) * q2)
        keep = (np.abs(ctf) > 0.3) & (q2 < band**2)
        candidate = np.fft.ifft2(px_result["tcbf"] * np.sign(ctf) * keep).real
        otf_c10 = c10_abs
        measured = True
        if com_measured and (rot["flip"] != flip or abs(_wrap90(rot["rotation_deg"] - theta)) > MAX_DISAGREEMENT_DEG):
            measured = False
            notes.append(f"the COM curl ({rot['rotation_deg']:.1f}° mod 180, flip {rot['flip']}) and the parallax "
                         f"({_wrap90(theta):.1f}° mod 180, flip {flip}) disagree")
    else:
        method, flip, theta, c10_abs = "com", rot["flip"], rot["rotation_deg"], None
        candidate = _bin_image(icom_phase(res_y, res_x, theta, flip, step), f)
        otf_c10 = 0.0
        measured = com_measured and com_flip_ok
        if not com_measured:
            notes.append(f"no measurable parallax and the COM field is dominated by noise (curl fraction "
                         f"{curl[rot['flip']]:.2f} > {COM_MAX_CURL_FRACTION})")
        elif not com_flip_ok:
            notes.append(f"the COM curl does not tell the flip apart (curl fractions {curl[False]:.2f} / {curl[True]:.2f})")
    decided, ht = False, None
    if adf is not None:
        candidate = candidate[: adf.shape[0], : adf.shape[1]]
        ht = half_turn(candidate, adf, small_step, lambda q: probe_otf(q, lam, semiangle, otf_c10), band)
        decided = ht["decided"]
        if not ht["keep"]:
            theta, candidate = theta + 180.0, -candidate
        if not decided:
            notes.append(f"the ADF image does not decide the half turn (agreement z = {ht['z']:.1f}, need ≥ 6)")
    skew = skewness(candidate)
    c10 = None
    if c10_abs is not None:
        c10 = -c10_abs if (ht is None or ht["keep"]) else c10_abs
    out.update({
        "rotation_deg": float(_wrap180(theta)), "flip": bool(flip), "method": method,
        # C10's sign comes with the half turn: an estimate is only given when the orientation holds
        "rotation_reliable": bool(measured and decided),
        "c10_estimate_a": float(c10) if c10 is not None and measured and decided else None,
        "c10_magnitude_a": None if c10_abs is None else float(c10_abs),
        "adf_agreement": None if ht is None else {"r": ht["r"], "z": ht["z"]}, "phase_skewness": skew,
        "notes": notes,
    })
    return out


def _summary(r: dict) -> str:
    c10 = "none measured" if r["c10_estimate_a"] is None else f"{r['c10_estimate_a']:.1f} Å"
    d = r["defects"]
    return (f"BF centre ({r['bf_center'][0]:.2f}, {r['bf_center'][1]:.2f}) px, radius {r['bf_radius']:.2f} px "
            f"(edge fit rms {r['bf_fit']['rms_px']:.2f} px); masked {d['masked_pixels']} px "
            f"({len(d['hot'])} hot, {len(d['dead'])} dead, dead columns {d['dead_columns']}, rows {d['dead_rows']}); "
            f"descan {r['descan']['model'] if r['descan'] else 'off'} (moves ≤ {r['descan_span_px']:.2f} px); "
            f"rotation {r['rotation_deg']:.2f}°, flip {r['flip']} ({r['method']}, "
            f"{'reliable' if r['rotation_reliable'] else 'NOT reliable'}); C10 {c10}")


def calibrate_store(path: str | os.PathLike, write: bool = True, mask=None, descan: str = "plane") -> dict:
    """Calibrate the store at ``path`` (:func:`calibrate`); with ``write`` store the BF disk, the
    detector mask, the descan, the C10 estimate and — only when ``rotation_reliable`` — the
    rotation and flip (otherwise the stored ones are kept and a message says so).

    Returns the result dict of :func:`calibrate` (JSON-serialisable), with ``messages`` (lines
    to show the user) and ``summary`` (one line).
    """
    from ..events import open as open_dataset

    ds = open_dataset(path)
    result, full_mask, fill = calibrate(ds, mask=mask, descan=descan)
    old = ds.calibration
    if not result["rotation_reliable"]:
        result["messages"].append(
            f"rotation/flip NOT reliable: {'; '.join(result['messages']) or 'see the report'} — "
            + (f"kept the stored rotation {old.rotation_deg:g}°, flip {old.flip}" if write else "not stored")
            + " (set them with `stemdask calibrate --set rotation-deg=… --set flip=…` or `reconstruct --rotation-deg`)")
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
