"""Event stores for tests and benchmarks."""

from __future__ import annotations

import os

import numpy as np

from ..optics import Calibration
from ..store import EventStore, create_store

#: Length of the random pixel sequence of :func:`random_event_store` (a prime; 128 kB of uint16).
PATTERN = 65521


def random_event_store(
    path: str | os.PathLike,
    scan_shape: tuple[int, int],
    detector: int,
    events_per_position: float,
    *,
    rows_per_block: int | None = None,
    bf_radius: float = 4.0,
    bf_fraction: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> EventStore:
    """A store of any size, fast: Poisson(``events_per_position``) events per position at
    scattered detector pixels, no physics — for scale tests and benchmarks.

    The calibration declares a ``bf_radius``-pixel BF disk at the detector centre (1 mrad/px,
    semi-angle = ``bf_radius`` mrad, 0.5 Å steps) so dense methods get a small, known input.
    Pixels: by default a fixed stride through the detector (cheap, and compresses far better
    than real data); with ``bf_fraction`` a random sequence of :data:`PATTERN` pixels, that
    fraction of them inside the BF disk (the rest anywhere), repeated from a random start in
    every block — as fast, and as incompressible as real events (the repeat is longer than the
    codec's window).
    """
    rng = np.random.default_rng(seed)
    ny, nx = scan_shape
    cal = Calibration(scan_step_a=0.5, detector_pixel_mrad=1.0, semiangle_mrad=float(bf_radius),
                      bf_center=(detector / 2, detector / 2), bf_radius=float(bf_radius))
    store = create_store(path, scan_shape, (detector, detector), cal, rows_per_block=rows_per_block,
                         provenance={"source": "stemdask.testing.random_event_store"}, overwrite=overwrite)
    n_pix = detector * detector
    if bf_fraction is not None:
        yy, xx = np.divmod(np.arange(n_pix), detector)
        disk = np.flatnonzero(np.hypot(yy - detector / 2, xx - detector / 2) < bf_radius)
        pattern = rng.integers(0, n_pix, size=PATTERN)
        inside = rng.random(PATTERN) < bf_fraction
        pattern[inside] = disk[rng.integers(0, len(disk), size=int(inside.sum()))]
        pattern = pattern.astype(store.index_dtype)
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        counts = rng.poisson(events_per_position, size=(r1 - r0, nx)).astype(np.uint32)
        n = int(counts.sum())
        if bf_fraction is None:
            indices = (np.arange(n, dtype=np.int64) * 7919 + b) % n_pix
        else:
            indices = np.resize(np.roll(pattern, -int(rng.integers(PATTERN))), n)
        store.write_block(b, counts, indices)
    return store.finalize()
