"""Compute dask collections with a progress bar, locally or on a distributed cluster.

dask's local-scheduler callbacks do not fire under ``distributed``; there the futures are
tracked instead (``distributed.progress``), so a bar shows in both cases.

Watchdog: on a cluster, a computation during which the scheduler sees no task change state
for ``stemdask.watchdog-s`` seconds (dask config, default :data:`WATCHDOG_S`; 0 turns it
off) is cancelled and raises :class:`StalledError` — typically every worker paused at its
memory limit, which otherwise waits forever.
"""

from __future__ import annotations

import sys
import threading

import dask

from .parallel import active_client

WATCHDOG_S = 600.0


class StalledError(Exception):
    """A cluster computation made no progress for the watchdog's time and was cancelled."""


class _Watchdog(threading.Thread):
    """Cancels ``futures`` if the scheduler's transition counter stops moving for ``limit`` s."""

    def __init__(self, client, futures, limit: float):
        super().__init__(daemon=True)
        self.client, self.futures, self.limit = client, futures, limit
        self.stopped, self.message = threading.Event(), None

    def _counter(self) -> int:
        return self.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    def run(self) -> None:
        last, quiet = self._counter(), 0.0
        step = min(self.limit / 4, 5.0)
        while not self.stopped.wait(step):
            now = self._counter()
            quiet = 0.0 if now != last else quiet + step
            last = now
            if quiet >= self.limit:
                limits = {w.get("memory_limit") for w in self.client.scheduler_info()["workers"].values()}
                self.message = (f"no task made progress for {self.limit:g} s (workers paused or stuck; their "
                                f"memory limit: {dask.utils.format_bytes(max((v for v in limits if v), default=0))}); "
                                f"stopped. Use workers with more memory, or raise stemdask.watchdog-s")
                self.client.cancel(self.futures)
                return


def compute(*collections, progress: bool = True, desc: str = "compute"):
    """``dask.compute(*collections)`` with a progress bar (and, on a cluster, the watchdog);
    returns the computed tuple."""
    client = active_client()
    if client is not None:
        futures = client.compute(list(collections))
        limit = float(dask.config.get("stemdask.watchdog-s", WATCHDOG_S))
        watchdog = _Watchdog(client, futures, limit) if limit > 0 else None
        if watchdog:
            watchdog.start()
        try:
            if progress:
                from distributed import progress as dist_progress

                dist_progress(futures, notebook=False)
                sys.stdout.write("\n")
            return tuple(client.gather(futures))
        except Exception:
            if watchdog and watchdog.message:
                raise StalledError(watchdog.message) from None
            raise
        finally:
            if watchdog:
                watchdog.stopped.set()
    if not progress:
        return dask.compute(*collections)
    from tqdm.dask import TqdmCallback

    with TqdmCallback(desc=desc, leave=False, unit="task"):
        return dask.compute(*collections)
