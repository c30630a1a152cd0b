"""Dense detector frames → store entries: ``.npy`` (memory-mapped), an HDF5 dataset
(``file.h5:/path/to/dataset``, or the file's only 3-D/4-D dataset), Merlin ``.mib`` (read
natively, :class:`stemdask.io.merlin.MibFile`, with its ``.hdr``), and every format that
rosettasciio reads lazily, chosen by file extension (``.hspy``, ``.dm4``, ``.emd``,
``.tvips``, ``.prz``, …: any extension that names exactly one rosettasciio plugin).

Frames are ``(ny, nx, dy, dx)``, or a stack ``(n, dy, dx)`` with ``scan_shape`` given (a
``.mib`` is always a stack; without ``scan_shape`` its ``.hdr`` gives (frames in
acquisition / frames per trigger, frames per trigger), recorded as ``scan_shape_from``). A
stack must hold exactly ``ny·nx`` frames unless ``frames_range=(start, stop)`` names the
``ny·nx`` frames to take; provenance records the file's frame count and the range taken.
``mode``: ``"counts"`` (a pixel value is a number of electrons: exact, values must be
non-negative whole numbers — integrated intensities are refused) or ``"threshold"`` (a
value above ``threshold`` is one electron: for analogue frames only).

``encoding`` (counts mode): ``"events"`` — one entry per electron — or ``"weighted"`` — one
entry per counted pixel with its count as the weight (uint8/16/32 from the frames' dtype,
:func:`weight_dtype_for`); ``"auto"`` picks the one with fewer entry bytes on the first
piece of frames, which is read and checked when the source opens, before any store
exists. Frames are read in pieces of at most :data:`PIECE_BYTES`, so memory stays bounded
however large a row block is.

Optics (see :meth:`DenseSource.optics`): from rosettasciio's metadata and axes — HyperSpy's
``Acquisition_instrument.TEM.beam_energy`` (keV) and ``convergence_angle`` (mrad), the scan
step from the navigation axes' scale when their units are a length (pm … m), the detector
pixel size from the signal axes' scale when their units are an angle (mrad, rad) or, with a
known energy, a spatial frequency (1/nm, 1/Å). Merlin ``.mib`` records none of them: its
``.hdr`` holds detector settings (counter depth, thresholds, frame counts). HDF5 datasets:
attrs of the dataset or of the root named as :data:`~stemdask.io.common.OPTICS_NAMES`.
``.npy``: none.

Orientation: frames are taken as the reader returns them; a ``.mib`` is flipped vertically
(:func:`stemdask.io.merlin.to_store_orientation`), as rosettasciio reads it, so a ``.mib``
store's detector row 0 is the file's last row — the orientation HyperSpy shows.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import h5py
import numpy as np

from ..kernels.dense import count_frames, entries_of, thresholded_frames_to_events
from ..store import ENCODINGS, MAX_PER_POSITION, index_dtype_for
from .common import (
    OPTICS_NAMES,
    Source,
    SourceError,
    agree,
    as_shape,
    open_h5,
    optics_from_mapping,
)
from .merlin import MerlinError, MibFile

#: Largest piece of frames read at once (bytes).
PIECE_BYTES = 64 << 20
MODES = ("counts", "threshold")


def weight_dtype_for(dtype: np.dtype) -> np.dtype:
    """The weight dtype of a weighted store of counted frames of ``dtype``: the smallest
    unsigned one that holds every count such frames can carry (8-bit frames → uint8,
    16-bit → uint16, anything wider or floating point → uint32)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "ui" and dtype.itemsize <= 2:
        return np.dtype(f"uint{8 * dtype.itemsize}")
    return np.dtype(np.uint32)


def pieces(p0: int, p1: int, nx: int, frame_bytes: int):
    """Split positions [p0, p1) of an ``nx``-wide scan into pieces of ≤ :data:`PIECE_BYTES`
    of frames (``frame_bytes`` each): whole scan rows, or parts of one row."""
    per = max(1, PIECE_BYTES // frame_bytes)
    if per >= nx:
        step = (per // nx) * nx
        yield from ((a, min(a + step, p1)) for a in range(p0, p1, step))
    else:
        for row0 in range(p0, p1, nx):
            yield from ((a, min(a + per, row0 + nx)) for a in range(row0, row0 + nx, per))


def choose_encoding(asked: str, electrons: int, nonzero: int, positions: int, index_dtype,
                    weight_dtype) -> tuple[str, float]:
    """The encoding of counted frames, from ``electrons`` and ``nonzero`` (counted pixels) on
    ``positions`` positions (ingest's and live's first piece, :func:`pieces`): ``asked``, or
    with ``"auto"`` the one whose entries take fewer bytes — one index per electron
    ("events") or an index and a weight per counted pixel, plus the per-position entries
    array ("weighted"). Returns it with its entry bytes per position."""
    events = np.dtype(index_dtype).itemsize * electrons / positions
    weighted = (np.dtype(index_dtype).itemsize + np.dtype(weight_dtype).itemsize) * nonzero / positions + 4
    chosen = asked if asked != "auto" else ("weighted" if weighted < events else "events")
    return chosen, weighted if chosen == "weighted" else events


def split_h5_path(spec: str) -> tuple[Path, str | None]:
    """``"file.h5:/group/data"`` → (file, "/group/data"); a plain path → (path, None)."""
    head, sep, tail = str(spec).rpartition(":/")
    if sep and Path(head).is_file():
        return Path(head), "/" + tail
    return Path(spec), None


def rsciio_plugin(path: Path) -> str | None:
    """The rosettasciio plugin module for ``path``'s extension, if exactly one claims it
    (``.npy`` and plain HDF5 are read natively); None otherwise or without rosettasciio."""
    ext = path.suffix[1:].lower()
    if ext in ("", "npy", "h5", "hdf5", "hdf"):
        return None
    try:
        from rsciio import IO_PLUGINS
    except ImportError:  # pragma: no cover - rosettasciio is a test dependency
        return None
    apis = {p["api"] for p in IO_PLUGINS if ext in (e.lower() for e in p["file_extensions"])}
    return apis.pop() if len(apis) == 1 else None


#: Length units of rosettasciio axes, in Å.
_LENGTH_A = {"pm": 1e-2, "Å": 1.0, "A": 1.0, "angstrom": 1.0, "nm": 10.0, "µm": 1e4, "um": 1e4, "mm": 1e7, "m": 1e10}
#: Angle units, in mrad; spatial-frequency units, in Å⁻¹.
_ANGLE_MRAD = {"mrad": 1.0, "rad": 1e3, "µrad": 1e-3, "urad": 1e-3}
_FREQ_INV_A = {"1/nm": 0.1, "nm^-1": 0.1, "nm⁻¹": 0.1, "1/Å": 1.0, "1/A": 1.0, "Å^-1": 1.0, "Å⁻¹": 1.0}


def rsciio_optics(signal: dict | None, ndim: int) -> dict:
    """The optics a rosettasciio signal dict records (module docstring); ``{}`` for none."""
    if not signal:
        return {}
    from ..optics import wavelength_a

    found = {}
    tem = ((signal.get("metadata") or {}).get("Acquisition_instrument") or {}).get("TEM") or {}

    def positive(v):
        try:
            v = float(v)
        except (TypeError, ValueError):
            return None
        return v if np.isfinite(v) and v > 0 else None

    if positive(tem.get("beam_energy")):
        found["energy_ev"] = positive(tem["beam_energy"]) * 1e3
    if positive(tem.get("convergence_angle")):
        found["semiangle_mrad"] = positive(tem["convergence_angle"])
    axes = sorted(signal.get("axes") or [], key=lambda a: a.get("index_in_array", 0))
    if len(axes) != ndim:
        return found
    nav, sig = axes[:-2], axes[-2:]
    if ndim == 4:
        steps = [positive(a.get("scale")) and _LENGTH_A.get(str(a.get("units", "")).strip()) for a in nav]
        if all(steps):
            found["scan_step_a"] = tuple(float(a["scale"]) * u for a, u in zip(nav, steps))
    units = {str(a.get("units", "")).strip() for a in sig}
    scales = [positive(a.get("scale")) for a in sig]
    if len(units) == 1 and all(scales) and np.isclose(scales[0], scales[1], rtol=1e-6):
        u = units.pop()
        if u in _ANGLE_MRAD:
            found["detector_pixel_mrad"] = scales[0] * _ANGLE_MRAD[u]
        elif u in _FREQ_INV_A and "energy_ev" in found:
            found["detector_pixel_mrad"] = scales[0] * _FREQ_INV_A[u] * wavelength_a(found["energy_ev"]) * 1e3
    return found


@contextlib.contextmanager
def _quiet_rsciio():
    """Keep rosettasciio's reader warnings off stderr, so that every CLI error
    stays one line; errors still raise."""
    log = logging.getLogger("rsciio")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _only_frames_dataset(f: h5py.File, path) -> str:
    found = []
    f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim in (3, 4) else None)
    if len(found) != 1:
        what = "no 3-D or 4-D dataset" if not found else f"several 3-D/4-D datasets {found}"
        raise SourceError(f"{path}: {what}; name one as {path}:/path/to/dataset")
    return "/" + found[0]


class DenseSource(Source):
    format = "dense"

    def __init__(self, path, *, mode="counts", threshold=None, scan_shape=None, detector_shape=None,
                 frames_range=None, encoding="auto", format="dense", **_):
        if mode not in MODES:
            raise SourceError(f"{path}: mode must be one of {MODES}, got {mode!r}")
        if encoding not in ("auto", *ENCODINGS):
            raise SourceError(f"{path}: encoding must be one of {('auto', *ENCODINGS)}, got {encoding!r}")
        if mode == "threshold":
            if threshold is None or not np.isfinite(float(threshold)):
                raise SourceError(f"{path}: mode 'threshold' needs a finite threshold (--threshold)")
            threshold = float(threshold)
            if encoding == "weighted":
                raise SourceError(f"{path}: mode 'threshold' makes one electron of a pixel: encoding 'events'")
        elif threshold is not None:
            raise SourceError(f"{path}: a threshold is only used with mode 'threshold'")
        self.mode, self.threshold = mode, threshold
        self.path, self.dataset = split_h5_path(path)
        self.plugin = None if self.dataset else rsciio_plugin(self.path)
        if format == "mib" or self.path.suffix.lower() == ".mib":
            self.plugin, self.format = None, "mib"
        scan = as_shape("scan_shape", scan_shape, path)
        self._lazy = None
        self._signal = None
        with self._frames() as arr:
            shape, dtype = arr.shape, np.dtype(arr.dtype)
            recorded = dict(arr.attrs) if isinstance(arr, h5py.Dataset) else {}
            if isinstance(arr, h5py.Dataset):
                recorded = {**{k: arr.file.attrs[k] for k in OPTICS_NAMES if k in arr.file.attrs}, **recorded}
            hdr_scan = getattr(arr, "scan_shape", None)
        if dtype.kind not in "uif" or len(shape) not in (3, 4):
            raise SourceError(f"{path}: expected numeric frames (ny, nx, dy, dx) or (n, dy, dx), got {dtype} {shape}")
        self.detector_shape = agree("detector_shape", as_shape("detector_shape", detector_shape, path),
                                    tuple(shape[-2:]), path)
        self.source_frames = int(np.prod(shape[:-2]))
        self.scan_shape_from = "file" if len(shape) == 4 else "caller"
        if len(shape) == 4:
            if frames_range is not None:
                raise SourceError(f"{path}: frames_range applies to a stack of frames, not to {shape} data")
            self.scan_shape = agree("scan_shape", scan, tuple(shape[:2]), path)
            self.frames_range = None
        else:
            if scan is None and hdr_scan is not None and frames_range is None:
                scan, self.scan_shape_from = hdr_scan, ".hdr (frames in acquisition / frames per trigger)"
            if scan is None:
                raise SourceError(f"{path}: {shape[0]} frames in a stack; pass scan_shape (ny, nx)")
            self.scan_shape = scan
            self.frames_range = self._check_frames_range(path, frames_range, shape[0])
        self.frame_bytes = int(np.prod(self.detector_shape)) * dtype.itemsize
        self.ndim = len(shape)
        recorded = {k: v for k, v in recorded.items() if k in OPTICS_NAMES}
        self._optics = {**rsciio_optics(self._signal, len(shape)), **optics_from_mapping(recorded, self.path)}
        self._signal = None
        self.index_dtype = index_dtype_for(self.detector_shape)
        self.weight_dtype = weight_dtype_for(dtype) if mode == "counts" else None
        self.encoding, self.bytes_per_position = self._choose_encoding(encoding)

    def _choose_encoding(self, asked: str) -> tuple[str, float]:
        """Read and check the first piece (so that data a store cannot hold are refused
        before one exists) and settle the encoding (:func:`choose_encoding`). Returns it with
        its estimated entry bytes per position."""
        with self._frames() as arr:
            a, b = next(self._pieces(0, self.scan_shape[0] * self.scan_shape[1]))
            frames = self._read(arr, a, b)
        if self.mode == "threshold":
            return "events", self.index_dtype.itemsize * np.count_nonzero(frames > self.threshold) / (b - a)
        electrons, nonzero = self._counted(frames, f"positions {a}..{b - 1}")
        return choose_encoding(asked, int(electrons.sum()), int(nonzero.sum()), b - a, self.index_dtype,
                               self.weight_dtype)

    def _check_frames_range(self, path, frames_range, n: int) -> tuple[int, int] | None:
        """The frames ``[start, stop)`` of an ``n``-frame stack that make the scan: all of them
        unless ``frames_range`` says otherwise; never silently fewer or more."""
        positions = self.scan_shape[0] * self.scan_shape[1]
        if frames_range is None:
            if n != positions:
                raise SourceError(
                    f"{path}: scan_shape {self.scan_shape} does not match the data: {positions} positions, but "
                    f"the file has {n} frames; give the right scan shape, or --frames-range START STOP to take "
                    f"{positions} of them on purpose"
                )
            return None
        try:
            start, stop = (int(v) for v in frames_range)
        except (TypeError, ValueError):
            raise SourceError(f"{path}: frames_range must be two integers START STOP, got {frames_range!r}") from None
        if not 0 <= start < stop <= n:
            raise SourceError(f"{path}: frames_range {start}..{stop} is outside the file's {n} frames (0..{n})")
        if stop - start != positions:
            raise SourceError(f"{path}: frames_range {start}..{stop} holds {stop - start} frames but scan_shape "
                              f"{self.scan_shape} has {positions} positions")
        return start, stop

    # ---------------------------------------------------------------- access
    @contextlib.contextmanager
    def _frames(self):
        """The frames as an array-like (numpy memmap, h5py dataset or dask array)."""
        if self.format == "mib":
            try:
                yield MibFile(self.path)
            except MerlinError as e:
                raise SourceError(str(e)) from None
        elif self.plugin is not None:
            yield self._rsciio_array()
        elif self.path.suffix.lower() == ".npy":
            try:
                arr = np.load(self.path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise SourceError(f"{self.path}: not a readable .npy file ({type(e).__name__}: {e})") from None
            yield arr
        else:
            with open_h5(self.path) as f:
                name = self.dataset or _only_frames_dataset(f, self.path)
                if name not in f or not isinstance(f[name], h5py.Dataset):
                    raise SourceError(f"{self.path}: has no dataset {name}")
                yield f[name]

    def _rsciio_array(self):
        """The file's (only) 3-D/4-D signal as rosettasciio's lazy dask array (cached)."""
        if self._lazy is None:
            import importlib

            reader = importlib.import_module(self.plugin).file_reader
            try:
                with _quiet_rsciio():
                    signals = reader(str(self.path), lazy=True)
            except Exception as e:  # readers raise many kinds for a malformed file
                raise SourceError(f"{self.path}: {self.plugin} cannot read it ({type(e).__name__}: {e})") from None
            frames = [s["data"] for s in signals if np.ndim(s["data"]) in (3, 4)]
            if len(frames) != 1:
                raise SourceError(f"{self.path}: expected one 3-D/4-D signal, found {len(frames)} "
                                  f"(shapes {[np.shape(s['data']) for s in signals]})")
            self._lazy = frames[0]
            self._signal = next(s for s in signals if np.ndim(s["data"]) in (3, 4))
        return self._lazy

    def _pieces(self, p0: int, p1: int):
        return pieces(p0, p1, self.scan_shape[1], self.frame_bytes)

    def _read(self, arr, a: int, b: int) -> np.ndarray:
        """Frames of positions [a, b) as a C-contiguous native-endian (b - a, D) array."""
        nx = self.scan_shape[1]
        if self.ndim == 3:
            first = self.frames_range[0] if self.frames_range else 0
            got = arr[first + a : first + b]
        elif a % nx == 0 and b % nx == 0:
            got = arr[a // nx : b // nx]
        else:
            got = arr[a // nx, a % nx : a % nx + (b - a)]
        got = np.asarray(got)
        return np.ascontiguousarray(got.reshape(b - a, -1), dtype=got.dtype.newbyteorder("="))

    def _counted(self, frames: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        """Check counted frames (a store can hold them exactly) → (electrons, counted pixels)
        per position."""
        electrons, nonzero, n_bad, top = count_frames(frames)
        if n_bad:
            raise SourceError(
                f"{self.path}: {n_bad} pixels ({where}) are negative or not whole numbers: integrated (non-integer) "
                "intensities, not electron counts; mode 'counts' needs counts (--mode threshold --threshold T "
                "makes one electron of each pixel above T, for analogue frames only)")
        if electrons.size and electrons.max() > MAX_PER_POSITION:
            raise SourceError(f"{self.path}: a position ({where}) holds {electrons.max()} electrons, more than "
                              f"a store's {MAX_PER_POSITION}")
        if self.weight_dtype is not None and top > np.iinfo(self.weight_dtype).max:  # pragma: no cover - by dtype
            raise SourceError(f"{self.path}: a pixel ({where}) counts {top}, more than {self.weight_dtype} holds")
        return electrons, nonzero

    def _entries(self, frames: np.ndarray, where: str) -> tuple:
        """(entries per position, indices, weights or None) of a piece in the source's encoding."""
        if self.mode == "threshold":
            counts, indices = thresholded_frames_to_events(frames, self.threshold)
            return counts, indices.astype(self.index_dtype), None
        electrons, nonzero = self._counted(frames, where)  # one counting pass, then the fill
        if self.encoding == "weighted":
            return nonzero, *entries_of(frames, nonzero, self.index_dtype, self.weight_dtype)
        return electrons, *entries_of(frames, electrons, self.index_dtype)

    def read_rows(self, r0, r1):
        """Entries of scan rows ``[r0, r1)``: (counts, indices, None) with encoding "events",
        (entries, indices, None, weights) with "weighted" (see :meth:`EventStore.write_block`)."""
        nx = self.scan_shape[1]
        pieces = []
        with self._frames() as arr:
            for a, b in self._pieces(r0 * nx, r1 * nx):
                pieces.append(self._entries(self._read(arr, a, b), f"positions {a}..{b - 1}"))
        counts = np.concatenate([p[0] for p in pieces]).astype(np.uint32).reshape(r1 - r0, nx)
        indices = np.concatenate([p[1] for p in pieces])
        if self.encoding == "weighted":
            return counts, indices, None, np.concatenate([p[2] for p in pieces])
        return counts, indices, None

    def count_events(self) -> int:
        """Σ pixel values (counts) or pixels above threshold, in NumPy (not the kernels)."""
        total = 0
        n = self.scan_shape[0] * self.scan_shape[1]
        with self._frames() as arr:
            for a, b in self._pieces(0, n):
                frames = self._read(arr, a, b)
                if self.mode == "threshold":
                    total += int(np.count_nonzero(frames > self.threshold))
                else:
                    total += int(frames.sum(dtype=np.float64 if frames.dtype.kind == "f" else np.int64))
        return total

    def params(self) -> dict:
        return {**super().params(), "dataset": self.dataset, "reader": self.plugin, "mode": self.mode,
                "threshold": self.threshold, "source_frames": self.source_frames,
                "frames_range": list(self.frames_range) if self.frames_range else None,
                "scan_shape_from": self.scan_shape_from, "encoding": self.encoding,
                "weight_dtype": self.weight_dtype.name if self.encoding == "weighted" else None}

    def __getstate__(self):
        return {**self.__dict__, "_lazy": None}  # the reader's dask graph is rebuilt where it runs
