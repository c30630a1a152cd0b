"""Numba kernel of a live session: per-frame sums for COM and virtual detectors in one pass.

A frame is read once: its total, its first moments (Σ I·k_y, Σ I·k_x; pixel centres at
integer coordinates, as everywhere in stemdask) and its sum over each *pixel group*
(pixels grouped by the set of virtual detectors they belong to, see
:func:`stemdask.reduce.mask_groups`). Integer frames are summed exactly in int64, so the
COM ``Σ I·k / Σ I`` equals that of the same frame's electron events
(:func:`stemdask.kernels.events.center_of_mass`) to the last bit.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def frame_sums(frames, labels, n_groups, zero):
    """Frames (m, H, W) (any strides, any numeric dtype), ``labels`` (H, W) group of each pixel.

    ``zero``: the accumulator type (:func:`stemdask.kernels.ricom.accumulator_zero`).
    Returns ``total`` (m,), ``sum_y`` (m,), ``sum_x`` (m,) and ``groups`` (m, n_groups), all
    float64 (exact integers for integer frames below 2⁵³).
    """
    m, hgt, wid = frames.shape
    total = np.zeros(m)
    sum_y = np.zeros(m)
    sum_x = np.zeros(m)
    groups = np.zeros((m, n_groups))
    acc = np.full(n_groups, zero)
    for f in range(m):
        tot = zero
        sy = zero
        sx = zero
        acc[:] = 0
        for y in range(hgt):
            row = frames[f, y]
            lab = labels[y]
            rs = zero
            rx = zero
            for x in range(wid):
                v = row[x]
                rs += v
                rx += v * x
            for x in range(wid):
                acc[lab[x]] += row[x]
            tot += rs
            sy += rs * y
            sx += rx
        total[f] = tot
        sum_y[f] = sy
        sum_x[f] = sx
        for g in range(n_groups):
            groups[f, g] = acc[g]
    return total, sum_y, sum_x, groups
