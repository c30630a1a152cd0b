"""Dense detector frames → electron events (ingest of npy / HDF5 / Merlin data).

Two readings of a pixel value ``v`` (frames flattened to (P, D), D = detector pixels,
linear index ``k_y · det_x + k_x``):

* counted: ``v`` is a number of electrons → ``v`` events of that pixel (exact);
* thresholded: ``v > threshold`` → one event.

Both return ``(counts (P,) int64, indices (Σ counts,) uint32)``, indices ascending within
a position.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def counted_frames_to_events(frames):
    """Counted frames (P, D), any real dtype → (counts, indices, n_bad).

    ``n_bad``: pixels whose value is negative or not an integer (the caller raises; their
    events are not produced).
    """
    n_pos, n_pix = frames.shape
    counts = np.zeros(n_pos, np.int64)
    n_bad = 0
    for p in range(n_pos):
        c = 0
        for j in range(n_pix):
            v = frames[p, j]
            if v != 0:
                n = np.int64(v)
                if v < 0 or n != v:
                    n_bad += 1
                else:
                    c += n
        counts[p] = c
    indices = np.empty(counts.sum(), np.uint32)
    k = 0
    for p in range(n_pos):
        for j in range(n_pix):
            v = frames[p, j]
            if v > 0:
                n = np.int64(v)
                if n == v:
                    for _ in range(n):
                        indices[k] = j
                        k += 1
    return counts, indices, n_bad


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
