"""Which reader a file needs (format sniffing) and opening it as an ingest source."""

from __future__ import annotations

import zipfile
from pathlib import Path

from ..errors import InvalidParameter
from .common import Source, SourceError, open_h5
from .csr import CSRSource
from .dense import DenseSource, rsciio_plugin, split_h5_path
from .npzfile import NpzArrays
from .stempy import GROUP, StempySource
from .timestamped import FIELDS, TimestampedSource

READERS = {
    "stempy": StempySource,
    "csr": CSRSource,
    "dense": DenseSource,
    "mib": DenseSource,
    "events": TimestampedSource,
}
FORMATS = ("auto", *READERS)
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def sniff_format(spec) -> str:
    """Guess the format of ``spec`` (a path, or ``file.h5:/dataset``) from its name and contents.

    ``.npz`` with ``indices`` + ``offsets`` → csr, with ``index`` + ``toa_ns`` → events;
    ``.npy`` or an extension rosettasciio reads → dense; ``.mib`` → mib; HDF5 with
    ``/electron_events/frames`` → stempy, with root ``index`` + ``toa_ns`` → events,
    otherwise dense.
    """
    path, dataset = split_h5_path(spec)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise SourceError(f"{path}: is a folder; expected a data file")
    suffix = path.suffix.lower()
    if suffix == ".mib":
        return "mib"
    if suffix == ".npy" or (dataset is None and rsciio_plugin(path) is not None):
        return "dense"
    if suffix == ".npz" or zipfile.is_zipfile(path):
        keys = set(NpzArrays(path).keys())
        if {"indices", "offsets"} <= keys:
            return "csr"
        if set(FIELDS) <= keys:
            return "events"
        raise SourceError(
            f"{path}: .npz has neither indices+offsets (CSR) nor index+toa_ns (event list): {sorted(keys)}"
        )
    with open(path, "rb") as f:
        magic = f.read(len(_HDF5_MAGIC))
    if magic == _HDF5_MAGIC or suffix in (".h5", ".hdf5", ".hdf", ".emd", ".nxs"):
        if dataset is not None:
            return "dense"
        with open_h5(path) as f:
            if f"{GROUP}/frames" in f:
                return "stempy"
            if all(k in f for k in FIELDS):
                return "events"
        return "dense"
    raise SourceError(f"{path}: unknown format (not npz/npy/HDF5 nor a rosettasciio format); pass --format")


def open_source(spec, format: str = "auto", **options) -> Source:
    """Open ``spec`` as an ingest source.

    ``options``: ``scan_shape``, ``detector_shape``, ``mode``, ``threshold``, ``encoding``, ``dwell_ns``,
    ``frames_range``,
    ``scratch`` (folder for decompressed npz members) — each reader takes what it uses.
    """
    if format not in FORMATS:
        raise InvalidParameter(f"unknown format {format!r}; one of {FORMATS}")
    path = split_h5_path(spec)[0]
    if path.is_file() and path.stat().st_size == 0:
        raise SourceError(f"{path}: is empty (0 bytes)")
    fmt = sniff_format(spec) if format == "auto" else format
    if fmt != "dense" and not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such file")
    used = {k: v for k, v in options.items() if v is not None}
    if fmt not in ("dense", "mib") and ("threshold" in used or used.get("mode", "counts") != "counts"):
        raise SourceError(f"{spec}: mode/threshold apply to dense frames only, not to {fmt} input")
    if fmt not in ("dense", "mib") and "frames_range" in used:
        raise SourceError(f"{spec}: frames_range applies to dense frame stacks only, not to {fmt} input")
    if fmt not in ("dense", "mib") and used.get("encoding", "auto") == "weighted":
        raise SourceError(
            f"{spec}: encoding 'weighted' (a count per pixel) applies to dense frames only; "
            f"{fmt} input has one entry per electron"
        )
    if fmt != "events" and "dwell_ns" in used:
        raise SourceError(f"{spec}: dwell_ns applies to time-stamped event lists only, not to {fmt} input")
    return READERS[fmt](spec, format=fmt, **used)
