"""Ingest detector data into event stores, and check a store against its source.

``ingest(input, out, ...)`` converts 4D Camera / stempy HDF5, CSR ``.npz``, dense frames
(``.npy``, HDF5, Merlin ``.mib``) and time-stamped event lists into a finalized
:class:`~stemdask.store.EventStore`; ``validate_against_source(store)`` recomputes the
source's checksum and event total. One small module per format; :mod:`.formats` sniffs.
"""

from .common import Source, SourceError, file_sha256
from .formats import FORMATS, open_source, sniff_format
from .ingest import (
    ASSUMED_DEFAULTS,
    MissingOpticsError,
    check_against_source,
    ingest,
    validate_against_source,
)

__all__ = [
    "ASSUMED_DEFAULTS",
    "FORMATS",
    "MissingOpticsError",
    "Source",
    "SourceError",
    "check_against_source",
    "file_sha256",
    "ingest",
    "open_source",
    "sniff_format",
    "validate_against_source",
]
