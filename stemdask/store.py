"""The event store: electron events in a Zarr v3 group, "slotted CSR" chunked by scan rows.

Layout (``FORMAT_NAME`` version ``FORMAT_VERSION``). A store holds *entries*, one per
electron (``encoding: "events"``) or one per pixel that counted electrons, with their number
(``encoding: "weighted"``, for dense counting detectors such as the Merlin, see below):

``counts``  uint32 ``(ny, nx)``, chunks ``(rows_per_block, nx)``: electrons per probe position.
            Its fill value 0xFFFFFFFF marks a row block as "not yet written"; a block's
            ``counts`` chunk is written *last* and so is its commit mark.
``entries`` weighted stores only, uint32 ``(ny, nx)`` like ``counts``: entries per position
            (pixels with counts); in an events store the entries per position are ``counts``.
``indices`` uint16 (detector ≤ 65536 px) or uint32, 1-D: linear detector index
            ``k_y * det_x + k_x`` of every entry, positions in scan order, ascending
            within a position when the source was. Row block ``b`` owns the aligned slot
            ``[b*cap, b*cap + n_b)``; ``cap`` is a multiple of the chunk length, so blocks
            never share a chunk and the unwritten rest of a slot costs nothing on disk.
``weights`` weighted stores only, ``weight_dtype`` (uint8/16/32), same slots: the electrons
            of each entry (the pixel's count). An events store has none: every entry is 1.
``toa``     optional uint32, same slots (events stores only): arrival time of each event
            within the dwell (ns).
``block_crc`` uint32 ``(n_blocks,)``, chunk 1: each block's record, written with the block
            just before its commit mark. Version ≥ 2: CRC-32C of the block's decoded counts
            (then entries), extended with the 4-byte CRC-32C trailers of its ``indices``
            (then ``toa``, ``weights``) chunk files in order (see
            :meth:`EventStore.block_record`). Version 1: zlib CRC-32 of the decoded counts +
            indices (+ toa).

No per-position cap (version 3): a block's slot ``cap`` is the most entries its positions
can hold — ``2³²−1`` per position (the counts dtype) for events, the detector's pixel count
for weighted entries — rounded up to whole chunks. The slots are virtual (zarr writes only
the chunks that hold data), so a huge slot costs nothing.

Encoding: ``"weighted"`` pays ``weight_dtype`` bytes per entry and saves one entry per
extra electron on a pixel: smaller from about 1.5 electrons per counted pixel (a Merlin
frame, ≈ 5–50 counts/pixel), larger for sparse data (the 4D Camera, ≈ 0.01 counts/pixel,
where nearly every counted pixel holds one electron). Ingest picks the smaller
(:func:`stemdask.io.ingest`); every kernel takes the weights, and results equal the dense
computation.

Attrs: format name/version, shapes, ``rows_per_block``, ``cap``, ``encoding``,
``weight_dtype``, calibration
(:class:`stemdask.optics.Calibration`), provenance (source, its SHA-256, ingest parameters),
``n_events``, ``n_entries`` (not covered by the layout hash: a size hint for planning reads,
absent in older stores) and ``complete: true`` once :meth:`EventStore.finalize` has checked
every block.

Integrity (version 2). Every chunk of ``counts``, ``indices``, ``toa`` and ``block_crc``
ends with zarr's ``crc32c`` codec, so a flipped bit or a truncated chunk fails *before* the
Blosc decoder sees it. :meth:`EventStore.read_block` — the one read path of every product —
checks the block as a whole before decoding its events: its event total fits its slot and
its record (decoded counts + the trailers of its event chunks) equals ``block_crc[b]`` —
this catches a deleted chunk (zarr would read its fill value) and a chunk swapped with
another block's (it carries a valid chunk checksum, but not this block's). Then exactly that
many events must come back and, last, every index must lie on the detector (so even a bug
cannot make a kernel read out of bounds). Binding chunks to blocks by their trailers, rather
than by a second CRC over the decoded events, is what keeps verification cheap: every byte
is checksummed once (``python benchmarks/reductions.py --checksum-cost``). The attrs that
decide how bytes are interpreted
(:data:`LAYOUT_ATTRS`) are covered by ``layout_sha256``, checked on open together with the
arrays' own shapes, chunks and dtypes; ``calibration`` and ``provenance`` are not covered
(``stemdask calibrate`` rewrites the calibration legitimately). Any failure raises
:class:`CorruptStoreError` naming the store, the array, the chunk and the row block.
Version-2 stores (events only, slots sized by a per-position cap) open and read unchanged.
Version-1 stores (no chunk checksums, zlib block CRCs) still open; they get the layout,
slot and bounds checks on every read and the block CRCs only from :meth:`EventStore.check`.

Why this layout: a task for rows ``[r0, r1)`` reads one ``counts`` chunk and exactly its own
index chunks — no global offsets table, no lock; parallel writers (threads, processes, or
cluster workers) never touch the same object. Re-writing a block rewrites the same keys, so
an interrupted ingest resumes by skipping committed blocks and produces identical bytes.

Codec: Blosc lz4 (level 5) with byte shuffle, no delta filter. Measured on 4D-Camera-like
sorted uint32 indices (576×576 detector, 500 e⁻/position; benchmarks/ingest.py and
benchmarks/reductions.py, 2 cores): 1.77 bytes/event, CSR ingest 67 M events/s, and it
decodes ~2× faster than zstd + bit-shuffle (1.71 B/event, 54 M events/s ingest), which
caps every O(C) reduction end to end. Delta + bit-shuffle packs tighter (1.4 B/event) but
writes 2.4× slower.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import threading
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import google_crc32c
import numpy as np
import zarr
from dask.sizeof import sizeof
from zarr.codecs import BloscCodec, Crc32cCodec

from .chunk_reads import ChunkReadError, DirectChunks
from .errors import InvalidParameter, UserError
from .kernels.events import position_sums
from .optics import Calibration

FORMAT_NAME = "stemdask-events"
FORMAT_VERSION = 3
#: Attrs that decide how the stored bytes are read; covered by the ``layout_sha256`` attr.
LAYOUT_ATTRS = ("format", "format_version", "scan_shape", "detector_shape", "rows_per_block", "cap", "index_dtype",
                "has_toa", "encoding", "weight_dtype", "n_events", "complete")
ENCODINGS = ("events", "weighted")
#: Most electrons one position may hold (the ``counts`` dtype).
MAX_PER_POSITION = (1 << 32) - 2
UNWRITTEN = np.uint32(0xFFFFFFFF)
DEFAULT_CHUNK_EVENTS = 1 << 20
#: Target of decoded entry bytes per row block (:func:`default_rows_per_block`).
BLOCK_BYTES = 64 << 20
#: Most positions per row block (outputs such as densified patterns scale with positions).
MAX_BLOCK_POSITIONS = 1 << 14
#: Arrays of the detector mask written by :meth:`EventStore.set_detector_mask`.
MASK, MASK_FILL = "detector_mask", "mask_fill"


class StoreError(UserError):
    """A store is missing, malformed, or not what the caller asked for."""


class IncompleteStoreError(StoreError):
    """The store's ingest did not finish (not every row block is committed)."""


class CorruptStoreError(StoreError):
    """Stored data disagree with their recorded totals or checksums."""


#: What a block record takes for an event chunk that has no file (all fill value).
_NO_CHUNK = bytes(4)

#: What to do about a damaged store; ends every :class:`CorruptStoreError` of a read.
_REMEDY = (
    "the store is damaged: re-ingest it from its source (stemdask ingest … --overwrite) or restore "
    "a backup; `stemdask validate` lists every damaged block"
)


@dataclass
class Block:
    """One row block: ``counts`` (rows, nx) uint32 electrons per position, ``indices`` 1-D
    (one entry per electron, or with ``weights`` one per counted pixel), ``toa`` or None,
    ``weights`` (electrons of each entry) or None (each entry is one electron), and with
    weights ``entry_counts`` (rows, nx): entries per position."""

    index: int
    row_start: int
    counts: np.ndarray
    indices: np.ndarray
    toa: np.ndarray | None = None
    weights: np.ndarray | None = None
    entry_counts: np.ndarray | None = None

    def __post_init__(self):
        if (self.weights is None) != (self.entry_counts is None):
            raise InvalidParameter("a weighted block needs both weights and entry_counts")

    @property
    def entries(self) -> np.ndarray:
        """Entries per position (rows, nx): what the kernels walk (= ``counts`` without weights)."""
        return self.counts if self.weights is None else self.entry_counts

    @property
    def offsets(self) -> np.ndarray:
        """CSR offsets (rows*nx + 1,) int64 into ``indices``, positions in scan order."""
        off = np.zeros(self.entries.size + 1, dtype=np.int64)
        np.cumsum(self.entries.ravel(), out=off[1:])
        return off

    def rows(self, lo: int, hi: int) -> "Block":
        """Its rows [``lo``, ``hi``) (counted within the block) as a block of their own (views)."""
        a, z = (int(self.entries[:r].sum(dtype=np.int64)) for r in (lo, hi))

        def part(x):
            return None if x is None else x[a:z]

        return Block(self.index, self.row_start + lo, self.counts[lo:hi],
                     self.indices[a:z], part(self.toa), part(self.weights),
                     None if self.entry_counts is None else self.entry_counts[lo:hi])

    @staticmethod
    def concat(blocks: "list[Block]", index: int) -> "Block":
        """Consecutive blocks (ascending rows) as one block numbered ``index``."""
        if len(blocks) == 1:
            return dataclasses.replace(blocks[0], index=index)
        first = blocks[0]

        def joined(name):
            return None if getattr(first, name) is None else np.concatenate([getattr(b, name) for b in blocks])

        return Block(index, first.row_start, joined("counts"), joined("indices"), joined("toa"), joined("weights"),
                     joined("entry_counts"))


    def decoded(self) -> "Block":
        """Itself (an :class:`EncodedBlock` decodes; a Block already is)."""
        return self

    def pieces(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]]:
        """(0, positions, entries per position, indices, weights): the whole block as the one
        piece of :meth:`EncodedBlock.pieces`."""
        yield 0, self.entries.size, self.entries.ravel(), self.indices, self.weights


@dataclass(frozen=True)
class _EncodedArray:
    """One entry array's part of an :class:`EncodedBlock`: its chunk reader, and per stored chunk
    (in order) the chunk number, its checked bytes (None: never written), the elements
    [lo, hi) of the chunk that the block holds, and the chunk's name for errors."""

    reader: DirectChunks
    chunks: tuple[tuple[int, np.ndarray | None, int, int, str], ...]


_piece_buffers = threading.local()


def _damage(where: str, indices: np.ndarray, weights, electrons: int, n_pixels: int) -> str | None:
    """What the read's last guards find wrong with the entries of the rows ``where`` (None: nothing):
    kernels index detector arrays with these values, and the weights must add up to the
    electrons the counts say the rows hold."""
    top = int(indices.max()) if indices.size else 0
    if top >= n_pixels:
        return f"{where} holds detector index {top} ≥ {n_pixels} (damaged data)"
    if weights is not None and int(weights.sum(dtype=np.int64)) != electrons:
        return (f"{where}: its weights sum to {int(weights.sum(dtype=np.int64))} electrons but its counts to "
                f"{electrons} (damaged data)")
    return None


def _joined(heads, i: int) -> np.ndarray:
    """Item ``i`` (counts, entries) of the read pieces' heads (:meth:`EventStore._head`), joined."""
    return np.concatenate([h[i] for h in heads]) if len(heads) > 1 else heads[0][i]


@dataclass(frozen=True)
class EncodedBlock:
    """A :class:`Block` as read tasks hand it on: ``counts`` (and ``entry_counts``) decoded, the
    entry arrays still as their checked, compressed chunks — about 2.3× fewer bytes held between
    the read and its products than decoded entries. :meth:`pieces` decodes them a stored chunk
    at a time into buffers each thread reuses, so an O(C) reduction never holds (nor faults in)
    the whole block decoded; :meth:`decoded` gives the whole :class:`Block`. Both apply the
    read's last guards (indices within the detector, weights summing to the counts), naming the
    rows in a :class:`CorruptStoreError`."""

    index: int
    row_start: int
    counts: np.ndarray
    entry_counts: np.ndarray | None
    arrays: dict  # entry array name → _EncodedArray
    bounds: tuple[int, ...]  # first entry of each read piece, and the total
    positions: tuple[int, ...]  # first position of each read piece, and the total
    wheres: tuple[str, ...]  # each read piece's rows, for errors
    n_pixels: int
    store: str

    @property
    def entries(self) -> np.ndarray:
        return self.counts if self.entry_counts is None else self.entry_counts

    @property
    def weighted(self) -> bool:
        return "weights" in self.arrays

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.store}: {what}; {_REMEDY}")

    def _decode(self, name: str, k: int, target: np.ndarray) -> None:
        """Stored chunk ``k`` of array ``name`` (its held part) into ``target``."""
        enc = self.arrays[name]
        i, body, lo, hi, label = enc.chunks[k]
        whole = lo == 0 and hi == enc.reader.length
        dest = target if whole else _scratch(f"{name}-chunk", enc.reader.length, enc.reader.dtype)
        try:
            enc.reader.decode(i, body, dest)
        except ChunkReadError as e:
            raise self._corrupt(f"{label} cannot be read: {e.reason}") from None
        if not whole:
            target[:] = dest[lo:hi]

    def _where(self, first: int) -> str:
        """The rows of the read piece that holds entry ``first`` (counted within the block)."""
        return self.wheres[min(int(np.searchsorted(self.bounds, first, side="right")) - 1, len(self.wheres) - 1)]

    def _guard(self, where: str, indices: np.ndarray, weights, electrons: int) -> None:
        """The read's last guards (:func:`_damage`) on entries of the rows ``where``."""
        problem = _damage(where, indices, weights, electrons, self.n_pixels)
        if problem:
            raise self._corrupt(problem)

    def decoded(self) -> Block:
        """The whole block decoded (fresh arrays, arrival times included): :meth:`rows` of all."""
        return self.rows(0, self.counts.shape[0])

    def rows(self, lo: int, hi: int) -> Block:
        """Its rows [``lo``, ``hi``) (counted within the block) as a decoded block of their own
        (fresh arrays, arrival times included): only the stored chunks that hold their entries
        are decoded, and guarded per read piece."""
        nx = self.counts.shape[1]
        ends = np.concatenate([[0], np.cumsum(self.entries.ravel(), dtype=np.int64)])
        a, z = int(ends[lo * nx]), int(ends[hi * nx])
        out = {}
        for name, enc in self.arrays.items():
            out[name] = np.empty(z - a, enc.reader.dtype)
            start = 0  # the block entry where chunk k's held part begins
            for k, (_, _, c_lo, c_hi, _) in enumerate(enc.chunks):
                m = c_hi - c_lo
                s, e = max(a, start), min(z, start + m)
                if s < e:
                    whole = (s, e) == (start, start + m)
                    part = out[name][s - a : e - a] if whole else _scratch(f"{name}-rows", m, enc.reader.dtype)
                    self._decode(name, k, part)
                    if not whole:
                        out[name][s - a : e - a] = part[s - start : e - start]
                start += m
        counts = self.counts.ravel()
        for j, where in enumerate(self.wheres):
            q0, q1 = max(self.positions[j], lo * nx), min(self.positions[j + 1], hi * nx)
            if q0 < q1:
                e0, e1 = int(ends[q0]) - a, int(ends[q1]) - a
                weights = None if "weights" not in out else out["weights"][e0:e1]
                self._guard(where, out["indices"][e0:e1], weights, int(counts[q0:q1].sum(dtype=np.int64)))
        return Block(self.index, self.row_start + lo, self.counts[lo:hi], out["indices"], out.get("toa"),
                     out.get("weights"), None if self.entry_counts is None else self.entry_counts[lo:hi])

    def pieces(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray | None]]:
        """(p0, p1, entries per position, indices, weights) for consecutive ranges of whole
        positions [p0, p1), a stored chunk's worth of entries each: every chunk is decoded once,
        after the previous one's unfinished position. The arrays are this thread's buffers, valid
        until the next piece: use them, do not keep them. Arrival times are not decoded."""
        entries = self.entries.ravel()
        ends = np.cumsum(entries, dtype=np.int64)
        counts = self.counts.ravel()
        names = ("indices", "weights") if self.weighted else ("indices",)
        n_chunks = len(self.arrays["indices"].chunks)
        if not n_chunks:
            empty = {name: np.zeros(0, self.arrays[name].reader.dtype) for name in names}
            self._guard(self.wheres[0], empty["indices"], empty.get("weights"), int(counts.sum(dtype=np.int64)))
            yield 0, entries.size, entries, empty["indices"], empty.get("weights")
            return
        buffers = _take_buffers()
        try:
            carry = done = p0 = 0  # entries decoded but not yet handed on; entries handed on; next position
            for k in range(n_chunks):
                _, _, lo, hi, _ = self.arrays["indices"].chunks[k]
                m = hi - lo
                for name in names:
                    buf = _grown(buffers, name, carry + m, self.arrays[name].reader.dtype)
                    self._decode(name, k, buf[carry : carry + m])
                avail = done + carry + m
                p1 = entries.size if k == n_chunks - 1 else int(np.searchsorted(ends, avail, side="right"))
                if p1 == p0:
                    carry += m
                    continue
                used = int(ends[p1 - 1]) - done
                indices = buffers["indices"][:used]
                weights = buffers["weights"][:used] if self.weighted else None
                self._guard(self._where(done), indices, weights, int(counts[p0:p1].sum(dtype=np.int64)))
                yield p0, p1, entries[p0:p1], indices, weights
                for name in names:  # the unfinished position's entries to the front
                    buffers[name][: carry + m - used] = buffers[name][used : carry + m]
                carry, done, p0 = carry + m - used, done + used, p1
        finally:
            _free_buffers().append(buffers)


def _free_buffers() -> list:
    """This thread's piece buffers not in use."""
    if not hasattr(_piece_buffers, "free"):
        _piece_buffers.free = []
    return _piece_buffers.free


def _take_buffers() -> dict:
    """A set of piece buffers for one :meth:`EncodedBlock.pieces` walk (this thread's, reused)."""
    free = _free_buffers()
    return free.pop() if free else {}


def _grown(buffers: dict, name: str, n: int, dtype) -> np.ndarray:
    """``buffers[name]`` of at least ``n`` elements of ``dtype``, its contents kept."""
    buf = buffers.get(name)
    if buf is None or buf.size < n or buf.dtype != dtype:
        new = np.empty(max(n, 2 * (0 if buf is None else buf.size)), dtype)
        if buf is not None and buf.dtype == dtype:
            new[: buf.size] = buf
        buffers[name] = buf = new
    return buf


def _scratch(name: str, n: int, dtype) -> np.ndarray:
    """A scratch array of ``n`` elements of ``dtype`` kept per thread under ``name``."""
    if not hasattr(_piece_buffers, "scratch"):
        _piece_buffers.scratch = {}
    return _grown(_piece_buffers.scratch, name, n, dtype)[:n]


@sizeof.register(Block)
def _sizeof_block(block: Block) -> int:
    """Bytes a Block holds (dask's memory accounting; its default would count 56)."""
    return sum(a.nbytes for a in (block.counts, block.indices, block.toa, block.weights, block.entry_counts)
               if a is not None)


@sizeof.register(EncodedBlock)
def _sizeof_encoded(block: EncodedBlock) -> int:
    held = sum(body.nbytes for enc in block.arrays.values() for _, body, *_ in enc.chunks if body is not None)
    return held + block.counts.nbytes + (0 if block.entry_counts is None else block.entry_counts.nbytes)


def index_dtype_for(detector_shape: tuple[int, int]) -> np.dtype:
    """The smallest unsigned dtype that holds every linear index of the detector."""
    n = int(detector_shape[0]) * int(detector_shape[1])
    return np.dtype(np.uint16) if n <= 1 << 16 else np.dtype(np.uint32)


def block_crc(counts: np.ndarray, indices: np.ndarray, toa: np.ndarray | None) -> int:
    """The version-1 block record: zlib CRC-32 of the decoded counts (uint32), indices and toa
    (uint32), native byte order."""
    crc = zlib.crc32(np.ascontiguousarray(counts, dtype=np.uint32))
    crc = zlib.crc32(np.ascontiguousarray(indices), crc)
    if toa is not None:
        crc = zlib.crc32(np.ascontiguousarray(toa, dtype=np.uint32), crc)
    return crc


def layout_sha256(attrs: dict) -> str:
    """SHA-256 of the :data:`LAYOUT_ATTRS` present in ``attrs`` (canonical JSON)."""
    doc = {k: attrs[k] for k in LAYOUT_ATTRS if k in attrs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _compressors(version: int) -> list:
    """Blosc lz4, then (version ≥ 2) a CRC-32C of the compressed bytes, checked before decoding."""
    blosc = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")
    return [blosc, Crc32cCodec()] if version >= 2 else [blosc]


class EventStore:
    """Handle on an event store. Create with :func:`create_store`, open with :func:`open_store`."""

    def __init__(self, path: str | os.PathLike, group: zarr.Group, writable: bool):
        self.path = Path(path)
        self._group = group
        self.writable = writable
        attrs = dict(group.attrs)
        self.attrs = attrs
        self.version = int(attrs.get("format_version", 1))
        try:
            self.scan_shape: tuple[int, int] = check_shape("scan_shape", attrs["scan_shape"])
            self.detector_shape: tuple[int, int] = check_shape("detector_shape", attrs["detector_shape"])
            self.rows_per_block: int = int(attrs["rows_per_block"])
            self.cap: int = int(attrs["cap"])
            self.index_dtype = np.dtype(attrs["index_dtype"])
            self._counts = group["counts"]
            self._indices = group["indices"]
            self._crc = group["block_crc"]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptStoreError(
                f"{self.path}: damaged store metadata ({type(e).__name__}: {e}); {_REMEDY}"
            ) from None
        self.has_toa: bool = bool(attrs.get("has_toa", False))
        self._toa = group["toa"] if self.has_toa and "toa" in group else None
        self.encoding: str = attrs.get("encoding", "events")
        if self.encoding not in ENCODINGS:
            raise self._corrupt(f"unknown encoding {self.encoding!r} (known: {ENCODINGS})")
        self.weighted = self.encoding == "weighted"
        self.weight_dtype = np.dtype(attrs["weight_dtype"]) if self.weighted else None
        self._weights = group["weights"] if self.weighted and "weights" in group else None
        self._entries = group["entries"] if self.weighted and "entries" in group else None
        self._check_layout()
        #: Direct chunk readers of the arrays (None: read through zarr), see :mod:`stemdask.chunk_reads`.
        self._direct = {arr.basename: DirectChunks.of(arr, self.path / arr.basename)
                        for arr in (self._counts, self._entries, self._crc, self._indices, self._toa, self._weights)
                        if arr is not None}

    def _corrupt(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.path}: {what}; {_REMEDY}")

    def _check_layout(self) -> None:
        """The layout attrs against their checksum (version ≥ 2) and against the arrays'
        own metadata (every version): a mismatch would make reads land in the wrong slots."""
        recorded = self.attrs.get("layout_sha256")
        if self.version >= 2 and recorded != layout_sha256(self.attrs):
            changed = "missing" if recorded is None else "does not match"
            raise self._corrupt(
                f"the layout attrs {list(LAYOUT_ATTRS)} were edited or damaged (their checksum layout_sha256 {changed})"
            )
        ny, nx = self.scan_shape
        rpb, cap = self.rows_per_block, self.cap
        if not 1 <= rpb <= ny:
            raise self._corrupt(f"rows_per_block {rpb} outside 1..{ny}")
        expect = {"counts": ((ny, nx), (rpb, nx), np.dtype(np.uint32)),
                  "indices": ((self.n_blocks * cap,), None, index_dtype_for(self.detector_shape)),
                  "block_crc": ((self.n_blocks,), (1,), np.dtype(np.uint32))}
        if self.has_toa:
            if self._toa is None:
                raise self._corrupt("attrs say has_toa but the array toa is missing")
            expect["toa"] = ((self.n_blocks * cap,), None, np.dtype(np.uint32))
        if self.weighted:
            if self._weights is None or self._entries is None:
                raise self._corrupt("attrs say encoding 'weighted' but the array weights or entries is missing")
            expect["weights"] = ((self.n_blocks * cap,), None, self.weight_dtype)
            expect["entries"] = expect["counts"]
        if self.index_dtype != expect["indices"][2]:
            raise self._corrupt(f"index_dtype {self.index_dtype} is not the one for a {self.detector_shape} detector")
        for name, (shape, chunks, dtype) in expect.items():
            arr = self._group[name]
            if arr.shape != shape or (chunks and arr.chunks != chunks) or arr.dtype != dtype:
                raise self._corrupt(
                    f"array {name} is {arr.dtype} shape {arr.shape} chunks {arr.chunks}, but the "
                    f"attrs (scan, detector, rows_per_block, cap) imply {dtype} shape {shape}"
                )
            if self.version >= 2 and not any(isinstance(c, Crc32cCodec) for c in arr.metadata.codecs):
                raise self._corrupt(f"array {name} has lost its crc32c codec (its metadata were edited)")
            if name in ("indices", "toa", "weights") and cap % arr.chunks[0]:
                raise self._corrupt(f"cap {cap} is not a multiple of the {name} chunk length {arr.chunks[0]}")

    # ------------------------------------------------------------------ geometry
    @property
    def n_blocks(self) -> int:
        return math.ceil(self.scan_shape[0] / self.rows_per_block)

    def block_rows(self, b: int) -> tuple[int, int]:
        """Scan rows ``[r0, r1)`` of row block ``b``."""
        if not 0 <= b < self.n_blocks:
            raise IndexError(f"{self.path}: row block {b} out of range 0..{self.n_blocks - 1}")
        r0 = b * self.rows_per_block
        return r0, min(r0 + self.rows_per_block, self.scan_shape[0])

    @property
    def calibration(self) -> Calibration:
        return Calibration.from_dict(self.attrs["calibration"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def n_events(self) -> int:
        """Total events (recorded at finalize; summed from committed blocks otherwise)."""
        if "n_events" in self.attrs:
            return int(self.attrs["n_events"])
        c = self._counts[...]
        return int(c[c != UNWRITTEN].sum(dtype=np.int64))

    @property
    def n_entries(self) -> int:
        """Stored entries of the committed blocks: electrons (events), counted pixels (weighted)
        (recorded at finalize; summed from committed blocks otherwise)."""
        if not self.weighted:
            return self.n_events
        if "n_entries" in self.attrs:
            return int(self.attrs["n_entries"])
        c = self._entries[...]
        return int(c[c != UNWRITTEN].sum(dtype=np.int64))

    @property
    def provenance(self) -> dict:
        return dict(self.attrs.get("provenance", {}))

    # ------------------------------------------------------------------ writing
    def committed_blocks(self) -> np.ndarray:
        """Boolean (n_blocks,): which row blocks carry their commit mark."""
        c = self._counts[...]
        return np.array([not np.any(c[slice(*self.block_rows(b))] == UNWRITTEN) for b in range(self.n_blocks)])

    def write_block(
        self,
        b: int,
        counts: np.ndarray,
        indices: np.ndarray,
        toa: np.ndarray | None = None,
        weights: np.ndarray | None = None,
    ) -> int:
        """Write row block ``b`` (idempotent): entry chunks first, then the ``counts`` commit mark.

        ``counts``: (rows, nx) entries per position (electrons, without ``weights``);
        ``indices``: the entries of those positions in scan order; ``weights`` (weighted
        stores only): the electrons of each entry. Returns the number of electrons written.
        Validates everything before touching the store.
        """
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        r0, r1 = self.block_rows(b)
        nx = self.scan_shape[1]
        entries = np.asarray(counts)
        if entries.shape != (r1 - r0, nx):
            raise InvalidParameter(
                f"{self.path}: block {b} counts has shape {entries.shape}, expected {(r1 - r0, nx)} "
                f"(rows {r0}..{r1} of a {self.scan_shape} scan)"
            )
        if entries.size and (entries.min() < 0):
            raise InvalidParameter(f"{self.path}: block {b} has negative counts")
        if entries.size and entries.max() > MAX_PER_POSITION:
            raise InvalidParameter(f"{self.path}: block {b} has more than {MAX_PER_POSITION} entries at one position")
        entries = entries.astype(np.uint32)
        n = int(entries.sum(dtype=np.int64))
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.size != n:
            raise InvalidParameter(f"{self.path}: block {b} has {indices.size} indices but counts sum to {n}")
        n_pix = self.detector_shape[0] * self.detector_shape[1]
        if n:
            lo, hi = int(indices.min()), int(indices.max())
            if lo < 0 or hi >= n_pix:
                bad = hi if hi >= n_pix else lo
                raise InvalidParameter(
                    f"{self.path}: block {b} has detector index {bad} outside the "
                    f"{self.detector_shape[0]}×{self.detector_shape[1]} detector (0..{n_pix - 1})"
                )
        if n > self.cap:
            raise InvalidParameter(
                f"{self.path}: block {b} has {n} entries, more than its slot of {self.cap}"
                + ("" if self.version >= 3 else " (a version-2 store's per-position cap)")
            )
        indices = indices.astype(self.index_dtype, copy=False)
        if self.has_toa:
            if toa is None or np.shape(toa) != (n,):
                raise InvalidParameter(f"{self.path}: store has arrival times; block {b} needs toa of length {n}")
            toa = np.asarray(toa).astype(np.uint32, copy=False)
        elif toa is not None:
            raise InvalidParameter(f"{self.path}: store was created without arrival times (has_toa=False)")
        electrons = entries
        if self.weighted:
            weights = self._checked_weights(b, weights, n)
            electrons = position_sums(entries.ravel(), weights).reshape(entries.shape)
            if electrons.size and electrons.max() > MAX_PER_POSITION:
                raise InvalidParameter(
                    f"{self.path}: block {b} has more than {MAX_PER_POSITION} electrons at one position"
                )
            electrons = electrons.astype(np.uint32)
        elif weights is not None:
            raise InvalidParameter(f"{self.path}: store has encoding 'events' (one entry per electron): no weights")
        start = b * self.cap
        if n:
            self._indices[start : start + n] = indices
            if toa is not None:
                self._toa[start : start + n] = toa
            if self.weighted:
                self._weights[start : start + n] = weights
        if self.weighted:
            self._entries[r0:r1] = entries
        record = (
            self.block_record(b, electrons, n, entries if self.weighted else None)
            if self.version >= 2
            else block_crc(electrons, indices, toa)
        )
        self._crc[b : b + 1] = np.array([record], dtype=np.uint32)
        self._counts[r0:r1] = electrons  # commit mark: last
        return int(electrons.sum(dtype=np.int64))

    def _checked_weights(self, b: int, weights, n: int) -> np.ndarray:
        """``weights`` of block ``b`` as ``weight_dtype``: n non-negative whole numbers that fit it."""
        if weights is None or np.shape(weights) != (n,):
            raise InvalidParameter(f"{self.path}: a weighted store needs the weights of block {b}'s {n} entries")
        weights = np.asarray(weights)
        top = np.iinfo(self.weight_dtype).max
        if n and (weights.min() < 0 or weights.max() > top):
            raise InvalidParameter(f"{self.path}: block {b} has a weight outside 0..{top} ({self.weight_dtype})")
        if weights.dtype.kind == "f" and n and not np.array_equal(weights, np.round(weights)):
            raise InvalidParameter(f"{self.path}: block {b} has weights that are not whole numbers")
        return weights.astype(self.weight_dtype, copy=False)

    def finalize(self, **provenance) -> "EventStore":
        """Check every block is committed, record totals + provenance, mark ``complete``."""
        if not self.writable:
            raise StoreError(f"{self.path}: opened read-only")
        done = self.committed_blocks()
        if not done.all():
            missing = np.flatnonzero(~done)
            raise IncompleteStoreError(
                f"{self.path}: cannot finalize, {missing.size} of {self.n_blocks} row blocks not written "
                f"(first: {missing[:5].tolist()})"
            )
        counts = self._counts[...]
        prov = dict(self.attrs.get("provenance", {}))
        prov.update(provenance)
        layout = {**self.attrs, "n_events": int(counts.sum(dtype=np.int64)), "complete": True}
        n_entries = int(self._entries[...].sum(dtype=np.int64)) if self.weighted else layout["n_events"]
        self._set_attrs(n_events=layout["n_events"], n_entries=n_entries, provenance=prov, complete=True,
                        layout_sha256=layout_sha256(layout))
        return self

    def set_calibration(self, calibration: Calibration) -> None:
        """Store a new calibration (e.g. after :mod:`stemdask.calibrate`)."""
        self._set_attrs(calibration=calibration.to_dict())

    def set_detector_mask(self, mask: np.ndarray | None, fill: np.ndarray | None) -> None:
        """Store the detector mask (bool (det_y, det_x), True = excluded pixel) and its fill
        weights (see :mod:`stemdask.reductions`) as arrays ``detector_mask`` / ``mask_fill``;
        ``None`` removes them. Part of the calibration: write it with :meth:`set_calibration`."""
        grp = self._group if self.writable else zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        for name in (MASK, MASK_FILL):
            if name in grp:
                del grp[name]
        if mask is not None:
            shape = self.detector_shape
            for name, data, dtype in ((MASK, mask, "uint8"), (MASK_FILL, fill, "float64")):
                arr = grp.create_array(
                    name, shape=shape, chunks=shape, dtype=dtype, fill_value=0, compressors=_compressors(self.version)
                )
                arr[...] = np.asarray(data).astype(dtype)
        self._set_attrs(has_detector_mask=mask is not None)

    def detector_mask(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(mask bool, fill float64) of :meth:`set_detector_mask`, or (None, None)."""
        if not self.attrs.get("has_detector_mask", False):
            return None, None
        grp = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        return grp[MASK][...].astype(bool), grp[MASK_FILL][...]

    def _set_attrs(self, **kv) -> None:
        """Update group attrs, then refresh the consolidated metadata readers open."""
        grp = self._group if self.writable else zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        grp.attrs.update(kv)
        self.attrs.update(json.loads(json.dumps(kv)))
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            zarr.consolidate_metadata(str(self.path))

    # ------------------------------------------------------------------ reading
    def read_block(self, b: int, rows: tuple[int, int] | None = None) -> Block:
        """Events of row block ``b``, verified (see the module docstring, "Integrity"); with
        ``rows`` = (lo, hi) (absolute scan rows within the block) only those rows' entries are
        read and decoded — the block's counts give their offsets, and the block's record is
        still checked as a whole.

        Raises :class:`IncompleteStoreError` if the block is not committed (in an incomplete
        store) and :class:`CorruptStoreError` naming the array and chunk if anything fails.
        """
        r0, r1 = self.block_rows(b)
        return self.read_rows([(b, *(rows or (r0, r1)))], b)

    def read_rows(self, pieces, index: int, encoded: bool = False) -> "Block | EncodedBlock":
        """Rows of one or more row blocks, ``pieces`` = [(block, first row, end row), ...]
        (absolute, consecutive), as one :class:`Block` numbered ``index``: each piece verified as
        :meth:`read_block` does, the entries of all pieces decoded straight into one buffer per
        array (no concatenation). ``encoded``: an :class:`EncodedBlock` instead — the entry
        chunks read and checked, not decoded — where every entry array is read directly."""
        heads = [self._head(b, lo, hi) for b, lo, hi in pieces]
        bounds = np.cumsum([0] + [h[3] for h in heads])
        entry_arrays = [a for a in (self._indices, self._toa, self._weights) if a is not None]
        readers = [self._direct.get(a.basename) for a in entry_arrays]
        if encoded and all(r is not None and r.length == readers[0].length for r in readers):  # chunks in step
            return self._encoded(pieces, heads, bounds, index, entry_arrays)
        arrays = {}
        for arr in (self._indices, self._toa, self._weights):
            if arr is None:
                continue
            out = np.empty(bounds[-1], arr.dtype)
            for (b, _, _), (_, _, start, n, where), pos in zip(pieces, heads, bounds):
                got = self._read_entries(arr, b, start, n, out[pos : pos + n])
                if got != n:
                    raise self._corrupt(f"{where}: counts sum to {n} entries but only {got} {arr.basename} are stored")
            arrays[arr.basename] = out
        indices, weights = arrays["indices"], arrays.get("weights")
        n_pix = self.detector_shape[0] * self.detector_shape[1]
        for (counts, _, _, n, where), pos in zip(heads, bounds):  # the last guards, per piece
            problem = _damage(where, indices[pos : pos + n], None if weights is None else weights[pos : pos + n],
                              int(counts.sum(dtype=np.int64)), n_pix)
            if problem:
                raise self._corrupt(problem)
        return Block(index, pieces[0][1], _joined(heads, 0), indices, arrays.get("toa"), weights,
                     _joined(heads, 1) if self.weighted else None)

    def _encoded(self, pieces, heads, bounds, index: int, entry_arrays) -> EncodedBlock:
        """:meth:`read_rows`'s EncodedBlock: each piece's entry chunks read and checked."""
        arrays = {}
        for arr in entry_arrays:
            reader, name = self._direct[arr.basename], arr.basename
            length = reader.length
            chunks = []
            for (b, _, _), (_, _, start, n, _) in zip(pieces, heads):
                for i in range(start // length, (start + n - 1) // length + 1) if n else ():
                    try:
                        body = reader.body(i, fresh=True)
                    except ChunkReadError as e:
                        raise self._unreadable(name, e.chunk, b, e.reason) from None
                    lo, hi = max(start, i * length) - i * length, min(start + n, (i + 1) * length) - i * length
                    chunks.append((i, body, lo, hi, self._chunk_label(name, i, b)))
            arrays[name] = _EncodedArray(reader, tuple(chunks))
        positions = tuple(int(x) for x in np.cumsum([0] + [h[0].size for h in heads]))
        return EncodedBlock(index, pieces[0][1], _joined(heads, 0), _joined(heads, 1) if self.weighted else None,
                            arrays, tuple(int(x) for x in bounds), positions, tuple(h[4] for h in heads),
                            self.detector_shape[0] * self.detector_shape[1], str(self.path))

    def _head(self, b: int, lo: int, hi: int) -> tuple:
        """Row block ``b``'s counts checked (committed, within its slot, its record) and cut to
        rows [lo, hi): (counts, entries, first entry, entries, where)."""
        r0, r1 = self.block_rows(b)
        if not r0 <= lo < hi <= r1:
            raise IndexError(f"{self.path}: rows {lo}..{hi - 1} are not within row block {b} (rows {r0}..{r1 - 1})")
        where = f"row block {b} (rows {r0}..{r1 - 1})"
        counts = self._read(self._counts, b, slice(r0, r1))
        if np.any(counts == UNWRITTEN):
            if not self.complete:
                raise IncompleteStoreError(f"{self.path}: {where} was never written")
            raise self._corrupt(
                f"counts chunk {self._chunk_key('counts', b)} ({where}) is missing from a complete store"
            )
        entries = self._read(self._entries, b, slice(r0, r1)) if self.weighted else counts
        if self.weighted and np.any(entries == UNWRITTEN):
            raise self._corrupt(f"entries chunk {self._chunk_key('entries', b)} ({where}) is missing")
        n = int(entries.sum(dtype=np.int64))
        if n > self.cap:
            name = "entries" if self.weighted else "counts"
            raise self._corrupt(
                f"{name} chunk {self._chunk_key(name, b)} ({where}) sums to {n} entries, "
                f"more than the block's slot of {self.cap}"
            )
        if self.version >= 2:
            stored = int(self._read(self._crc, b, slice(b, b + 1))[0])
            if self.block_record(b, counts, n, entries if self.weighted else None) != stored:
                raise self._corrupt(self._explain_crc_mismatch(b, n))
        if (lo, hi) == (r0, r1):
            return counts, entries, b * self.cap, n, where
        start = b * self.cap + int(entries[: lo - r0].sum(dtype=np.int64))
        counts, entries = counts[lo - r0 : hi - r0], entries[lo - r0 : hi - r0]
        return counts, entries, start, int(entries.sum(dtype=np.int64)), f"rows {lo}..{hi - 1} of {where}"

    def _chunk_key(self, name: str, i: int) -> str:
        """``array/c/...`` key of chunk ``i`` (along the first axis) of array ``name``."""
        return f"{name}/c/{i}/0" if name in ("counts", "entries") else f"{name}/c/{i}"

    @property
    def _entry_arrays(self) -> tuple[str, ...]:
        """Names of the 1-D arrays that share the entry slots, in record order."""
        return ("indices",) + (("toa",) if self.has_toa else ()) + (("weights",) if self.weighted else ())

    def _event_chunks(self, b: int, n: int) -> list[tuple[str, int]]:
        """(array, chunk number) of the ``indices`` (then ``toa``, ``weights``) chunks holding
        the ``n`` entries of row block ``b``, in order."""
        if not n:
            return []
        length = self._indices.chunks[0]
        first, last = b * self.cap // length, (b * self.cap + n - 1) // length
        names = self._entry_arrays
        return [(name, i) for name in names for i in range(first, last + 1)]

    def block_record(self, b: int, counts: np.ndarray, n: int, entries: np.ndarray | None = None) -> int:
        """Version ≥ 2 record of row block ``b``: CRC-32C of its ``counts`` (uint32, native
        order; then, weighted, its ``entries``) extended with the last 4 bytes — zarr's
        CRC-32C of the chunk — of each of its entry chunk files, or 4 zero bytes for a chunk
        with no file (zarr does not write a chunk that is all fill value, and reading it
        gives exactly that). Reads only those trailers; a truncated chunk file raises."""
        r0, r1 = self.block_rows(b)
        crc = google_crc32c.value(np.ascontiguousarray(counts, dtype=np.uint32))
        if entries is not None:
            crc = google_crc32c.extend(crc, np.ascontiguousarray(entries, dtype=np.uint32))
        for name, i in self._event_chunks(b, n):
            key = self._chunk_key(name, i)
            try:
                with open(self.path / key, "rb") as f:
                    f.seek(-4, os.SEEK_END)
                    trailer = f.read(4)
            except FileNotFoundError:
                trailer = _NO_CHUNK
            except OSError:
                raise self._corrupt(f"chunk {key} of row block {b} (rows {r0}..{r1 - 1}) is truncated") from None
            crc = google_crc32c.extend(crc, trailer)
        return crc

    def _read_entries(self, arr, b: int, start: int, n: int, out: np.ndarray) -> int:
        """Entries ``[start, start + n)`` of an entry array, for row block ``b``, into ``out``
        (n elements): decoded there directly where the layout allows
        (:mod:`stemdask.chunk_reads`), else read through zarr; returns how many were stored."""
        if self._direct.get(arr.basename) is not None:
            self._read(arr, b, slice(start, start + n), out)
            return n
        data = self._read(arr, b, slice(start, start + n))
        out[: data.size] = data[: out.size]
        return data.size

    def _read(self, arr, b: int, sel: slice, out: np.ndarray | None = None) -> np.ndarray:
        """``arr[sel]`` (whole rows of a 2-D array) for row block ``b``, decoded directly where
        the layout allows (into ``out`` when given), else through zarr; a damaged chunk raises
        :class:`CorruptStoreError` naming it."""
        direct = self._direct.get(arr.basename)
        if direct is not None:
            row = math.prod(arr.shape[1:])
            try:
                flat = direct.read(sel.start * row, sel.stop * row, out)
            except ChunkReadError as e:
                raise self._unreadable(arr.basename, e.chunk, b, e.reason) from None
            return flat.reshape((-1, *arr.shape[1:]))
        try:
            return arr[sel]
        except (RuntimeError, ValueError, OSError) as e:  # a chunk's checksum or decoder failed
            length = arr.chunks[0]
            bad = sel.start // length
            for i in range(sel.start // length, max(sel.start, sel.stop - 1) // length + 1):
                try:
                    arr[i * length : (i + 1) * length]
                except (RuntimeError, ValueError, OSError):
                    bad = i
                    break
            reason = (
                "its CRC-32C does not match its bytes (damaged or truncated)"
                if "checksum" in str(e)
                else f"{type(e).__name__}: {e}"
            )
            raise self._unreadable(arr.basename, bad, b, reason) from e

    def _unreadable(self, name: str, chunk: int, b: int, reason: str) -> CorruptStoreError:
        return self._corrupt(f"{self._chunk_label(name, chunk, b)} cannot be read: {reason}")

    def _chunk_label(self, name: str, chunk: int, b: int) -> str:
        """``indices chunk indices/c/12 of row block 3 (rows 96..127)``: a chunk, for errors."""
        r0, r1 = self.block_rows(b)
        return f"{name} chunk {self._chunk_key(name, chunk)} of row block {b} (rows {r0}..{r1 - 1})"

    def _explain_crc_mismatch(self, b: int, n: int) -> str:
        """Why block ``b``'s record does not match (the failure path only): a missing record
        chunk, a missing event chunk, else the first chunk that fails its own checksum (raised
        from :meth:`_read`), else a chunk replaced by another valid one."""
        r0, r1 = self.block_rows(b)
        record = self._chunk_key("block_crc", b)
        if not (self.path / record).is_file():
            return f"chunk {record} (the record of row block {b}, rows {r0}..{r1 - 1}) is missing (deleted?)"
        keys = [self._chunk_key(name, i) for name, i in self._event_chunks(b, n)]
        present = [(self.path / key).is_file() for key in keys]
        missing = [key for key, ok in zip(keys, present) if not ok]
        per_array = len(keys) // len(self._entry_arrays)  # the indices chunks come first
        last = max((k for k in range(per_array) if present[k]), default=-1)
        if per_array - 1 - last > 1:  # far more entries than chunks: the counts, not the chunks
            name = "entries" if self.weighted else "counts"
            return (
                f"{name} chunk {self._chunk_key(name, b)} (row block {b}, rows {r0}..{r1 - 1}) sums to {n} "
                f"entries, more than its entry chunks hold ({per_array - 1 - last} chunks from "
                f"{keys[last + 1]} on are absent): the counts are damaged, or those chunks were deleted"
            )
        if missing:
            return f"chunk {', '.join(missing)} of row block {b} (rows {r0}..{r1 - 1}) is missing (deleted?)"
        start = b * self.cap
        for name in self._entry_arrays:
            self._read(self._group[name], b, slice(start, start + n))
        heads = [("counts", b), ("block_crc", b)] + ([("entries", b)] if self.weighted else [])
        keys = [self._chunk_key(name, i) for name, i in [*heads, *self._event_chunks(b, n)]]
        return (
            f"row block {b} (rows {r0}..{r1 - 1}) fails its checksum: one of its chunks "
            f"{', '.join(keys)} was replaced, swapped with another block's or changed"
        )

    def iter_blocks(self) -> Iterator[Block]:
        for b in range(self.n_blocks):
            yield self.read_block(b)

    def counts(self) -> np.ndarray:
        """Events per position (ny, nx) uint32 (requires a complete store)."""
        c = self._counts[...]
        if np.any(c == UNWRITTEN):
            raise IncompleteStoreError(f"{self.path}: some row blocks were never written")
        return c

    def to_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """All events as (indices, offsets) CSR, one index per electron (weighted entries
        repeated) — the whole dataset in memory; an exporter."""
        blocks = list(self.iter_blocks())
        indices = (
            np.concatenate(
                [blk.indices if blk.weights is None else np.repeat(blk.indices, blk.weights) for blk in blocks]
            )
            if blocks
            else np.empty(0, self.index_dtype)
        )
        offsets = np.zeros(self.scan_shape[0] * self.scan_shape[1] + 1, np.int64)
        np.cumsum(np.concatenate([blk.counts.ravel() for blk in blocks]), out=offsets[1:])
        return indices, offsets

    def check(self, source_checksum: str | None = None) -> tuple[list[str], int]:
        """Every problem of the store, one line each, and the total of the readable blocks.

        Reads every block through :meth:`read_block`, recomputes version-1 block CRCs,
        compares the total with ``n_events`` and the provenance's ``source_events`` and, with
        ``source_checksum`` (the source's SHA-256, see
        :func:`stemdask.io.common.file_sha256`), the recorded source checksum.
        """
        problems, total = [], 0
        stored_crc = None
        for b in range(self.n_blocks):
            try:
                blk = self.read_block(b)
                if self.version < 2:
                    if stored_crc is None:
                        stored_crc = self._crc[...]
                    if block_crc(blk.counts, blk.indices, blk.toa) != int(stored_crc[b]):
                        raise self._corrupt(self._explain_crc_mismatch(b, blk.indices.size))
            except StoreError as e:
                problems.append(str(e))
                continue
            total += int(blk.counts.sum(dtype=np.int64))
        if not problems and "n_events" in self.attrs and total != int(self.attrs["n_events"]):
            problems.append(f"{self.path}: {total} events stored but {self.attrs['n_events']} recorded")
        prov = self.provenance
        if source_checksum is not None and prov.get("source_sha256") not in (None, source_checksum):
            problems.append(
                f"{self.path}: source checksum {source_checksum[:12]}… differs from the recorded "
                f"{prov['source_sha256'][:12]}… (not the file this store was made from, or it changed)"
            )
        source_total = prov.get("source_events")
        if not problems and source_total is not None and int(source_total) != total:
            problems.append(f"{self.path}: source had {source_total} events, store holds {total}")
        return problems, total

    def validate(self, source_checksum: str | None = None) -> dict:
        """:meth:`check`, raising :class:`CorruptStoreError` with every problem (one per line)
        if there is any; else a summary dict ``{n_events, blocks, ok}``."""
        problems, total = self.check(source_checksum)
        if problems:
            raise CorruptStoreError("\n".join(problems))
        return {"n_events": total, "blocks": self.n_blocks, "ok": True}

    def nbytes_stored(self) -> int:
        """Bytes the store occupies on disk."""
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    def __repr__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE"
        return (
            f"<EventStore {self.path} scan={self.scan_shape} detector={self.detector_shape} "
            f"rows_per_block={self.rows_per_block} {state}>"
        )


def check_shape(name: str, shape) -> tuple[int, int]:
    """``shape`` as two positive ints, else a ValueError naming ``name``."""
    try:
        s = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        raise InvalidParameter(f"{name} must be two positive integers, got {shape!r}") from None
    if len(s) != 2 or min(s) < 1:
        raise InvalidParameter(f"{name} must be two positive integers, got {shape!r}")
    return s


def create_store(
    path: str | os.PathLike,
    scan_shape,
    detector_shape,
    calibration: Calibration | None = None,
    *,
    rows_per_block: int | None = None,
    has_toa: bool = False,
    encoding: str = "events",
    weight_dtype="uint16",
    bytes_per_position: float | None = None,
    chunk_events: int = DEFAULT_CHUNK_EVENTS,
    provenance: dict | None = None,
    overwrite: bool = False,
    format_version: int = FORMAT_VERSION,
) -> EventStore:
    """Create an empty, writable (incomplete) store.

    ``encoding``: ``"events"`` (one entry per electron) or ``"weighted"`` (one entry per
    counted pixel, its count in ``weights`` of ``weight_dtype``: uint8, uint16 or uint32);
    weighted stores have no arrival times. ``rows_per_block`` defaults to
    :func:`default_rows_per_block` from ``bytes_per_position`` (the expected decoded entry
    bytes per position, when known). ``format_version`` 1 or 2 writes an older layout
    (events only; for compatibility tests and the no-verification baseline of the
    benchmarks). Refuses an existing path unless ``overwrite``.
    """
    path = Path(path)
    scan_shape = check_shape("scan_shape", scan_shape)
    detector_shape = check_shape("detector_shape", detector_shape)
    calibration = calibration or Calibration()
    if encoding not in ENCODINGS:
        raise InvalidParameter(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    weighted = encoding == "weighted"
    if weighted and (has_toa or format_version < 3):
        raise InvalidParameter("a weighted store (format version ≥ 3) has no arrival times")
    weight_dtype = np.dtype(weight_dtype)
    if weighted and weight_dtype not in (np.uint8, np.uint16, np.uint32):
        raise InvalidParameter(f"weight_dtype must be uint8, uint16 or uint32, got {weight_dtype}")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
        remove_zarr_output(path, FORMAT_NAME)
    ny, nx = scan_shape
    if rows_per_block is None:
        rows_per_block = default_rows_per_block(scan_shape, bytes_per_position)
    rows_per_block = int(rows_per_block)
    if not 1 <= rows_per_block:
        raise InvalidParameter(f"rows_per_block must be ≥ 1, got {rows_per_block}")
    rows_per_block = min(rows_per_block, ny)
    n_pixels = detector_shape[0] * detector_shape[1]
    if format_version >= 3:  # the most entries a position can hold: no per-position cap
        per_pos = n_pixels if weighted else MAX_PER_POSITION
    else:  # the older layouts' slot: 4 electrons per pixel on average, at least 65536
        per_pos = max(4 * n_pixels, 1 << 16)
    chunk_events = int(chunk_events)
    cap = math.ceil(rows_per_block * nx * per_pos / chunk_events) * chunk_events
    n_blocks = math.ceil(ny / rows_per_block)
    idx_dtype = index_dtype_for(detector_shape)

    group = zarr.open_group(str(path), mode="w-", zarr_format=3)
    per_position = ["counts", "entries"] if weighted else ["counts"]
    for name in per_position:
        group.create_array(
            name,
            shape=(ny, nx),
            chunks=(rows_per_block, nx),
            dtype="uint32",
            fill_value=int(UNWRITTEN),
            compressors=_compressors(format_version),
        )
    slotted = [("indices", idx_dtype)] + [("toa", "uint32")] * has_toa + [("weights", weight_dtype)] * weighted
    for name, dtype in slotted:
        group.create_array(
            name,
            shape=(n_blocks * cap,),
            chunks=(chunk_events,),
            dtype=dtype,
            fill_value=0,
            compressors=_compressors(format_version),
        )
    group.create_array("block_crc", shape=(n_blocks,), chunks=(1,), dtype="uint32", fill_value=0,
                       compressors=[Crc32cCodec()] if format_version >= 2 else "auto")
    attrs = {
        "format": FORMAT_NAME,
        "format_version": int(format_version),
        "scan_shape": list(scan_shape),
        "detector_shape": list(detector_shape),
        "rows_per_block": rows_per_block,
        "cap": cap,
        "index_dtype": idx_dtype.name,
        "has_toa": bool(has_toa),
        "calibration": calibration.to_dict(),
        "provenance": dict(provenance or {}),
        "complete": False,
    }
    if format_version >= 3:
        attrs["encoding"] = encoding
        attrs["weight_dtype"] = weight_dtype.name if weighted else None
    if format_version >= 2:
        attrs["layout_sha256"] = layout_sha256(attrs)
    group.attrs.update(attrs)
    return EventStore(path, group, writable=True)


def check_replaceable(path: Path, expected_format: str | None = None) -> None:
    """Refuse to replace ``path`` unless it is a Zarr group (and, with ``expected_format``,
    one of that stemdask format), so an --overwrite never deletes input data or an unrelated
    folder."""
    path = Path(path)
    meta = path / "zarr.json"
    if not (path.is_dir() and meta.is_file()):
        raise FileExistsError(f"{path} exists and is not a Zarr store; refusing to delete it (remove it yourself)")
    if expected_format is not None:
        try:
            fmt = json.loads(meta.read_text()).get("attributes", {}).get("format")
        except ValueError:
            fmt = None
        if fmt != expected_format:
            raise FileExistsError(f"{path} is a Zarr store but not a {expected_format} store; refusing to replace it")


def remove_zarr_output(path: Path, expected_format: str | None = None) -> None:
    """Delete an existing output before it is replaced, after :func:`check_replaceable`."""
    check_replaceable(path, expected_format)
    shutil.rmtree(path)


def default_rows_per_block(scan_shape, bytes_per_position: float | None = None) -> int:
    """Rows per block: as many as keep the block's decoded entries near :data:`BLOCK_BYTES`
    (64 MiB: big enough that a task's fixed cost — open, checksum, schedule, ≈ ms — is noise
    next to reading it, small enough that each worker thread holds a few blocks and their
    products well within 1 GB), and never more than :data:`MAX_BLOCK_POSITIONS` positions
    (per-position outputs, such as densified patterns, grow with positions, not bytes);
    at least one row. Without ``bytes_per_position``, the position limit alone (e.g. 32 rows
    of a 512-wide scan)."""
    ny, nx = scan_shape
    rows = max(1, MAX_BLOCK_POSITIONS // max(nx, 1))
    if bytes_per_position:
        rows = min(rows, max(1, int(BLOCK_BYTES // (float(bytes_per_position) * nx))))
    return max(1, min(ny, rows))


def _read_group_attrs(path: Path) -> tuple[zarr.Group, dict]:
    if not path.exists():
        raise StoreError(f"{path}: no such store")
    if path.is_file():
        raise StoreError(
            f"{path}: a file, not a store (a store is a .zarr folder; `stemdask ingest` makes one from a detector file)"
        )
    if not (path / "zarr.json").is_file():
        raise StoreError(f"{path}: not a stemdask store (a folder without zarr.json)")
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:  # zarr raises several kinds for "not a group" / unreadable metadata
        raise StoreError(f"{path}: not a stemdask store (its zarr.json is not that of a Zarr v3 group)") from None
    return group, dict(group.attrs)


#: Read-only handles reused by read tasks: (resolved path, allow_incomplete) → (stamp, handle).
_READ_HANDLES: dict[tuple[str, bool], tuple[tuple, "EventStore"]] = {}
_READ_HANDLES_KEPT = 8
_READ_HANDLES_LOCK = threading.Lock()


def _metadata_stamp(root: Path) -> tuple:
    """The store's group ``zarr.json`` bytes (its attrs and consolidated metadata) and the
    (size, mtime, inode) of each array's own ``zarr.json``: any edit changes it."""
    arrays = []
    for child in sorted(root.iterdir()):
        try:
            st = (child / "zarr.json").stat()
        except (FileNotFoundError, NotADirectoryError):
            continue
        arrays.append((child.name, st.st_size, st.st_mtime_ns, st.st_ino))
    return (root / "zarr.json").read_bytes(), tuple(arrays)


def read_handle(path: str | os.PathLike, *, allow_incomplete: bool = False) -> EventStore:
    """:func:`open_store` for read tasks: one read-only handle per store and process, reused
    while the store's metadata is the same (:func:`_metadata_stamp`) — opening costs
    milliseconds (zarr metadata, the layout checks), which a read task of tens of milliseconds
    should not pay each time. Every read still reads and checks its chunks afresh."""
    root = Path(path).resolve()
    try:
        stamp = _metadata_stamp(root)
    except OSError:
        return open_store(path, allow_incomplete=allow_incomplete)  # its own clear error
    key = (str(root), allow_incomplete)
    with _READ_HANDLES_LOCK:
        kept = _READ_HANDLES.get(key)
    if kept is not None and kept[0] == stamp:
        return kept[1]
    store = open_store(root, allow_incomplete=allow_incomplete)
    with _READ_HANDLES_LOCK:
        if key not in _READ_HANDLES and len(_READ_HANDLES) >= _READ_HANDLES_KEPT:
            _READ_HANDLES.pop(next(iter(_READ_HANDLES)))
        _READ_HANDLES[key] = (stamp, store)
    return store


def open_store(path: str | os.PathLike, *, allow_incomplete: bool = False, mode: str = "r") -> EventStore:
    """Open a store. Refuses an incomplete store (an interrupted ingest) unless asked."""
    path = Path(path)
    group, attrs = _read_group_attrs(path)
    if attrs.get("format") != FORMAT_NAME:
        raise StoreError(f"{path}: not a stemdask event store (format attr {attrs.get('format')!r})")
    version = int(attrs.get("format_version", -1))
    if version > FORMAT_VERSION:
        raise StoreError(
            f"{path}: store format version {version} is newer than this stemdask supports "
            f"({FORMAT_VERSION}); upgrade stemdask"
        )
    if version < 1:
        raise StoreError(f"{path}: unknown store format version {version}")
    if not attrs.get("complete", False) and not allow_incomplete:
        raise IncompleteStoreError(
            f"{path}: store is incomplete (its ingest was interrupted or is still running); "
            f"resume the ingest, or open with allow_incomplete=True"
        )
    if mode != "r":
        group = zarr.open_group(str(path), mode="r+", use_consolidated=False)
    return EventStore(path, group, writable=(mode != "r"))
