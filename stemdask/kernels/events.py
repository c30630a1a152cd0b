"""O(C) kernels over one row block of electron events (CSR without the offsets array).

Every kernel takes ``counts`` (P,) — events per position, positions in scan order — and
``indices`` (Σ counts,) — the linear detector index ``k_y * det_x + k_x`` of each event,
grouped by position. They walk the events once, in order, so their cost is O(events), never
O(positions × detector pixels). Pure functions: plain arrays in, plain arrays out.

Detector pixel (k_y, k_x) is recovered from the linear index without an integer division:
``k_y = floor((i + 0.5) · (1 / det_x))`` is exact for every ``i < 2**32`` in float64
(the product lies at least ``0.5 / det_x`` away from an integer, far above the rounding error).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True, inline="always")
def _split(i, det_x, inv_det_x):
    y = np.int64((np.float64(i) + 0.5) * inv_det_x)
    return y, np.int64(i) - y * det_x


@numba.njit(nogil=True, cache=True)
def center_of_mass(counts, indices, det_x, ref_y, ref_x):
    """Mean detector position of each position's events, minus a reference (pixels).

    Returns ``(com_y, com_x)``, each (P,) float64; NaN where a position has no events.
    Pixel (k_y, k_x) sits at coordinate (k_y, k_x) (pixel centres at integers).
    """
    n_pos = counts.shape[0]
    com_y = np.empty(n_pos, np.float64)
    com_x = np.empty(n_pos, np.float64)
    inv = 1.0 / det_x
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        sy = np.int64(0)
        sx = np.int64(0)
        for j in range(e, e + n):
            y, x = _split(indices[j], det_x, inv)
            sy += y
            sx += x
        e += n
        if n:
            com_y[p] = sy / n - ref_y
            com_x[p] = sx / n - ref_x
        else:
            com_y[p] = np.nan
            com_x[p] = np.nan
    return com_y, com_x


@numba.njit(nogil=True, cache=True)
def masked_counts(counts, indices, labels, table):
    """Events per position inside each of several (possibly overlapping) detector masks.

    Pixels are grouped by which detectors they belong to: ``labels`` (D,) gives each
    detector pixel a group ``0 ≤ g < G``; ``table`` (G, n_detectors) is 1 where group ``g``
    belongs to detector ``d``. Each event costs one increment of its group's counter
    (branch-free); the groups are mapped onto detectors once per position.
    Returns (P, n_detectors) uint32.
    """
    n_pos = counts.shape[0]
    n_groups, n_det = table.shape
    out = np.zeros((n_pos, n_det), np.uint32)
    acc = np.zeros(n_groups, np.uint32)
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        acc[:] = 0
        for j in range(e, e + n):
            acc[labels[indices[j]]] += 1
        e += n
        for g in range(n_groups):
            for d in range(n_det):
                out[p, d] += acc[g] * table[g, d]
    return out


@numba.njit(nogil=True, cache=True)
def histogram(indices, n_pixels):
    """Events per detector pixel, (n_pixels,) uint64 — one block's share of the PACBED."""
    out = np.zeros(n_pixels, np.uint64)
    for j in range(indices.shape[0]):
        out[indices[j]] += 1
    return out


@numba.njit(nogil=True, cache=True)
def densify_lookup(det_y, det_x, y0, x0, bin_factor, out_y, out_x):
    """For :func:`densify`: output pixel (flat, ``a·out_x + b``) of every detector pixel, −1 outside.

    Output pixel (a, b) sums detector pixels ``y0 + a·bin .. y0 + (a+1)·bin − 1`` (same in x
    from ``x0``); ``y0``/``x0`` may be negative, the window may pass the detector edge.
    """
    lut = np.full(det_y * det_x, -1, np.int32)
    for y in range(det_y):
        dy = y - y0
        if dy < 0 or dy >= out_y * bin_factor:
            continue
        for x in range(det_x):
            dx = x - x0
            if 0 <= dx < out_x * bin_factor:
                lut[y * det_x + x] = (dy // bin_factor) * out_x + dx // bin_factor
    return lut


@numba.njit(nogil=True, cache=True)
def densify(counts, indices, lookup, out):
    """Crop, bin and densify: add each position's events into ``out`` (P, out_y, out_x) float32.

    ``lookup`` (from :func:`densify_lookup`) maps each detector pixel to its flat output
    pixel, or −1 for pixels outside the window (their events are dropped). ``out`` is
    allocated (zeroed) by the caller — with NumPy, whose large allocations get transparent
    huge pages: first-touching the output costs ~6× less than an allocation made in numba,
    and for a large crop it is most of densify's time. Returns ``out``.
    """
    n_pos = counts.shape[0]
    size = out.shape[1] * out.shape[2]
    flat = out.reshape(n_pos * size)
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        base = p * size
        for j in range(e, e + n):
            o = lookup[indices[j]]
            if o >= 0:
                flat[base + o] += 1.0
        e += n
    return out


@numba.njit(nogil=True, cache=True)
def bin_scan(counts, indices, factor):
    """Merge the events of ``factor × factor`` neighbouring positions.

    ``counts`` (R, nx) with R a multiple of ``factor``; trailing columns that do not fill a
    bin are dropped. Output position (i, j) holds the events of input positions
    (i·f + a, j·f + b), a, b < f, in scan order. Returns ``(counts (R/f, nx//f) uint32,
    indices)`` (indices keep the input dtype).
    """
    rows, nx = counts.shape
    oy = rows // factor
    ox = nx // factor
    flat = counts.ravel()
    off = np.zeros(rows * nx + 1, np.int64)
    for p in range(rows * nx):
        off[p + 1] = off[p] + flat[p]
    out_counts = np.zeros((oy, ox), np.uint32)
    for i in range(oy):
        for j in range(ox):
            s = 0
            for a in range(factor):
                for b in range(factor):
                    s += counts[i * factor + a, j * factor + b]
            out_counts[i, j] = s
    out = np.empty(np.int64(out_counts.astype(np.int64).sum()), indices.dtype)
    k = 0
    for i in range(oy):
        for j in range(ox):
            for a in range(factor):
                for b in range(factor):
                    p = (i * factor + a) * nx + j * factor + b
                    for q in range(off[p], off[p + 1]):
                        out[k] = indices[q]
                        k += 1
    return out_counts, out


@numba.njit(nogil=True, cache=True)
def select_toa(counts, indices, toa, t_min, t_max):
    """Keep events with ``t_min ≤ toa < t_max`` (dose fractionation within the dwell).

    Returns ``(counts (P,) uint32, indices, toa)`` of the kept events, order preserved.
    """
    n_pos = counts.shape[0]
    keep_counts = np.zeros(n_pos, np.uint32)
    kept = 0
    for j in range(indices.shape[0]):
        if t_min <= toa[j] < t_max:
            kept += 1
    out_idx = np.empty(kept, indices.dtype)
    out_toa = np.empty(kept, toa.dtype)
    e = 0
    k = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        for j in range(e, e + n):
            if t_min <= toa[j] < t_max:
                out_idx[k] = indices[j]
                out_toa[k] = toa[j]
                keep_counts[p] += 1
                k += 1
        e += n
    return keep_counts, out_idx, out_toa
