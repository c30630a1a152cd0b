"""Single-sideband (SSB) ptychography on a dense, row-chunked 4D dask array.

Graph (DESIGN.md §3)::

    dense (rows, nx, fy, fx) ─► BF-disk pixels, rfft over scan_x per row chunk
      ─► rechunk (p2p under distributed, else tasks) to q_x chunks: all scan rows, a range
         of scan frequencies q_x, all BF pixels (sized by :mod:`stemdask.chunk_plan`)
      ─► fft over scan_y ─► G (ny, nx//2+1, npix)          [kept: memory or Zarr scratch]
      ─► trotter sums with χ, one task per q_x chunk (output: that chunk's frequencies)
      ─► irfft2 ─► phase (rad)

A refocus reads G once and writes (ny, nx//2+1) complex numbers: no partial planes, no tree sum.

Physics (numpy's forward FFT convention of :mod:`stemdask.simulate`; weak phase object
t = 1 + iφ; probe P(k) = A(k)·exp(−iχ(k)) normalised to one electron; G(k, Q) = mean over
probe positions R of I(k, R)·exp(−2πiQ·R), i.e. a forward FFT divided by the number of
positions):

    G(k, Q) = iΦ(Q)·D·[a(k − Q)·a*(k) − a(k)·a*(k + Q)]         (Q ≠ 0)

with D the dose per position, a the normalised probe and Φ(Q) the mean-normalised Fourier
coefficient of φ. On the two double-overlap ("trotter") lobes of the bright-field disk only
one term survives, and multiplying by the conjugate of its known phase factor
(:mod:`stemdask.kernels.ssb`) gives Φ(Q)·D/n_disk on every lobe pixel, D/n_disk being the
mean intensity of a bright-field pixel (measured from the data as Σ_k G(k, 0) / n_disk).
The triple-overlap region carries no first-order signal in focus and is left out; so are
frequencies |Q| ≥ 2α/λ, which no trotter reaches.

Weighting:

* default (``quantitative=False``, the classic SSB): each frequency is the plain sum over its
  trotter, divided by the total bright-field intensity. This is the SNR-optimal matched
  filter for Poisson noise of equal variance per pixel; the transfer function is the
  fraction of the BF disk covered by the trotter, T(Q) = n_trotter(Q) / n_disk ≤ ≈0.78
  (largest at |Q| ≈ α/λ, → 0 at Q → 0 and |Q| → 2α/λ). Phase in rad, filtered by T.
* ``quantitative=True``: each frequency divided by its own trotter's pixel count (the
  average over the trotter, as in ptychography40), so T(Q) = 1 for every 0 < |Q| < 2α/λ
  that has at least one trotter pixel: slope ≈ 1 against the phase band-limited to 2α/λ
  (the band limit of SSB's transfer; the slope is the regression of the image on that
  band-limited truth). Frequencies with few trotter pixels (near Q = 0 and |Q| = 2α/λ) are
  noisier. Pixels are in or out of the disk by their centre, while a real aperture edge
  cuts through the rim pixels, which carry part of the signal: below |Q| of about two
  detector pixels the transfer drops under 1 (≈ 0.5 at one pixel), so the slope on the
  simulator is ≈ 0.93–0.96 for a BF disk 7–13 pixels in radius.

Refocus and focus search: :class:`SSBResult` keeps G; ``refocus`` reruns only the trotter
sums, ``sweep`` stacks phases over one coefficient with the truth-free criterion Σ phase²
(largest at the right aberrations; on a 25 Å grid it picks C10 = −150 Å on the abTEM case),
and :func:`focus_c10` searches and refines its maximum (−146 Å there; ``--c10 auto``).

Geometry: detector frequencies k come from the dense array's ``k_y, k_x`` coordinates (mrad
relative to the BF centre, detector frame), are mapped into the scan frame with the
calibration's rotation/flip (:func:`stemdask.optics.detector_to_scan_frame`) and converted to
Å⁻¹ (mrad·10⁻³/λ). Scan frequencies are ``fftfreq(ny, d=step_y)``, ``rfftfreq(nx, d=step_x)``
(Å⁻¹). Aberrations in Krivanek notation (Å, degrees from scan x towards scan y); C10 < 0 is
underfocus (abTEM ``defocus`` = −C10). Positive projected potential gives positive phase.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import tempfile
import warnings
from typing import Literal

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..chunk_plan import chunk_length, regular_chunks
from ..errors import InvalidParameter, MissingExtra
from ..events import EventDataset, chunk_target, scan_coordinates
from ..kernels.ssb import array_module, chi_coefficients, ssb_partial, trotter_counts
from ..optics import Aberrations, Calibration, check_scan_step, detector_to_scan_frame
from ..progress import active_client
from . import PositiveFloat, PositiveInt

#: G is cut into at least this many q_x chunks (parallelism), when it has that many columns.
G_MIN_CHUNKS = 8


def select_and_rfft(block, pix_y, pix_x):
    """(rows, nx, fy, fx) real → (rows, nx//2+1, npix) complex64: BF pixels, rfft over scan_x."""
    xp = array_module(block)
    sel = block[:, :, xp.asarray(pix_y), xp.asarray(pix_x)].astype(xp.float32, copy=False)
    return xp.fft.rfft(sel, axis=1, norm="forward").astype(xp.complex64, copy=False)


def _fft_scan_y(chunk):
    xp = array_module(chunk)
    return xp.fft.fft(chunk, axis=0, norm="forward").astype(xp.complex64, copy=False)


def _trotter_block(g, q_x, *, k_y, k_x, q_y, k0, coef):
    """Trotter sums of one q_x chunk of G (frequencies ``q_y`` × ``q_x``) → (nqy, nqx) complex128."""
    if array_module(g) is np:
        return ssb_partial(g, k_y, k_x, q_y, np.asarray(q_x), k0, coef)
    from ..kernels.ssb_cuda import ssb_partial_cuda  # numba.cuda: imported only where G is on a GPU

    return ssb_partial_cuda(g, k_y, k_x, q_y, np.asarray(q_x), k0, coef)


def _counts_block(q_x, *, k_y, k_x, q_y, k0):
    """Trotter pixel counts of one q_x chunk → (nqy, nqx) float64."""
    return trotter_counts(k_y, k_x, q_y, np.asarray(q_x), k0)


def _meta(like: da.Array, ndim: int, dtype) -> object:
    """An empty array of ``like``'s array module (NumPy or CuPy) for dask's ``meta=``."""
    return array_module(like._meta).empty((0,) * ndim, dtype=dtype)


class _ScratchLease:
    """Holds a temporary scratch directory while a dask graph refers to it (a graph may outlive
    the :class:`SSBResult` that made it). Pickles to an empty lease: workers never own it."""

    def __init__(self, tmp: tempfile.TemporaryDirectory | None):
        self.tmp = tmp

    def __reduce__(self):
        return (_ScratchLease, (None,))


def _held(block, lease: _ScratchLease):
    return block


def _to_host(block):
    return block.get() if array_module(block) is not np else block


def _irfft2(spectrum, *, shape):
    xp = array_module(spectrum)
    return xp.fft.irfft2(spectrum, s=shape, norm="forward").astype(xp.float32)


def _aberrations(aberrations: Aberrations | dict | None, **coefficients) -> Aberrations:
    if aberrations is None:
        aberrations = Aberrations()
    elif isinstance(aberrations, dict):
        aberrations = Aberrations(**aberrations)
    elif not isinstance(aberrations, Aberrations):
        raise TypeError(f"aberrations must be an Aberrations or a dict, got {type(aberrations).__name__}")
    return dataclasses.replace(aberrations, **coefficients) if coefficients else aberrations


#: The dask config key of the folder SSB spills G into when no path is given (``--scratch``).
SCRATCH_CONFIG = "stemdask.scratch"


def _spill_folder(nbytes: int) -> tempfile.TemporaryDirectory:
    """A temporary folder for G (``nbytes``) under the configured scratch folder
    (:data:`SCRATCH_CONFIG`), else under this machine's temporary folder — refused, in one line,
    when a worker of the active cluster cannot see it (another node, another filesystem)."""
    root = dask.config.get(SCRATCH_CONFIG, None)
    if root is not None:
        os.makedirs(root, exist_ok=True)
    folder = tempfile.TemporaryDirectory(prefix="stemdask-ssb-", dir=root)
    client = active_client()
    seen = {} if client is None else client.run(os.path.isdir, folder.name)
    blind = sorted(w for w, sees in seen.items() if not sees)
    if blind:
        folder.cleanup()
        where = f"the scratch folder {root}" if root is not None else "this machine's temporary folder"
        raise InvalidParameter(
            f"SSB keeps G ({nbytes / 2**30:.2f} GiB, more than half the workers' memory) in a scratch store "
            f"under {where}, which {len(blind)} worker(s) cannot see ({', '.join(blind[:3])}"
            f"{' …' if len(blind) > 3 else ''}): give --scratch DIR on a filesystem every worker sees "
            f"(dask config {SCRATCH_CONFIG!r})"
        )
    return folder


def _default_scratch_threshold() -> int:
    """Half the memory of the active cluster's workers, else half this machine's memory (bytes)."""
    client = active_client()
    if client is not None:
        limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
        if limits and all(limits):
            return int(0.5 * sum(limits))
    from distributed.system import MEMORY_LIMIT  # this machine's memory, or its cgroup / rlimit limit

    return int(0.5 * MEMORY_LIMIT)


@dataclasses.dataclass(repr=False)
class SSBResult:
    """The scan-FFT cube G of a dataset, and reductions of it (phase images).

    G: complex64 dask array (ny, nx//2+1, npix): scan frequencies (``q_y``, ``q_x``, Å⁻¹)
    × bright-field pixels (``k_y``, ``k_x``: scan-frame Å⁻¹; ``pixels``: (npix, 2) their
    (row, column) in the dense crop, whose mrad coordinates are ``k_y_mrad``, ``k_x_mrad``).
    Lazy until :meth:`keep`; :meth:`refocus` keeps G on first use so that every refocus is one
    pass over G (the trotter sums), never the FFT again.
    """

    G: da.Array
    k_y: np.ndarray
    k_x: np.ndarray
    pixels: np.ndarray
    k_y_mrad: np.ndarray
    k_x_mrad: np.ndarray
    q_y: np.ndarray
    q_x: np.ndarray
    k0: float
    scan_coords: tuple[np.ndarray, np.ndarray]
    bf: da.Array | float
    calibration: Calibration
    aberrations: Aberrations
    quantitative: bool = False
    scratch: str | os.PathLike | None = None
    scratch_threshold: int | None = None
    kept: bool = False
    semiangle_source: str = "argument"
    _tmp: tempfile.TemporaryDirectory | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def scan_shape(self) -> tuple[int, int]:
        return (len(self.scan_coords[0]), len(self.scan_coords[1]))

    def __repr__(self) -> str:
        ny, nx = self.scan_shape
        state = f"kept in {self.scratch}" if self.kept and self.scratch else "kept in memory" if self.kept else "lazy"
        return (
            f"<SSBResult G {ny}×{self.G.shape[1]}×{len(self.k_y)} (scan {ny}×{nx}, {len(self.k_y)} BF pixels, "
            f"{self.G.nbytes / 2**20:.0f} MiB, {state}), "
            f"semi-angle {self.k0 * self.calibration.wavelength_a * 1e3:.3g} mrad, {self.aberrations.label()}"
            f"{', quantitative' if self.quantitative else ''}>"
        )

    @property
    def phase(self) -> xr.DataArray:
        """The phase (rad) for the aberrations and weighting given to :func:`ssb`; lazy."""
        return self._reduce(self.aberrations, self.quantitative)

    def keep(self, scratch: str | os.PathLike | None = None) -> "SSBResult":
        """Compute G once and keep it (returns self).

        In memory (``persist``: distributed memory when a client is active) unless a scratch
        path is given (here or to :func:`ssb`) or G is larger than ``scratch_threshold``
        bytes (default: half the cluster's worker memory, or of this machine's): then G is
        written to a Zarr store (when no path is given, in a temporary folder under the dask
        config's ``stemdask.scratch`` — ``--scratch`` — or this machine's temporary folder; refused
        when a worker cannot see it) and read back lazily chunk by chunk.
        """
        if self.kept:
            return self
        path = scratch or self.scratch
        threshold = self.scratch_threshold if self.scratch_threshold is not None else _default_scratch_threshold()
        if path is None and self.G.nbytes > threshold:
            self._tmp = _spill_folder(self.G.nbytes)
            path = os.path.join(self._tmp.name, "G.zarr")
        if path is not None:
            xp = array_module(self.G._meta)
            host = self.G.map_blocks(_to_host, meta=np.empty((0, 0, 0), np.complex64))
            _, self.bf = dask.compute(host.to_zarr(os.fspath(path), overwrite=True, compute=False), self.bf)
            self.G = da.from_zarr(os.fspath(path))
            if self._tmp is not None:  # every graph built on G keeps the temporary directory alive
                self.G = self.G.map_blocks(
                    _held, _ScratchLease(self._tmp), dtype=self.G.dtype, meta=np.empty((0, 0, 0), np.complex64)
                )
            if xp is not np:  # pragma: no cover - GPU only: back onto the device chunk by chunk
                self.G = self.G.map_blocks(xp.asarray, meta=xp.empty((0, 0, 0), np.complex64))
            self.scratch = path
        else:
            self.G, self.bf = dask.persist(self.G, self.bf)  # on the active client's workers, if any
        self.kept = True
        return self

    def refocus(
        self, aberrations: Aberrations | dict | None = None, *, quantitative: bool | None = None, **coefficients
    ) -> xr.DataArray:
        """Phase (rad) for other aberrations: only the trotter sums over the kept G rerun.

        ``aberrations``: an :class:`~stemdask.optics.Aberrations` or a dict of its fields
        (default: this result's); ``coefficients`` override single fields (e.g. ``C10=-150``).
        """
        self.keep()
        ab = _aberrations(self.aberrations if aberrations is None else aberrations, **coefficients)
        return self._reduce(ab, self.quantitative if quantitative is None else quantitative)

    def sweep(self, values, field: str = "C10", **fixed) -> xr.Dataset:
        """Phases for a series of one aberration coefficient; lazy, G kept first.

        ``values`` of ``field`` (an :class:`~stemdask.optics.Aberrations` field, Å or
        degrees) on top of this result's aberrations with ``fixed`` overrides. Returns a
        Dataset with ``phase`` (field, scan_y, scan_x) and ``power`` (field,) = Σ phase²
        (rad²): a criterion that needs no truth, largest where the aberrations match, since
        wrong ones misalign the trotter phases, which then cancel (use the default SNR
        weighting; quantitative weighting lets noise dominate the sum). For thick samples the
        best defocus differs from the nominal one: pick it with ``power.argmax()``.
        """
        values = np.asarray(values, dtype=float)
        if field not in {f.name for f in dataclasses.fields(Aberrations)}:
            raise InvalidParameter(
                f"unknown aberration {field!r}; choose from {[f.name for f in dataclasses.fields(Aberrations)]}"
            )
        phases = [self.refocus(None, **{**fixed, field: float(v)}) for v in values]
        unit = "degree" if field.startswith("phi") else "angstrom"
        phase = xr.concat(phases, dim=field, combine_attrs="drop_conflicts").assign_coords(
            {field: (field, values, {"units": unit, "long_name": f"aberration {field}"})}
        )
        phase.attrs.pop(f"aberration_{field}", None)
        power = (phase.astype(np.float64) ** 2).sum(("scan_y", "scan_x"))
        power.attrs = {"units": "rad²", "long_name": "Σ phase² (focus criterion)"}
        return xr.Dataset({"phase": phase, "power": power})

    def _q_x(self) -> da.Array:
        """The scan frequencies q_x (Å⁻¹) chunked as G."""
        return da.from_array(self.q_x, chunks=(self.G.chunks[1],))

    def transfer(self) -> da.Array:
        """Trotter pixel count n_trotter(Q) (float64 (ny, nx//2+1), chunked as G by q_x); lazy."""
        return da.blockwise(
            _counts_block, "ij", self._q_x(), "j", new_axes={"i": len(self.q_y)}, dtype=np.float64,
            k_y=self.k_y, k_x=self.k_x, q_y=self.q_y, k0=self.k0,
            name="ssb-trotter-counts-" + dask.base.tokenize(self.k_y, self.k_x, self.q_y, self.q_x, self.k0,
                                                            self.G.chunks[1]),
        )

    def _reduce(self, ab: Aberrations, quantitative: bool) -> xr.DataArray:
        G = self.G
        coef = chi_coefficients(ab, self.calibration.wavelength_a)
        # One task per q_x chunk of G: its frequencies' trotter sums, nothing else.
        total = da.blockwise(
            _trotter_block, "ij", G, "ijp", self._q_x(), "j", concatenate=True,
            k_y=self.k_y, k_x=self.k_x, q_y=self.q_y, k0=self.k0, coef=coef,
            dtype=np.complex128, meta=_meta(G, 2, np.complex128),
            name="ssb-trotter-sum-" + dask.base.tokenize(G, self.k_y, self.k_x, self.q_y, self.q_x, self.k0, coef),
        )
        bf = self.bf
        if quantitative:
            n_disk = len(self.k_y)
            counts = self.transfer()
            xp = array_module(G._meta)
            if xp is not np:  # pragma: no cover - GPU only
                counts = counts.map_blocks(xp.asarray, meta=xp.empty((0, 0), np.float64))
            spectrum = total / (bf / n_disk * da.maximum(counts, 1.0))
        else:
            spectrum = total / bf
        ny, nx = self.scan_shape
        # The q_x chunks joined in the one task that needs them all.
        phase = da.blockwise(_irfft2, "yx", spectrum, "ij", new_axes={"y": ny, "x": nx}, concatenate=True,
                             shape=(ny, nx), dtype=np.float32, meta=_meta(spectrum, 2, np.float32),
                             name="ssb-irfft2-" + dask.base.tokenize(spectrum, ny, nx))
        attrs = {
            "units": "rad",
            "long_name": f"SSB phase ({ab.label()}" + (", quantitative)" if quantitative else ")"),
            "method": "ssb",
            "weighting": "quantitative" if quantitative else "snr",
            "semiangle_mrad": self.k0 * self.calibration.wavelength_a * 1e3,
            "semiangle_source": self.semiangle_source,
            **{f"aberration_{k}": v for k, v in ab.to_dict().items()},
        }
        return xr.DataArray(
            phase,
            dims=("scan_y", "scan_x"),
            name="phase",
            attrs=attrs,
            coords=scan_coordinates(*self.scan_coords),
        )

    def g_at(self, q_y: float, q_x: float) -> np.ndarray:
        """G (complex, NaN outside the BF disk) on the dense crop at the scan frequency nearest
        (``q_y``, ``q_x``) (Å⁻¹; ``q_x < 0`` uses G(−Q) = G(Q)*). Reads one q_x chunk of a kept G
        (:meth:`keep`); a G not kept is computed from the events for it."""
        conj = q_x < 0
        if conj:
            q_y, q_x = -q_y, -q_x
        iy = int(np.argmin(np.abs(self.q_y - q_y)))
        ix = int(np.argmin(np.abs(self.q_x - q_x)))
        values = _to_host(self.G[iy, ix, :].compute())
        img = np.full((len(self.k_y_mrad), len(self.k_x_mrad)), np.nan + 0j, dtype=np.complex64)
        img[self.pixels[:, 0], self.pixels[:, 1]] = np.conj(values) if conj else values
        return img


def ssb(
    dense: xr.DataArray,
    calibration: Calibration,
    aberrations: Aberrations | dict | None = None,
    *,
    quantitative: bool = False,
    semiangle_mrad: float | None = None,
    qx_chunk: int | None = None,
    scratch: str | os.PathLike | None = None,
    scratch_threshold: int | None = None,
) -> SSBResult:
    """Build the SSB graph for ``dense`` (lazy): returns an :class:`SSBResult`; ``.phase`` is
    the phase image (rad), ``.refocus(...)`` reruns it for other aberrations.

    dense: DataArray (scan_y, scan_x, k_y, k_x), dask-chunked by scan rows with whole scan
    rows and whole detector crops per chunk (``EventDataset.densify``); coords ``k_y, k_x`` in
    mrad relative to the BF centre, detector frame. NumPy-backed input is chunked as one block.
    calibration: energy, scan step (Å), rotation/flip, and the semi-angle α that sets which
    pixels are inside the BF disk and the trotter boundaries: the measured disk,
    ``bf_radius`` × ``detector_pixel_mrad``, when the calibration has a ``bf_radius`` (the
    disk edge in the data is what decides which pixels carry bright field; the virtual
    detectors use the same radius), else the nominal ``semiangle_mrad``; an explicit
    ``semiangle_mrad`` argument wins over both. The phase's ``semiangle_source`` attr says
    which ("argument", "measured BF radius", "nominal semi-angle").
    aberrations: Krivanek coefficients (Å, degrees), :class:`~stemdask.optics.Aberrations` or
    a dict. quantitative: unit transfer instead of the SNR-optimal sum (module docstring).
    qx_chunk: scan-frequency columns q_x per chunk of G (default: chunks of at most the chunk
    byte target of :func:`stemdask.events.chunk_target`, at least :data:`G_MIN_CHUNKS` of them).
    scratch, scratch_threshold: where G is kept, see :meth:`SSBResult.keep`.
    The scan frequencies use ``calibration.scan_step_a``; the image's scan coordinates are
    ``dense``'s own (Å). Under a distributed client the rechunk is a p2p shuffle.
    """
    if not isinstance(dense, xr.DataArray) or dense.dims != ("scan_y", "scan_x", "k_y", "k_x"):
        raise InvalidParameter(
            "dense must be an xarray.DataArray with dims (scan_y, scan_x, k_y, k_x), "
            f"got {getattr(dense, 'dims', type(dense).__name__)}"
        )
    ny, nx, fy, fx = dense.shape
    data = dense.data if isinstance(dense.data, da.Array) else da.from_array(dense.data, chunks=-1)
    if len(data.chunks[1]) != 1 or len(data.chunks[2]) != 1 or len(data.chunks[3]) != 1:
        data = data.rechunk({1: -1, 2: -1, 3: -1})
    check_scan_step(calibration, dense)
    disk = bf_pixels(dense.coords["k_y"].values, dense.coords["k_x"].values, calibration, semiangle_mrad)
    pix_y, pix_x = disk.pixels.T
    npix = len(pix_y)
    nxh = nx // 2 + 1

    rows = data.map_blocks(
        select_and_rfft,
        pix_y,
        pix_x,
        drop_axis=3,
        chunks=(data.chunks[0], (nxh,), (npix,)),
        dtype=np.complex64,
        meta=_meta(data, 3, np.complex64),
        token="ssb-rfft-x",
    )
    chunks = g_chunks(ny, nxh, npix, qx_chunk)
    method = "p2p" if active_client() is not None else "tasks"
    # No merging of row blocks into bigger pieces on the way (memory stays ~ one chunk).
    largest = max(max(data.chunks[0]) * nxh * npix, ny * chunks[1][0] * npix) * 8
    cols = rows.rechunk(chunks, method=method, block_size_limit=largest)
    G = cols.map_blocks(_fft_scan_y, dtype=np.complex64, meta=_meta(cols, 3, np.complex64), token="ssb-fft-y")

    # Σ_k G(k, Q=0): the mean bright-field counts per position (the normalisation).
    bf = rows[:, 0, :].real.astype(np.float64).sum(axis=1).mean()
    scan_coords = tuple(
        np.asarray(dense.coords[d].values) if d in dense.coords else np.arange(n) * step
        for d, n, step in (("scan_y", ny, calibration.scan_step_a[0]), ("scan_x", nx, calibration.scan_step_a[1]))
    )
    return disk.result(G, bf, scan_coords, calibration, _aberrations(aberrations), quantitative=quantitative,
                       scratch=scratch, scratch_threshold=scratch_threshold)


def g_chunks(ny: int, nqx: int, npix: int, qx_chunk: int | None = None) -> tuple:
    """Dask chunks of G (ny, nqx, npix) complex64: all q_y and all BF pixels per chunk, ``qx_chunk``
    scan-frequency columns q_x (default: as many as keep a chunk within the chunk target of
    :func:`stemdask.events.chunk_target`, at least :data:`G_MIN_CHUNKS` chunks)."""
    qc = qx_chunk or chunk_length(nqx, ny * npix * 8, chunk_target(), min_chunks=G_MIN_CHUNKS)
    return (ny,), regular_chunks(nqx, min(qc, nqx)), (npix,)


@dataclasses.dataclass(frozen=True)
class BFPixels:
    """The pixels of a dense crop inside the BF disk, which SSB uses: ``pixels`` (npix, 2)
    their (row, column) in the crop, ``k_y``/``k_x`` their scan-frame frequencies (Å⁻¹),
    ``k0`` the disk radius α/λ (Å⁻¹), ``alpha_source`` where α came from; ``k_y_mrad``/
    ``k_x_mrad`` the crop's coordinates (mrad, detector frame)."""

    pixels: np.ndarray
    k_y: np.ndarray
    k_x: np.ndarray
    k_y_mrad: np.ndarray
    k_x_mrad: np.ndarray
    k0: float
    alpha_source: str

    def result(self, G, bf, scan_coords, calibration: Calibration, aberrations: Aberrations, **kw) -> "SSBResult":
        """The :class:`SSBResult` of scan-FFT cube ``G`` (ny, nx//2+1, npix) of these pixels."""
        (sy, sx), (ny, nx) = calibration.scan_step_a, (len(scan_coords[0]), len(scan_coords[1]))
        return SSBResult(G=G, k_y=self.k_y, k_x=self.k_x, pixels=self.pixels, k_y_mrad=self.k_y_mrad,
                         k_x_mrad=self.k_x_mrad, q_y=np.fft.fftfreq(ny, d=sy), q_x=np.fft.rfftfreq(nx, d=sx),
                         k0=self.k0, bf=bf, scan_coords=scan_coords, calibration=calibration, aberrations=aberrations,
                         semiangle_source=self.alpha_source, **kw)


def bf_pixels(ky_mrad, kx_mrad, calibration: Calibration, semiangle_mrad: float | None = None) -> BFPixels:
    """The crop pixels (coordinates ``ky_mrad`` × ``kx_mrad``, mrad from the BF centre, detector
    frame) inside the BF disk of semi-angle α: ``semiangle_mrad``, else the measured disk
    (``bf_radius`` × ``detector_pixel_mrad``), else the nominal ``calibration.semiangle_mrad``
    (see :func:`ssb`). Warns when the crop cuts the disk."""
    lam = calibration.wavelength_a
    if semiangle_mrad:
        alpha, alpha_source = float(semiangle_mrad), "argument"
    elif calibration.bf_radius is not None:
        alpha, alpha_source = calibration.bf_radius * calibration.detector_pixel_mrad, "measured BF radius"
    elif calibration.semiangle_mrad is not None:
        alpha, alpha_source = calibration.semiangle_mrad, "nominal semi-angle"
    else:
        raise InvalidParameter(
            "SSB needs the probe semi-angle: calibration.bf_radius (stemdask calibrate measures it), "
            "calibration.semiangle_mrad or semiangle_mrad=..."
        )
    k0 = alpha * 1e-3 / lam
    ky_mrad = np.asarray(ky_mrad, dtype=float)
    kx_mrad = np.asarray(kx_mrad, dtype=float)
    dky, dkx = np.meshgrid(ky_mrad, kx_mrad, indexing="ij")
    sky, skx = detector_to_scan_frame(dky, dkx, calibration.rotation_deg, calibration.flip)
    sky, skx = sky * 1e-3 / lam, skx * 1e-3 / lam
    inside = sky**2 + skx**2 < k0**2
    pix_y, pix_x = np.nonzero(inside)
    if len(pix_y) == 0:
        raise InvalidParameter(f"no detector pixel of the crop lies inside the BF disk (semi-angle {alpha:g} mrad)")
    pitch = max(np.abs(np.diff(ky_mrad)).max(initial=0), np.abs(np.diff(kx_mrad)).max(initial=0))
    edge = np.hypot(dky, dkx)[[0, -1], :].min(initial=np.inf), np.hypot(dky, dkx)[:, [0, -1]].min(initial=np.inf)
    if min(edge) + pitch / 2 < alpha:
        warnings.warn(
            f"the detector crop (edge at {min(edge):.3g} mrad) cuts the BF disk ({alpha:g} mrad): "
            "SSB uses only the pixels inside the crop",
            stacklevel=3,
        )
    return BFPixels(np.stack([pix_y, pix_x], axis=1), sky[inside], skx[inside], ky_mrad, kx_mrad, k0, alpha_source)


# ---------------------------------------------------------------------- focus search
#: Half-width (Å) of the automatic C10 search around 0 when no estimate is known (at least
#: :data:`FOCUS_SPAN_DOF` depths of focus).
FOCUS_SPAN_A = 300.0
#: Half-width (Å) of the search around a stored (parallax) estimate: at least this, two depths
#: of focus and half the estimate's magnitude.
FOCUS_SPAN_ESTIMATE_A = 100.0
FOCUS_SPAN_DOF = 6.0
#: The criterion is called flat (no focus found) when its best value is below this multiple of
#: its median over the coarse grid (a noise-only image has Σ phase² independent of C10).
FOCUS_MIN_CONTRAST = 1.2


def depth_of_focus_a(result: SSBResult) -> float:
    """λ/α² (Å) of ``result``'s BF disk: the C10 change that turns χ at the disk edge by π."""
    return 1.0 / (result.calibration.wavelength_a * result.k0**2)


def focus_span_a(result: SSBResult, start: float = 0.0, estimated: bool = False) -> float:
    """Default half-width (Å) of :func:`focus_c10`'s search: around an estimate (``estimated``)
    max(:data:`FOCUS_SPAN_ESTIMATE_A`, 2 λ/α², |start|/2); else max(:data:`FOCUS_SPAN_A`,
    :data:`FOCUS_SPAN_DOF` λ/α²)."""
    dof = depth_of_focus_a(result)
    if estimated:
        return max(FOCUS_SPAN_ESTIMATE_A, 2.0 * dof, 0.5 * abs(start))
    return max(FOCUS_SPAN_A, FOCUS_SPAN_DOF * dof)


def _powers(result: SSBResult, values, fixed: dict) -> np.ndarray:
    """Σ phase² (rad², SNR weighting) for each C10 in ``values``: one compute over the kept G."""
    sums = [
        (result.refocus(None, quantitative=False, **{**fixed, "C10": float(v)}).data.astype(np.float64) ** 2).sum()
        for v in values
    ]
    return np.array([float(_to_host(s)) for s in dask.compute(*sums)], dtype=np.float64)


def focus_c10(
    result: SSBResult,
    start: float = 0.0,
    span: float | None = None,
    *,
    step: float | None = None,
    xatol: float | None = None,
    warn: bool = True,
    **fixed,
) -> tuple[float, dict]:
    """The defocus C10 (Å) that maximises the truth-free focus criterion, and how it was found.

    Criterion: the power Σ phase² (rad², summed over the scan) of the SNR-weighted SSB phase
    (the ``power`` of :meth:`SSBResult.sweep`): wrong aberrations misalign the trotter phases,
    which then partly cancel, so the power is largest where C10 matches (a peak about one
    depth of focus λ/α² wide; on the abTEM SrTiO3 case it peaks within a few Å of the true
    −150 Å). The quantitative weighting is never used here (noise would dominate the sum).

    Search: G is kept (:meth:`SSBResult.keep`); a coarse grid over ``start ± span`` (Å;
    default :func:`focus_span_a` (result, start)) with a spacing ≤ ``step`` (default λ/(2α²),
    half a depth of focus, so the peak cannot fall between two points), then a bounded scalar
    minimisation of −power (``scipy.optimize.minimize_scalar``, tolerance ``xatol``, default
    1/25 of the grid spacing) between the coarse best's neighbours. Other aberrations: the
    result's own, with ``fixed`` overrides (e.g. ``C12=20``). Each evaluation is one pass of
    the trotter sums over G.

    Returns ``(c10, info)``; ``info``: ``c10``, ``start``, ``span``, ``range`` (lo, hi Å),
    ``step`` (the grid spacing, Å), ``grid`` and ``power`` (the coarse curve), ``best_power``,
    ``contrast`` (best / median power over the grid), ``n_evaluations``, ``at_edge`` (the coarse
    optimum is the first or last grid point: the true optimum may lie outside the range),
    ``flat`` (contrast < :data:`FOCUS_MIN_CONTRAST`: no focus found, the value is not to be
    trusted), ``warnings`` (lines saying so) and ``seconds``. With ``warn`` those also go to
    :func:`warnings.warn`.
    """
    import time

    from scipy.optimize import minimize_scalar

    t0 = time.perf_counter()
    start = float(start)
    span = float(focus_span_a(result, start) if span is None else span)
    step = float(0.5 * depth_of_focus_a(result) if step is None else step)
    if not (math.isfinite(start) and math.isfinite(span) and span > 0 and math.isfinite(step) and step > 0):
        raise InvalidParameter(
            f"focus search needs a finite start and a positive span and step (Å), got "
            f"start={start!r}, span={span!r}, step={step!r}"
        )
    half = max(1, math.ceil(span / step))
    grid = start + np.linspace(-span, span, 2 * half + 1)
    h = grid[1] - grid[0]
    result.keep()
    power = _powers(result, grid, fixed)
    i = int(np.argmax(power))
    best, best_power = float(grid[i]), float(power[i])
    n_eval = len(grid)
    lo, hi = max(grid[0], best - h), min(grid[-1], best + h)
    cache: dict[float, float] = {}

    def negative_power(c):
        if c not in cache:
            cache[c] = -_powers(result, [c], fixed)[0]
        return cache[c]

    fine = minimize_scalar(
        negative_power, bounds=(lo, hi), method="bounded", options={"xatol": float(h / 25 if xatol is None else xatol)}
    )
    n_eval += len(cache)
    if -fine.fun > best_power:
        best, best_power = float(fine.x), float(-fine.fun)
    contrast = best_power / float(np.median(power)) if np.median(power) > 0 else math.inf
    at_edge = i in (0, len(grid) - 1)
    flat = not contrast >= FOCUS_MIN_CONTRAST
    lines = []
    if at_edge:
        lines.append(
            f"the focus criterion is largest at the {'lower' if i == 0 else 'upper'} edge of the searched "
            f"C10 range {grid[0]:.1f}…{grid[-1]:.1f} Å: the optimum may be outside it (C10 = {best:.1f} Å "
            "is not a found focus; widen the search (--c10-span) or give C10)"
        )
    if flat:
        lines.append(
            f"the focus criterion is flat over {grid[0]:.1f}…{grid[-1]:.1f} Å (best Σphase² only "
            f"{contrast:.2f}× its median): no focus found, C10 = {best:.1f} Å is not to be trusted"
        )
    if warn:
        for line in lines:
            warnings.warn(line, stacklevel=2)
    info = {
        "c10": best,
        "start": start,
        "span": span,
        "range": (float(grid[0]), float(grid[-1])),
        "step": float(h),
        "grid": grid,
        "power": power,
        "best_power": best_power,
        "contrast": contrast,
        "n_evaluations": n_eval,
        "at_edge": at_edge,
        "flat": flat,
        "warnings": lines,
        "seconds": time.perf_counter() - t0,
    }
    return best, info


# ---------------------------------------------------------------------- the method
def stored_defocus(calibration: Calibration) -> tuple[float, str]:
    """C10 (Å) for SSB when none is given, and where it came from: the calibration's parallax
    estimate (``c10_estimate_a``), else 0 (in focus)."""
    if calibration.c10_estimate_a is not None:
        return float(calibration.c10_estimate_a), "stored estimate (stemdask calibrate, parallax)"
    return 0.0, "none given or stored: in focus assumed"


def to_gpu(dense: xr.DataArray) -> xr.DataArray:
    """The same lazy patterns with CuPy chunks (each row block moves to the GPU in its task)."""
    try:
        import cupy
    except ImportError:
        raise MissingExtra("SSB on the GPU needs CuPy: pip install 'stemdask[gpu]'") from None
    meta = cupy.empty((0,) * dense.ndim, dtype=dense.dtype)
    return dense.copy(data=dense.data.map_blocks(cupy.asarray, dtype=dense.dtype, meta=meta))


def _searched(result: SSBResult, start: float, span: float, origin: str) -> tuple[float, str, dict]:
    """:func:`focus_c10` from ``start`` over ±``span`` Å, said on stderr: (C10, its source, attrs)."""
    c10, info = focus_c10(result, start, span, warn=False)
    lo, hi = info["range"]
    print(f"ssb: C10 = {c10:.1f} Å (auto: focus criterion over {lo:.1f}…{hi:.1f} Å, start {start:.1f} Å from {origin})",
          file=sys.stderr)
    for line in info["warnings"]:
        print(f"ssb: warning: {line}", file=sys.stderr)
    source = (
        f"auto (focus criterion Σphase², searched {lo:.1f}…{hi:.1f} Å in steps of {info['step']:.1f} Å "
        f"then refined, start {start:.1f} Å from {origin}"
    )
    if info["at_edge"]:
        source += "; OPTIMUM AT THE EDGE of the range: it may lie outside"
    if info["flat"]:
        source += f"; criterion FLAT (best/median {info['contrast']:.2f}): no focus found"
    extra = {"c10_search_range_a": [lo, hi], "c10_at_edge": bool(info["at_edge"]),
             "c10_criterion_contrast": float(info["contrast"])}
    return c10, source + ")", extra


def unsigned_magnitude(calibration: Calibration) -> float | None:
    """|C10| (Å) that ``stemdask calibrate`` measured without its sign (the half turn undecided,
    so no ``c10_estimate_a``), or None."""
    magnitude = (calibration.report or {}).get("c10_magnitude_a")
    return None if calibration.c10_estimate_a is not None or magnitude is None else float(magnitude)


def signed_c10(result: SSBResult, magnitude: float, span: float | None = None) -> tuple[float, str, dict]:
    """The sign of a measured |C10| = ``magnitude`` (Å), picked by the focus criterion for the
    result's orientation: :func:`focus_c10` from 0 over ±``span`` (default both signs of it),
    said on stderr; returns (C10, its source, attrs) like ``--c10 auto``."""
    span = max(focus_span_a(result, 0.0, False), 1.5 * magnitude) if span is None else span
    origin = (
        f"0: calibrate measured |C10| = {magnitude:.1f} Å but not its sign (the half turn is undecided), "
        "so the focus criterion picks it for the stored orientation"
    )
    return _searched(result, 0.0, span, origin)


def run(
    ds: EventDataset,
    *,
    c10: float | Literal["auto"] | None = None,
    c10_span: PositiveFloat | None = None,
    c12: float = 0.0,
    c12_angle: float = 0.0,
    c21: float = 0.0,
    c21_angle: float = 0.0,
    c23: float = 0.0,
    c23_angle: float = 0.0,
    c30: float = 0.0,
    bin: PositiveInt = 1,
    quantitative: bool = False,
    gpu: bool = False,
    scratch: str | None = None,
) -> xr.Dataset:
    """Single-sideband ptychography phase (rad): variable phase.

    Parameters
    ----------
    c10
        defocus C10, Å; C10 < 0 is underfocus (none: the estimate `stemdask calibrate` stored;
        where it measured only |C10|, the sign the focus criterion picks; else 0, in focus).
        'auto': search C10 with the focus criterion Σ phase² around that value
    c10_span
        when C10 is searched ('auto'): the start ± this, Å (none: ±300 Å around 0, ±max(100 Å,
        |estimate|/2) around a stored estimate; at least a few depths of focus λ/α²)
    c12
        two-fold astigmatism C12, Å
    c12_angle
        C12 azimuth, degrees from scan x towards scan y
    c21
        axial coma C21, Å
    c21_angle
        C21 azimuth, degrees
    c23
        three-fold astigmatism C23, Å
    c23_angle
        C23 azimuth, degrees
    c30
        spherical aberration C30, Å
    bin
        detector binning factor before SSB (whole detector pixels per output pixel)
    quantitative
        unit transfer (each frequency averaged over its trotter) instead of the SNR-optimal
        trotter sum
    gpu
        move the dense patterns to CuPy and run the scan FFT and reduction on the GPU (needs
        the gpu extra; use with a CUDA cluster profile)
    scratch
        folder for G when it outgrows half the workers' memory, on a filesystem every worker
        sees (none: dask config 'stemdask.scratch', else this machine's temporary folder;
        refused when a worker cannot see it)
    """
    if isinstance(c10, str) and c10 != "auto":
        raise InvalidParameter(f"SSB c10 must be a number (Å), 'auto' or None, got {c10!r}")
    if c10_span is not None and not (math.isfinite(c10_span) and c10_span > 0):
        raise InvalidParameter(f"SSB c10_span must be a positive number of Å, got {c10_span!r}")
    with dask.config.set({SCRATCH_CONFIG: scratch} if scratch else {}):
        dense = ds.densify(bin=bin)
        if gpu:
            dense = to_gpu(dense)
        ab = Aberrations(C12=c12, phi12=c12_angle, C21=c21, phi21=c21_angle, C23=c23, phi23=c23_angle, C30=c30)
        if c10 not in (None, "auto"):
            start, source = float(c10), "command line"
        else:
            start, source = stored_defocus(ds.calibration)
        extra = {}
        magnitude = unsigned_magnitude(ds.calibration) if c10 is None else None
        if c10 == "auto" or magnitude is not None:
            result = ssb(dense, ds.calibration, dataclasses.replace(ab, C10=start), quantitative=quantitative)
            if magnitude is not None:
                chosen, source, extra = signed_c10(result, magnitude, c10_span)
            else:
                estimated = ds.calibration.c10_estimate_a is not None
                origin = (
                    "the stored estimate (stemdask calibrate, parallax)"
                    if estimated
                    else "the default (no estimate stored)"
                )
                span = focus_span_a(result, start, estimated) if c10_span is None else c10_span
                chosen, source, extra = _searched(result, start, span, origin)
            phase = result.refocus(C10=chosen)
        else:
            if source != "command line":
                print(f"ssb: C10 = {start:.1f} Å ({source}); pass --c10 to override", file=sys.stderr)
            chosen = start
            phase = ssb(dense, ds.calibration, dataclasses.replace(ab, C10=start), quantitative=quantitative).phase
    host = phase.data.map_blocks(_to_host, dtype=phase.dtype, meta=np.empty((0, 0), phase.dtype))
    out = phase.copy(data=host)
    out.attrs["c10_source"] = source
    out.attrs.update(extra)
    return xr.Dataset({"phase": out})
