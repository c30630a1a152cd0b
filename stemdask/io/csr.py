"""CSR event arrays in a ``.npz``: ``indices`` (linear detector index per electron) and
``offsets`` (int, ``ny·nx + 1``): position ``p = iy·nx + ix`` owns
``indices[offsets[p]:offsets[p+1]]``.

Scan and detector shape come from the arguments or from ``scan_shape`` / ``detector_shape``
arrays in the npz (both given → they must agree). Optics: small arrays named as
:data:`~stemdask.io.common.OPTICS_NAMES` (``energy_ev``, ``scan_step_a``, …), if present.
``offsets`` is loaded (8 bytes per
position); ``indices`` is memory-mapped (see :mod:`stemdask.io.npzfile`), so a row block
reads only its own slice.
"""

from __future__ import annotations

import numpy as np

from .common import (
    OPTICS_NAMES,
    Source,
    SourceError,
    agree,
    as_shape,
    check_indices,
    counts_from_offsets,
    optics_from_mapping,
)
from .npzfile import NpzArrays


class CSRSource(Source):
    format = "csr"
    cheap_count = True

    def __init__(self, path, *, scan_shape=None, detector_shape=None, scratch=None, **_):
        self.npz = NpzArrays(path, scratch)
        self.path = self.npz.path
        missing = {"indices", "offsets"} - set(self.npz.keys())
        if missing:
            raise SourceError(f"{path}: CSR .npz needs arrays 'indices' and 'offsets'; missing {sorted(missing)}")
        recorded = {k: as_shape(k, self.npz.small(k), path) for k in ("scan_shape", "detector_shape") if k in self.npz}
        self.scan_shape = agree(
            "scan_shape", as_shape("scan_shape", scan_shape, path), recorded.get("scan_shape"), path
        )
        self.detector_shape = agree(
            "detector_shape", as_shape("detector_shape", detector_shape, path), recorded.get("detector_shape"), path
        )
        self._optics = optics_from_mapping({k: self.npz.small(k) for k in OPTICS_NAMES if k in self.npz}, path)
        offsets = self.npz.small("offsets")
        n_pos = self.scan_shape[0] * self.scan_shape[1]
        if offsets.ndim != 1 or offsets.size != n_pos + 1:
            raise SourceError(
                f"{path}: scan shape {self.scan_shape} ({n_pos} positions) does not match the data: "
                f"'offsets' has {offsets.size} entries, i.e. {offsets.size - 1} positions"
            )
        if not np.issubdtype(offsets.dtype, np.integer):
            raise SourceError(f"{path}: 'offsets' must be integers, got {offsets.dtype}")
        self.offsets = offsets.astype(np.int64)
        indices = self.npz.array("indices")
        if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
            raise SourceError(f"{path}: 'indices' must be a 1-D integer array, got {indices.dtype} {indices.shape}")
        if self.offsets[0] != 0 or self.offsets[-1] != indices.size or np.any(np.diff(self.offsets) < 0):
            raise SourceError(
                f"{path}: 'offsets' must rise from 0 to len(indices) = {indices.size} "
                f"(first {self.offsets[0]}, last {self.offsets[-1]})"
            )

    def read_rows(self, r0, r1):
        nx = self.scan_shape[1]
        off = self.offsets[r0 * nx : r1 * nx + 1]
        indices = np.asarray(self.npz.array("indices")[off[0] : off[-1]])
        check_indices(indices, self.detector_shape, self.path, f"scan rows {r0}..{r1 - 1}")
        return counts_from_offsets(off, (r1 - r0, nx)), indices, None

    def count_events(self) -> int:
        return int(self.npz.array("indices").size)

    def close(self):
        self.npz.close()
