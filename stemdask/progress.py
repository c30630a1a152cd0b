"""Compute dask collections with a progress bar, locally or on a distributed cluster.

dask's local-scheduler callbacks do not fire under ``distributed``; there the futures are
tracked instead (``distributed.progress``), so a bar shows in both cases.
"""

from __future__ import annotations

import sys

import dask

from .parallel import active_client


def compute(*collections, progress: bool = True, desc: str = "compute"):
    """``dask.compute(*collections)`` with a progress bar; returns the computed tuple."""
    client = active_client()
    if client is not None:
        futures = client.compute(list(collections))
        if progress:
            from distributed import progress as dist_progress

            dist_progress(futures, notebook=False)
            sys.stdout.write("\n")
        return tuple(client.gather(futures))
    if not progress:
        return dask.compute(*collections)
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc=desc, leave=False, unit="task"):
        return dask.compute(*collections)
