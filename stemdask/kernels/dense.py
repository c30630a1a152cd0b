"""Dense detector frames → store entries (ingest of npy / HDF5 / Merlin data).

Two readings of a pixel value ``v`` (frames flattened to (P, D), D = detector pixels,
linear index ``k_y · det_x + k_x``):

* counted: ``v`` is a number of electrons — exact, either as ``v`` events of that pixel
  (encoding "events") or as one entry of that pixel with weight ``v`` (encoding
  "weighted", pixels with ``v = 0`` omitted);
* thresholded: ``v > threshold`` → one event.

:func:`count_frames` is the first pass (what each position holds, which values are not
counts); the fill kernels write into arrays the caller allocated in the store's dtypes.
Entries are ascending in pixel index within a position.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def count_frames(frames):
    """Counted frames (P, D), any real dtype → (electrons (P,) int64, nonzero (P,) int64,
    n_bad, largest value).

    ``n_bad``: pixels whose value is negative or not a whole number (not counts; the caller
    refuses the data, and the fill kernels skip them).
    """
    n_pos, n_pix = frames.shape
    electrons = np.zeros(n_pos, np.int64)
    nonzero = np.zeros(n_pos, np.int64)
    n_bad = 0
    top = 0
    for p in range(n_pos):
        c = 0
        nz = 0
        for j in range(n_pix):
            v = frames[p, j]
            if v != 0:
                n = np.int64(v)
                if v < 0 or n != v:
                    n_bad += 1
                else:
                    c += n
                    nz += 1
                    top = max(top, n)
        electrons[p] = c
        nonzero[p] = nz
    return electrons, nonzero, n_bad, top


@numba.njit(nogil=True, cache=True)
def fill_entries(frames, indices, weights):
    """Write the entries of counted frames. ``weights`` None: one entry per electron (pixel
    ``j`` with count ``v`` appears ``v`` times in ``indices``, length Σ electrons of
    :func:`count_frames`); an array: one entry per counted pixel, its index in ``indices``
    and its count in ``weights`` (length Σ nonzero). Non-counts are skipped."""
    n_pos, n_pix = frames.shape
    k = 0
    for p in range(n_pos):
        for j in range(n_pix):
            v = frames[p, j]
            if v > 0:
                n = np.int64(v)
                if n == v:
                    if weights is None:
                        for _ in range(n):
                            indices[k] = j
                            k += 1
                    else:
                        indices[k] = j
                        weights[k] = n
                        k += 1


@numba.njit(nogil=True, cache=True)
def thresholded_frames_to_events(frames, threshold):
    """Frames (P, D) → one event for each pixel with value > ``threshold``: (counts, indices)."""
    n_pos, n_pix = frames.shape
    counts = np.zeros(n_pos, np.int64)
    for p in range(n_pos):
        c = 0
        for j in range(n_pix):
            if frames[p, j] > threshold:
                c += 1
        counts[p] = c
    indices = np.empty(counts.sum(), np.uint32)
    k = 0
    for p in range(n_pos):
        for j in range(n_pix):
            if frames[p, j] > threshold:
                indices[k] = j
                k += 1
    return counts, indices


def entries_of(frames, per_position, index_dtype, weight_dtype=None):
    """The entries of counted frames, given ``per_position`` from :func:`count_frames`
    (its electrons for events, its nonzero for weighted): (indices, weights or None — one
    entry per electron without ``weight_dtype``)."""
    indices = np.empty(int(per_position.sum()), index_dtype)
    weights = None if weight_dtype is None else np.empty(indices.size, weight_dtype)
    fill_entries(frames, indices, weights)
    return indices, weights


def counted_frames_to_events(frames, index_dtype=np.uint32):
    """Counted frames (P, D) → (counts (P,) int64, indices, n_bad): one entry per electron."""
    electrons, _, n_bad, _ = count_frames(frames)
    return electrons, entries_of(frames, electrons, index_dtype)[0], n_bad


def counted_frames_to_weighted(frames, index_dtype=np.uint32, weight_dtype=np.uint32):
    """Counted frames (P, D) → (entries (P,) int64, indices, weights, n_bad, largest value):
    one entry per counted pixel. Weights above ``weight_dtype``'s range are the caller's to
    refuse (from the largest value) before storing."""
    _, nonzero, n_bad, top = count_frames(frames)
    indices, weights = entries_of(frames, nonzero, index_dtype, weight_dtype)
    return nonzero, indices, weights, n_bad, top
