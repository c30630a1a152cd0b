"""4D Camera / stempy electron-counted HDF5 (format versions 1–3).

Layout (as stempy's ``SparseArray.write_to_hdf5`` / ``save_electron_counts`` write it):

* root attr ``version`` (absent → 1);
* ``/electron_events/frames``: variable-length uint32 arrays, one per camera frame, each
  the linear detector indices of that frame's electrons; attrs ``Nx``, ``Ny``: the frame
  shape. stempy reads the frame shape as ``(Nx, Ny)`` and so do we (the 4D Camera's
  576×576 frame is square, so the order never mattered in practice);
* ``/electron_events/scan_positions``: the scan position index (``iy·Nx + ix``) of each
  frame (v1/v2) or of each row of ``F`` frames (v3); attrs ``Nx`` (scan width, fast axis),
  ``Ny`` (scan height).

Versions: v1 one frame per position (a frame may repeat an index); v2 several frames may
share a position (``scan_positions`` repeats); v3 ``frames`` holds ``n_positions · F``
entries (flattened), or is 2-D ``(n_positions, F)``, row ``i`` belonging to
``scan_positions[i]``. All frames of a position are merged into one event list, in frame
order.

Flyback: when the scan recorded a flyback column, the file's ``Nx`` includes it. Pass
``scan_shape=(Ny, Nx - 1)`` and the first column (``ix = 0``) of every row is dropped — the
column stempy's ``from_hdf5(keep_flyback=False)`` drops.

Optics: stempy itself records none (its writers store only the frame and scan shapes; its
``SparseArray.metadata`` dict goes to a free-form ``/metadata`` group). The optics are taken
from root attributes or ``/metadata`` attributes/scalar datasets named as
:data:`~stemdask.io.common.OPTICS_NAMES` (``energy_ev``, ``energy_kev``, ``scan_step_a``,
``semiangle_mrad``, ``detector_pixel_mrad``) where a file carries them; any other metadata
is ignored rather than guessed at.
"""

from __future__ import annotations

import h5py
import numpy as np

from .common import (
    OPTICS_NAMES,
    Source,
    SourceError,
    as_shape,
    check_indices,
    open_h5,
    optics_from_mapping,
)

GROUP = "electron_events"
SUPPORTED_VERSIONS = (1, 2, 3)


class StempySource(Source):
    format = "stempy"

    def __init__(self, path, *, scan_shape=None, detector_shape=None, **_):
        self.path = path
        with open_h5(path) as f:
            if f"{GROUP}/frames" not in f or f"{GROUP}/scan_positions" not in f:
                raise SourceError(f"{path}: not a stempy file (no /{GROUP}/frames and /{GROUP}/scan_positions)")
            self.version = int(f.attrs.get("version", 1))
            if self.version not in SUPPORTED_VERSIONS:
                raise SourceError(
                    f"{path}: stempy format version {self.version} is not supported (known: {SUPPORTED_VERSIONS})"
                )
            frames = f[f"{GROUP}/frames"]
            positions = f[f"{GROUP}/scan_positions"]
            element = h5py.check_vlen_dtype(frames.dtype) if frames.dtype.kind == "O" else None
            if element is None or not np.issubdtype(element, np.integer):
                raise SourceError(f"{path}: /{GROUP}/frames must hold variable-length integer arrays")
            self.frames_2d = frames.ndim == 2
            self._init_shapes(path, frames, positions, scan_shape, detector_shape)
            self._optics = optics_from_mapping(_recorded_optics(f), path)
            row_pos = positions[()].astype(np.int64).ravel()
            self._init_rows(path, frames, row_pos)

    # ---------------------------------------------------------------- planning
    def _init_shapes(self, path, frames, positions, scan_shape, detector_shape):
        fa, pa = frames.attrs, positions.attrs
        found_det = (int(fa["Nx"]), int(fa["Ny"])) if "Nx" in fa and "Ny" in fa else None
        det = as_shape("detector_shape", detector_shape, path)
        if det is not None and found_det is not None and det != found_det:
            raise SourceError(f"{path}: detector_shape {det} does not match the file's frame shape {found_det}")
        self.detector_shape = det or found_det
        if self.detector_shape is None:
            raise SourceError(f"{path}: the file does not record the frame shape; pass detector_shape")
        file_scan = (int(pa["Ny"]), int(pa["Nx"])) if "Nx" in pa and "Ny" in pa else None
        scan = as_shape("scan_shape", scan_shape, path)
        self.drop_flyback = False
        if file_scan is None:
            if scan is None:
                raise SourceError(f"{path}: the file does not record the scan shape; pass scan_shape")
            file_scan = scan
        elif scan is not None and scan != file_scan:
            if scan == (file_scan[0], file_scan[1] - 1):
                self.drop_flyback = True
            else:
                raise SourceError(
                    f"{path}: scan_shape {scan} does not match the file's scan {file_scan} "
                    f"(Ny, Nx); give ({file_scan[0]}, {file_scan[1] - 1}) to drop a flyback column"
                )
        self.file_scan = file_scan
        self.scan_shape = scan or file_scan

    def _init_rows(self, path, frames, row_pos):
        """Map each frame row to a position of the stored scan; group the rows by row block."""
        n_rows = row_pos.size
        n_frames = frames.shape[0] * (frames.shape[1] if self.frames_2d else 1)
        if self.frames_2d:
            per_row = frames.shape[1]
            if frames.shape[0] != n_rows:
                raise SourceError(f"{path}: frames has {frames.shape[0]} rows but scan_positions has {n_rows}")
        elif self.version >= 3:
            if n_rows == 0 or n_frames % n_rows:
                raise SourceError(
                    f"{path}: v3 frames count {n_frames} is not a multiple of the {n_rows} scan positions"
                )
            per_row = n_frames // n_rows
        else:
            per_row = 1
            if n_frames != n_rows:
                raise SourceError(f"{path}: {n_frames} frames but {n_rows} scan positions (v{self.version})")
        self.frames_per_row = per_row
        fy, fx = self.file_scan
        if n_rows and (row_pos.min() < 0 or row_pos.max() >= fy * fx):
            bad = int(row_pos.max() if row_pos.max() >= fy * fx else row_pos.min())
            raise SourceError(f"{path}: scan position {bad} outside the file's {fy}×{fx} scan; wrong scan shape?")
        if self.drop_flyback:
            iy, ix = np.divmod(row_pos, fx)
            row_pos = np.where(ix == 0, -1, iy * (fx - 1) + ix - 1)
        self.order = np.argsort(row_pos, kind="stable")  # rows grouped by position, file order kept
        self.sorted_pos = row_pos[self.order]

    # ---------------------------------------------------------------- reading
    def _rows_of(self, p0, p1) -> tuple[np.ndarray, np.ndarray]:
        """Frame rows of positions ``[p0, p1)`` (grouped by position) and their positions."""
        lo, hi = np.searchsorted(self.sorted_pos, [p0, p1])
        return self.order[lo:hi], self.sorted_pos[lo:hi]

    def _read_frame_rows(self, frames, rows: np.ndarray) -> list[np.ndarray]:
        """The frames of the given frame rows (in that order), one array per frame."""
        if rows.size == 0:
            return []
        a, b = int(rows.min()), int(rows.max()) + 1
        if b - a == rows.size:  # contiguous: one slice read
            F = self.frames_per_row
            got = frames[a:b] if self.frames_2d else frames[a * F : b * F]
            got = np.asarray(got, dtype=object).reshape(b - a, -1)
            return list(got[rows - a].ravel())
        uniq = np.unique(rows)
        if self.frames_2d:
            got = np.asarray(frames[uniq], dtype=object)
        else:
            F = self.frames_per_row
            flat = (uniq[:, None] * F + np.arange(F)).ravel()
            got = np.asarray(frames[flat], dtype=object).reshape(uniq.size, F)
        return list(got[np.searchsorted(uniq, rows)].ravel())

    def read_rows(self, r0, r1):
        nx = self.scan_shape[1]
        p0, p1 = r0 * nx, r1 * nx
        rows, row_pos = self._rows_of(p0, p1)
        with open_h5(self.path) as f:
            pieces = self._read_frame_rows(f[f"{GROUP}/frames"], rows)
        lengths = _lengths(pieces)
        pos = np.repeat(row_pos, self.frames_per_row)
        counts = np.bincount(pos - p0, weights=lengths, minlength=p1 - p0).astype(np.uint32)
        indices = np.concatenate(pieces) if pieces else np.empty(0, np.uint32)
        check_indices(indices, self.detector_shape, self.path, f"scan rows {r0}..{r1 - 1}")
        return counts.reshape(r1 - r0, nx), indices, None

    def count_events(self) -> int:
        """Events of every kept frame, from the frame lengths (read in slices)."""
        keep = np.zeros(self.sorted_pos.size, bool)
        keep[self.order] = self.sorted_pos >= 0
        total, step = 0, 1 << 16
        with open_h5(self.path) as f:
            frames = f[f"{GROUP}/frames"]
            F = 1 if self.frames_2d else self.frames_per_row
            for a in range(0, keep.size, step):
                b = min(a + step, keep.size)
                got = np.asarray(frames[a * F : b * F], dtype=object).reshape(b - a, -1)
                lengths = _lengths(got.ravel()).reshape(got.shape).sum(axis=1)
                total += int(lengths[keep[a:b]].sum())
        return total

    def params(self) -> dict:
        return {
            **super().params(),
            "stempy_version": self.version,
            "frames_per_row": self.frames_per_row,
            "drop_flyback": self.drop_flyback,
        }


def _recorded_optics(f: h5py.File) -> dict:
    """Root attrs, then ``/metadata`` attrs and scalar datasets, named as :data:`OPTICS_NAMES`."""
    found = {k: f.attrs[k] for k in OPTICS_NAMES if k in f.attrs}
    meta = f.get("metadata")
    if isinstance(meta, h5py.Group):
        for k in OPTICS_NAMES:
            if k in found:
                continue
            if k in meta.attrs:
                found[k] = meta.attrs[k]
            elif isinstance(meta.get(k), h5py.Dataset) and meta[k].size <= 2:
                found[k] = meta[k][()]
    return found


def _lengths(pieces) -> np.ndarray:
    return np.fromiter(map(len, pieces), np.int64, len(pieces))
