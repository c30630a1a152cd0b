"""Live SSB: each scan row's scan-x FFT of its BF-disk pixels made as it arrives, SSB when the scan completes.

:class:`LiveSSB` crops every position like :func:`stemdask.reductions.densify` — binned so that
the crop's side ``n`` is at most ``crop_side`` output pixels
(:meth:`stemdask.reductions.CropWindow.fitting`) — and, each time a scan row is complete, keeps
only what SSB needs of it: the rfft over scan_x of its pixels inside the BF disk (the first
stage of :func:`stemdask.methods.ssb.ssb`). When the last position is in, the FFT over scan_y
(all cores) gives G, kept in memory, and the trotter sums give the phase; refocusing is the
trotter sums alone. Memory is fixed when the session starts (:attr:`LiveSSB.nbytes`:
``ny × (nx//2 + 1) × npix`` complex64 plus a row of crops) and said then. The crop honours
the detector mask and the descan exactly as batch densify does (masked pixels excluded and
filled from the PACBED, the window following each position's BF-disk origin), so the phase
equals ``stemdask reconstruct --method ssb --bin B`` of the same events, B the crop's bin.
"""

from __future__ import annotations

import math
import os
import uuid

import dask.array as da
import numpy as np
import scipy.fft

from .errors import InvalidParameter
from .kernels import events as kernels
from .kernels.dense import counted_frames_to_weighted
from .kernels.live import binned_crop
from .methods.ssb import SSBResult, bf_pixels, g_chunks, select_and_rfft
from .optics import Aberrations, Calibration, descan_offsets
from .reductions import CropWindow, MaskTerms

#: Default largest side (output pixels) of the crop of each position.
CROP_SIDE = 32


class LiveSSB:
    """What SSB keeps of a ``scan_shape`` scan on a ``detector_shape`` detector (module docstring).

    calibration: needs the BF centre and radius (the crop is ``ceil(1.1·R) + 1`` px around the
    centre, as batch densify's); ``terms``: the detector mask (:class:`stemdask.reductions.MaskTerms`,
    None for none). Positions are pushed in scan order, ``where`` a slice of flat positions.
    """

    def __init__(self, scan_shape, detector_shape, calibration: Calibration, *, crop_side: int = CROP_SIDE,
                 terms: MaskTerms | None = None):
        if calibration.bf_center is None or calibration.bf_radius is None:
            raise InvalidParameter("live SSB crops the BF disk: calibrate its centre and radius first "
                             "(--calibration-from STORE, or --bf-center Y X and --bf-radius R)")
        self.scan_shape = tuple(scan_shape)
        self.detector_shape = tuple(detector_shape)
        self.window = w = CropWindow.fitting(calibration.bf_center, math.ceil(1.1 * calibration.bf_radius) + 1,
                                             crop_side)
        self._coords = w.coords(calibration.detector_pixel_mrad)
        self.disk = bf_pixels(self._coords["k_y"].values, self._coords["k_x"].values, calibration)
        ny, nx = self.scan_shape
        self.rows = np.zeros((ny, nx // 2 + 1, len(self.disk.pixels)), np.complex64)  # rfft over scan_x
        self._pending = np.zeros((0, w.n, w.n), np.float32)  # crops of the row in progress
        #: bytes kept: the rows' scan-x FFT (G at the end, in place) and one row of crops
        self.nbytes = self.rows.nbytes + nx * w.n**2 * 4
        self._next = 0  # first position not yet pushed
        self._G = None
        self._det_x = self.detector_shape[1]
        descan = calibration.descan
        self._plain = terms is None and descan is None
        if self._plain:
            self._lookup = kernels.densify_lookup(*self.detector_shape, w.y0, w.x0, w.bin, w.n, w.n)
        else:
            self._terms = terms or MaskTerms.none(self.detector_shape[0] * self._det_x)
            dy, dx = descan_offsets(descan, self.scan_shape)
            self._shift = (dy.ravel(), dx.ravel())

    def describe(self) -> str:
        w = self.window
        return (f"live SSB crops {w.n}×{w.n} (bin {w.bin}) around the BF disk and keeps the scan-x FFT of its "
                f"{len(self.disk.pixels)} pixels: {self.nbytes / 2**20:,.{0 if self.nbytes >= 2**24 else 2}f} MiB")

    def push_events(self, where: slice, counts, indices, weights=None) -> None:
        """Positions ``where`` as events (``counts`` entries each, ``weights`` electrons per entry)."""
        w = self.window
        crops = np.zeros((where.stop - where.start, w.n, w.n), np.float32)
        if self._plain:
            kernels.densify(counts, indices, weights, self._lookup, crops)
        else:
            kernels.densify_shifted(counts, indices, weights, self._det_x, self._shift[0][where],
                                    self._shift[1][where], float(w.y0), float(w.x0), w.bin, self._terms.keep,
                                    self._terms.fill_idx, self._terms.fill_w, crops)
        self._add(where, crops)

    def push_frames(self, where: slice, frames) -> None:
        """Positions ``where`` as counted frames (m, det_y, det_x), store orientation."""
        w = self.window
        if self._plain and w.within(self.detector_shape):  # the window read straight from the frames
            crops = np.zeros((frames.shape[0], w.n, w.n), np.float32)
            self._add(where, binned_crop(frames, w.y0, w.x0, w.bin, crops))
            return
        entries, indices, weights, n_bad, _ = counted_frames_to_weighted(
            np.ascontiguousarray(frames).reshape(frames.shape[0], -1))
        if n_bad:
            raise InvalidParameter(f"{n_bad} pixels are negative or not whole numbers: live SSB with a detector mask "
                             "or descan needs counted frames")
        self.push_events(where, entries, indices, weights)

    def _add(self, where: slice, crops) -> None:
        """The crops of positions ``where``: every row they complete goes through the scan-x FFT."""
        if where.start != self._next:
            raise InvalidParameter(  # LiveSSB.push_* are public: a caller's mistake
                f"positions {where.start}… pushed after {self._next}: live SSB takes them in scan order"
            )
        nx, w = self.scan_shape[1], self.window
        if len(self._pending):
            crops = np.concatenate([self._pending, crops])
        r0 = (where.start - len(self._pending)) // nx
        k = len(crops) // nx
        if k:
            pix_y, pix_x = self.disk.pixels.T
            self.rows[r0 : r0 + k] = select_and_rfft(crops[: k * nx].reshape(k, nx, w.n, w.n), pix_y, pix_x)
        self._pending = crops[k * nx :].copy()
        self._next = where.stop

    def reconstruct(self, calibration: Calibration, aberrations: Aberrations) -> SSBResult:
        """SSB of the completed scan (G kept in memory: refocus is the trotter sums only), in
        the scan frame of ``calibration`` (rotation/flip as tuned by the end)."""
        ny, nx = self.scan_shape
        if self._next != ny * nx:
            raise InvalidParameter(f"live SSB needs the whole scan: {self._next} of {ny * nx} positions are in")
        disk = bf_pixels(self._coords["k_y"].values, self._coords["k_x"].values, calibration)
        if not np.array_equal(disk.pixels, self.disk.pixels):
            raise InvalidParameter("the BF disk's size changed since the scan began: live SSB kept other pixels")
        if self._G is None:  # the scan-y FFT in place: the rows are not needed after it
            self._bf = float(self.rows[:, 0, :].real.sum(axis=1, dtype=np.float64).mean())
            self._G = scipy.fft.fft(self.rows, axis=0, norm="forward", overwrite_x=True, workers=os.cpu_count())
            self.rows = None
        chunks = g_chunks(ny, nx // 2 + 1, len(disk.pixels))  # by q_x, as batch SSB's G
        G = da.from_array(self._G, chunks=chunks, name=f"live-ssb-G-{uuid.uuid4().hex}")  # named: hashing costs
        (sy, sx) = calibration.scan_step_a
        return disk.result(G, self._bf, (np.arange(ny) * sy, np.arange(nx) * sx), calibration, aberrations, kept=True)

    def warm_up(self, calibration: Calibration) -> None:
        """SSB once on a 4×4 scan of this crop, so that the one at the scan's end pays no first-call
        costs (dask imports distributed to pick a scheduler, 0.3 s; numba caches)."""
        small = LiveSSB((4, 4), self.detector_shape, calibration, crop_side=self.window.n)
        small.rows[...] = 1.0
        small._next = 16
        small.reconstruct(calibration, Aberrations()).phase.values
