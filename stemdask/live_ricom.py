"""Live riCOM: update a phase image as probe positions arrive, one kernel-sized scatter each.

Yu et al. 2022's live scheme: riCOM is linear in the COM, so each new position ``q`` adds
``k(p − q)·COM(q)`` to every image pixel ``p`` within the kernel's reach and its pattern can
be discarded at once. :class:`LiveRiCOM` does this in numba kernels
(:mod:`stemdask.kernels.events`, :mod:`stemdask.kernels.ricom`): the COM of each position
from its events (or dense frame), then its scatter — a whole scan row per call, no Python
per position. The final image equals batch riCOM (:func:`stemdask.methods.ricom.ricom`)
with the same kernel.

Units: the image is in rad, exactly like batch riCOM. The kernel is built in the scan frame
(Å, :func:`stemdask.kernels.ricom.ricom_kernel`) and mapped once into the detector frame and
detector pixels — ``k·R(c) = (Rᵀk)·c`` for the rotation/flip R of the calibration, times the
detector's Å⁻¹ per pixel — so a position's COM is used as measured, in px from the reference.

Memory: rows still receiving contributions live in a ring buffer of n rows (n × nx float64);
each row is written to ``out`` (the result: an in-memory array by default, or a memmap/Zarr
array) as soon as no later position can reach it. Nothing per position is kept, so the
working memory does not depend on the scan length.
Thread safety: ``push_*`` and :meth:`LiveRiCOM.snapshot` share a lock; the numba kernels
release the GIL, so a display thread stays responsive while an acquisition thread pushes.

Sources: :func:`replay_store` (an event store, one row block per update),
:func:`replay_csr` (a CSR event-list ``.npz`` with ``indices`` and ``offsets``) and
:func:`consume` (any iterable or :class:`queue.Queue` of per-position index arrays, e.g. fed
by an acquisition; ``None`` on a queue ends the stream). :class:`LiveView` shows snapshots in
a matplotlib figure (notebooks included).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Iterable

import numpy as np
import xarray as xr

from .errors import InvalidParameter
from .events import scan_coordinates
from .kernels.events import center_of_mass
from .kernels.ricom import accumulator_zero, com_from_frames, ricom_kernel, scatter_com
from .methods.ricom import ricom_long_name
from .optics import Calibration, scan_to_detector_frame
from .store import EventStore, open_store


class ScanProgress:
    """Positions done of a ``scan_shape`` scan fed in scan order (``positions_done``)."""

    scan_shape: tuple[int, int]
    positions_done: int

    @property
    def n_positions(self) -> int:
        return self.scan_shape[0] * self.scan_shape[1]

    @property
    def done(self) -> bool:
        return self.positions_done == self.n_positions


class LiveRiCOM(ScanProgress):
    """Incremental riCOM of a scan fed position by position, in scan order.

    scan_shape: (ny, nx); detector_shape: (det_y, det_x) pixels; calibration: scan step,
    detector sampling, rotation/flip and (unless ``reference`` is given) the BF centre used
    as the COM reference (px). kernel_size, kmin, kmax: as batch riCOM (kmin/kmax in Å⁻¹).
    out: where finished rows are written — any (ny, nx) array supporting slice assignment
    (a NumPy array, ``np.memmap``, a Zarr array); default a new in-memory float64 array.
    Rows in progress live in a ring buffer of ``kernel_size`` rows.
    """

    def __init__(self, scan_shape, detector_shape, calibration: Calibration, *, kernel_size: int = 61,
                 kmin: float | None = None, kmax: float | None = None, reference=None, out=None):
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.detector_shape = tuple(int(v) for v in detector_shape)
        if len(self.scan_shape) != 2 or min(self.scan_shape) < 1:
            raise InvalidParameter(f"scan_shape must be two positive integers, got {scan_shape!r}")
        if len(self.detector_shape) != 2 or min(self.detector_shape) < 1:
            raise InvalidParameter(f"detector_shape must be two positive integers, got {detector_shape!r}")
        reference = calibration.bf_center if reference is None else reference
        if reference is None:
            raise InvalidParameter(
                "live riCOM needs a COM reference: calibrate the BF centre or pass reference=(y, x) px"
            )
        self.reference = (float(reference[0]), float(reference[1]))
        self.calibration = calibration
        self.kernel_size = int(kernel_size)
        self.kmin, self.kmax = kmin, kmax
        kernel = ricom_kernel(kernel_size, calibration.scan_step_a, kmin, kmax)
        ky, kx = scan_to_detector_frame(kernel[0], kernel[1], calibration.rotation_deg, calibration.flip)
        scale = calibration.detector_pixel_inv_a
        self._kfy = np.ascontiguousarray(ky[::-1, ::-1] * scale)
        self._kfx = np.ascontiguousarray(kx[::-1, ::-1] * scale)
        self._slots = min(self.kernel_size, self.scan_shape[0])
        self._ring = np.zeros((self._slots, self.scan_shape[1]))  # image row r in slot r % slots
        if out is None:
            out = np.zeros(self.scan_shape)
        elif tuple(out.shape) != self.scan_shape:
            raise InvalidParameter(f"out has shape {tuple(out.shape)}, the scan is {self.scan_shape}")
        self.out = out
        self._final = 0  # rows [0, _final) are finished and written to ``out``
        self._lock = threading.Lock()
        self.positions_done = 0
        self.feed_error: BaseException | None = None  # what stopped a background feed

    @property
    def rows_final(self) -> int:
        """Leading image rows that no later position can change any more (written to ``out``)."""
        return self._final

    def _finish_rows(self, upto: int) -> None:
        """Write rows [rows_final, upto) from the ring buffer to ``out`` and free their slots."""
        upto = min(upto, self.scan_shape[0])
        if upto <= self._final:
            return
        slots = np.arange(self._final, upto) % self._slots
        self.out[self._final : upto] = self._ring[slots]
        self._ring[slots] = 0.0
        self._final = upto

    def _claim(self, m: int) -> int:
        start = self.positions_done
        if start + m > self.n_positions:
            raise InvalidParameter(
                f"{m} more positions after {start} overrun the {self.scan_shape[0]}×{self.scan_shape[1]} scan"
            )
        return start

    def push_events(self, indices, counts, weights=None) -> None:
        """The next ``len(counts)`` positions: ``counts[i]`` entries each, ``indices`` in scan
        order, each one electron or, with ``weights``, that many (a weighted store's entries)."""
        counts = np.ascontiguousarray(counts).ravel()
        indices = np.ascontiguousarray(indices).ravel()
        weights = None if weights is None else np.ascontiguousarray(weights).ravel()
        if counts.size and counts.min() < 0:
            raise InvalidParameter("event counts must be ≥ 0")
        if int(counts.sum(dtype=np.int64)) != indices.size:
            raise InvalidParameter(f"{indices.size} event indices but counts sum to {int(counts.sum(dtype=np.int64))}")
        n_pix = self.detector_shape[0] * self.detector_shape[1]
        if indices.size and (int(indices.min()) < 0 or int(indices.max()) >= n_pix):
            raise InvalidParameter(
                f"detector index outside the {self.detector_shape[0]}×{self.detector_shape[1]} detector"
            )
        if weights is not None and weights.shape != indices.shape:
            raise InvalidParameter(f"{weights.size} weights for {indices.size} entries")
        n_pixels = self.detector_shape[0] * self.detector_shape[1]
        self.push_com(*center_of_mass(counts, indices, self.detector_shape[1], *self.reference, weights=weights,
                                      n_pixels=n_pixels))

    def push_position(self, indices) -> None:
        """One position's event indices (slow path: one kernel call per position)."""
        indices = np.asarray(indices).ravel()
        self.push_events(indices, np.array([indices.size]))

    def push_frames(self, frames) -> None:
        """The next positions as dense frames (m, det_y, det_x), any numeric dtype."""
        frames = np.asarray(frames)
        if frames.ndim == 2:
            frames = frames[None]
        if frames.shape[1:] != self.detector_shape:
            raise InvalidParameter(
                f"frames of shape {frames.shape[1:]} do not match the detector {self.detector_shape}"
            )
        ref_y, ref_x = self.reference
        zero = accumulator_zero(frames.dtype)
        if frames.strides[1] < 0 and frames[:, ::-1].flags.c_contiguous:
            # vertically flipped frames (a .mib in store orientation): the COM of the contiguous
            # frames about the mirrored reference, mirrored back — 5× faster than a strided read
            com_y, com_x = com_from_frames(frames[:, ::-1], frames.shape[1] - 1 - ref_y, ref_x, zero)
            self.push_com(-com_y, com_x)
        else:
            self.push_com(*com_from_frames(frames, ref_y, ref_x, zero))

    def push_com(self, com_y, com_x) -> None:
        """The next positions as their detector-frame COM (px from the reference; NaN: no electrons)."""
        com_y = np.ascontiguousarray(com_y, dtype=np.float64).ravel()
        com_x = np.ascontiguousarray(com_x, dtype=np.float64).ravel()
        if com_y.shape != com_x.shape:
            raise InvalidParameter(f"com_y and com_x differ in length ({com_y.size}, {com_x.size})")
        ny, nx = self.scan_shape
        h = self.kernel_size // 2
        with self._lock:
            start = self._claim(com_y.size)
            end = start + com_y.size
            p = start
            while p < end:  # row by row: a row's positions reach rows row − h .. row + h
                row = p // nx
                stop = min(end, (row + 1) * nx)
                self._finish_rows(row - h)  # frees the slot that row + h needs
                scatter_com(
                    self._ring,
                    ny,
                    p,
                    com_y[p - start : stop - start],
                    com_x[p - start : stop - start],
                    self._kfy,
                    self._kfx,
                )
                p = stop
            self.positions_done = end
            self._finish_rows(ny if end == self.n_positions else end // nx - h)

    def snapshot(self) -> np.ndarray:
        """A consistent copy of the current image (rad), safe to call from any thread.

        Finished rows are read back from ``out``, rows in progress from the ring buffer.
        """
        if self.feed_error is not None:
            raise self.feed_error
        ny, nx = self.scan_shape
        image = np.zeros((ny, nx))
        with self._lock:
            f = self._final
            image[:f] = self.out[:f]
            rows = np.arange(f, min(f + self._slots, ny))
            image[rows] = self._ring[rows % self._slots]
        return image

    def result(self) -> xr.DataArray:
        """The current image as ``phase`` with scan coordinates (Å), like batch riCOM."""
        ny, nx = self.scan_shape
        sy, sx = self.calibration.scan_step_a
        coords = scan_coordinates(np.arange(ny) * sy, np.arange(nx) * sx)
        return xr.DataArray(
            self.snapshot(),
            dims=("scan_y", "scan_x"),
            coords=coords,
            name="phase",
            attrs={
                "units": "rad",
                "long_name": "live " + ricom_long_name(self.kernel_size, self.kmin, self.kmax),
                "method": "ricom-live",
                "positions_done": self.positions_done,
            },
        )

    def run_in_background(self, feed, *args, **kwargs) -> "LiveThread":
        """Run ``feed(*args, live=self, **kwargs)`` in a daemon thread and return it.

        ``feed`` is a replay made by :func:`replay_store` (called with the store only) or any
        function taking ``live=`` (e.g. :func:`consume`). An exception
        that stops the feed is raised again to the caller: by :meth:`LiveThread.join` and by
        every later :meth:`snapshot` / :meth:`result` (it is also kept in ``thread.exception``).
        """
        thread = LiveThread(self, feed, args, kwargs)
        thread.start()
        return thread


class LiveThread(threading.Thread):
    """The daemon thread of :meth:`LiveRiCOM.run_in_background`; ``join`` re-raises its error."""

    def __init__(self, live: LiveRiCOM, feed, args, kwargs):
        super().__init__(daemon=True, name="live-ricom")
        self.live, self._call = live, (feed, args, kwargs)
        self.exception: BaseException | None = None

    def run(self) -> None:
        feed, args, kwargs = self._call
        try:
            feed(*args, live=self.live, **kwargs)
        except BaseException as e:  # handed to the caller by join() and snapshot()
            self.exception = self.live.feed_error = e

    def join(self, timeout: float | None = None) -> None:
        """Wait like :meth:`threading.Thread.join`, then raise what stopped the feed, if anything."""
        super().join(timeout)
        if self.exception is not None:
            raise self.exception


class _Replay:
    """A replay not yet run: ``source(live=…)`` streams it into ``live`` and returns it."""

    def __init__(self, run, *args):
        self._run, self._args = run, args

    def __call__(self, live: LiveRiCOM | None = None, **kwargs) -> LiveRiCOM:
        return self._run(*self._args, live=live, **kwargs)


def replay_store(store: EventStore | str | os.PathLike, live: LiveRiCOM | None = None, **kwargs):
    """Stream an event store into live riCOM, one row block per update.

    With the store alone: a replay not yet run, for :meth:`LiveRiCOM.run_in_background`
    (``live.run_in_background(replay_store("sto.zarr"))``); calling it with ``live=`` runs it.
    With ``live`` or LiveRiCOM arguments (kernel_size, kmin, kmax, reference, out; a new
    LiveRiCOM is built when ``live`` is None): replays now and returns the LiveRiCOM.
    """
    if live is None and not kwargs:
        return _Replay(replay_store, store)
    if not isinstance(store, EventStore):
        store = open_store(store)
    if live is None:
        live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **kwargs)
    for block in store.iter_blocks():
        live.push_events(block.indices, block.entries, block.weights)
    return live


def replay_csr(
    path,
    scan_shape,
    detector_shape,
    calibration: Calibration,
    *,
    live: LiveRiCOM | None = None,
    rows_per_update: int = 1,
    **kwargs,
) -> LiveRiCOM:
    """Stream a CSR event list (``.npz`` with ``indices`` and ``offsets``, position p owns
    ``indices[offsets[p]:offsets[p+1]]``) into live riCOM, ``rows_per_update`` scan rows at a
    time, read lazily and checked like ``stemdask ingest --format csr`` reads it."""
    from .io.csr import CSRSource

    with CSRSource(path, scan_shape=scan_shape, detector_shape=detector_shape) as src:
        if live is None:
            live = LiveRiCOM(src.scan_shape, src.detector_shape, calibration, **kwargs)
        if tuple(src.scan_shape) != tuple(live.scan_shape):
            raise InvalidParameter(f"{path}: scan {src.scan_shape}, but the live image is {live.scan_shape}")
        ny, step = src.scan_shape[0], max(1, int(rows_per_update))
        for r0 in range(0, ny, step):
            counts, indices, _ = src.read_rows(r0, min(r0 + step, ny))
            live.push_events(indices, counts)
    return live


def _positions(source):
    if isinstance(source, queue.Queue):
        while (item := source.get()) is not None:
            yield item
    else:
        yield from source


def consume(source: Iterable | queue.Queue, live: LiveRiCOM, batch: int | None = None) -> LiveRiCOM:
    """Feed per-position event index arrays from an iterable or a queue (``None`` ends it).

    Positions are gathered into batches of ``batch`` (default one scan row) so that each
    numba call covers many positions; a partial batch is pushed when the stream ends.
    """
    batch = live.scan_shape[1] if batch is None else max(1, int(batch))
    pending: list[np.ndarray] = []

    def flush():
        if pending:
            live.push_events(np.concatenate(pending), np.array([a.size for a in pending]))
            pending.clear()

    for item in _positions(source):
        pending.append(np.asarray(item).ravel())
        if len(pending) >= batch:
            flush()
    flush()
    return live


class LiveView:
    """A matplotlib figure showing a :class:`LiveRiCOM`'s snapshots (works headless with Agg).

    ``update()`` redraws from the latest snapshot; ``follow(thread)`` keeps updating until
    the feeding thread ends. The colour scale follows the rows already final.
    """

    def __init__(self, live: LiveRiCOM, ax=None, cmap: str = "gray"):
        import matplotlib.pyplot as plt

        self.live = live
        if ax is None:
            self.fig, ax = plt.subplots(figsize=(5, 5))
        else:
            self.fig = ax.figure
        self.ax = ax
        ny, nx = live.scan_shape
        sy, sx = live.calibration.scan_step_a
        self.image = ax.imshow(live.snapshot(), cmap=cmap, origin="upper", extent=(0, nx * sx, ny * sy, 0))
        ax.set_xlabel("scan x (Å)")
        ax.set_ylabel("scan y (Å)")
        self.fig.colorbar(self.image, ax=ax, label="phase (rad)")
        self.update()

    def update(self) -> None:
        snap = self.live.snapshot()
        self.image.set_data(snap)
        shown = snap[: max(self.live.rows_final, 1)] if self.live.positions_done else snap
        lo, hi = np.percentile(shown, [0.5, 99.5])
        self.image.set_clim(lo, hi if hi > lo else lo + 1e-12)
        self.ax.set_title(
            f"riCOM (n = {self.live.kernel_size})\n{self.live.positions_done:,} / {self.live.n_positions:,} positions",
            fontsize=10,
        )
        self.fig.canvas.draw_idle()

    def follow(self, thread: threading.Thread, interval: float = 0.25) -> None:
        """Update every ``interval`` s while ``thread`` runs, then once more; ``thread.join()``
        re-raises what stopped it.

        Interactive backends (``%matplotlib widget``, Qt…) redraw in place; with the
        notebook's default inline backend the figure is shown once and its output cell is
        replaced at every update.
        """
        handle = self._inline_display()
        while thread.is_alive():
            self._refresh(handle)
            time.sleep(interval)
        thread.join()
        self._refresh(handle)

    def _inline_display(self):
        import matplotlib

        if "inline" not in matplotlib.get_backend():
            return None
        from IPython.display import display

        return display(self.fig, display_id=True)

    def _refresh(self, handle) -> None:
        self.update()
        if handle is not None:
            handle.update(self.fig)
        else:
            self.fig.canvas.flush_events()
