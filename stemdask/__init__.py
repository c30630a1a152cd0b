"""stemdask: 4D-STEM phase-contrast imaging from electron-event data, on Dask.

The names below are imported on first use (``import stemdask`` itself loads no NumPy, dask
or xarray), so the command line starts fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS = {
    "open": "events",
    "EventDataset": "events",
    "Aberrations": "optics",
    "Calibration": "optics",
    "wavelength_a": "optics",
    "CorruptStoreError": "store",
    "EventStore": "store",
    "IncompleteStoreError": "store",
    "StoreError": "store",
    "create_store": "store",
    "open_store": "store",
    "UserError": "errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stemdask' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
