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

Optics (see :meth:`DenseSource.optics`): from rosettasciio's metadata and axes — HyperSpy's
``Acquisition_instrument.TEM.beam_energy`` (keV) and ``convergence_angle`` (mrad), the scan
step from the navigation axes' scale when their units are a length (pm … m), the detector
pixel size from the signal axes' scale when their units are an angle (mrad, rad) or, with a
known energy, a spatial frequency (1/nm, 1/Å). Merlin ``.mib`` records none of them: its
``.hdr`` holds detector settings (counter depth, thresholds, frame counts), and rosettasciio
gives its axes scale 1 without units. HDF5 datasets: attrs of the dataset or of the root
named as :data:`~stemdask.io.common.OPTICS_NAMES`. ``.npy``: none.

Orientation: frames are taken as the reader returns them. rosettasciio flips Merlin frames
vertically (``np.flip(data, axis=-2)``, its convention for the Merlin readout order), so a
``.mib`` store's detector row 0 is the file's last row — the orientation HyperSpy shows.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import h5py
import numpy as np

from ..kernels.dense import counted_frames_to_events, thresholded_frames_to_events
from ..store import default_max_events_per_position
from .common import (
    OPTICS_NAMES,
    Source,
    SourceError,
    agree,
    as_shape,
    optics_from_mapping,
)
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
    """Keep rosettasciio's reader warnings (e.g. "`hdr` file couldn't be found." for a .mib
    without its header, which stemdask does not need) off stderr, so that every CLI error
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
        self._signal = None
        with self._frames() as arr:
            shape, dtype = arr.shape, np.dtype(arr.dtype)
            recorded = dict(arr.attrs) if isinstance(arr, h5py.Dataset) else {}
            if isinstance(arr, h5py.Dataset):
                recorded = {**{k: arr.file.attrs[k] for k in OPTICS_NAMES if k in arr.file.attrs}, **recorded}
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
        recorded = {k: v for k, v in recorded.items() if k in OPTICS_NAMES}
        self._optics = {**rsciio_optics(self._signal, len(shape)), **optics_from_mapping(recorded, self.path)}
        self._signal = None

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
                with _quiet_rsciio():
                    signals = reader(str(self.path), lazy=True, **kwargs)
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
