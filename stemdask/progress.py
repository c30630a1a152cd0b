"""Progress of long work, in one style everywhere: dask graphs (threads or a cluster) and
parallel per-row-block jobs.

On a terminal the progress is a bar (tqdm) on stderr that disappears when the work ends. When
stderr is not a terminal (a batch job's log, a pipe) there are no escape codes: one plain line
every :data:`LINE_INTERVAL_S` seconds (``reconstruct: 120/480 tasks (25 %), 12 s``) and one at
the end. ``progress=False`` (the CLI's ``--quiet``) shows nothing.

Dask's local-scheduler callbacks do not fire under ``distributed``; there the scheduler's
own progress feed (:class:`distributed.diagnostics.progressbar.TextProgressBar`'s) drives
the same display.

Watchdog: on a cluster, a computation during which the scheduler sees no task change state
for ``stemdask.watchdog-s`` seconds (dask config, default :data:`WATCHDOG_S`; 0 turns it
off) is cancelled and raises :class:`StalledError` — typically every worker paused at its
memory limit, which otherwise waits forever.

Parallel jobs (:func:`run_jobs`, used by ingest and the simulator): each job writes one row
block of a store (idempotent), so jobs may run in any order, on threads here or on the
workers of a distributed cluster when a ``distributed.Client`` is active. The kernels inside
release the GIL (numba ``nogil``, FFTs, Blosc), so threads scale on one machine.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterable, TypeVar

from .errors import UserError

T = TypeVar("T")

WATCHDOG_S = 600.0
#: Seconds between progress lines when stderr is not a terminal.
LINE_INTERVAL_S = 5.0


class StalledError(UserError):
    """A cluster computation made no progress for the watchdog's time and was cancelled."""


class Progress:
    """``done`` of ``total`` units of work named ``desc``: a bar on a terminal, else a line every
    :data:`LINE_INTERVAL_S` s and one at the end; nothing when not ``enabled``. Thread-safe."""

    def __init__(self, desc: str, total: int = 0, unit: str = "task", enabled: bool = True, stream=None):
        self.desc, self.total, self.unit, self.done = desc, total, unit, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled
        self.start = self.last_line = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self.stream, dynamic_ncols=True)

    def set(self, done: int, total: int | None = None) -> None:
        """Now ``done`` of ``total`` (unchanged when None)."""
        with self._lock:
            if total is not None:
                self.total = total
            step, self.done = done - self.done, done
            if not self.enabled:
                return
            if self._bar is not None:
                self._bar.total = self.total
                self._bar.update(step)
            elif time.monotonic() - self.last_line >= LINE_INTERVAL_S:
                self._line()

    def update(self, n: int = 1) -> None:
        self.set(self.done + n)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self.total:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        self.last_line = time.monotonic()
        pct = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        end = ", done" if final and self.done >= self.total else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}s{pct}, {self.last_line - self.start:.0f} s{end}",
              file=self.stream, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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


class _Watchdog(threading.Thread):
    """Cancels ``futures`` if the scheduler's transition counter stops moving for ``limit`` s."""

    def __init__(self, client, futures, limit: float):
        super().__init__(daemon=True)
        self.client, self.futures, self.limit = client, futures, limit
        self.stopped, self.message = threading.Event(), None

    def _counter(self) -> int:
        return self.client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.transition_counter)

    def run(self) -> None:
        from dask.utils import format_bytes

        last, quiet = self._counter(), 0.0
        step = min(self.limit / 4, 5.0)
        while not self.stopped.wait(step):
            now = self._counter()
            quiet = 0.0 if now != last else quiet + step
            last = now
            if quiet >= self.limit:
                limits = {w.get("memory_limit") for w in self.client.scheduler_info()["workers"].values()}
                self.message = (f"no task made progress for {self.limit:g} s (workers paused or stuck; their "
                                f"memory limit: {format_bytes(max((v for v in limits if v), default=0))}); "
                                f"stopped. Use workers with more memory, or raise stemdask.watchdog-s")
                self.client.cancel(self.futures)
                return


def _follow_cluster(futures, display: Progress) -> None:
    """Drive ``display`` from the scheduler's progress feed until ``futures`` finish."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class Feed(TextProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):
            display.set(all - remaining, all)

        def _draw_stop(self, **kwargs):
            pass

    Feed(futures, complete=True)


def _local_callback(display: Progress):
    from dask.callbacks import Callback

    class Tasks(Callback):
        def _start_state(self, dsk, state):
            display.set(0, sum(len(state[k]) for k in ("ready", "waiting", "running", "finished")))

        def _posttask(self, key, result, dsk, state, worker_id):
            display.update()

    return Tasks()


def compute(*collections, progress: bool = True, desc: str = "compute"):
    """``dask.compute(*collections)`` with progress (and, on a cluster, the watchdog); returns
    the computed tuple."""
    import dask

    client = active_client()
    with Progress(desc, enabled=progress) as display:
        if client is None:
            if not progress:
                return dask.compute(*collections)
            with _local_callback(display):
                return dask.compute(*collections)
        futures = client.compute(list(collections))
        limit = float(dask.config.get("stemdask.watchdog-s", WATCHDOG_S))
        watchdog = _Watchdog(client, futures, limit) if limit > 0 else None
        if watchdog:
            watchdog.start()
        try:
            if progress:
                _follow_cluster(futures, display)
            return tuple(client.gather(futures))
        except Exception:
            if watchdog and watchdog.message:
                raise StalledError(watchdog.message) from None
            raise
        finally:
            if watchdog:
                watchdog.stopped.set()


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
    results: dict[int, T] = {}
    client = active_client()
    with Progress(desc, total=len(jobs), unit="block", enabled=progress and bool(jobs)) as display:
        if client is not None:
            from distributed import as_completed as dist_as_completed

            futures = {client.submit(fn, j, pure=False): j for j in jobs}
            for fut in dist_as_completed(futures):
                results[futures[fut]] = fut.result()
                display.update()
        else:
            workers = max_workers or os.cpu_count() or 1
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futures = {pool.submit(fn, j): j for j in jobs}
                try:
                    for fut in as_completed(futures):
                        results[futures[fut]] = fut.result()
                        display.update()
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    return [results[j] for j in jobs]
