"""The lazy dataset handle: an event store seen as a dask graph over chunks of scan rows.

``stemdask.open(path)`` returns an :class:`EventDataset`. Nothing is read when it is opened
or when a product is requested: every product (:meth:`EventDataset.com`,
:meth:`~EventDataset.virtual`, :meth:`~EventDataset.pacbed`, :meth:`~EventDataset.densify`,
...) is an xarray object backed by a dask graph of the shape

    read rows r0..r1  ──►  one map per product  (──► tree reductions where needed)

Read chunks are whole scan rows sized by bytes (:func:`event_row_chunks`: a part of a stored
row block, or several), and dense products cut them again by their own bytes
(:meth:`EventDataset.map_event_rows`). The read tasks are named from the store alone
(``events-<token>``), so products computed together — ``dask.compute(ds.com(),
ds.virtual(...), ds.pacbed())`` or one ``xr.merge(...).to_zarr(...)`` — read each row once
and share it. A read task takes
the store *path* and opens the store itself, so graphs pickle and run on a distributed
cluster (the workers must see the same path, e.g. a shared filesystem).

Frames: everything here is in the DETECTOR frame (no rotation applied); scan coordinates
are ``scan_y = iy·step_y``, ``scan_x = ix·step_x`` (Å) — for a scan-binned dataset the
coordinate of a bin is the centre of the positions it merged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from . import chunk_plan, reductions
from .errors import InvalidParameter
from .kernels import events as kernels
from .optics import Calibration
from .progress import active_client
from .store import Block, EncodedBlock, EventStore, open_store, read_handle

_OBJECT_META = np.empty((0, 0), dtype=object)


def _read_rows(path: str, index: int, pieces: tuple, allow_incomplete: bool,
               encoded: bool = True) -> "Block | EncodedBlock":
    """Task: open the store at ``path`` and read the rows ``pieces`` ((stored block, first row,
    end row), ...) as one block numbered ``index`` — its entries still encoded where the store
    allows and ``encoded`` asks (:class:`~stemdask.store.EncodedBlock`), else decoded;
    picklable by design."""
    return read_handle(path, allow_incomplete=allow_incomplete).read_rows(pieces, index, encoded=encoded)


def _rows_of(blocks: list, ranges: list, fn, args: tuple):
    """Task: ``fn(parts, *args)`` on the rows ``ranges`` [(lo, hi), ...] (counted within each
    block) of consecutive ``blocks``: ``parts`` the decoded Blocks of those rows, in order (not
    joined: a product adds each into its output, without copying the events into one block)."""
    return fn([block.rows(lo, hi) for block, (lo, hi) in zip(blocks, ranges)], *args)  # decodes only those rows


def chunk_target() -> int:
    """Bytes per chunk for the graphs built now (:func:`stemdask.chunk_plan.target_bytes`): the
    dask config ``stemdask.chunk-bytes`` (e.g. ``"32 MiB"``) or 64 MiB, at most 1/24 of the
    smallest worker memory per thread of the active distributed client."""
    from dask.utils import parse_bytes

    configured = dask.config.get("stemdask.chunk-bytes", None)
    client = active_client()
    per_thread = None
    if client is not None:
        workers = client.scheduler_info()["workers"].values()
        shares = [w["memory_limit"] / max(1, w.get("nthreads", 1)) for w in workers if w.get("memory_limit")]
        per_thread = int(min(shares)) if shares else None
    return chunk_plan.target_bytes(parse_bytes(configured) if configured else None, per_thread)


def _select_toa(block: "Block | EncodedBlock", t_min: int, t_max: int) -> Block:
    block = block.decoded()
    if block.toa is None:  # (a weighted block never has them)
        raise RuntimeError("dose fractionation needs arrival times; this block has none")  # checked per store first
    counts, indices, toa = kernels.select_toa(block.counts.ravel(), block.indices, block.toa, t_min, t_max)
    return Block(block.index, block.row_start, counts.reshape(block.counts.shape), indices, toa)


def _bin_blocks(factor: int, rows_out: int, row_start: int, index: int, *blocks: Block) -> Block:
    """Merge a group of consecutive read chunks and bin its scan by ``factor``."""
    group = Block.concat([b.decoded() for b in blocks], index).rows(0, rows_out * factor)
    binned, merged, merged_w = kernels.bin_scan(np.ascontiguousarray(group.entries), group.indices, factor,
                                                group.weights)
    if group.weights is None:
        return Block(index, row_start, binned, merged, None)
    counts = group.counts.astype(np.int64)
    oy, ox = binned.shape
    electrons = counts[:, : ox * factor].reshape(oy, factor, ox, factor).sum(axis=(1, 3)).astype(np.uint32)
    return Block(index, row_start, electrons, merged, None, merged_w, binned)


@dataclass(frozen=True)
class _Events:
    """The per-block events layer: a dask array of dtype object whose chunks are Blocks.

    Never computed as an array; products map over its blocks.
    """

    array: da.Array
    scan_offset_a: tuple[float, float] = (0.0, 0.0)
    has_toa: bool = False
    #: The store's own reads, which :meth:`EventDataset.decode_once` may redo (not a derived layer).
    from_store: bool = False
    #: For a scan-binned layer: (the layer it bins, the factor) — products that bin as they go
    #: (:func:`stemdask.reductions.densify`) read that instead of reordering the events.
    unbinned: "tuple[_Events, int] | None" = None

    @property
    def scan_shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.array.shape)


def event_row_chunks(store: EventStore, target: int) -> tuple[int, ...]:
    """Scan rows per chunk of the events layer: regular chunks of about ``target`` bytes of
    decoded events (counts, indices, weights, arrival times; from the store's event total), cut
    from or merged across the stored row blocks, aligned with them where that keeps the size
    (:func:`stemdask.chunk_plan.aligned`). A store without an event total (incomplete) keeps its
    stored blocks."""
    per_row = event_bytes_per_row(store)
    if per_row is None:
        return tuple(r1 - r0 for r0, r1 in map(store.block_rows, range(store.n_blocks)))
    return chunk_plan.row_chunks(store.scan_shape[0], per_row, target, store.rows_per_block)


def event_bytes_per_row(store: EventStore) -> float | None:
    """Mean decoded bytes of one scan row's entries, from the totals recorded at finalize (a
    weighted store written before ``n_entries`` was recorded: its electron total, an upper
    bound), or None for a store without them (incomplete)."""
    if "n_events" not in store.attrs or not store.complete:
        return None
    ny, nx = store.scan_shape
    weight_bytes = store.weight_dtype.itemsize if store.weighted else 0
    entry_bytes = store.index_dtype.itemsize + 4 * store.has_toa + weight_bytes
    entries = int(store.attrs.get("n_entries", store.attrs["n_events"]))
    return entries / ny * entry_bytes + nx * 4 * (1 + store.weighted)


def _store_events(store: EventStore, allow_incomplete: bool, encoded: bool = True) -> _Events:
    """The read layer: one task per chunk of rows (:func:`event_row_chunks`), handing on
    EncodedBlocks (``encoded``) or decoded Blocks."""
    path = str(store.path.resolve())
    rows = event_row_chunks(store, chunk_target())
    token = tokenize(path, store.attrs.get("n_events"), store.attrs.get("provenance"), store.scan_shape, rows)
    name = f"events-{token}" if encoded else f"events-decoded-{token}"
    stored = [store.block_rows(b)[0] for b in range(store.n_blocks)] + [store.scan_shape[0]]
    starts = np.cumsum((0,) + rows).tolist()
    graph = {(name, i, 0): (_read_rows, path, i, tuple(chunk_plan.row_pieces(stored, r0, r1)), allow_incomplete,
                            encoded)
             for i, (r0, r1) in enumerate(zip(starts[:-1], starts[1:]))}
    chunks = (rows, (store.scan_shape[1],))
    hlg = HighLevelGraph.from_collections(name, graph, dependencies=())
    return _Events(da.Array(hlg, name, chunks, meta=_OBJECT_META), has_toa=store.has_toa, from_store=True)


class EventDataset:
    """An event store with a calibration, as lazy dask/xarray products.

    Open with :func:`open`. Attributes: ``store`` (:class:`~stemdask.store.EventStore`),
    ``calibration`` (:class:`~stemdask.optics.Calibration`), ``scan_shape`` (ny, nx),
    ``detector_shape`` (det_y, det_x). Every product is lazy until computed.
    """

    def __init__(self, store: EventStore, calibration: Calibration | None = None, *,
                 allow_incomplete: bool = False, _events: _Events | None = None, _mask=None):
        self.store = store
        self.calibration = calibration if calibration is not None else store.calibration
        self.detector_shape: tuple[int, int] = tuple(store.detector_shape)
        self._events = _events if _events is not None else _store_events(store, allow_incomplete)
        self.scan_shape: tuple[int, int] = self._events.scan_shape
        self.mask, self.fill = _mask if _mask is not None else store.detector_mask()

    # ------------------------------------------------------------------ derived datasets
    def _derived(self, events: _Events, calibration: Calibration | None = None) -> "EventDataset":
        return EventDataset(self.store, calibration or self.calibration, _events=events, _mask=(self.mask, self.fill))

    def decode_once(self) -> "EventDataset":
        """The same dataset with read tasks that decode every entry once and hand the decoded
        block to all its products. By default a read hands on its chunks still compressed
        (:class:`~stemdask.store.EncodedBlock`: 2.3× fewer bytes held) and each O(C) product
        (COM, virtual detectors, PACBED, counts) decodes them itself, a stored chunk at a time,
        into buffers its thread reuses — the fastest way to compute one product — but several
        products computed together then decode the same chunks once each (COM + 3 virtual
        detectors + PACBED: 119–130 M events per CPU-second against 167 M decoded once, ``python
        benchmarks/reductions.py``). For those, decode once. A scan-binned or
        dose-fractionated dataset is returned as it is (its blocks are decoded already)."""
        if not self._events.from_store:
            return self
        allow_incomplete = not self.store.complete
        return self._derived(_store_events(self.store, allow_incomplete, encoded=False))

    def with_calibration(self, **changes) -> "EventDataset":
        """The same events with calibration fields replaced (e.g. ``rotation_deg=90``)."""
        return self._derived(self._events, self.calibration.replace(**changes))

    def with_mask(self, mask, fill) -> "EventDataset":
        """The same events with another detector mask (bool (det_y, det_x), True = excluded) and
        its fill weights (float (det_y, det_x), see :mod:`stemdask.reductions`); ``None, None``: no mask."""
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            fill = np.asarray(fill, dtype=np.float64)
            if mask.shape != self.detector_shape or fill.shape != self.detector_shape:
                raise InvalidParameter(f"mask and fill must have the detector's shape {self.detector_shape}, "
                                 f"got {mask.shape} and {fill.shape}")
        return EventDataset(self.store, self.calibration, _events=self._events, _mask=(mask, fill))

    def fractionate(self, t_max_ns: float, t_min_ns: float = 0.0) -> "EventDataset":
        """Dose fractionation: keep only events with ``t_min_ns ≤ toa < t_max_ns`` (ns within the dwell).

        Needs a store made with arrival times (``create_store(..., has_toa=True)``).
        """
        if not self.store.has_toa:
            raise InvalidParameter(f"{self.store.path}: store has no arrival times (toa); dose fractionation "
                                   "needs them")
        if not self._events.has_toa:
            raise InvalidParameter("scan binning drops arrival times: fractionate first, then bin_scan")
        if not (math.isfinite(t_max_ns) and t_max_ns > t_min_ns >= 0):
            raise InvalidParameter(f"need 0 ≤ t_min_ns < t_max_ns, got t_min_ns={t_min_ns}, t_max_ns={t_max_ns}")
        lo, hi = int(math.ceil(t_min_ns)), int(math.ceil(t_max_ns))
        arr = self._events.array.map_blocks(
            _select_toa,
            lo,
            hi,
            dtype=object,
            meta=_OBJECT_META,
            name=f"events-toa-{tokenize(self._events.array.name, lo, hi)}",
        )
        return self._derived(_Events(arr, self._events.scan_offset_a, has_toa=True))

    def bin_scan(self, factor: int) -> "EventDataset":
        """Merge the events of ``factor × factor`` neighbouring positions (scan binning).

        Trailing rows/columns that do not fill a bin are dropped. The scan step of the
        result is ``factor`` times larger; its coordinates are the centres of the bins.
        Arrival times are dropped (call :meth:`fractionate` before binning). Its
        :meth:`densify` bins as it densifies, from the unbinned events (each position with its
        own descan; no reordering of the events); its other products read binned events.
        """
        f = int(factor)
        if f != factor or f < 1:
            raise InvalidParameter(f"scan binning factor must be a positive integer, got {factor!r}")
        ny, nx = self.scan_shape
        if f > min(ny, nx):
            raise InvalidParameter(f"scan binning factor {f} is larger than the scan {self.scan_shape}")
        if f == 1:
            return self
        src = self._events.array
        row_chunks = src.chunks[0]
        rpb = row_chunks[0]
        group = f // math.gcd(rpb, f)  # blocks per group: each full group spans a multiple of f rows
        name = f"events-bin-{tokenize(src.name, f)}"
        graph, out_rows, row0 = {}, [], 0
        for g, first in enumerate(range(0, len(row_chunks), group)):
            members = range(first, min(first + group, len(row_chunks)))
            rows_out = sum(row_chunks[b] for b in members) // f
            graph[(name, g, 0)] = (_bin_blocks, f, rows_out, row0, g, *[(src.name, b, 0) for b in members])
            out_rows.append(rows_out)
            row0 += rows_out
        hlg = HighLevelGraph.from_collections(name, graph, dependencies=[src])
        arr = da.Array(hlg, name, (tuple(out_rows), (nx // f,)), meta=_OBJECT_META)
        cal = self.calibration
        step_y, step_x = cal.scan_step_a
        off_y, off_x = self._events.scan_offset_a
        offset = (off_y + (f - 1) / 2 * step_y, off_x + (f - 1) / 2 * step_x)
        return self._derived(_Events(arr, offset, unbinned=(self._events, f)),
                             cal.replace(scan_step_a=(step_y * f, step_x * f)))

    def unbinned(self) -> "tuple[EventDataset, int]":
        """(the dataset before its last :meth:`bin_scan`, its factor f), or (this dataset, 1):
        the same calibration but for the scan step (÷ f), the same mask."""
        if self._events.unbinned is None:
            return self, 1
        events, f = self._events.unbinned
        step_y, step_x = self.calibration.scan_step_a
        return self._derived(events, self.calibration.replace(scan_step_a=(step_y / f, step_x / f))), f

    # ------------------------------------------------------------------ products
    def counts(self):
        """Electrons per position, (scan_y, scan_x) uint32 DataArray."""
        return reductions.counts(self)

    def com(self, reference="bf", units: str = "px", vacuum=None):
        """Centre of mass per position (detector frame): Dataset {com_y, com_x}. See :func:`stemdask.reductions.com`."""
        return reductions.com(self, reference=reference, units=units, vacuum=vacuum)

    def virtual(self, inner=0.0, outer=math.inf, units: str = "mrad", name: str = "image"):
        """One annular virtual detector image. See :func:`stemdask.reductions.virtual`."""
        return reductions.virtual(self, inner=inner, outer=outer, units=units, name=name)

    def virtual_detectors(self, detectors):
        """Several virtual detectors in one pass over the events. See :func:`stemdask.reductions.virtual_detectors`."""
        return reductions.virtual_detectors(self, detectors)

    def pacbed(self):
        """Sum of all patterns (k_y, k_x). See :func:`stemdask.reductions.pacbed`."""
        return reductions.pacbed(self)

    def radial_profile(self, bin_px: float = 1.0):
        """Position-averaged radial profile around the BF centre. See :func:`stemdask.reductions.radial_profile`."""
        return reductions.radial_profile(self, bin_px=bin_px)

    def densify(self, radius_px=None, center=None, bin: int = 1):
        """Crop + bin + densify to (scan_y, scan_x, k_y, k_x) float32. See :func:`stemdask.reductions.densify`."""
        return reductions.densify(self, radius_px=radius_px, center=center, bin=bin)

    # ------------------------------------------------------------------ helpers for reduce
    def map_events(self, fn, *args, dtype, chunks, new_axis=None, drop_axis=None, name: str):
        """``fn(block, *args)`` on every read chunk of rows → dask array (a product of the shared read).
        ``block`` is a :class:`~stemdask.store.Block` or an :class:`~stemdask.store.EncodedBlock`:
        walk its entries with ``block.pieces()`` (or take ``block.decoded()``); both have
        ``counts``, ``entries``, ``row_start`` and ``index``."""
        meta = np.empty((0,) * len(chunks), dtype=dtype)
        token = tokenize(self._events.array.name, fn, args, chunks)
        return self._events.array.map_blocks(
            fn,
            *args,
            dtype=dtype,
            chunks=chunks,
            new_axis=new_axis,
            drop_axis=drop_axis,
            meta=meta,
            name=f"{name}-{token}",
        )

    def map_event_rows(self, fn, *args, dtype, row_bytes: float, trailing: tuple, name: str, scan_bin: int = 1):
        """``fn(parts, *args)`` on regular chunks of scan rows cut from the shared reads (``parts``:
        the chunk's rows as consecutive Blocks, one per read it draws from), each as
        many rows as keep its output (``row_bytes`` bytes per scan row) within
        :func:`chunk_target` (aligned with the reads where that keeps the size) → a dask array
        of chunks (rows, nx, *``trailing``): a product of the shared read, in chunks sized by
        what they hold, regular as Zarr needs, whatever was read together.

        ``scan_bin`` f > 1: ``fn`` bins the scan f × f as :meth:`bin_scan` does (``row_bytes``
        then counts the output of one input row): every chunk is a multiple of f rows and at
        most about one read (so the tasks run as the reads arrive, and none holds many reads), the
        trailing rows that fill no bin are not read, and the chunks are (rows / f, nx // f,
        *``trailing``)."""
        src = self._events.array
        reads = src.chunks[0]
        f = int(scan_bin)
        ny = sum(reads) // f * f
        length = chunk_plan.aligned(chunk_plan.chunk_length(ny, row_bytes, chunk_target()), max(reads))
        if f > 1:  # a binned chunk's cost is the events it reads, not its f²-times smaller output: one read's rows
            length = min(length, max(reads))
        length = max(f, length // f * f)
        rows = chunk_plan.regular_chunks(ny, length)
        token = tokenize(src.name, fn, args, row_bytes, trailing, rows, f)
        out = f"{name}-{token}"
        zeros = (0,) * (1 + len(trailing))
        read_starts = np.cumsum((0,) + reads).tolist()
        graph = {f"{out}-args": (tuple, list(args))}  # once in the graph, not once per task
        for j, r0 in enumerate(range(0, ny, length)):
            parts = chunk_plan.row_pieces(read_starts, r0, min(ny, r0 + length))
            blocks = [(src.name, i, 0) for i, _, _ in parts]
            ranges = [(lo - read_starts[i], hi - read_starts[i]) for i, lo, hi in parts]
            graph[(out, j, *zeros)] = (_rows_of, blocks, ranges, fn, f"{out}-args")
        hlg = HighLevelGraph.from_collections(out, graph, dependencies=[src])
        chunks = (tuple(r // f for r in rows), (self.scan_shape[1] // f,), *((n,) for n in trailing))
        return da.Array(hlg, out, chunks, meta=np.empty((0,) * len(chunks), dtype=dtype))

    @property
    def row_chunks(self) -> tuple[int, ...]:
        return self._events.array.chunks[0]

    def scan_coords(self) -> dict:
        """xarray coords of the scan axes (Å): :func:`scan_coordinates`."""
        ny, nx = self.scan_shape
        (sy, sx), (oy, ox) = self.calibration.scan_step_a, self._events.scan_offset_a
        return scan_coordinates(oy + sy * np.arange(ny), ox + sx * np.arange(nx))

    def __repr__(self) -> str:
        c = self.calibration
        return (
            f"<EventDataset {self.store.path} scan={self.scan_shape} detector={self.detector_shape} "
            f"bf_center={c.bf_center} bf_radius={c.bf_radius} rotation={c.rotation_deg}° flip={c.flip}>"
        )


def scan_coordinates(y_a, x_a) -> dict:
    """xarray coords ``scan_y``, ``scan_x`` of probe positions ``y_a``, ``x_a`` (Å; units
    spelled ``angstrom`` so that pint / cf-xarray parse them)."""
    import xarray as xr

    return {
        "scan_y": xr.Variable("scan_y", np.asarray(y_a, float), {"units": "angstrom", "long_name": "scan position y"}),
        "scan_x": xr.Variable("scan_x", np.asarray(x_a, float), {"units": "angstrom", "long_name": "scan position x"}),
    }


def open(store_or_path: EventStore | str | os.PathLike, *, allow_incomplete: bool = False) -> EventDataset:
    """Open an event store as a lazy :class:`EventDataset` (reads metadata only)."""
    if isinstance(store_or_path, EventStore):
        store = store_or_path
        if not store.complete and not allow_incomplete:
            store = open_store(store.path)  # raises the store's own "incomplete" error
    else:
        store = open_store(store_or_path, allow_incomplete=allow_incomplete)
    return EventDataset(store, allow_incomplete=allow_incomplete)
