"""Poisson sampling of electron events from expected-intensity patterns (simulator kernel)."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def sample_events(patterns, dose, seed):
    """Draw electron events from diffraction patterns.

    patterns: (P, D) float, each row the probability of an electron landing in each of D
    detector pixels (rows sum to the detected fraction, ≤ 1). dose: electrons per
    position. Each pixel's count is independent Poisson(dose · p): drawn as a Poisson total
    followed by a categorical draw per electron (the same distribution).

    Returns (counts (P,) uint32, indices (Σ counts,) uint32 ascending within a position).
    """
    np.random.seed(seed)
    n_pos, n_pix = patterns.shape
    counts = np.empty(n_pos, np.uint32)
    for p in range(n_pos):
        total = 0.0
        for j in range(n_pix):
            total += patterns[p, j]
        counts[p] = np.random.poisson(dose * total) if total > 0 else 0
    out = np.empty(counts.astype(np.int64).sum(), np.uint32)
    cdf = np.empty(n_pix, np.float64)
    pos = 0
    for p in range(n_pos):
        n = counts[p]
        if n == 0:
            continue
        acc = 0.0
        for j in range(n_pix):
            acc += patterns[p, j]
            cdf[j] = acc
        u = np.sort(np.random.random(n)) * acc
        j = 0
        for i in range(n):
            while j < n_pix - 1 and cdf[j] <= u[i]:
                j += 1
            out[pos + i] = j
        pos += n
    return counts, out
