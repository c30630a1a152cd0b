"""Time-stamped event lists (Timepix-style): ``index`` (linear detector index per electron)
and ``toa_ns`` (arrival time in ns from the start of the scan), in a ``.npz`` or an HDF5
file (datasets at the root).

An electron arriving at ``t`` belongs to position ``p = floor(t / dwell_ns)`` in scan
order; the store keeps its time within the dwell, ``floor(t − p·dwell_ns)`` ns, for dose
fractionation. Events must be grouped by row block in time (true for a time-sorted list,
the usual output of Timepix converters; order inside a block is free): each block's events
are found by binary search on ``toa_ns`` and checked to lie inside the block's time window.
Events before 0 or after the last position are an error.

``scan_shape``, ``detector_shape`` and ``dwell_ns`` come from the arguments or from arrays
(npz) / root attributes (HDF5) of those names; so do the optics, under the names of
:data:`~stemdask.io.common.OPTICS_NAMES` (``energy_ev``, ``scan_step_a``, …), if present.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

from .common import (
    OPTICS_NAMES,
    Source,
    SourceError,
    agree,
    as_shape,
    check_indices,
    open_h5,
    optics_from_mapping,
)
from .npzfile import NpzArrays

FIELDS = ("index", "toa_ns")


def _bisect(arr, value: float) -> int:
    """First i with arr[i] >= value in a sorted array (memmap) or h5py dataset (read element-wise)."""
    if isinstance(arr, np.ndarray):
        return int(np.searchsorted(arr, value, side="left"))
    lo, hi = 0, arr.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if arr[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


class TimestampedSource(Source):
    format = "events"
    has_toa = True
    cheap_count = True

    def __init__(self, path, *, scan_shape=None, detector_shape=None, dwell_ns=None, scratch=None, **_):
        self.npz = None
        if str(path).lower().endswith(".npz"):
            self.npz = NpzArrays(path, scratch)
            self.path = self.npz.path
            names = set(self.npz.keys())
            meta = {k: self.npz.small(k) for k in ("scan_shape", "detector_shape", "dwell_ns") if k in names}
            optics = {k: self.npz.small(k) for k in OPTICS_NAMES if k in names}
        else:
            self.path = path
            with open_h5(path) as f:
                names = set(f.keys())
                meta = {k: f.attrs[k] for k in ("scan_shape", "detector_shape", "dwell_ns") if k in f.attrs}
                optics = {k: f.attrs[k] for k in OPTICS_NAMES if k in f.attrs}
        self._optics = optics_from_mapping(optics, path)
        if not set(FIELDS) <= names:
            raise SourceError(f"{path}: an event list needs arrays {FIELDS}; found {sorted(names)}")
        self.scan_shape = agree("scan_shape", as_shape("scan_shape", scan_shape, path),
                                as_shape("scan_shape", meta.get("scan_shape"), path), path)
        self.detector_shape = agree("detector_shape", as_shape("detector_shape", detector_shape, path),
                                    as_shape("detector_shape", meta.get("detector_shape"), path), path)
        dwell = dwell_ns if dwell_ns is not None else meta.get("dwell_ns")
        if dwell is None:
            raise SourceError(f"{path}: the dwell time per position is unknown; pass dwell_ns (--dwell-ns)")
        dwell = float(np.asarray(dwell).ravel()[0])
        if not (math.isfinite(dwell) and 0 < dwell < 2**32):
            raise SourceError(f"{path}: dwell_ns must be a positive number of ns below 2³² "
                              f"(times within the dwell are stored as uint32 ns), got {dwell!r}")
        self.dwell_ns = dwell
        with self._arrays() as (index, toa):
            if index.ndim != 1 or toa.shape != index.shape:
                raise SourceError(f"{path}: 'index' {index.shape} and 'toa_ns' {toa.shape} must be equal 1-D arrays")
            if not np.issubdtype(index.dtype, np.integer) or toa.dtype.kind not in "uif":
                raise SourceError(f"{path}: 'index' must be integers and 'toa_ns' numbers")
            self.n_events = index.shape[0]
            if _bisect(toa, 0.0) != 0:  # with the window checks per block, every event is read once
                raise SourceError(f"{path}: events with negative arrival times (or toa_ns not sorted)")
            ny, nx = self.scan_shape
            self.end = _bisect(toa, ny * nx * self.dwell_ns)
            if self.end < self.n_events:
                raise SourceError(
                    f"{path}: {self.n_events - self.end} events arrive after the scan ends "
                    f"({ny}×{nx} positions × {self.dwell_ns:g} ns = {ny * nx * self.dwell_ns:g} ns); "
                    f"wrong scan shape or dwell time?"
                )

    @contextlib.contextmanager
    def _arrays(self):
        if self.npz is not None:
            yield self.npz.array("index"), self.npz.array("toa_ns")
        else:
            with open_h5(self.path) as f:
                yield f["index"], f["toa_ns"]

    def read_rows(self, r0, r1):
        nx = self.scan_shape[1]
        p0, p1 = r0 * nx, r1 * nx
        t0, t1 = p0 * self.dwell_ns, p1 * self.dwell_ns
        with self._arrays() as (index, toa):
            a, b = _bisect(toa, t0), _bisect(toa, t1)
            idx, t = np.asarray(index[a:b]), np.asarray(toa[a:b], dtype=np.float64)
        where = f"scan rows {r0}..{r1 - 1}"
        if t.size and (t.min() < t0 or t.max() >= t1 or not np.all(np.isfinite(t))):
            raise SourceError(
                f"{self.path}: events of {where} are not grouped in time (arrival times "
                f"{t.min():g}..{t.max():g} ns outside the window {t0:g}..{t1:g} ns); sort the list by toa_ns"
            )
        check_indices(idx, self.detector_shape, self.path, where)
        pos = np.clip(np.floor(t / self.dwell_ns).astype(np.int64), p0, p1 - 1)  # guard rounding at edges
        order = np.argsort(pos, kind="stable")
        pos = pos[order]
        counts = np.bincount(pos - p0, minlength=p1 - p0).astype(np.uint32)
        toa_in = np.floor(t[order] - pos * self.dwell_ns).clip(0).astype(np.uint32)
        return counts.reshape(r1 - r0, nx), idx[order], toa_in

    def count_events(self) -> int:
        return int(self.n_events)

    def params(self) -> dict:
        return {**super().params(), "dwell_ns": self.dwell_ns}

    def close(self):
        if self.npz is not None:
            self.npz.close()
