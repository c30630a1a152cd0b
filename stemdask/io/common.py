"""What every ingest source shares: the source interface, errors, checksums, shape checks.

A *source* is a file (or a dataset inside one) opened for ingest. It knows its scan and
detector shape and hands out the events of any range of scan rows without reading the rest
of the file, so that :func:`stemdask.io.ingest` can run one job per row block. Sources hold
only paths and small metadata (never open file handles), so they pickle to cluster workers;
each read opens what it needs.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import InvalidParameter
from ..store import check_shape

#: The optics every store needs (:class:`~stemdask.optics.Calibration` field names and units:
#: eV, Å, mrad, mrad per pixel). Each comes from the source's metadata, the caller, or an
#: explicit assumption (``--assume-defaults``); never silently.
OPTICS_FIELDS = ("energy_ev", "scan_step_a", "semiangle_mrad", "detector_pixel_mrad")
#: The names a file may record them under (:func:`optics_from_mapping`).
OPTICS_NAMES = (*OPTICS_FIELDS, "energy_kev")


class SourceError(InvalidParameter):
    """An input file is unreadable, malformed, or disagrees with what the caller said.

    The message always starts with the file's path.
    """


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file, streamed (:func:`hashlib.file_digest`; never the whole file in memory)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_h5(path) -> h5py.File:
    """Open an HDF5 file read-only; an unreadable/truncated/corrupt file → SourceError naming it.

    Files whose data live partly in other files — external links, virtual datasets, external
    raw storage — are refused: the source checksum covers only this file, so such data could
    change unnoticed (and a link can point anywhere). Copy them in first (``h5repack``)."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise SourceError(f"{path}: not a readable HDF5 file ({e})") from None
    try:
        _refuse_outside_data(f, path)
    except BaseException:
        f.close()
        raise
    return f


def _refuse_outside_data(group: h5py.Group, path) -> None:
    for name in group:
        link = group.get(name, getlink=True)
        where = f"{group.name.rstrip('/')}/{name}"
        if isinstance(link, h5py.ExternalLink):
            raise SourceError(f"{path}: {where} is an external link to {link.filename}:{link.path}; data outside "
                              f"the file are not covered by its checksum — copy them in first (h5repack)")
        if isinstance(link, h5py.SoftLink):
            continue  # points inside this file: checked where it points
        obj = group[name]
        if isinstance(obj, h5py.Group):
            _refuse_outside_data(obj, path)
        elif isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
            kind = "a virtual dataset" if obj.is_virtual else "stored in external files"
            raise SourceError(f"{path}: dataset {where} is {kind}; data outside the file are not covered by "
                              f"its checksum — copy them in first (h5repack)")


def as_shape(name: str, value, path) -> tuple[int, int] | None:
    """``value`` as two positive ints (or None); a :class:`SourceError` naming ``path`` otherwise."""
    if value is None:
        return None
    try:
        return check_shape(name, np.asarray(value).ravel())
    except ValueError as e:
        raise SourceError(f"{path}: {e}") from None


def agree(name: str, given, found, path, hint: str = "") -> tuple[int, int]:
    """Reconcile a shape the caller gave with one the file records; either may be None."""
    if given is not None and found is not None and tuple(given) != tuple(found):
        raise SourceError(
            f"{path}: {name} {tuple(given)} does not match the data, which has {tuple(found)}{hint}"
        )
    shape = given if given is not None else found
    if shape is None:
        raise SourceError(f"{path}: the file does not record the {name}; pass it (--{name.replace('_', '-')})")
    return tuple(shape)


def optics_from_mapping(mapping, path) -> dict:
    """The optics a file records under stemdask's own names — the :data:`OPTICS_FIELDS`
    (``energy_ev`` eV, ``scan_step_a`` Å, one value or (y, x), ``semiangle_mrad`` mrad,
    ``detector_pixel_mrad`` mrad/px) and ``energy_kev`` (keV) — picked from ``mapping``
    (npz arrays, HDF5 attrs). Other keys are ignored; a recorded value that is not positive
    and finite is a :class:`SourceError` naming ``path``."""
    found = {}
    names = {**{k: (k, 1.0) for k in OPTICS_FIELDS}, "energy_kev": ("energy_ev", 1e3)}
    for key, (field, scale) in names.items():
        if key not in mapping or field in found:
            continue
        raw = mapping[key]
        try:
            values = [float(v) * scale for v in np.asarray(raw, dtype=float).ravel()]
        except (TypeError, ValueError):
            values = []
        n_ok = (1, 2) if field == "scan_step_a" else (1,)
        if len(values) not in n_ok or not all(math.isfinite(v) and v > 0 for v in values):
            raise SourceError(f"{path}: records {key} = {raw!r}; it must be a positive finite number")
        found[field] = (tuple(values * (3 - len(values)))[:2] if field == "scan_step_a" else values[0])
    return found


def check_indices(indices: np.ndarray, detector_shape, path, where: str) -> None:
    """Raise naming ``path`` if a linear detector index lies outside the detector."""
    if indices.size == 0:
        return
    n_pix = int(detector_shape[0]) * int(detector_shape[1])
    lo, hi = indices.min(), indices.max()
    if lo < 0 or hi >= n_pix:
        bad = int(hi) if hi >= n_pix else int(lo)
        raise SourceError(
            f"{path}: detector index {bad} ({where}) outside the {detector_shape[0]}×{detector_shape[1]} "
            f"detector (valid 0..{n_pix - 1}); wrong --detector-shape?"
        )


class Source:
    """Base of the ingest sources (one small module per format).

    Subclasses set ``path`` (the file that is checksummed), ``format``, ``scan_shape``,
    ``detector_shape``, ``has_toa`` and implement :meth:`read_rows` and :meth:`count_events`.
    """

    path: Path
    format: str
    scan_shape: tuple[int, int]
    detector_shape: tuple[int, int]
    has_toa: bool = False
    #: :meth:`count_events` is cheap (read from metadata), so ingest records it as the
    #: source total and checks the stored total against it.
    cheap_count: bool = False
    #: How the store holds the entries :meth:`read_rows` returns (see :mod:`stemdask.store`):
    #: "events" (one per electron) or "weighted" (dense frames only), with the weights'
    #: dtype and the expected entry bytes per position (sizes the row blocks; None: unknown).
    encoding: str = "events"
    weight_dtype = None
    bytes_per_position: float | None = None

    def read_rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Events of scan rows ``[r0, r1)``: counts (rows, nx) uint32, indices 1-D in scan
        order, toa (ns within the dwell, uint32) or None; with encoding "weighted" a fourth,
        the weights (and counts are entries per position)."""
        raise NotImplementedError

    def count_events(self) -> int:
        """Event total of the source, recounted by a pass independent of :meth:`read_rows`
        where the format allows (used by :func:`stemdask.io.validate_against_source`)."""
        raise NotImplementedError

    def optics(self) -> dict:
        """The optics (:data:`OPTICS_FIELDS` → value) the file itself records; ``{}`` when it
        records none. Each reader documents where it looks."""
        return dict(getattr(self, "_optics", {}) or {})

    def params(self) -> dict:
        """Everything that decides the ingest result; recorded in provenance, compared on resume."""
        return {
            "format": self.format,
            "scan_shape": list(self.scan_shape),
            "detector_shape": list(self.detector_shape),
        }

    def close(self) -> None:
        """Remove scratch files (if any)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.path} scan={self.scan_shape} detector={self.detector_shape}>"
        )


def counts_from_offsets(offsets: np.ndarray, shape) -> np.ndarray:
    """Events per position (rows, nx) uint32 from CSR offsets of those positions (+1)."""
    return np.diff(offsets).astype(np.uint32).reshape(shape)
