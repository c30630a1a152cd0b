"""Dense detector frames → events: ``.npy`` (memory-mapped), an HDF5 dataset
(``file.h5:/path/to/dataset``, or the file's only 3-D/4-D dataset), and every format that
rosettasciio reads lazily, chosen by file extension (Merlin ``.mib`` through its
``quantumdetector`` reader, ``.hspy``, ``.dm4``, ``.emd``, ``.tvips``, ``.prz``, …: any
extension that names exactly one rosettasciio plugin).

Frames are ``(ny, nx, dy, dx)``, or a stack ``(n, dy, dx)`` with ``scan_shape`` given (a
``.mib`` is always read as a stack). A stack must hold exactly ``ny·nx`` frames unless
``frames_range=(start, stop)`` names the ``ny·nx`` frames to take; provenance records the
file's frame count and the range taken. ``mode``:
``"counts"`` (a pixel value is a number of electrons: exact, values must be non-negative
integers) or ``"threshold"`` (a value above ``threshold`` is one electron). Frames are read
in pieces of at most :data:`PIECE_BYTES`, so memory stays bounded however large a row
block is.

Orientation: frames are taken as the reader returns them. rosettasciio flips Merlin frames
vertically (``np.flip(data, axis=-2)``, its convention for the Merlin readout order), so a
``.mib`` store's detector row 0 is the file's last row — the orientation HyperSpy shows.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py
import numpy as np

from ..kernels.dense import counted_frames_to_events, thresholded_frames_to_events
from ..store import default_max_events_per_position
from .common import Source, SourceError, agree, as_shape
from .stempy import open_h5

#: Largest piece of frames read at once (bytes).
PIECE_BYTES = 64 << 20
MODES = ("counts", "threshold")


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
                 frames_range=None, format="dense", **_):
        if mode not in MODES:
            raise SourceError(f"{path}: mode must be one of {MODES}, got {mode!r}")
        if mode == "threshold":
            if threshold is None or not np.isfinite(float(threshold)):
                raise SourceError(f"{path}: mode 'threshold' needs a finite threshold (--threshold)")
            threshold = float(threshold)
        elif threshold is not None:
            raise SourceError(f"{path}: a threshold is only used with mode 'threshold'")
        self.mode, self.threshold = mode, threshold
        self.path, self.dataset = split_h5_path(path)
        self.plugin = None if self.dataset else rsciio_plugin(self.path)
        if format == "mib" or self.path.suffix.lower() == ".mib":
            try:
                import rsciio.quantumdetector  # noqa: F401
            except ImportError:  # pragma: no cover - rosettasciio is a test dependency
                raise SourceError(f"{self.path}: reading Merlin .mib needs rosettasciio (pip install rosettasciio)")
            self.plugin, self.format = "rsciio.quantumdetector", "mib"
        scan = as_shape("scan_shape", scan_shape, path)
        self._lazy = None
        with self._frames() as arr:
            shape, dtype = arr.shape, np.dtype(arr.dtype)
        if dtype.kind not in "uif" or len(shape) not in (3, 4):
            raise SourceError(f"{path}: expected numeric frames (ny, nx, dy, dx) or (n, dy, dx), got {dtype} {shape}")
        self.detector_shape = agree("detector_shape", as_shape("detector_shape", detector_shape, path),
                                    tuple(shape[-2:]), path)
        self.source_frames = int(np.prod(shape[:-2]))
        if len(shape) == 4:
            if frames_range is not None:
                raise SourceError(f"{path}: frames_range applies to a stack of frames, not to {shape} data")
            self.scan_shape = agree("scan_shape", scan, tuple(shape[:2]), path)
            self.frames_range = None
        else:
            if scan is None:
                raise SourceError(f"{path}: {shape[0]} frames in a stack; pass scan_shape (ny, nx)")
            self.scan_shape = scan
            self.frames_range = self._check_frames_range(path, frames_range, shape[0])
        self.frame_bytes = int(np.prod(self.detector_shape)) * dtype.itemsize
        self.ndim = len(shape)

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
        if self.plugin is not None:
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
            kwargs = {}
            try:
                if self.plugin == "rsciio.quantumdetector":
                    # Every frame, as a stack: without navigation_shape rosettasciio guesses a scan
                    # from the timestamps and silently drops the frames that do not fill it.
                    from rsciio.quantumdetector import load_mib_data

                    kwargs["navigation_shape"] = (len(load_mib_data(str(self.path), return_headers=True)[1]),)
                signals = reader(str(self.path), lazy=True, **kwargs)
            except Exception as e:  # readers raise many kinds for a malformed file
                raise SourceError(f"{self.path}: {self.plugin} cannot read it ({type(e).__name__}: {e})") from None
            frames = [s["data"] for s in signals if np.ndim(s["data"]) in (3, 4)]
            if len(frames) != 1:
                raise SourceError(f"{self.path}: expected one 3-D/4-D signal, found {len(frames)} "
                                  f"(shapes {[np.shape(s['data']) for s in signals]})")
            self._lazy = frames[0]
        return self._lazy

    def _pieces(self, p0: int, p1: int):
        """Split positions [p0, p1) into pieces of ≤ PIECE_BYTES, whole scan rows or within one row."""
        nx = self.scan_shape[1]
        per = max(1, PIECE_BYTES // self.frame_bytes)
        if per >= nx:
            step = (per // nx) * nx
            yield from ((a, min(a + step, p1)) for a in range(p0, p1, step))
        else:
            for row0 in range(p0, p1, nx):
                yield from ((a, min(a + per, row0 + nx)) for a in range(row0, row0 + nx, per))

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

    def _events(self, frames: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
        if self.mode == "threshold":
            return thresholded_frames_to_events(frames, self.threshold)
        most = float(frames.sum(axis=1, dtype=np.float64).max()) if frames.size else 0.0
        limit = default_max_events_per_position(self.detector_shape)
        if most > limit:
            raise SourceError(
                f"{self.path}: a position ({where}) sums to {most:.4g} counts, more than {limit} electrons — these "
                "look like integrated intensities, not electron counts: use --mode threshold --threshold T"
            )
        counts, indices, n_bad = counted_frames_to_events(frames)
        if n_bad:
            raise SourceError(
                f"{self.path}: {n_bad} pixels ({where}) are negative or not whole numbers; mode 'counts' "
                f"needs electron counts (use mode 'threshold' for analogue frames)"
            )
        return counts, indices

    def read_rows(self, r0, r1):
        nx = self.scan_shape[1]
        counts, indices = [], []
        with self._frames() as arr:
            for a, b in self._pieces(r0 * nx, r1 * nx):
                c, i = self._events(self._read(arr, a, b), f"positions {a}..{b - 1}")
                counts.append(c)
                indices.append(i)
        counts = np.concatenate(counts)
        if counts.max(initial=0) > np.iinfo(np.uint32).max:
            raise SourceError(f"{self.path}: more than 2³²−1 electrons at one position (rows {r0}..{r1 - 1})")
        return counts.astype(np.uint32).reshape(r1 - r0, nx), np.concatenate(indices), None

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
                "frames_range": list(self.frames_range) if self.frames_range else None}

    def __getstate__(self):
        return {**self.__dict__, "_lazy": None}  # the reader's dask graph is rebuilt where it runs
