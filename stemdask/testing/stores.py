"""Event stores for tests and benchmarks."""

from __future__ import annotations

import os

import numpy as np

from ..optics import Calibration
from ..store import EventStore, create_store


def random_event_store(
    path: str | os.PathLike,
    scan_shape: tuple[int, int],
    detector: int,
    events_per_position: float,
    *,
    rows_per_block: int | None = None,
    bf_radius: float = 4.0,
    seed: int = 0,
    overwrite: bool = False,
) -> EventStore:
    """A store of any size, fast: Poisson(``events_per_position``) events per position at
    scattered detector pixels, no physics — for scale tests and benchmarks.

    The calibration declares a ``bf_radius``-pixel BF disk at the detector centre (1 mrad/px,
    semi-angle = ``bf_radius`` mrad, 0.5 Å steps) so dense methods get a small, known input.
    """
    rng = np.random.default_rng(seed)
    ny, nx = scan_shape
    cal = Calibration(scan_step_a=0.5, detector_pixel_mrad=1.0, semiangle_mrad=float(bf_radius),
                      bf_center=(detector / 2, detector / 2), bf_radius=float(bf_radius))
    store = create_store(path, scan_shape, (detector, detector), cal, rows_per_block=rows_per_block,
                         provenance={"source": "stemdask.testing.random_event_store"}, overwrite=overwrite)
    n_pix = detector * detector
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        counts = rng.poisson(events_per_position, size=(r1 - r0, nx)).astype(np.uint32)
        indices = (np.arange(int(counts.sum()), dtype=np.int64) * 7919 + b) % n_pix
        store.write_block(b, counts, indices)
    return store.finalize()
