"""Calibration from the data alone: BF disk, scan rotation, detector flip (and defocus).

* **BF disk** (:func:`bf_disk`): from the PACBED. A first threshold at half the disk's
  plateau gives a coarse disk; then each pixel near the edge is weighted by its fractional
  brightness ``clip(I / plateau, 0, 1)`` (the area a sharp aperture covers in it), so the
  centre is that weight's centroid and the radius ``sqrt(Σw / π)`` — sub-pixel. (A soft
  *amplitude* taper, as abTEM's aperture, makes the edge intensity a squared taper and
  reads ≈ 1/6 px smaller: 19.63 px for the abTEM case's 19.835.)
* **Rotation and flip in focus** (:func:`rotation_from_com`): the COM field of a pure phase
  object is a gradient (∇ of φ blurred by the probe intensity, at any defocus), so its
  curl in the scan frame vanishes. The scan-frame field for angle θ is linear in
  (cos θ, sin θ), so the energy of its solenoidal part is a quadratic form whose smallest
  eigenvector is the exact minimiser; the flip is the choice whose minimum is smaller
  relative to the largest. This fixes θ modulo 180°. **The half turn**
  (:func:`resolve_half_turn`): θ and θ + 180° give opposite phases; integrate the field by
  Fourier iCOM and keep the angle whose phase has **positive skewness** — atoms are sparse,
  strong, positive peaks (positive projected potential → positive phase) on a lower
  background, so the true phase is skewed to the right and its negative to the left.
* **Defocused data** (:func:`parallax`): a wide probe washes the COM signal out (at the
  abTEM case's 150 Å defocus and 1000 e⁻ its variance is below the shot noise, and the COM
  curl gives ≈ 5° errors), but the bright-field images of different detector pixels are
  shifted copies of one image, shifted by ``−λ·C10·k_scan``: fitting the shifts gives the
  flip, θ modulo 180° and |C10| precisely, and the half turn comes from the sign of the
  CTF-corrected tilt-corrected BF image (again: positive skewness). :func:`calibrate` uses
  the parallax when it is clearly measured and the COM curl otherwise.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
from scipy import ndimage, optimize

from .methods.icom import integrate_com, mirror_extend
from .optics import detector_to_scan_frame
from .store import open_store


def bf_disk(pacbed: np.ndarray, iterations: int = 3) -> tuple[tuple[float, float], float]:
    """BF-disk centre (y, x) px (pixel centres at integers) and radius (px) from a PACBED."""
    img = np.asarray(pacbed, dtype=np.float64)
    if img.ndim != 2 or not np.isfinite(img).all() or img.max() <= 0:
        raise ValueError("PACBED must be a finite 2-D image with some counts")
    smooth = ndimage.gaussian_filter(img, 1.0)
    coarse = _largest_component(smooth > 0.5 * smooth.max())
    plateau = float(np.median(img[coarse]))
    coarse = _largest_component(img > 0.5 * plateau)
    if coarse.sum() < 5:
        raise ValueError("no bright-field disk found in the PACBED (fewer than 5 bright pixels)")
    yy, xx = np.indices(img.shape, dtype=np.float64)
    cy, cx = yy[coarse].mean(), xx[coarse].mean()
    radius = math.sqrt(coarse.sum() / math.pi)
    for _ in range(iterations):
        r = np.hypot(yy - cy, xx - cx)
        inner = r < 0.7 * radius
        if inner.sum() >= 3:
            plateau = float(np.median(img[inner]))
        w = np.clip(img / plateau, 0.0, 1.0) * (r < radius + 2.0)
        total = w.sum()
        cy, cx = float((w * yy).sum() / total), float((w * xx).sum() / total)
        radius = math.sqrt(total / math.pi)
    return (cy, cx), radius


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + int(np.argmax(sizes)))


def _clean(field: np.ndarray) -> np.ndarray:
    f = np.array(field, dtype=np.float64)
    bad = ~np.isfinite(f)
    f[bad] = np.nanmean(f) if (~bad).any() else 0.0
    return f - f.mean()


def _frequencies(shape, step):
    k_y = np.fft.fftfreq(shape[0], d=step[0])[:, None]
    k_x = np.fft.fftfreq(shape[1], d=step[1])[None, :]
    return k_y, k_x


def _transverse(g_y, g_x, step) -> np.ndarray:
    """Fourier amplitude of the curl (solenoidal) part of a field: (k_x G_y − k_y G_x)/|k|."""
    g_y, g_x = mirror_extend(g_y, g_x)  # the gradient of the evenly mirrored φ: still curl-free
    k_y, k_x = _frequencies(g_y.shape, step)
    k = np.hypot(k_y, k_x)
    k[0, 0] = 1.0
    t = (k_x * np.fft.fft2(g_y) - k_y * np.fft.fft2(g_x)) / k
    t[0, 0] = 0.0
    return t


def rotation_from_com(com_y: np.ndarray, com_x: np.ndarray, step=(1.0, 1.0)) -> dict:
    """Scan rotation (deg, modulo 180, in (−90, 90]) and flip that make the COM field curl-free.

    ``com_y, com_x``: detector-frame COM (ny, nx) (any unit, NaN allowed), ``step``: scan
    step (y, x). The scan-frame field for angle θ is ``cos θ · V0 + sin θ · V90`` (V0, V90
    the field mapped with θ = 0° and 90°), so the energy of its solenoidal part — ``Σ|T|²``
    with ``T = (k_x G_y − k_y G_x)/|k|`` on the mirror-extended field (the curl without the
    noise-amplifying ``|k|`` factor) — is a quadratic form in (cos θ, sin θ), minimised
    exactly by its smallest eigenvector. Returns {rotation_deg, flip, curl_fraction:
    {False: f, True: f}}, ``curl_fraction`` = smallest / largest eigenvalue for each flip.
    """
    v_y, v_x = _clean(com_y), _clean(com_x)
    if v_y.shape != v_x.shape or v_y.ndim != 2 or min(v_y.shape) < 3:
        raise ValueError(f"COM fields must be two 2-D arrays of the same shape ≥ 3×3, got {v_y.shape}, {v_x.shape}")
    best, fractions = None, {}
    for flip in (False, True):
        basis = [_transverse(*detector_to_scan_frame(v_y, v_x, angle, flip), step) for angle in (0.0, 90.0)]
        m = np.array([[np.vdot(a, b).real for b in basis] for a in basis])
        evals, evecs = np.linalg.eigh(m)
        if evals[1] <= 0:
            raise ValueError("the COM field is constant: no rotation can be estimated from it")
        fractions[flip] = float(evals[0] / evals[1])
        c, s = evecs[:, 0]
        theta = math.degrees(math.atan2(s, c))
        theta = (theta + 90.0) % 180.0 - 90.0  # θ and θ + 180° are equivalent here
        if theta == -90.0:
            theta = 90.0
        if best is None or fractions[flip] < fractions[best[1]]:
            best = (theta, flip)
    return {"rotation_deg": best[0], "flip": best[1], "curl_fraction": fractions}


def skewness(a: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    a = a - a.mean()
    sd = a.std()
    return float(np.mean(a**3) / sd**3) if sd > 0 else 0.0


def resolve_half_turn(com_y, com_x, rotation_deg: float, flip: bool, step=(1.0, 1.0)) -> dict:
    """Choose between θ and θ + 180°: the one whose iCOM phase has positive skewness.

    Returns {rotation_deg in (−180, 180], phase_skewness (of the chosen phase)}.
    """
    g_y, g_x = detector_to_scan_frame(_clean(com_y), _clean(com_x), rotation_deg, flip)
    skew = skewness(integrate_com(g_y, g_x, step))  # the skew's sign does not depend on a 2π scale
    theta = rotation_deg if skew >= 0 else rotation_deg + 180.0
    return {"rotation_deg": _wrap180(theta), "phase_skewness": abs(skew)}


def _peak(cc: np.ndarray) -> np.ndarray:
    """Position (y, x) px of a periodic correlation's maximum, parabolic sub-pixel, in [−n/2, n/2)."""
    ny, nx = cc.shape
    iy, ix = np.unravel_index(np.argmax(cc), cc.shape)
    c0 = cc[iy, ix]

    def sub(a, b):
        den = a - 2 * c0 + b
        return 0.5 * (a - b) / den if den != 0 else 0.0

    dy = iy + sub(cc[iy - 1, ix], cc[(iy + 1) % ny, ix])
    dx = ix + sub(cc[iy, ix - 1], cc[iy, (ix + 1) % nx])
    return np.array([(dy + ny / 2) % ny - ny / 2, (dx + nx / 2) % nx - nx / 2])


def _form(pc: float, ps: float, flip: bool) -> np.ndarray:
    """``p·R(θ)·F`` acting on (y, x) vectors, from p·cos θ, p·sin θ (R, F as in
    :func:`stemdask.optics.detector_to_scan_frame`)."""
    return np.array([[pc, ps], [-ps, pc]]) @ np.diag([1.0, -1.0 if flip else 1.0])


def _similarity(m: np.ndarray, flip: bool) -> tuple[float, float]:
    """(p·cos θ, p·sin θ) of the ``p·R(θ)·F`` closest to ``m``."""
    n = m @ np.diag([1.0, -1.0 if flip else 1.0])
    return (n[0, 0] + n[1, 1]) / 2, (n[0, 1] - n[1, 0]) / 2


def parallax(dense: np.ndarray, k_y: np.ndarray, k_x: np.ndarray, inside: np.ndarray, step, wavelength: float,
             band_inv_a: float, iterations: int = 2) -> dict:
    """Rotation, flip and defocus from the parallax of bright-field images (defocused data).

    ``dense`` (ny, nx, n, n) counts; ``k_y, k_x`` (n,) detector-frame frequencies of its
    pixels (Å⁻¹, relative to k = 0); ``inside`` (n, n) the pixels to use (well inside the BF
    disk); ``step`` scan step (y, x) Å; ``band_inv_a`` the information limit 2α/λ (Å⁻¹).

    Physics (weak phase object, probe ψ = A·exp(−iχ), χ = πλC10k², numpy's forward FFT):
    the image of BF pixel k is ``I_k(R) = 1 + T(R − d_k)`` with ``d_k = −λ·C10·k_scan`` and
    ``T(q) = 2 sin(πλC10 q²) Φ(q)``. So the shifts are linear in the detector-frame k,
    ``d = M k`` with ``M = −λ C10 · R(θ) F`` (R, F of :func:`stemdask.optics.detector_to_scan_frame`):
    M's form (rotation or reflection) gives the flip, its angle θ modulo 180°, its size |C10|.
    θ and θ + 180° go with opposite signs of C10 and so opposite CTF signs: the phase
    ``T(q)·sign(sin(πλC10 q²))`` (the tilt-corrected BF image, CTF phase-flipped, band-limited)
    must have atoms positive, i.e. positive skewness — that picks the pair.

    Shifts: first from the summed cross-power of all neighbouring pixel pairs along k_y and
    k_x (no reference needed), then refined by correlating every image with the aligned mean
    (the tilt-corrected BF) and a least-squares fit ``d = M k + d0``; finally, for each flip,
    the scale and angle of M that maximise the power of the aligned mean within the band
    (Nelder–Mead from the least-squares M). The flip with the larger power wins.
    Returns {rotation_deg, flip, c10_a, phase_skewness, sharpness_gain (aligned power over
    unaligned), flip_contrast (best flip's power over the other's), max_shift_a}.
    """
    ny, nx = dense.shape[:2]
    step = np.asarray(step, dtype=np.float64)
    iy, ix = np.nonzero(inside)
    if iy.size < 4:
        raise ValueError("parallax needs at least 4 bright-field pixels")
    imgs = dense[:, :, iy, ix].transpose(2, 0, 1).astype(np.float64)
    mean = imgs.mean(axis=(1, 2), keepdims=True)
    imgs = imgs / np.where(mean > 0, mean, 1.0) - 1.0
    spec = np.fft.fft2(imgs)
    k = np.stack([k_y[iy], k_x[ix]], axis=1)
    where = {(a, b): j for j, (a, b) in enumerate(zip(iy, ix))}
    m0 = np.zeros((2, 2))
    for axis, (oy, ox) in enumerate([(1, 0), (0, 1)]):
        cross = np.zeros((ny, nx), complex)
        for (a, b), j in where.items():
            j2 = where.get((a + oy, b + ox))
            if j2 is not None:
                cross += spec[j2] * spec[j].conj()
        dk = (k_y[1] - k_y[0]) if axis == 0 else (k_x[1] - k_x[0])
        m0[:, axis] = _peak(np.fft.ifft2(cross).real) * step / dk
    q_y = np.fft.fftfreq(ny)
    q_x = np.fft.fftfreq(nx)

    def aligned_mean(shifts_a):
        """Mean of the images moved back by their shifts (Å): the tilt-corrected BF spectrum."""
        s = shifts_a / step
        ramp_y = np.exp(2j * np.pi * s[:, :1] * q_y[None, :])
        ramp_x = np.exp(2j * np.pi * s[:, 1:] * q_x[None, :])
        return np.einsum("jyx,jy,jx->yx", spec, ramp_y, ramp_x, optimize=True) / len(s)

    q2 = np.fft.fftfreq(ny, step[0])[:, None] ** 2 + np.fft.fftfreq(nx, step[1])[None, :] ** 2  # Å⁻²
    band = q2 < band_inv_a**2

    def aligned_power(pc, ps, flip):
        return float(np.sum(np.abs(aligned_mean(k @ _form(pc, ps, flip).T))[band] ** 2))

    design = np.column_stack([k, np.ones(len(k))])
    fit = k @ m0.T
    for _ in range(iterations):
        ref = aligned_mean(fit)
        cc = np.fft.ifft2(spec * ref.conj()).real
        shifts = np.array([_peak(c) for c in cc]) * step
        coef, *_ = np.linalg.lstsq(design, shifts, rcond=None)
        fit = design @ coef
    m = coef[:2].T
    # refine: the rotation/reflection (and scale) that makes the aligned mean sharpest
    power = {}
    for flip in (False, True):
        start = np.array(_similarity(m, flip))
        res = optimize.minimize(lambda v: -aligned_power(*v, flip), start, method="Nelder-Mead",
                                options={"xatol": 1e-4 * np.abs(start).max(), "fatol": 0.0, "maxiter": 400})
        power[flip] = (-res.fun, *res.x)
    best = max(power, key=lambda f: power[f][0])
    _, pc, ps = power[best]
    size = math.hypot(pc, ps)
    unaligned = aligned_power(0.0, 0.0, False)
    theta = math.degrees(math.atan2(ps, pc))  # the pair member with C10 < 0 (M = −λC10·R·F, −λC10 > 0)
    c10 = -size / wavelength
    ctf = np.sin(np.pi * wavelength * c10 * q2)
    keep = (np.abs(ctf) > 0.3) & band
    skew = skewness(np.fft.ifft2(aligned_mean(k @ _form(pc, ps, best).T) * np.sign(ctf) * keep).real)
    if skew < 0:
        theta, c10 = theta + 180.0, -c10
    return {
        "rotation_deg": _wrap180(theta), "flip": best, "c10_a": c10, "phase_skewness": abs(skew),
        "sharpness_gain": power[best][0] / unaligned if unaligned > 0 else math.inf,
        "flip_contrast": power[best][0] / power[not best][0] if power[not best][0] > 0 else math.inf,
        "max_shift_a": size * float(np.hypot(k[:, 0], k[:, 1]).max()),
    }


def _wrap180(theta: float) -> float:
    """Angle into (−180, 180]."""
    return -((-theta + 180.0) % 360.0 - 180.0)


def parallax_from_dataset(ds, center, radius, max_scan: int = 128) -> dict:
    """:func:`parallax` on a dataset: bins the scan to ≤ ``max_scan`` a side and the
    detector to ~6 pixels per BF radius, uses pixels ≥ one bin inside the BF disk."""
    cal = ds.calibration
    if cal.semiangle_mrad is None:
        raise ValueError("parallax needs the convergence semi-angle (calibration.semiangle_mrad)")
    f = max(1, math.ceil(max(ds.scan_shape) / max_scan))
    small = ds.bin_scan(f) if f > 1 else ds
    b = max(1, round(radius / 6.5))
    dense = small.densify(radius_px=radius, center=center, bin=b).compute()
    lam = cal.wavelength_a
    k_y = dense.k_y.values * 1e-3 / lam
    k_x = dense.k_x.values * 1e-3 / lam
    r_px = np.hypot(dense.k_y.values[:, None], dense.k_x.values[None, :]) / cal.detector_pixel_mrad
    band = 2 * cal.semiangle_mrad * 1e-3 / lam
    return parallax(dense.values, k_y, k_x, r_px < radius - b, small.calibration.scan_step_a, lam, band)


#: Parallax is trusted (defocused data) when aligning the BF images raises the power of their
#: mean at least this much, and the best flip beats the other by this factor. Empirical: in
#: focus the gain is ≈ 2.5 and the contrast ≈ 1.25 (simulator); defocused ≥ 7 and ≥ 2.5
#: (simulator at C10 = ±80 Å, abTEM case at −150 Å).
PARALLAX_MIN_GAIN = 4.0
PARALLAX_MIN_FLIP_CONTRAST = 1.5
#: … and the shifts across the BF disk reach this many scan steps.
PARALLAX_MIN_SHIFT_STEPS = 2.0
#: The COM rotation is reported unreliable when even the best angle leaves this fraction of
#: the field's solenoidal energy (noise-dominated COM: 0.95 on the abTEM case at 150 Å
#: defocus, 0.99 at dose 50; ≈ 0.45 on in-focus simulations at 1000–2000 e⁻).
COM_MAX_CURL_FRACTION = 0.8


def calibrate(ds) -> dict:
    """Calibrate an :class:`~stemdask.events.EventDataset` (three passes over the events).

    1. PACBED → BF centre and radius (:func:`bf_disk`).
    2. Parallax of the BF images (:func:`parallax`, needs ``semiangle_mrad``): rotation, flip,
       C10 and the half turn — used when trusted (see ``PARALLAX_MIN_*``): defocused data,
       where the COM signal is washed out by the wide probe.
    3. Otherwise (in focus: no parallax) COM curl minimisation (:func:`rotation_from_com`)
       and the iCOM skewness for the half turn (:func:`resolve_half_turn`).

    Returns a JSON-serialisable dict: bf_center [y, x] px, bf_radius px, rotation_deg, flip,
    method ("parallax" or "com"), rotation_reliable, c10_estimate_a (Å, parallax only, else None),
    curl_fraction {false, true}, phase_skewness, parallax_gain, parallax_flip_contrast.
    """
    center, radius = bf_disk(ds.pacbed().values)
    step = ds.calibration.scan_step_a
    px = None
    if ds.calibration.semiangle_mrad is not None:
        try:
            px = parallax_from_dataset(ds, center, radius)
        except ValueError:  # too few BF pixels for a parallax fit: rely on the COM
            px = None
    trusted = (
        px is not None
        and px["sharpness_gain"] >= PARALLAX_MIN_GAIN
        and px["flip_contrast"] >= PARALLAX_MIN_FLIP_CONTRAST
        and px["max_shift_a"] >= PARALLAX_MIN_SHIFT_STEPS * max(step)
    )
    com = ds.com(reference=center).compute()
    rot = rotation_from_com(com.com_y.values, com.com_x.values, step)
    if trusted:
        rotation, flip, skew, method = px["rotation_deg"], px["flip"], px["phase_skewness"], "parallax"
        reliable = True
    else:
        half = resolve_half_turn(com.com_y.values, com.com_x.values, rot["rotation_deg"], rot["flip"], step)
        rotation, flip, skew, method = half["rotation_deg"], rot["flip"], half["phase_skewness"], "com"
        reliable = rot["curl_fraction"][flip] <= COM_MAX_CURL_FRACTION
    return {
        "bf_center": [float(center[0]), float(center[1])],
        "bf_radius": float(radius),
        "rotation_deg": float(rotation),
        "flip": bool(flip),
        "method": method,
        "rotation_reliable": bool(reliable),
        "c10_estimate_a": float(px["c10_a"]) if trusted else None,
        "curl_fraction": {str(k).lower(): float(v) for k, v in rot["curl_fraction"].items()},
        "phase_skewness": float(skew),
        "parallax_gain": float(px["sharpness_gain"]) if px is not None else None,
        "parallax_flip_contrast": float(px["flip_contrast"]) if px is not None else None,
    }


def calibrate_store(path: str | os.PathLike, write: bool = True) -> dict:
    """Calibrate the store at ``path``; with ``write`` store bf_center, bf_radius and — when
    ``rotation_reliable`` — rotation_deg and flip (otherwise the stored ones are kept, with a
    warning: set them by hand, e.g. ``stemdask reconstruct --rotation-deg``).

    Returns the dict of :func:`calibrate` (JSON-serialisable).
    """
    from .events import open as open_dataset

    result = calibrate(open_dataset(path))
    if not result["rotation_reliable"]:
        warnings.warn(
            f"{path}: scan rotation/flip not reliable (no measurable parallax, and the COM field is "
            f"dominated by noise: curl fraction {result['curl_fraction']}); "
            + ("keeping the stored rotation and flip" if write else "not stored"),
            stacklevel=2,
        )
    if write:
        store = open_store(path, mode="r+")
        changes = {"bf_center": tuple(result["bf_center"]), "bf_radius": result["bf_radius"]}
        if result["rotation_reliable"]:
            changes.update(rotation_deg=result["rotation_deg"], flip=result["flip"])
        store.set_calibration(store.calibration.replace(**changes))
    return result
