"""Checks that building a result computes nothing (the pattern of xarray's own tests)."""

from __future__ import annotations

import contextlib

import dask


class ComputeCounter:
    """A dask scheduler that counts the computes it runs and refuses more than ``max_computes``."""

    def __init__(self, max_computes: int = 0):
        self.max_computes, self.total_computes = max_computes, 0

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(f"dask computed {self.total_computes} time(s); at most {self.max_computes} allowed")
        return dask.get(dsk, keys, **kwargs)


@contextlib.contextmanager
def raise_if_dask_computes(max_computes: int = 0):
    """Within the block, any dask compute beyond ``max_computes`` raises ``RuntimeError``
    (computes run in this thread, synchronously)."""
    counter = ComputeCounter(max_computes)
    with dask.config.set(scheduler=counter):
        yield counter
