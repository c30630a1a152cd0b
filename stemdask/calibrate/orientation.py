"""Scan rotation, detector flip, the half turn and the defocus, from the data alone.

Pure NumPy functions on in-memory arrays; :mod:`stemdask.calibrate` runs them on a dataset.

* **COM curl** (:func:`rotation_from_com`), at any defocus. The COM field of a pure phase object is
  a gradient (∇φ blurred by the probe intensity, at any defocus), so its curl in the scan
  frame vanishes. The scan-frame field for angle θ is linear in (cos θ, sin θ), so the
  energy of its solenoidal part is a quadratic form whose smallest eigenvector is the exact
  minimiser, at any angle; the flip is the choice with the smaller minimum relative to the
  largest. This fixes θ modulo 180°.
* **Defocused: parallax** (:func:`parallax`). A wide probe washes the COM signal out, but the
  bright-field image of detector pixel k is the in-focus image shifted by ``d = M·k`` with
  ``M = −λ·C10·R(θ)·F`` (R, F of :func:`stemdask.optics.detector_to_scan_frame`). On a crystal
  the images' cross-correlations have a peak at every lattice vector, and shifts across the
  whole disk reach half a unit cell, so a shift is only ever measured against a *close*
  reference inside a window smaller than half the shortest lattice period (found from the
  mean image's autocorrelation): first between neighbouring pixels (M from the summed
  cross-power of all neighbour pairs), then each image against the aligned mean within the
  window around its predicted shift, refitted by least squares. ``det M`` decides the flip
  (a rotation has det > 0, a reflection det < 0), M's angle θ modulo 180° and its size |C10|.
  It counts only where aligning the BF images by M sharpens their mean (``alignment_gain``);
  θ's standard error comes from refining on four disjoint sets of BF pixels.
* **The half turn** (:func:`half_turn`). θ and θ + 180° give opposite phase images (and, for
  the parallax, opposite signs of C10), so it needs an independent physical reference
  measured in the same data: the **annular dark-field** image, bright at atomic columns —
  where the projected potential, hence the phase, is positive. The candidate phase, the iCOM
  image in the orientation found (COM curl or parallax), is compared with the ADF image
  through the probe's incoherent transfer (both are the object blurred by the probe
  intensity, at any defocus):
  ``r = Σ Re(ADF*·OTF·Φ) / norms`` over the band 2/L < |q| < 2α/λ, with z its significance
  against images of the same amplitude spectra and unrelated phases. Positive r keeps θ, negative flips
  it by 180°; |z| below :data:`MIN_ADF_Z` leaves the half turn undecided (unreliable).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft, optimize

from ..errors import InvalidParameter
from ..kernels.icom import integrate_com
from ..optics import detector_to_scan_frame

#: The half turn is decided only when the ADF agreement is this significant. z is normalised
#: for unrelated phases under independent Fourier coefficients; the Tukey window correlates
#: neighbours, so its measured spread over 2000 pairs of unrelated images (white to 1/k² red
#: spectra) is 1.1–1.4, and none reached |z| ≥ 5 (|z| ≥ 4: up to 0.2 %).
MIN_ADF_Z = 5.0


def _clean(field: np.ndarray) -> np.ndarray:
    f = np.array(field, dtype=np.float64)
    bad = ~np.isfinite(f)
    f[bad] = np.nanmean(f) if (~bad).any() else 0.0
    return f - f.mean()


def _curl_bases(v_y: np.ndarray, v_x: np.ndarray, step) -> tuple[np.ndarray, dict]:
    """The solenoidal parts ``(k_x·G_y − k_y·G_x)/|k|`` of the scan-frame fields
    :func:`~stemdask.optics.detector_to_scan_frame` makes of the detector-frame field (v_y, v_x)
    at 0° and at 90°, over the plane of their mirror extensions (2ny, 2nx) (the gradient of the
    evenly mirrored φ: still curl-free). Every angle's is a sum of the two: at θ,
    cos θ·T0 + sin θ·T90 — the field is linear in (cos θ, sin θ).

    Without the extensions: a component even along an axis (mirrored, ``mirror_extend``) has
    the FFT ``e^{iπk/2n}·C[k]`` along it, odd ``e^{iπk/2n}·(−i)·S[k]``, with C, S the DCT-II and
    DST-II of the n samples (C[2n − k] = −C[k], C[n] = 0; S[2n − k] = S[k], S[0] = 0). Each
    component of G is odd along exactly its own axis, so every T shares the factor
    ``e^{iπ(k_y/2ny + k_x/2nx)}·(−i)``: it drops out of every product conj(T_a)·T_b, what is left
    is real, and it is the same at k and at its mirror images along either axis. So the
    whole plane's sums are ``weights``-weighted sums over k_y ≤ ny, k_x ≤ nx (weight 2 per
    axis for 0 < k < n, else 1) of real T's. Returns (weights (ny + 1, nx + 1),
    {flip: (T0, T90)})."""
    ny, nx = v_y.shape

    def cosine(a, axis):  # C[0 … n], C[n] = 0
        c = fft.dct(a, type=2, axis=axis)
        return np.concatenate([c, np.zeros_like(np.take(c, [0], axis=axis))], axis=axis)

    def sine(a, axis):  # S[0 … n], S[0] = 0
        t = fft.dst(a, type=2, axis=axis)
        return np.concatenate([np.zeros_like(np.take(t, [0], axis=axis)), t], axis=axis)

    # G_y is odd along y (y-parity), G_x along x; at θ = 0: (G_y, G_x) = (v_y, f·v_x), at
    # θ = 90°: (f·v_x, −v_y), f = −1 with the flip
    yy, yx = sine(cosine(v_y, 1), 0), sine(cosine(v_x, 1), 0)
    xx, xy = cosine(sine(v_x, 1), 0), cosine(sine(v_y, 1), 0)
    q_y = np.fft.fftfreq(2 * ny)[: ny + 1, None] / step[0]
    q_x = np.fft.fftfreq(2 * nx)[None, : nx + 1] / step[1]
    k = np.hypot(q_y, q_x)
    k[0, 0] = np.inf  # the mean field has no solenoidal part
    qx_yy, qy_xx, qx_yx, qy_xy = q_x * yy / k, q_y * xx / k, q_x * yx / k, q_y * xy / k

    def axis_weights(n):
        w = np.full(n + 1, 2.0)
        w[[0, n]] = 1.0
        return w

    weights = axis_weights(ny)[:, None] * axis_weights(nx)[None, :]
    return weights, {flip: (qx_yy - f * qy_xx, f * qx_yx + qy_xy) for flip, f in ((False, 1.0), (True, -1.0))}


def rotation_from_com(com_y: np.ndarray, com_x: np.ndarray, step=(1.0, 1.0)) -> dict:
    """Scan rotation (deg, modulo 180, in (−90, 90]) and flip that make the COM field curl-free.

    ``com_y, com_x``: detector-frame COM (ny, nx) (any unit, NaN allowed), ``step``: scan
    step (y, x). Returns {rotation_deg, flip, curl_fraction: {False: f, True: f},
    rotation_sigma_deg}: ``curl_fraction`` = smallest / largest eigenvalue of the solenoidal
    energy for each flip; ``rotation_sigma_deg`` the standard error of θ from the noise.
    """
    v_y, v_x = _clean(com_y), _clean(com_x)
    if v_y.shape != v_x.shape or v_y.ndim != 2 or min(v_y.shape) < 3:
        raise InvalidParameter(
            f"COM fields must be two 2-D arrays of the same shape ≥ 3×3, got {v_y.shape}, {v_x.shape}"
        )
    best, fractions = None, {}
    weights, bases = _curl_bases(v_y, v_x, step)
    for flip, basis in bases.items():
        # the solenoidal energy's 2×2 form in (cos θ, sin θ), summed over the whole plane
        m = np.array([[float(np.sum(weights * a * b)) for b in basis] for a in basis])
        evals, evecs = np.linalg.eigh(m)
        if evals[1] <= 0:
            raise InvalidParameter("the COM field is constant: no rotation can be estimated from it")
        fractions[flip] = float(evals[0] / evals[1])
        c, s = evecs[:, 0]
        theta = _wrap90(math.degrees(math.atan2(s, c)))
        if best is None or fractions[flip] < fractions[best[1]]:
            best = (theta, flip)
    f = fractions[best[1]]
    # θ's standard error: the signal × noise terms of the 2×2 form turn its eigenvector by
    # ≈ √(λ0·λ1) / (λ1 − λ0) / √N radians over N positions (white noise: within 10 % for f ≤ 0.6)
    sigma = math.degrees(math.sqrt(f) / max(1.0 - f, 1e-12) / math.sqrt(v_y.size))
    return {"rotation_deg": best[0], "flip": best[1], "curl_fraction": fractions, "rotation_sigma_deg": sigma}


def _wrap180(theta: float) -> float:
    """Angle into (−180, 180]."""
    return -((-theta + 180.0) % 360.0 - 180.0)


def _wrap90(theta: float) -> float:
    """Angle modulo 180 into (−90, 90]."""
    return -((-theta + 90.0) % 180.0 - 90.0)


# ---------------------------------------------------------------------- parallax
def _peaks(cc: np.ndarray, centers: np.ndarray, window: float = np.inf) -> np.ndarray:
    """Positions (n, 2) (y, x) px of the maxima of periodic correlations ``cc`` (n, ny, nx),
    each within ``window`` px of its ``centers`` row (the pixel nearest it where none is),
    parabolic sub-pixel, as shifts in [−n/2, n/2)."""
    n, ny, nx = cc.shape
    sy = (np.arange(ny) + ny / 2) % ny - ny / 2
    sx = (np.arange(nx) + nx / 2) % nx - nx / 2
    cy, cx = centers[:, 0, None, None], centers[:, 1, None, None]
    near = (sy[None, :, None] - cy) ** 2 + (sx[None, None, :] - cx) ** 2 <= window**2
    for j in np.flatnonzero(~near.any(axis=(1, 2))):
        near[j, int(round(centers[j, 0])) % ny, int(round(centers[j, 1])) % nx] = True
    iy, ix = np.divmod(np.argmax(np.where(near, cc, -np.inf).reshape(n, -1), axis=1), nx)
    j = np.arange(n)
    c0 = cc[j, iy, ix]

    def sub(a, b):
        den = a - 2 * c0 + b
        safe = np.where(den < 0, den, -1.0)
        return np.where(den < 0, np.clip(0.5 * (a - b) / safe, -0.5, 0.5), 0.0)

    dy = sy[iy] + sub(cc[j, iy - 1, ix], cc[j, (iy + 1) % ny, ix])
    dx = sx[ix] + sub(cc[j, iy, ix - 1], cc[j, iy, (ix + 1) % nx])
    return np.stack([dy, dx], axis=1)


def lattice_window(power: np.ndarray, shape) -> float:
    """Half the distance (px) from zero to the nearest other peak (above 0.2 of the central
    one) of the periodic autocorrelation whose power spectrum is ``power`` (e.g. the mean over BF images;
    its half plane, as :func:`bf_images` gives, of (ny, nx) ``shape`` images) — beyond
    it a shift of a crystal image is ambiguous. At least 2 px."""
    ac = fft.irfft2(power, s=shape)
    ny, nx = ac.shape
    sy = (np.arange(ny) + ny / 2) % ny - ny / 2
    sx = (np.arange(nx) + nx / 2) % nx - nx / 2
    r = np.hypot(sy[:, None], sx[None, :])
    # the zero lag holds the shot noise: the signal's own peak height is read next to it
    peak = float(ac[(r >= 1) & (r < 1.5)].max())
    # local maxima away from the central peak (beyond where the autocorrelation first falls to half)
    central = r <= max(1.5, float(r[ac < 0.5 * peak].min(initial=1.5)))
    is_max = np.ones_like(ac, bool)
    for ay, ax in ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1)):
        is_max &= ac >= np.roll(ac, (ay, ax), axis=(0, 1))
    cand = is_max & ~central & (ac > 0.2 * peak)
    if not cand.any():
        return max(2.0, 0.25 * min(ny, nx))
    return max(2.0, 0.5 * float(r[cand].min()))


def _tukey(n: int, frac: float = 0.25) -> np.ndarray:
    w = np.ones(n)
    m = max(1, int(frac * n / 2))
    ramp = 0.5 * (1 - np.cos(np.pi * (np.arange(m) + 0.5) / m))
    w[:m], w[n - m :] = ramp, ramp[::-1]
    return w


def bf_images(dense: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The BF-pixel images of ``dense`` (ny, nx, n, n) at ``inside``: their row/column indices and
    the windowed, mean-normalised images' half-plane spectra (npix, ny, nx // 2 + 1) (``rfft2``)."""
    iy, ix = np.nonzero(inside)
    ny, nx = dense.shape[:2]
    imgs = np.take(dense.reshape(ny * nx, -1), iy * dense.shape[3] + ix, axis=1).T.astype(np.float64)
    imgs = imgs.reshape(len(iy), ny, nx)
    mean = imgs.mean(axis=(1, 2), keepdims=True)
    imgs = imgs / np.where(mean > 0, mean, 1.0) - 1.0
    window = _tukey(ny)[:, None] * _tukey(nx)[None, :]
    return iy, ix, fft.rfft2(imgs * window, workers=-1)


class HalfPlane:
    """Sums over the whole 2-D frequency plane of (ny, nx) real images, on its half.

    ``rfft2`` keeps the columns 0 … ⌊nx/2⌋ of the plane; the others hold the complex
    conjugates of their mirror images, and so does a *shifted* spectrum ``S(q)·e^{iq·d}`` —
    except on the Nyquist row (even ny), where ``fftfreq`` gives both q_y = ±½ the frequency
    −½: there the mirror of a column is the same coefficient with q_y = +½. So a sum over the
    whole plane of ``Re(conj(A)·B)`` for any two such spectra (|A|², the power, among them) is the
    ``weights``-weighted sum over the half plane with, for even ny, the Nyquist row appended
    once more at q_y = +½ (:meth:`extend`): weight 2 on the columns whose mirrors are left out,
    1 on columns 0 and nx/2 (their own mirrors, not appended again: weight 0 in the appended
    row), 1 on both copies of the Nyquist row elsewhere.

    ``q_y`` (rows, 1), ``q_x`` (1, columns): phase (rad) per Å of shift (scan step ``step``
    (y, x) Å), as ``fftfreq`` assigns the frequencies.
    """

    def __init__(self, ny: int, nx: int, step):
        nh = nx // 2 + 1
        paired = np.arange(nh) > 0
        if nx % 2 == 0:
            paired[-1] = False
        weights = np.repeat(np.where(paired, 2.0, 1.0)[None, :], ny, axis=0)
        f_y = np.fft.fftfreq(ny)
        self.nyquist = ny // 2 if ny % 2 == 0 else None
        if self.nyquist is not None:
            weights[self.nyquist, paired] = 1.0
            weights = np.vstack([weights, paired.astype(np.float64)])
            f_y = np.append(f_y, 0.5)
        self.weights = weights
        self.q_y = 2 * np.pi * f_y[:, None] / step[0]
        self.q_x = 2 * np.pi * np.fft.fftfreq(nx)[:nh][None, :] / step[1]

    def extend(self, spec: np.ndarray) -> np.ndarray:
        """Half-plane spectra (…, ny, nh) with the Nyquist row appended where ny is even."""
        if self.nyquist is None:
            return spec
        return np.concatenate([spec, spec[..., self.nyquist : self.nyquist + 1, :]], axis=-2)

    def fold(self, a: np.ndarray) -> np.ndarray:
        """(ny, nh) from an extended half plane ``a`` (:meth:`extend`): the half plane of the
        Hermitian part of the whole-plane A — both copies of the Nyquist row averaged where
        they differ — so that ``irfft2(S·conj(fold(a)))``, S a real image's spectrum, is the
        real part of the whole plane's ``ifft2(S·conj(A))``."""
        if self.nyquist is None:
            return a
        out = a[: self.weights.shape[0] - 1].copy()
        paired = self.weights[-1] > 0
        out[self.nyquist, paired] = 0.5 * (a[self.nyquist, paired] + a[-1, paired])
        return out

    def shifted(self, spec: np.ndarray, shifts_a: np.ndarray) -> np.ndarray:
        """The spectra (n, rows, nh) — extended or not — of images shifted by ``shifts_a`` (n, 2) Å."""
        q_y = self.q_y[: spec.shape[1], 0]
        phase_y = np.exp(1j * shifts_a[:, :1] * q_y)[:, :, None]
        return spec * phase_y * np.exp(1j * shifts_a[:, 1:] * self.q_x)[:, None, :]

    def power(self, a: np.ndarray, dc: bool = True) -> float:
        """Σ over the whole plane of |A|² from an extended half-plane A (without q = 0 unless ``dc``)."""
        w = self.weights.copy()
        w[0, 0] *= dc
        return float(np.sum(w * np.abs(a) ** 2))


def _similarity(m: np.ndarray, flip: bool) -> tuple[float, float]:
    """(p·cos θ, p·sin θ) of the ``p·R(θ)·F`` closest to ``m`` (R, F as in
    :func:`stemdask.optics.detector_to_scan_frame` acting on (y, x) vectors)."""
    n = m @ np.diag([1.0, -1.0 if flip else 1.0])
    return (n[0, 0] + n[1, 1]) / 2, (n[0, 1] - n[1, 0]) / 2


def _form(pc: float, ps: float, flip: bool) -> np.ndarray:
    return np.array([[pc, ps], [-ps, pc]]) @ np.diag([1.0, -1.0 if flip else 1.0])


def _undistorted(pc: float, ps: float, flip: bool, descan_gradient: np.ndarray | None) -> tuple[float, float]:
    """The similarity (p·cos θ, p·sin θ) of M = M′·(I − D·M′)⁻¹, from the one fitted to images
    that a descan of gradient D shifts by M′ (see :func:`parallax`)."""
    if descan_gradient is None:
        return pc, ps
    m = _form(pc, ps, flip)
    return _similarity(m @ np.linalg.inv(np.eye(2) - np.asarray(descan_gradient) @ m), flip)


class AlignedPower:
    """Contrast power ``P(v) = Σ_q |A(q; v)|²`` of the mean of BF images aligned by the
    similarity ``v = (p·cos θ, p·sin θ)`` — image j shifted by ``d_j = p·R(θ)·F·k_j`` Å
    (:func:`_form`) — with its exact gradient and Hessian in v.

    ``spec`` (n, rows, nh): the images' half-plane spectra (:func:`bf_images`) extended by
    ``plane`` (:meth:`HalfPlane.extend`); ``k`` (n, 2): their detector frequencies (Å⁻¹).
    ``A = (1/n)·Σ_j spec_j·e^{iφ_j}`` with ``φ_j(q) = q_y·d_jy + q_x·d_jx`` (``plane``'s phase
    per Å) is linear in v through d_j, so every derivative of A is a sum of the spectra
    weighted by the monomials 1, k_y, k_x, k_y², k_y·k_x, k_x² (one matrix product). The sum
    runs over the whole plane, computed on its half (:class:`HalfPlane`): the Nyquist row and
    column have no conjugate partner (a sub-step shift there is a convention), and on 64²
    scans they move θ by ~0.1°.
    """

    def __init__(self, spec: np.ndarray, k: np.ndarray, flip: bool, plane: HalfPlane):
        n = spec.shape[0]
        self.spec, self.plane = spec, plane
        self.k, self.flip, self.sign = k, flip, -1.0 if flip else 1.0
        k_y, k_x = k[:, 0], k[:, 1]
        self.monomials = np.stack([np.ones(n), k_y, k_x, k_y * k_y, k_y * k_x, k_x * k_x]).astype(complex) / n

    def __call__(self, v) -> tuple[float, np.ndarray, np.ndarray]:
        """(P, ∂P/∂v (2,), ∂²P/∂v² (2, 2)) at v."""
        d = self.k @ _form(v[0], v[1], self.flip).T
        terms = self.plane.shifted(self.spec, d).reshape(len(d), -1)
        a, s_y, s_x, s_yy, s_yx, s_xx = (self.monomials @ terms).reshape(6, *self.spec.shape[1:])
        f, qy, qx, w = self.sign, self.plane.q_y, self.plane.q_x, self.plane.weights
        # ∂φ_j/∂(pc, ps) = (qy·k_y + f·qx·k_x, f·qy·k_x − qx·k_y)
        da = (1j * (qy * s_y + f * qx * s_x), 1j * (f * qy * s_x - qx * s_y))
        d2a = {
            (0, 0): -(qy**2 * s_yy + 2 * f * qy * qx * s_yx + qx**2 * s_xx),
            (1, 1): -(qy**2 * s_xx - 2 * f * qy * qx * s_yx + qx**2 * s_yy),
            (0, 1): -(f * (qy**2 - qx**2) * s_yx + qy * qx * (s_xx - s_yy)),
        }
        ca = w * np.conj(a)
        power = self.plane.power(a)
        grad = np.array([2 * float(np.sum((ca * x).real)) for x in da])
        hess = np.empty((2, 2))
        for (i, j), x in d2a.items():
            hess[i, j] = hess[j, i] = 2 * float(np.sum((w * np.conj(da[i]) * da[j] + ca * x).real))
        return power, grad, hess

    def maximise(self, start, gtol: float = 1e-8) -> np.ndarray:
        """The v of greatest P near ``start``: Newton steps in a trust region (scipy's
        ``trust-exact``) on the exact derivatives, in units of |start| and P(start), to a
        gradient of ``gtol`` (θ to ≪ 0.001°; 4–8 evaluations). ``start`` itself where it is
        zero or the images have no contrast (P = 0)."""
        start = np.asarray(start, dtype=np.float64)
        scale = float(np.abs(start).max())
        p, g, h = self(start) if scale > 0 else (0.0, None, None)
        if not (math.isfinite(scale) and scale > 0 and math.isfinite(p) and p > 0):
            return start  # no shift or no contrast to align: nothing to refine
        u0 = start / scale
        last = {tuple(u0): (-1.0, -g * scale / p, -h * scale**2 / p)}  # in units of P(start)

        def at(u):
            key = tuple(u)
            if key not in last:
                q, g, h = self(u * scale)
                last.clear()
                last[key] = (-q / p, -g * scale / p, -h * scale**2 / p)
            return last[key]

        res = optimize.minimize(
            lambda u: at(u)[:2], u0, jac=True, hess=lambda u: at(u)[2], method="trust-exact", options={"gtol": gtol}
        )
        return res.x * scale


def parallax(
    dense: np.ndarray,
    k_y: np.ndarray,
    k_x: np.ndarray,
    inside: np.ndarray,
    step,
    wavelength: float,
    iterations: int = 3,
    descan_gradient: np.ndarray | None = None,
    sigma_wanted=None,
) -> dict:
    """Parallax of bright-field images: M, hence flip, θ (mod 180°) and |C10| (defocused data).

    ``dense`` (ny, nx, n, n) counts; ``k_y, k_x`` (n,) detector-frame frequencies of its pixels
    (Å⁻¹, relative to k = 0); ``inside`` (n, n) the pixels to use (well inside the BF disk);
    ``step`` scan step (y, x) Å. ``descan_gradient`` D (2, 2), Å⁻¹ per Å: how far the disk
    moves on the detector (detector frame) per Å of probe position (scan frame), the descan's
    linear part. A fixed detector pixel k then sees the disk's k − D·r at position r, so its
    image is O((I + M·D)·r − M·k): the images are shifted by M′·k, M′ = (I + M·D)⁻¹·M, and
    M = M′·(I − D·M′)⁻¹ (at −100 Å and a 2 px plane descan over a 13 Å field, θ moves by ≈ 1°
    otherwise). Returns {flip, rotation_deg (the member of the θ/θ+180 pair
    that goes with C10 < 0), c10_abs_a, matrix (M, Å per Å⁻¹), similarity_error (‖M − nearest
    p·R·F‖ / ‖p·R·F‖), fit_rms_a (shift residual), rotation_sigma_deg (θ's standard error, from
    four disjoint sets of BF pixels), max_shift_a, window_px, alignment_gain (the
    aligned mean's contrast power over the plain mean's: ≫ 1 where the images really are
    shifted copies, ≈ 1 for the DPC-like in-focus BF images)}.

    ``sigma_wanted(result)``: whether θ's standard error is needed, given the rest of the
    result (its four refinements are about a third of the work); where it says no,
    ``rotation_sigma_deg`` is None and ``sigma_computed`` False. Default: always computed.
    """
    ny, nx = dense.shape[:2]
    step = np.asarray(step, dtype=np.float64)
    if np.count_nonzero(inside) < 4:
        raise InvalidParameter("parallax needs at least 4 bright-field pixels")
    iy, ix, spec = bf_images(dense, inside)
    plane = HalfPlane(ny, nx, step)
    window = lattice_window(np.mean(np.abs(spec) ** 2, axis=0), (ny, nx))
    k = np.stack([k_y[iy], k_x[ix]], axis=1)
    where = {(a, b): j for j, (a, b) in enumerate(zip(iy, ix))}
    m0 = np.zeros((2, 2))
    for axis, (oy, ox) in enumerate([(1, 0), (0, 1)]):
        pairs = [(j2, j) for (a, b), j in where.items() if (j2 := where.get((a + oy, b + ox))) is not None]
        later, earlier = np.array(pairs, dtype=np.intp).reshape(-1, 2).T
        cross = np.einsum("jyx,jyx->yx", spec[later], spec[earlier].conj())
        dk = (k_y[1] - k_y[0]) if axis == 0 else (k_x[1] - k_x[0])
        m0[:, axis] = _peaks(fft.irfft2(cross, s=(ny, nx))[None], np.zeros((1, 2)), window)[0] * step / dk

    whole = plane.extend(spec)

    def aligned_mean(shifts_a):
        return plane.shifted(whole, shifts_a).mean(axis=0)

    design = np.column_stack([k, np.ones(len(k))])
    fit = k @ m0.T
    for _ in range(iterations):
        ref = plane.fold(aligned_mean(fit))
        cc = fft.irfft2(spec * ref.conj(), s=(ny, nx), workers=-1)
        shifts = _peaks(cc, fit / step, window) * step
        coef, *_ = np.linalg.lstsq(design, shifts, rcond=None)
        fit = design @ coef
    m = coef[:2].T
    flip = bool(np.linalg.det(m) < 0)
    pc, ps = _similarity(m, flip)

    # refine the similarity locally: the sharpest aligned mean (power within the lattice-safe
    # neighbourhood of the least-squares M only — a larger move is an alias and is not taken)

    def refined(start, use):
        best = AlignedPower(whole[use], k[use], flip, plane).maximise(start)
        return best if np.linalg.norm(best - start) <= 0.1 * np.linalg.norm(start) else None

    best = refined(np.array([pc, ps]), slice(None))
    if best is not None:
        pc, ps = best
    true_pc, true_ps = _undistorted(pc, ps, flip, descan_gradient)
    size = math.hypot(pc, ps)
    nearest = _form(pc, ps, flip)
    true_m = m if descan_gradient is None else m @ np.linalg.inv(np.eye(2) - np.asarray(descan_gradient) @ m)
    true_nearest = _form(true_pc, true_ps, flip)
    # the mean counts are no contrast: q = 0 left out
    gain = plane.power(aligned_mean(k @ nearest.T), dc=False) / max(
        plane.power(whole.mean(axis=0), dc=False), 1e-300)
    rms = float(np.sqrt(np.mean(np.sum((shifts - fit) ** 2, axis=1))))
    result = {
        "flip": flip,
        "rotation_deg": _wrap180(math.degrees(math.atan2(true_ps, true_pc))),
        "c10_abs_a": math.hypot(true_pc, true_ps) / wavelength,
        "matrix": true_m.tolist(),
        "similarity_error": float(np.linalg.norm(true_m - true_nearest) / max(np.linalg.norm(true_nearest), 1e-30)),
        "fit_rms_a": rms,
        "rotation_sigma_deg": None,
        "max_shift_a": size * float(np.hypot(k[:, 0], k[:, 1]).max()),
        "window_px": float(window),
        "alignment_gain": gain,
        "sigma_computed": False,
    }
    if sigma_wanted is not None and not sigma_wanted(result):
        return result
    # θ's standard error: the same refinement on four disjoint sets of BF pixels (a 2 × 2
    # pattern on the detector: independent noise), σ = their scatter / √4. Conservative on
    # average (a quarter of the pixels refines θ worse than a quarter of the information
    # predicts) but, from 3 degrees of freedom, heavy-tailed: over benchmarks/calibration_grid.py
    # --seeds 1, half of it left rms(error/σ) = 1.36 and 2 of 33 cases beyond 3σ
    result["sigma_computed"] = True
    groups = [
        refined(np.array([pc, ps]), (iy % 2 == a) & (ix % 2 == b))
        for a in (0, 1)
        for b in (0, 1)
        if np.count_nonzero((iy % 2 == a) & (ix % 2 == b)) >= 2
    ]
    # unknown (None): a group that would leave the neighbourhood, or fewer than 3 groups
    if len(groups) >= 3 and all(g is not None for g in groups):
        groups = [_undistorted(*g, flip, descan_gradient) for g in groups]
        spread = np.array([_wrap180(math.degrees(math.atan2(g[1], g[0]) - math.atan2(true_ps, true_pc)))
                           for g in groups])
        result["rotation_sigma_deg"] = float(spread.std(ddof=1) / math.sqrt(len(spread)))
    return result


# ---------------------------------------------------------------------- half turn
def probe_otf(q: np.ndarray, wavelength: float, semiangle_mrad: float, c10_a: float) -> np.ndarray:
    """Transfer of the probe intensity |ψ(r)|² at spatial frequencies |q| (Å⁻¹): the
    normalised autocorrelation of the pupil A(k)·exp(−iπλC10k²) (round aperture). Real and
    the same for ±C10; changes sign at large defocus."""
    k0 = semiangle_mrad * 1e-3 / wavelength
    n = 256
    dk = 4 * k0 / n
    k = (np.arange(n) - n // 2) * dk
    ky, kx = np.meshgrid(k, k, indexing="ij")
    pupil = (np.hypot(ky, kx) < k0) * np.exp(-1j * np.pi * wavelength * c10_a * (ky**2 + kx**2))
    psf = np.abs(fft.ifft2(fft.ifftshift(pupil))) ** 2  # period 1/dk, wide enough for |C10|·α
    otf = fft.fftshift(fft.fft2(psf)).real
    otf /= otf[n // 2, n // 2]
    # radial profile of the OTF on the pupil's k grid (q spacing = dk)
    r = np.hypot(ky, kx)
    bins = np.round(r / dk).astype(int).ravel()
    profile = np.bincount(bins, otf.ravel()) / np.maximum(np.bincount(bins), 1)
    return np.interp(np.abs(q), np.arange(profile.size) * dk, profile, right=0.0)


def half_turn(candidate: np.ndarray, adf: np.ndarray, step, otf, band_inv_a: float) -> dict:
    """Agreement of a candidate phase image with the ADF image (same grid, scan step ``step`` Å).

    ``otf(q)``: the probe-intensity transfer at |q| Å⁻¹ (:func:`probe_otf`); ``band_inv_a``: the
    upper frequency limit (2α/λ). Returns {r, z, keep (r > 0), decided (|z| ≥ MIN_ADF_Z)}.
    """
    ny, nx = adf.shape
    window = _tukey(ny)[:, None] * _tukey(nx)[None, :]
    a = fft.rfft2((adf - adf.mean()) * window)
    b = fft.rfft2((candidate - candidate.mean()) * window)
    q_y = np.fft.fftfreq(ny, step[0])[:, None]
    q_x = np.fft.rfftfreq(nx, step[1])[None, :]
    q = np.hypot(q_y, q_x)
    low = 2.0 / min(ny * step[0], nx * step[1])
    band = (q > low) & (q < band_inv_a)
    w = np.abs(otf(q)) * band  # where the probe transfers anything: both images carry the same OTF
    num = float(np.sum((np.conj(a) * w * b).real))
    den = math.sqrt(float(np.sum(np.abs(a * w) ** 2)) * float(np.sum(np.abs(b) ** 2 * band)))
    r = num / den if den > 0 else 0.0
    # significance from the phases alone (any amplitude spectrum, red or white): each
    # coefficient's cos(phase difference) has variance ½ for images with unrelated phases
    mag = np.abs(a) * np.abs(b)
    cos = np.where(mag > 0, (np.conj(a) * b).real / np.where(mag > 0, mag, 1.0), 0.0)
    null = math.sqrt(0.5 * float(np.sum(w**2 * (mag > 0))))
    z = float(np.sum(w * cos)) / null if null > 0 else 0.0
    return {"r": r, "z": z, "keep": r > 0, "decided": abs(z) >= MIN_ADF_Z}


def icom_phase(com_y, com_x, rotation_deg: float, flip: bool, step) -> np.ndarray:
    """The iCOM phase (arbitrary scale, sign as the method's) of a detector-frame COM field."""
    g_y, g_x = detector_to_scan_frame(_clean(com_y), _clean(com_x), rotation_deg, flip)
    return integrate_com(g_y, g_x, step)
