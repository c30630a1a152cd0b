"""A live session: riCOM, virtual images and COM of a scan while it arrives, retunable, optionally saved.

:class:`LiveSession` takes batches of positions in scan order (dense frames or events, see
:mod:`stemdask.live_sources`) and keeps, per position, only what the products need:

* the COM as measured — ``Σ I·k / Σ I`` in detector pixels (2 numbers a position, NaN
  without electrons) — so riCOM can be re-rendered for every position seen so far when the
  kernel size, band-pass, rotation/flip or COM reference changes (:meth:`LiveSession.retune`);
* electrons per position and the virtual detector images, as ``reconstruct --method virtual``
  names them (annuli around the calibrated BF centre: ``bf``/``abf``/``adf``, the presets of
  :mod:`stemdask.reductions`, or ``image`` for ``inner_mrad ≤ θ < outer_mrad`` when given).
  Unlike batch, live annuli stay at the scan-centre BF position (they do not follow a descan)
  and masked pixels are left out, not filled; ``counts`` are the electrons on kept pixels;
* riCOM through :class:`stemdask.live_ricom.LiveRiCOM` (rad; the same kernel as batch riCOM, the
  mask and descan applied as batch COM applies them, so the finished image equals
  ``reconstruct --method ricom --com-reference bf``);
* with ``ssb`` (not a default: it keeps the scan-x FFT of every row's BF-disk pixels, a
  memory bound fixed at the start, :class:`stemdask.live_ssb.LiveSSB`), the SSB phase (rad)
  once the last position is in (G kept: :attr:`LiveSession.ssb` refocuses in the trotter
  sums alone); equal to ``reconstruct --method ssb --bin B``.

Conventions are the batch ones: COM in the detector frame, px, relative to the reference
(default the calibrated BF centre); virtual images in electrons; riCOM in rad.

Saving (``save=``): the events go to an event store row block by row block with the
store's commit marks (:meth:`stemdask.store.EventStore.write_block`), each block as soon
as its last position has arrived; :meth:`LiveSession.finish` finalizes it. A session that
dies leaves its committed blocks readable with ``open_store(..., allow_incomplete=True)``.
Dense frames are stored as counted electrons (a pixel value of v is v electrons), in the
encoding ``stemdask ingest FILE`` chooses for the same frames (events, or weighted: an entry
per counted pixel), so a completed session's store equals the ingested one; the store is
created once the first piece of frames that ingest's rule looks at has arrived (see
:class:`_StoreWriter`).

Thread safety: pushes, :meth:`snapshot` and :meth:`retune` share one lock.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import xarray as xr

from . import __version__
from .errors import InvalidParameter
from .events import scan_coordinates
from .io.dense import choose_encoding, pieces, weight_dtype_for
from .kernels.dense import counted_frames_to_events, counted_frames_to_weighted
from .kernels.events import center_of_mass, masked_counts, position_sums
from .kernels.live import frame_sums
from .kernels.ricom import accumulator_zero
from .live_ricom import LiveRiCOM, ScanProgress
from .live_ssb import CROP_SIDE, LiveSSB
from .methods.ricom import ricom_long_name
from .methods.ssb import SSBResult, signed_c10, stored_defocus, unsigned_magnitude
from .optics import Aberrations, Calibration, descan_offsets
from .reductions import PRESETS, Annulus, MaskTerms, detector_masks, detector_name, mask_groups
from .store import FORMAT_NAME, check_replaceable, create_store, index_dtype_for

METHODS = ("ricom", "virtual", "com", "ssb")
#: What a session computes when no method is named (SSB holds memory for the whole scan: asked for only).
DEFAULT_METHODS = ("ricom", "virtual", "com")
_KEEP = object()


class LiveSession(ScanProgress):
    """Live products of a ``scan_shape`` scan on a ``detector_shape`` detector (see module docstring).

    methods: any of ``ricom``, ``virtual``, ``com``, ``ssb`` (COM is always kept: riCOM needs it).
    kernel_size, kmin, kmax: riCOM kernel full width (odd) and band-pass (Å⁻¹).
    reference: COM reference (y, x) px; default the calibration's BF centre.
    inner_mrad, outer_mrad: one ``image`` virtual detector (mrad around the BF centre); without
    either, the named BF/ABF/ADF annuli of the calibrated BF radius (as ``reconstruct``).
    save: path of an event store to write as the data arrive (``overwrite`` to replace one).
    ssb_crop: largest side (output pixels) of SSB's crop of each position (the BF disk is
    binned to fit); aberrations: SSB's (:class:`~stemdask.optics.Aberrations`; default C10 the
    calibration's stored estimate, else 0 — :attr:`ssb_c10_source` says which).
    mask, fill: the detector mask (bool, True = excluded) and its fill weights, as ``stemdask
    calibrate`` stores them: the COM excludes the masked pixels and fills them as batch COM
    does; the virtual detectors and ``counts`` only exclude them (the electrons on kept pixels).
    The calibration's descan is
    followed per position in the COM (the K·offset of batch COM), so live riCOM equals batch
    riCOM with ``--com-reference bf``.
    """

    def __init__(
        self,
        scan_shape,
        detector_shape,
        calibration: Calibration,
        *,
        methods=None,
        kernel_size: int = 61,
        kmin: float | None = None,
        kmax: float | None = None,
        reference=None,
        inner_mrad: float | None = None,
        outer_mrad: float | None = None,
        save=None,
        overwrite: bool = False,
        rows_per_block: int | None = None,
        provenance: dict | None = None,
        mask=None,
        fill=None,
        ssb_crop: int = CROP_SIDE,
        aberrations: Aberrations | None = None,
    ):
        self.scan_shape = tuple(int(v) for v in scan_shape)
        self.detector_shape = tuple(int(v) for v in detector_shape)
        asked = methods is not None
        methods = DEFAULT_METHODS if methods is None else methods
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise InvalidParameter(f"unknown live method(s) {sorted(unknown)}; choose from {list(METHODS)}")
        self.methods = tuple(dict.fromkeys(methods))
        self.calibration = calibration
        reference = calibration.bf_center if reference is None else reference
        if reference is None:
            raise InvalidParameter(
                "a live session needs a COM reference: give the BF centre (--bf-center Y X, "
                "or --calibration-from a calibrated store) or reference=(y, x) px"
            )
        self.reference = (float(reference[0]), float(reference[1]))
        self._setup_corrections(mask, fill)
        ny, nx = self.scan_shape
        self.com = np.full((2, ny, nx), np.nan)  # Σ I·k / Σ I (px), not yet minus the reference
        self.counts = np.zeros((ny, nx), np.int64)
        self._setup_virtual(inner_mrad, outer_mrad, required=asked)
        self.kernel_size, self.kmin, self.kmax = int(kernel_size), kmin, kmax
        self.ricom = self._new_ricom() if "ricom" in self.methods else None
        self.live_ssb = (
            LiveSSB(self.scan_shape, self.detector_shape, calibration, crop_side=ssb_crop, terms=self._terms)
            if "ssb" in self.methods
            else None
        )
        self._setup_ssb_focus(aberrations)
        if self.live_ssb is not None:
            self.live_ssb.warm_up(calibration)
        self.positions_done = 0
        self._lock = threading.Lock()
        self._writer = (
            None
            if save is None
            else _StoreWriter(
                save, self.scan_shape, self.detector_shape, calibration, rows_per_block, provenance, overwrite
            )
        )
        self.started = time.perf_counter()
        self.latencies: list[float] = []  # s, from a batch's first frame arriving to its contribution

    # ------------------------------------------------------------------ set-up
    def _setup_virtual(self, inner_mrad, outer_mrad, required: bool) -> None:
        """The virtual detectors; without a BF radius (and no angles given) none, said in a
        warning — or an error where ``virtual`` was asked for by name."""
        self.detectors: dict = {}
        if "virtual" in self.methods:
            if inner_mrad is not None or outer_mrad is not None:  # as reconstruct --method virtual
                self.detectors["image"] = Annulus(inner_mrad or 0.0, math.inf if outer_mrad is None else outer_mrad)
            elif self.calibration.bf_radius is not None:
                self.detectors.update({name: name for name in PRESETS})
            else:
                why = ("the BF/ABF/ADF virtual detectors need the BF-disk radius: give --bf-radius (or "
                       "--calibration-from a calibrated store), or --inner-mrad/--outer-mrad")
                if required:
                    raise InvalidParameter(why)
                warnings.warn(f"no virtual images: {why}", stacklevel=3)
        if self.detectors:
            if self.calibration.bf_center is None:
                raise InvalidParameter(
                    "virtual detectors are annuli around the BF centre: calibrate it first "
                    "(--bf-center Y X or --calibration-from STORE)"
                )
            geometry = SimpleNamespace(detector_shape=self.detector_shape, calibration=self.calibration,
                                       store=SimpleNamespace(path="live session"))  # what detector_masks reads
            masks, self.detector_attrs, _ = detector_masks(geometry, self.detectors)
        else:
            masks, self.detector_attrs = np.zeros((0,) + self.detector_shape, bool), {}
        if self._terms is not None:  # masked pixels count nowhere; the last group counts the kept ones (events)
            kept = self._keep_frame.astype(bool)
            masks = np.concatenate([masks & kept, kept[None]])
        self._masks = masks.astype(np.uint8)  # frames: multiplied in (kernels.live.frame_sums)
        if len(masks):  # events: pixel groups for kernels.events.masked_counts
            self._labels, self._table = mask_groups(masks)
        else:
            self._labels, self._table = (np.zeros(int(np.prod(self.detector_shape)), np.uint8),
                                         np.zeros((1, 0), np.uint32))
        self.virtual = np.zeros((len(self.detectors),) + self.scan_shape)
        if self._terms is not None:
            self._masks = self._masks[:-1]  # frames: the kept frames' total is the kept count

    def _setup_corrections(self, mask, fill) -> None:
        """The mask as the kernels take it and the descan's COM offset at every position (2, P)."""
        self._terms = None
        if mask is not None and np.asarray(mask).any():
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != self.detector_shape or fill is None or np.shape(fill) != self.detector_shape:
                raise InvalidParameter(
                    f"the detector mask and its fill must be {self.detector_shape}, got "
                    f"{mask.shape} and {np.shape(fill)}"
                )
            self._terms = MaskTerms.from_arrays(mask, fill)
            self._keep_frame = (~mask).astype(np.uint8)
            self._fill_moments = self._terms.mean_offset(self.detector_shape[1])
        descan = self.calibration.descan
        dy, dx = descan_offsets(descan, self.scan_shape)
        k = np.asarray((descan or {}).get("com_response", np.eye(2)), dtype=np.float64)
        self._com_offset = k @ np.stack([dy.ravel(), dx.ravel()])  # what the COM sees of the disk's move

    def _setup_ssb_focus(self, aberrations) -> None:
        self.ssb: SSBResult | None = None  # after the last position, with "ssb"
        self.ssb_phase: np.ndarray | None = None
        self.ssb_seconds: float | None = None  # last position in → SSB phase ready (s)
        self.ssb_attrs: dict = {}  # of the phase: aberrations, weighting, semi-angle, C10's source
        self.ssb_c10_magnitude = None  # a measured |C10| whose sign the focus criterion picks at the end
        if aberrations is not None:
            self.aberrations, self.ssb_c10_source = aberrations, "given"
            return
        c10, self.ssb_c10_source = stored_defocus(self.calibration)
        self.aberrations = Aberrations(C10=c10)
        self.ssb_c10_magnitude = unsigned_magnitude(self.calibration)
        if self.ssb_c10_magnitude is not None:
            self.ssb_c10_source = (
                f"calibrate measured |C10| = {self.ssb_c10_magnitude:.1f} Å but not its sign: "
                "the focus criterion picks it when the scan completes"
            )

    def _filled(self, com_y, com_x):
        """Kept-pixel COM (px, no reference) → with the masked pixels filled (batch COM's rule)."""
        if self._terms is None:
            return com_y, com_x
        f0, fy, fx = self._fill_moments
        return (com_y + fy) / (1.0 + f0), (com_x + fx) / (1.0 + f0)

    def _relative(self, com_y, com_x, where):
        """COM minus the reference and the descan of positions ``where`` (px)."""
        return (com_y - self.reference[0] - self._com_offset[0][where],
                com_x - self.reference[1] - self._com_offset[1][where])

    def _new_ricom(self) -> LiveRiCOM:
        return LiveRiCOM(self.scan_shape, self.detector_shape, self.calibration, kernel_size=self.kernel_size,
                         kmin=self.kmin, kmax=self.kmax, reference=self.reference)

    # ------------------------------------------------------------------ pushing
    def _claim(self, m: int) -> slice:
        p0 = self.positions_done
        if p0 + m > self.n_positions:
            raise InvalidParameter(
                f"{m} more positions after {p0} overrun the {self.scan_shape[0]}×{self.scan_shape[1]} scan"
            )
        return slice(p0, p0 + m)

    def push_frames(self, frames, arrival: float | None = None) -> None:
        """The next positions as dense frames (m, det_y, det_x) of counts, store orientation.

        ``arrival``: ``time.perf_counter()`` when the first of them arrived (for the latency figure).
        """
        frames = np.asarray(frames)
        if frames.ndim != 3 or frames.shape[1:] != self.detector_shape:
            raise InvalidParameter(
                f"frames of shape {frames.shape[1:]} do not match the detector {self.detector_shape}"
            )
        kept = frames if self._terms is None else frames * self._keep_frame
        total, sum_y, sum_x, virtual = frame_sums(kept, self._masks, accumulator_zero(kept.dtype))
        with np.errstate(invalid="ignore", divide="ignore"):
            com_y, com_x = self._filled(sum_y / total, sum_x / total)
        events = None if self._writer is None else self._writer.frame_entries(frames)
        crop = None if self.live_ssb is None else functools.partial(self.live_ssb.push_frames, frames=frames)
        self._push(com_y, com_x, total, virtual, events, arrival, crop)

    def push_events(self, indices, counts, arrival: float | None = None, weights=None) -> None:
        """The next ``len(counts)`` positions as electron events (``indices``: linear detector pixels,
        in scan order; with ``weights``, each entry that many electrons) — the signature of
        :meth:`stemdask.live_ricom.LiveRiCOM.push_events`, so :func:`stemdask.live_ricom.consume` feeds a
        session from a queue of per-position arrays."""
        counts = np.ascontiguousarray(counts).ravel()
        indices = np.ascontiguousarray(indices).ravel()
        weights = None if weights is None else np.ascontiguousarray(weights).ravel()
        n_pix = self.detector_shape[0] * self.detector_shape[1]
        if int(counts.sum(dtype=np.int64)) != indices.size:
            raise InvalidParameter(f"{indices.size} event indices but counts sum to {int(counts.sum(dtype=np.int64))}")
        if indices.size and int(indices.max()) >= n_pix:
            raise InvalidParameter(f"detector index {int(indices.max())} outside the {self.detector_shape} detector")
        keep = None if self._terms is None else self._terms.keep
        com_y, com_x = self._filled(*center_of_mass(counts, indices, self.detector_shape[1], 0.0, 0.0, keep, weights,
                                                    n_pixels=n_pix))
        virtual = masked_counts(counts, indices, weights, self._labels, self._table)
        electrons = counts if weights is None else position_sums(counts, weights)
        kept = electrons if self._terms is None else virtual[:, -1]
        crop = (
            None
            if self.live_ssb is None
            else functools.partial(self.live_ssb.push_events, counts=counts, indices=indices, weights=weights)
        )
        self._push(
            com_y, com_x, kept, virtual[:, : len(self.detectors)], (counts, indices, weights, electrons), arrival, crop
        )

    def _push(self, com_y, com_x, counts, virtual, events, arrival, crop=None) -> None:
        """Record a batch's per-position products (``crop(where)`` fills its SSB crops)."""
        with self._lock:
            where = self._claim(com_y.size)
            if crop is not None:
                crop(where)
            self.com[0].reshape(-1)[where] = com_y
            self.com[1].reshape(-1)[where] = com_x
            self.counts.reshape(-1)[where] = counts
            for d in range(self.virtual.shape[0]):
                self.virtual[d].reshape(-1)[where] = virtual[:, d]
            if self.ricom is not None:
                self.ricom.push_com(*self._relative(com_y, com_x, where))
            self.positions_done = where.stop
            if arrival is not None:
                self.latencies.append(time.perf_counter() - arrival)
        if self._writer is not None:
            self._writer.add(*events)
        if self.live_ssb is not None and self.done:
            self._reconstruct_ssb()

    def _reconstruct_ssb(self) -> None:
        """SSB of the completed scan from the kept rows (the calibration as tuned by then)."""
        t = time.perf_counter()
        result = self.live_ssb.reconstruct(self.calibration, self.aberrations)
        extra = {}
        if self.ssb_c10_magnitude is not None:  # as batch SSB does (methods.ssb.run)
            c10, self.ssb_c10_source, extra = signed_c10(result, self.ssb_c10_magnitude)
            self.aberrations = dataclasses.replace(self.aberrations, C10=c10)
        phase = result.refocus(self.aberrations)
        values = phase.values
        with self._lock:
            self.ssb, self.ssb_phase = result, values
            self.ssb_attrs = {**phase.attrs, "c10_source": self.ssb_c10_source, **extra}
            self.ssb_seconds = time.perf_counter() - t

    # ------------------------------------------------------------------ tuning
    def retune(
        self, *, kernel_size=_KEEP, kmin=_KEEP, kmax=_KEEP, rotation_deg=_KEEP, flip=_KEEP, reference=_KEEP
    ) -> None:
        """Change riCOM's kernel size, band-pass (Å⁻¹; None: none), rotation (deg) / flip or the
        COM reference ((y, x) px) mid-scan: riCOM is re-rendered from the kept COM of every
        position so far, then continues. Nothing measured is lost."""
        with self._lock:
            changes = {k: v for k, v in (("rotation_deg", rotation_deg), ("flip", flip)) if v is not _KEEP}
            calibration = self.calibration.replace(**changes) if changes else self.calibration
            old = (self.calibration, self.kernel_size, self.kmin, self.kmax, self.reference)
            self.calibration = calibration
            if kernel_size is not _KEEP:
                self.kernel_size = int(kernel_size)
            if kmin is not _KEEP:
                self.kmin = kmin
            if kmax is not _KEEP:
                self.kmax = kmax
            if reference is not _KEEP:
                self.reference = (float(reference[0]), float(reference[1]))
            if self.ricom is None:
                return
            try:
                ricom = self._new_ricom()
            except ValueError:
                self.calibration, self.kernel_size, self.kmin, self.kmax, self.reference = old
                raise
            p = self.positions_done
            ricom.push_com(*self._relative(self.com[0].reshape(-1)[:p], self.com[1].reshape(-1)[:p], slice(0, p)))
            self.ricom = ricom

    # ------------------------------------------------------------------ results
    @property
    def frames_per_second(self) -> float:
        dt = time.perf_counter() - self.started
        return self.positions_done / dt if dt > 0 else 0.0

    def snapshot(self) -> dict[str, np.ndarray]:
        """Copies of the current images: ``phase`` (riCOM, rad), ``com_y``/``com_x`` (px from the
        reference), each virtual detector (electrons) and ``counts``; NaN/0 where not yet measured."""
        with self._lock:
            out = {"counts": self.counts.copy()}
            if self.ricom is not None:
                out["phase"] = self.ricom.snapshot()
            if "com" in self.methods:
                rel_y, rel_x = self._relative(self.com[0].reshape(-1), self.com[1].reshape(-1), slice(None))
                out["com_y"], out["com_x"] = rel_y.reshape(self.scan_shape), rel_x.reshape(self.scan_shape)
            for d, name in enumerate(self.detectors):
                out[name] = self.virtual[d].copy()
            if self.ssb_phase is not None:
                out["ssb_phase"] = self.ssb_phase.copy()
        return out

    def result(self) -> xr.Dataset:
        """The products as an xarray Dataset with the variable names of ``stemdask reconstruct``
        (a name two methods produce is prefixed with each: ``ricom_phase``, ``ssb_phase``)."""
        from .reconstruct import calibration_record, merge_method_parts

        snap = self.snapshot()
        (ny, nx), (sy, sx) = self.scan_shape, self.calibration.scan_step_a
        coords = scan_coordinates(np.arange(ny) * sy, np.arange(nx) * sx)
        dims = ("scan_y", "scan_x")
        parts = {}
        if "phase" in snap:
            parts["ricom"] = {
                "phase": (
                    snap["phase"],
                    {"units": "rad", "long_name": ricom_long_name(self.kernel_size, self.kmin, self.kmax),
                     "kernel_size": self.kernel_size, "kmin_inv_a": self.kmin, "kmax_inv_a": self.kmax},
                )
            }
        if "com" in self.methods:
            parts["com"] = {
                c: (
                    snap[c],
                    {"units": "px", "frame": "detector", "reference_px": list(self.reference),
                     "long_name": f"centre of mass k_{c[-1]} (detector frame)"},
                )
                for c in ("com_y", "com_x")
            }
        if self.detectors:
            parts["virtual"] = {
                name: (
                    snap[name].astype(np.uint32),
                    {"units": "electrons", "long_name": detector_name(name, self.detector_attrs[name]),
                     **self.detector_attrs[name]},
                )
                for name in self.detectors
            }
        if "ssb_phase" in snap:
            parts["ssb"] = {"phase": (snap["ssb_phase"], {**self.ssb_attrs, "crop_bin": self.live_ssb.window.bin})}
        merged = merge_method_parts(
            {
                m: xr.Dataset({k: xr.Variable(dims, *v) for k, v in part.items()}, coords=coords)
                for m, part in parts.items()
            }
        )
        merged.attrs = {
            "methods": list(self.methods),
            "positions_done": self.positions_done,
            "n_positions": self.n_positions,
            "complete": self.done,
            **calibration_record(self.calibration),
        }
        return merged

    # ------------------------------------------------------------------ running
    def run(self, source) -> "LiveSession":
        """Consume an opened source (:mod:`stemdask.live_sources`) until the scan is complete."""
        if tuple(source.detector_shape) != self.detector_shape:
            raise InvalidParameter(
                f"{source.url}: detector {tuple(source.detector_shape)}, the session expects {self.detector_shape}"
            )
        for kind, payload in source.batches(self.n_positions - self.positions_done):
            arrival = getattr(source, "batch_arrival", None) or time.perf_counter()
            if kind == "frames":
                self.push_frames(payload, arrival)
            else:
                counts, indices, weights = payload
                self.push_events(indices, counts, arrival=arrival, weights=weights)
        return self

    @property
    def saved(self) -> str:
        """What the store holds so far, in words (for the end-of-session report)."""
        return "nothing saved" if self._writer is None else self._writer.describe()

    def finish(self):
        """Write the saved store's complete row blocks and finalize it if the scan is complete;
        returns the finalized store, or None (no ``save``, or an incomplete scan)."""
        if self._writer is None:
            return None
        return self._writer.finish(self.done)


class _StoreWriter:
    """A store written as the positions arrive: a row block as soon as it is complete.

    Its encoding is that of what arrives: events stay events, weighted events (a weighted
    store replayed) stay weighted with their weight dtype, and dense frames are stored as
    ``stemdask ingest`` stores the same frames — ingest's byte rule
    (:func:`stemdask.io.dense.choose_encoding`) on the same first piece of frames
    (:func:`stemdask.io.dense.pieces`), the weights of :func:`~stemdask.io.dense.weight_dtype_for`
    the frames' dtype, and the row block height from the same bytes per position. So the
    store is created once that first piece (at most ``PIECE_BYTES`` of frames) has arrived;
    until then the positions wait in memory as weighted entries.
    """

    def __init__(self, path, scan_shape, detector_shape, calibration, rows_per_block, provenance, overwrite):
        self.path = Path(path)
        if self.path.exists():  # refused now, not once the scan runs (the store is created later)
            if not overwrite:
                raise FileExistsError(f"{self.path} already exists (pass --overwrite to replace it)")
            check_replaceable(self.path, FORMAT_NAME)
        prov = {"source": "live", "stemdask_version": __version__, **(provenance or {})}
        self._create = functools.partial(create_store, self.path, scan_shape, detector_shape, calibration,
                                         rows_per_block=rows_per_block, provenance=prov, overwrite=overwrite)
        self.nx, self.n_positions = scan_shape[1], scan_shape[0] * scan_shape[1]
        self.index_dtype = index_dtype_for(detector_shape)
        self.store = None
        self.encoding: str | None = None  # settled by the first batches
        self._first: tuple[int, np.dtype] | None = None  # frames: (first piece's positions, weight dtype)
        self._waiting: list[tuple] = []  # batches before the store exists
        self._waiting_positions = 0
        self.block = 0
        self._rows: list[tuple] = []  # entries of the block being filled
        self._have = 0
        self.events = 0

    def frame_entries(self, frames: np.ndarray) -> tuple:
        """Counted frames (m, det_y, det_x) → (entries per position, indices, weights or None,
        electrons per position), one entry per electron once the store is settled on events,
        else one per counted pixel."""
        flat = np.ascontiguousarray(frames).reshape(frames.shape[0], -1)
        if self._first is None and self.encoding is None:
            first = next(pieces(0, self.n_positions, self.nx, flat.shape[1] * frames.dtype.itemsize))
            self._first = (first[1], weight_dtype_for(frames.dtype))
        if self.encoding == "events":
            electrons, indices, n_bad = counted_frames_to_events(flat, self.index_dtype)
            entries, weights = electrons, None
        else:
            weight_dtype = self._first[1] if self.store is None else self.store.weight_dtype
            entries, indices, weights, n_bad, top = counted_frames_to_weighted(flat, self.index_dtype, weight_dtype)
            if top > np.iinfo(weight_dtype).max:
                raise InvalidParameter(f"a pixel counts {top} electrons, more than a {weight_dtype} weight holds")
            electrons = position_sums(entries, weights)
        if n_bad:
            raise InvalidParameter(
                f"{n_bad} pixels are negative or not whole numbers: cannot store them as electron counts"
            )
        return entries, indices, weights, electrons

    def add(self, entries, indices, weights=None, electrons=None) -> None:
        """The next positions' entries (``weights`` None: one per electron; ``electrons``: per
        position, with weights)."""
        batch = (np.asarray(entries).ravel(), np.asarray(indices).ravel(),
                 None if weights is None else np.asarray(weights).ravel(),
                 np.asarray(entries if weights is None else electrons).ravel())
        if self.store is None:
            self._waiting.append(batch)
            self._waiting_positions += batch[0].size
            if self._first is None or self._waiting_positions >= self._first[0]:
                self._settle()
            return
        self._append(*batch)

    def _settle(self) -> None:
        """Choose the encoding from the batches so far, create the store, write what waits."""
        waiting, self._waiting, self._waiting_positions = self._waiting, [], 0
        if not waiting:
            return
        if self._first is None:  # events as they came
            weights = waiting[0][2]
            self.encoding = "events" if weights is None else "weighted"
            weight_dtype = "uint16" if weights is None else weight_dtype_for(weights.dtype)
            self.store = self._create(encoding=self.encoding, weight_dtype=weight_dtype)
        else:  # frames: ingest's rule on its first piece (or on what came, if the scan ended before)
            n, weight_dtype = self._first
            entries = np.concatenate([w[0] for w in waiting])[:n]
            electrons = np.concatenate([w[3] for w in waiting])[:n]
            self.encoding, per_position = choose_encoding(
                "auto", int(electrons.sum()), int(entries.sum()), entries.size, self.index_dtype, weight_dtype
            )
            self.store = self._create(
                encoding=self.encoding, weight_dtype=weight_dtype, bytes_per_position=per_position
            )
        for batch in waiting:
            self._append(*batch)

    def _append(self, entries, indices, weights, electrons) -> None:
        """Positions in the store's encoding, written a row block at a time."""
        if self.store.weighted and weights is None:
            weights = np.ones(indices.size, self.store.weight_dtype)
        elif not self.store.weighted and weights is not None:
            indices, weights, entries = np.repeat(indices, weights), None, electrons
        e = 0
        while entries.size:
            r0, r1 = self.store.block_rows(self.block)
            take = min((r1 - r0) * self.nx - self._have, entries.size)
            n = int(entries[:take].sum(dtype=np.int64))
            self._rows.append(
                (entries[:take], indices[e : e + n], None if weights is None else weights[e : e + n], electrons[:take])
            )
            self._have += take
            entries, electrons, e = entries[take:], electrons[take:], e + n
            if self._have == (r1 - r0) * self.nx:
                self._write_block(r1 - r0)

    def _write_block(self, rows: int) -> None:
        part = list(zip(*self._rows))
        weights = None if part[2][0] is None else np.concatenate(part[2])
        self.events += self.store.write_block(
            self.block, np.concatenate(part[0]).reshape(rows, self.nx), np.concatenate(part[1]), weights=weights
        )
        self.block += 1
        self._rows, self._have = [], 0

    def describe(self) -> str:
        if not self.block:
            return f"{self.path}: no complete row block yet (nothing saved)"
        rows = self.store.block_rows(self.block - 1)[1]
        return (
            f"{self.path}: {self.block} of {self.store.n_blocks} row blocks saved "
            f"(scan rows 0..{rows - 1}, {self.events:,} electrons, encoding {self.encoding})"
        )

    def finish(self, complete: bool):
        """Write what waits for the encoding (a scan that ended early), then finalize a
        ``complete`` scan's store (returned; else None)."""
        self._settle()
        return self.store.finalize(source_events=self.events) if complete else None
