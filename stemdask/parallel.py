"""Run independent per-row-block jobs in parallel with a progress bar.

Used by ingest and the simulator: each job writes one row block of a store (idempotent), so
jobs may run in any order, on threads here or on the workers of a distributed cluster when a
``distributed.Client`` is active. The kernels inside release the GIL (numba ``nogil``, FFTs,
Blosc), so threads scale on one machine.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def active_client():
    """The current ``distributed.Client``, or None (without importing distributed, 0.3 s, when
    nothing has: no client can exist then)."""
    if "distributed" not in sys.modules:
        return None
    from distributed import default_client

    try:
        return default_client()
    except ValueError:
        return None


def run_jobs(
    fn: Callable[[int], T],
    jobs: Iterable[int],
    *,
    desc: str,
    progress: bool = True,
    max_workers: int | None = None,
) -> list[T]:
    """Call ``fn(job)`` for every job in parallel; return results in job order.

    Runs on the active distributed client if there is one, else on a thread pool of
    ``max_workers`` (default: the number of CPUs). The first failure is re-raised after
    the jobs already running finish; finished jobs are kept (their blocks are committed),
    so a re-run only redoes what is missing.
    """
    jobs = list(jobs)
    bar = tqdm(total=len(jobs), desc=desc, unit="block", disable=not progress or not jobs, leave=False)
    results: dict[int, T] = {}
    client = active_client()
    try:
        if client is not None:
            from distributed import as_completed as dist_as_completed

            futures = {client.submit(fn, j, pure=False): j for j in jobs}
            for fut in dist_as_completed(futures):
                results[futures[fut]] = fut.result()
                bar.update()
        else:
            workers = max_workers or os.cpu_count() or 1
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(fn, j): j for j in jobs}
                try:
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        bar.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    finally:
        bar.close()
    return [results[j] for j in jobs]
