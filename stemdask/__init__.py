"""stemdask: 4D-STEM phase-contrast imaging from electron-event data, on Dask."""

from .events import open
from .optics import Aberrations, Calibration, wavelength_a
from .store import (
    CorruptStoreError,
    EventStore,
    IncompleteStoreError,
    StoreError,
    create_store,
    open_store,
)

__version__ = "0.1.0"

__all__ = [
    "Aberrations",
    "Calibration",
    "CorruptStoreError",
    "EventStore",
    "IncompleteStoreError",
    "StoreError",
    "create_store",
    "open",
    "open_store",
    "wavelength_a",
]
