"""O(C) kernels over one row block of electron events (CSR without the offsets array).

Every kernel takes ``counts`` (P,) — entries per position, positions in scan order —,
``indices`` (Σ counts,) — the linear detector index ``k_y * det_x + k_x`` of each entry,
grouped by position — and ``weights``: None when each entry is one electron (an events
store), else (Σ counts,) unsigned ints, the electrons of each entry (a weighted store: one
entry per counted pixel). A weighted entry counts exactly as that many identical events, so
results equal those of the expanded events (and of the dense frames). They walk the entries
once, in order, so their cost is O(entries), never O(positions × detector pixels). Numba
compiles the ``weights=None`` case apart, with the weight a constant 1 (no cost). Pure
functions: plain arrays in, plain arrays out.

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
def _weight(weights, j):
    """Electrons of entry ``j``: 1 without weights (compiled apart, a constant)."""
    if weights is None:
        return np.int64(1)
    return np.int64(weights[j])


@numba.njit(nogil=True, cache=True)
def position_sums(counts, weights):
    """Electrons per position (P,) int64: the sum of each position's entry weights."""
    out = np.zeros(counts.shape[0], np.int64)
    e = 0
    for p in range(counts.shape[0]):
        n = np.int64(counts[p])
        t = np.int64(0)
        for j in range(e, e + n):
            t += _weight(weights, j)
        out[p] = t
        e += n
    return out


#: ``keep`` argument meaning "every pixel".
ALL_PIXELS = np.zeros(0, np.uint8)


#: Largest detector (pixels) for which :func:`center_of_mass_unmasked`'s float32 row split is
#: exact: (i + ½)/W in float32 is off by at most (H·W)·2⁻²³/W, under the ½/W margin to the next
#: row while H·W < 2²²; one more factor 2 of headroom.
FLOAT32_SPLIT_PIXELS = 1 << 21


def center_of_mass(counts, indices, det_x, ref_y, ref_x, keep=None, weights=None, n_pixels=None):
    """:func:`center_of_mass_kept` using every pixel unless ``keep`` (D,) uint8 is given; with
    no ``keep`` on a detector of ``n_pixels`` ≤ :data:`FLOAT32_SPLIT_PIXELS` (or uint16
    indices), :func:`center_of_mass_unmasked` (the same numbers, ≈ 1.8× faster)."""
    if keep is None and (indices.dtype.itemsize <= 2 or (n_pixels is not None and n_pixels <= FLOAT32_SPLIT_PIXELS)):
        return center_of_mass_unmasked(counts, indices, weights, det_x, ref_y, ref_x)
    return center_of_mass_kept(counts, indices, weights, det_x, ref_y, ref_x, ALL_PIXELS if keep is None else keep)


#: Entries per partial sum in :func:`center_of_mass_unmasked`'s inner loop.
ROW_SUM_RUN = 1024


@numba.njit(nogil=True, cache=True)
def center_of_mass_unmasked(counts, indices, weights, det_x, ref_y, ref_x):
    """:func:`center_of_mass_kept` without a mask, for detectors of at most
    :data:`FLOAT32_SPLIT_PIXELS` pixels: per position Σ w·i and Σ w·y (y = ⌊i/W⌋ by a float32
    multiply, exact there), then Σ w·x = Σ w·i − W·Σ w·y — one split per event, no x. Without
    weights each position is summed in runs of :data:`ROW_SUM_RUN` entries, each run a loop of
    its own with fresh accumulators, and the index converted to float32 as a signed int32 (an
    index below 2²¹ is one): the form LLVM vectorises best (≈ 1.25× the single loop over
    uint32, ``python benchmarks/reductions.py``). Integer sums: the result equals the general
    kernel's exactly."""
    n_pos = counts.shape[0]
    com_y = np.empty(n_pos, np.float64)
    com_x = np.empty(n_pos, np.float64)
    inv = np.float32(1.0 / det_x)
    half = np.float32(0.5)
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        si = np.int64(0)
        sy = np.int64(0)
        used = np.int64(0)
        if weights is None:
            used = n
            for j0 in range(e, e + n, ROW_SUM_RUN):
                rows = np.int64(0)
                for j in range(j0, min(e + n, j0 + ROW_SUM_RUN)):
                    i = np.int32(indices[j])
                    si += np.int64(i)
                    rows += np.int64(np.int32((np.float32(i) + half) * inv))
                sy += rows
        else:
            for j in range(e, e + n):
                w = np.int64(weights[j])
                i = np.int64(indices[j])
                si += w * i
                sy += w * np.int64(np.int32((np.float32(indices[j]) + half) * inv))
                used += w
        e += n
        if used:
            com_y[p] = sy / used - ref_y
            com_x[p] = (si - sy * det_x) / used - ref_x
        else:
            com_y[p] = np.nan
            com_x[p] = np.nan
    return com_y, com_x


@numba.njit(nogil=True, cache=True)
def center_of_mass_kept(counts, indices, weights, det_x, ref_y, ref_x, keep):
    """Mean detector position of each position's electrons, minus a reference (pixels).

    ``keep`` (D,) uint8: 1 for the detector pixels to use, 0 for masked ones (their events
    are skipped); an empty array uses every pixel. Returns ``(com_y, com_x)``, each (P,)
    float64; NaN where a position has no (kept) events. Pixel (k_y, k_x) sits at coordinate
    (k_y, k_x) (pixel centres at integers).
    """
    n_pos = counts.shape[0]
    com_y = np.empty(n_pos, np.float64)
    com_x = np.empty(n_pos, np.float64)
    inv = 1.0 / det_x
    masked = keep.shape[0] > 0
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        sy = np.int64(0)
        sx = np.int64(0)
        used = n
        if masked:
            used = 0
            for j in range(e, e + n):
                i = indices[j]
                if keep[i]:
                    w = _weight(weights, j)
                    y, x = _split(i, det_x, inv)
                    sy += y * w
                    sx += x * w
                    used += w
        else:
            used = 0
            for j in range(e, e + n):
                w = _weight(weights, j)
                y, x = _split(indices[j], det_x, inv)
                sy += y * w
                sx += x * w
                used += w
        e += n
        if used:
            com_y[p] = sy / used - ref_y
            com_x[p] = sx / used - ref_x
        else:
            com_y[p] = np.nan
            com_x[p] = np.nan
    return com_y, com_x


@numba.njit(nogil=True, cache=True)
def annular_counts(counts, indices, weights, det_x, center_y, center_x, r2_lo, r2_hi, keep, fill_idx, fill_w):
    """Counts in annuli around a per-position centre (descan), with masked pixels filled.

    ``center_y, center_x`` (P,): each position's BF-disk centre (px); an event at pixel
    (y, x) counts for annulus d when ``r2_lo[d] ≤ (y − cy)² + (x − cx)² < r2_hi[d]`` (px²).
    ``keep`` (D,) uint8: events on pixels with 0 are skipped; for each masked pixel
    ``fill_idx[m]`` the position instead gets ``n_kept · fill_w[m]`` expected electrons in
    every annulus containing that pixel (``fill_w``: the masked pixel's share of a pattern
    relative to the kept pixels, from the PACBED). Returns (P, n_det) float64.
    """
    n_pos = counts.shape[0]
    n_det = r2_lo.shape[0]
    out = np.zeros((n_pos, n_det), np.float64)
    inv = 1.0 / det_x
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        cy = center_y[p]
        cx = center_x[p]
        kept = 0
        for j in range(e, e + n):
            i = indices[j]
            if keep[i]:
                w = _weight(weights, j)
                kept += w
                y, x = _split(i, det_x, inv)
                r2 = (y - cy) ** 2 + (x - cx) ** 2
                for d in range(n_det):
                    if r2_lo[d] <= r2 < r2_hi[d]:
                        out[p, d] += w
        e += n
        for m in range(fill_idx.shape[0]):
            y, x = _split(fill_idx[m], det_x, inv)
            r2 = (y - cy) ** 2 + (x - cx) ** 2
            for d in range(n_det):
                if r2_lo[d] <= r2 < r2_hi[d]:
                    out[p, d] += kept * fill_w[m]
    return out


@numba.njit(nogil=True, cache=True)
def masked_counts(counts, indices, weights, labels, table):
    """Events per position inside each of several (possibly overlapping) detector masks.

    Pixels are grouped by which detectors they belong to: ``labels`` (D,) gives each
    detector pixel a group ``0 ≤ g < G``; ``table`` (G, n_detectors) is 1 where group ``g``
    belongs to detector ``d``. Each entry costs one add of its weight to its group's counter
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
            acc[labels[indices[j]]] += _weight(weights, j)
        e += n
        for g in range(n_groups):
            for d in range(n_det):
                out[p, d] += acc[g] * table[g, d]
    return out


@numba.njit(nogil=True, cache=True)
def histogram(indices, weights, n_pixels):
    """Electrons per detector pixel, (n_pixels,) uint64 — one block's share of the PACBED."""
    return add_histogram(indices, weights, np.zeros(n_pixels, np.uint64))


@numba.njit(nogil=True, cache=True)
def add_histogram(indices, weights, out):
    """:func:`histogram` added into ``out`` (n_pixels,) uint64, which it returns."""
    for j in range(indices.shape[0]):
        out[indices[j]] += _weight(weights, j)
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
def densify(counts, indices, weights, lookup, out, target=None):
    """Crop, bin and densify: add each position's events into ``out`` (P, out_y, out_x) float32.

    ``lookup`` (from :func:`densify_lookup`) maps each detector pixel to its flat output
    pixel, or −1 for pixels outside the window (their events are dropped). ``target`` (P,)
    int64, optional: the output pattern of each position, −1 to drop it (scan binning:
    :func:`scan_bin_targets`); by default position p fills pattern p. ``out`` is
    allocated (zeroed) by the caller — with NumPy, whose large allocations get transparent
    huge pages: first-touching the output costs ~6× less than an allocation made in numba,
    and for a large crop it is most of densify's time. Returns ``out``.
    """
    n_pos = counts.shape[0]
    size = out.shape[1] * out.shape[2]
    flat = out.reshape(out.shape[0] * size)
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        t = p if target is None else target[p]
        if t >= out.shape[0]:
            raise IndexError("densify: a target pattern beyond the output")
        if t >= 0:
            base = t * size
            for j in range(e, e + n):
                o = lookup[indices[j]]
                if o >= 0:
                    flat[base + o] += _weight(weights, j)
        e += n
    return out


def scan_bin_targets(rows: int, nx: int, factor: int, first_row: int = 0) -> np.ndarray:
    """For :func:`densify` and :func:`densify_shifted`: the output pattern (int64) of each
    position of rows ``first_row … first_row + rows − 1`` (``nx`` positions each) of a scan
    binned ``factor × factor`` as :func:`bin_scan` bins it — output position (i, j) is pattern
    ``i·(nx // factor) + j`` — and −1 for the trailing columns that fill no bin."""
    ox = nx // factor
    iy, ix = np.divmod(np.arange(rows * nx, dtype=np.int64), nx)
    target = ((first_row + iy) // factor) * ox + ix // factor
    target[ix >= ox * factor] = -1
    return target


@numba.njit(nogil=True, cache=True, inline="always")
def _box_split(t, b):
    """A unit box ``[t, t + 1)`` over bins ``[a·b, (a + 1)·b)``: (first bin, its share)."""
    a = np.int64(np.floor(t / b))
    edge = (a + 1) * b
    return a, min(1.0, edge - t)


@numba.njit(nogil=True, cache=True, inline="always")
def _splat(flat, base, n_out, ty, tx, b, w):
    """Add weight ``w`` of a unit box at (ty, tx) (output-origin px) into ``flat[base:]``."""
    ay, fy = _box_split(ty, b)
    ax, fx = _box_split(tx, b)
    for oy, wy in ((ay, fy), (ay + 1, 1.0 - fy)):
        if wy <= 0.0 or oy < 0 or oy >= n_out:
            continue
        for ox, wx in ((ax, fx), (ax + 1, 1.0 - fx)):
            if wx > 0.0 and 0 <= ox < n_out:
                flat[base + oy * n_out + ox] += w * wy * wx


@numba.njit(nogil=True, cache=True)
def densify_shifted(counts, indices, weights, det_x, shift_y, shift_x, y0, x0, bin_factor, keep, fill_idx, fill_w,
                    out, target=None):
    """Crop, bin and densify with a per-position sub-pixel shift (descan) and masked pixels filled.

    Each event is a unit box (its detector pixel) moved by ``−(shift_y[p], shift_x[p])``
    px and shared between the ``bin × bin`` output pixels it overlaps by area, so the k-grid
    of every position follows its own BF-disk origin; with zero shifts this is exactly
    :func:`densify`. Output pixel (a, b) covers detector rows ``y0 + a·bin − ½ …
    y0 + (a + 1)·bin − ½`` (same in x). Events on pixels with ``keep == 0`` are skipped;
    each masked pixel ``fill_idx[m]`` instead adds ``n_kept · fill_w[m]`` electrons (see
    :func:`annular_counts`), moved the same way. ``out`` (P, n, n) float32, zeroed by the
    caller; ``target`` as in :func:`densify`. Returns ``out``.
    """
    n_pos = counts.shape[0]
    n_out = out.shape[1]
    size = n_out * out.shape[2]
    flat = out.reshape(out.shape[0] * size)
    inv = 1.0 / det_x
    e = 0
    for p in range(n_pos):
        n = np.int64(counts[p])
        t = p if target is None else target[p]
        if t >= out.shape[0]:
            raise IndexError("densify_shifted: a target pattern beyond the output")
        if t < 0:
            e += n
            continue
        base = t * size
        oy = y0 + shift_y[p]  # a pixel spans [y − ½, y + ½): its box starts at y − oy in bin units
        ox = x0 + shift_x[p]
        kept = 0
        for j in range(e, e + n):
            i = indices[j]
            if keep[i]:
                w = _weight(weights, j)
                kept += w
                y, x = _split(i, det_x, inv)
                _splat(flat, base, n_out, y - oy, x - ox, bin_factor, np.float64(w))
        e += n
        for m in range(fill_idx.shape[0]):
            y, x = _split(fill_idx[m], det_x, inv)
            _splat(flat, base, n_out, y - oy, x - ox, bin_factor, kept * fill_w[m])
    return out


def bin_scan(counts, indices, factor, weights=None):
    """Merge the entries of ``factor × factor`` neighbouring positions.

    ``counts`` (R, nx) entries per position, R a multiple of ``factor``; trailing columns
    that do not fill a bin are dropped. Output position (i, j) holds the entries of input
    positions (i·f + a, j·f + b), a, b < f, in scan order. Returns ``(counts (R/f, nx//f)
    uint32, indices, weights)`` (indices and weights keep their dtypes; weights None
    without weights).
    """
    binned, order = _bin_order(counts, factor)
    return binned, indices[order], None if weights is None else weights[order]


@numba.njit(nogil=True, cache=True)
def _bin_order(counts, factor):
    """For :func:`bin_scan`: (binned entry counts, the input entry of every output entry)."""
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
    order = np.empty(np.int64(out_counts.astype(np.int64).sum()), np.int64)
    k = 0
    for i in range(oy):
        for j in range(ox):
            for a in range(factor):
                for b in range(factor):
                    p = (i * factor + a) * nx + j * factor + b
                    for q in range(off[p], off[p + 1]):
                        order[k] = q
                        k += 1
    return out_counts, order


@numba.njit(nogil=True, cache=True)
def select_toa(counts, indices, toa, t_min, t_max):
    """Keep events with ``t_min ≤ toa < t_max`` (dose fractionation within the dwell;
    arrival times exist only for events, one per electron, so there are no weights).

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
