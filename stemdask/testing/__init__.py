"""Helpers for testing code that uses stemdask (as :mod:`xarray.testing`): quick event
stores, a guard that no dask graph is computed, peak-memory probes, and Merlin ``.mib``
writing with a replaying Merlin data socket (:mod:`stemdask.testing.merlin`)."""

from .laziness import ComputeCounter, raise_if_dask_computes
from .memory import peak_rss_bytes, peak_rss_per_worker, reset_peak_rss
from .stores import random_event_store

__all__ = ["ComputeCounter", "peak_rss_bytes", "peak_rss_per_worker", "raise_if_dask_computes", "random_event_store",
           "reset_peak_rss"]
