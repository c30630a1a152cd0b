"""Quantum Detectors MerlinEM (Medipix3) frames: the acquisition header, frame headers, pixel data.

The same bytes appear in a ``.mib`` file (frames back to back, the acquisition header in a
``.hdr`` file beside it) and on the Merlin's TCP data socket, where every message is framed
as ``MPX,<10-digit length>,<payload>`` (the length counts the payload plus the comma before
it) and the first message is the acquisition header. This module only parses and decodes;
the socket client is :mod:`stemdask.live_sources`.

* Acquisition header (``HDR,`` …): tab-separated ``key:\\tvalue`` lines up to ``End``;
  :class:`AcquisitionHeader` keeps them all and names the few a reader checks (frames in
  the acquisition, counter depth, chip assembly).
* Frame header (``MQ1,`` …, 384 bytes for one chip, 768 for a quad): comma-separated
  fields — sequence number, header length, chips, width, height, pixel type (``U08``,
  ``U16``, ``U32``: processed; ``R64``: RAW), sensor layout (``1x1``, ``2x2``), … and,
  after the ``MQ1A`` marker, the counter depth (1, 6, 12 or 24 bit). See :class:`FrameHeader`.
* Pixel data, processed: big-endian ``u1``/``u2``/``u4`` per pixel (1- and 6-bit counters are
  ``U08``), row-major, a quad already assembled into 512 × 512.
* Pixel data, RAW (``R64``): the chips' readout order in 64-bit words — 1-bit counters pack
  8 pixels a byte, least significant bit first, with the 8 bytes of each word reversed;
  6- and 12-bit counters take 1 or 2 bytes a pixel (big-endian), the 8 or 4 pixels of each
  word reversed. A quad's RAW frame is the four chips side by side (1024 × 256): chips 3 and
  2 are the top-left and top-right quadrants, chips 1 and 0 the bottom ones, rotated 180°.
  24-bit RAW (two 12-bit counters per pixel) is not decoded.

Orientation: :func:`decode_frames` returns frames as the Merlin sends them (row 0 first).
rosettasciio, and so ``stemdask ingest`` of a ``.mib``, flips them vertically; readers that
must agree with an ingested store apply :func:`to_store_orientation`.
Units: pixel values are counts (electrons above threshold, for a counting detector).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np

from ..errors import InvalidParameter

#: Bytes of the ``MPX,<10 digits>,`` prefix of every message on the data socket.
MPX_PREFIX_BYTES = 15
#: Bytes per pixel of processed data, by pixel type.
PROCESSED_BYTES = {"U08": 1, "U16": 2, "U32": 4}
#: Counter depths each processed pixel type carries.
_DEPTHS_OF = {"U08": (1, 6), "U16": (12,), "U32": (24,)}
#: Bits per pixel of RAW data, by counter depth.
RAW_BITS = {1: 1, 6: 8, 12: 16}
#: Side of one Medipix3 chip (pixels).
CHIP = 256


class MerlinError(InvalidParameter):
    """Merlin bytes that cannot be parsed, or headers that disagree; the message names the source."""


def mpx_prefix(payload_bytes: int) -> bytes:
    """The data socket's ``MPX,<length>,`` prefix of a ``payload_bytes`` message."""
    return b"MPX,%010d," % (payload_bytes + 1)


def parse_mpx_prefix(prefix: bytes, where: str) -> int:
    """Payload length (bytes) announced by a 15-byte ``MPX,<length>,`` prefix."""
    if len(prefix) != MPX_PREFIX_BYTES or prefix[:4] != b"MPX," or prefix[14:15] != b"," \
            or not prefix[4:14].isdigit() or int(prefix[4:14]) < 1:
        raise MerlinError(f"{where}: expected the Merlin framing 'MPX,<10-digit length>,', got {bytes(prefix)[:40]!r}")
    return int(prefix[4:14]) - 1


@dataclass(frozen=True)
class AcquisitionHeader:
    """The ``HDR`` acquisition header: every ``key: value`` line, and the ones readers check."""

    fields: dict

    @property
    def frames(self) -> int | None:
        """Frames in the acquisition (None when not recorded)."""
        v = self.fields.get("Frames in Acquisition (Number)")
        return None if v is None else int(v)

    @property
    def counter_depth(self) -> int | None:
        v = self.fields.get("Counter Depth (number)")
        return None if v is None else int(v)

    @property
    def assembly(self) -> str | None:
        """Chip assembly, ``"1x1"`` or ``"2x2"`` (None when not recorded)."""
        v = self.fields.get("Assembly Size (NX1, 2X2)")
        return None if v is None else v.strip().lower()


def parse_acquisition_header(data: bytes, where: str) -> AcquisitionHeader:
    """Parse an ``HDR,`` acquisition header (a ``.hdr`` file, or the socket's first message)."""
    text = bytes(data).decode("latin-1")
    if not text.startswith("HDR,"):
        raise MerlinError(f"{where}: expected the acquisition header 'HDR,…', got {text[:40]!r}")
    fields = {}
    for line in text[4:].splitlines():
        line = line.strip("\x00 \t")
        if line.startswith("End"):
            break
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    header = AcquisitionHeader(fields)
    try:
        header.frames, header.counter_depth  # noqa: B018 - both must be integers when present
    except ValueError as e:
        raise MerlinError(f"{where}: acquisition header has a malformed number ({e})") from None
    return header


@dataclass(frozen=True)
class FrameHeader:
    """One ``MQ1`` frame header.

    ``header_bytes``: its length (the pixel data follow); ``chips``: 1 or 4; ``width`` ×
    ``height``: the pixel data's shape as sent (a RAW quad: 1024 × 256); ``pixel_type``:
    ``U08``/``U16``/``U32`` (processed) or ``R64`` (RAW); ``layout``: ``1x1``/``2x2``;
    ``counter_depth``: 1, 6, 12 or 24 (bit).
    """

    sequence: int
    header_bytes: int
    chips: int
    width: int
    height: int
    pixel_type: str
    layout: str
    counter_depth: int

    @property
    def raw(self) -> bool:
        return self.pixel_type == "R64"

    @property
    def data_bytes(self) -> int:
        """Bytes of pixel data after the header."""
        if self.raw:
            return self.width * self.height * RAW_BITS[self.counter_depth] // 8
        return self.width * self.height * PROCESSED_BYTES[self.pixel_type]

    @property
    def frame_bytes(self) -> int:
        return self.header_bytes + self.data_bytes

    @property
    def shape(self) -> tuple[int, int]:
        """Decoded frame shape (rows, columns): a RAW quad is assembled into 2 × 2 chips."""
        if self.raw and self.layout == "2x2":
            return 2 * self.height, self.width // 2
        return self.height, self.width

    @property
    def dtype(self) -> np.dtype:
        """Native dtype of decoded pixels."""
        if self.raw:
            return np.dtype(np.uint8 if self.counter_depth <= 6 else np.uint16)
        return np.dtype({"U08": np.uint8, "U16": np.uint16, "U32": np.uint32}[self.pixel_type])

    def same_format(self, other: "FrameHeader") -> bool:
        """Whether two frames have the same layout and pixel format (the sequence may differ)."""
        return (self.header_bytes, self.chips, self.width, self.height, self.pixel_type, self.layout,
                self.counter_depth) == (other.header_bytes, other.chips, other.width, other.height,
                                        other.pixel_type, other.layout, other.counter_depth)

    def describe(self) -> str:
        return (f"{self.width}×{self.height} {self.pixel_type} {self.counter_depth}-bit {self.layout}, "
                f"{self.header_bytes}-byte header")


def parse_frame_header(data: bytes, where: str) -> FrameHeader:
    """Parse an ``MQ1`` frame header (``data``: at least its first 384 bytes, all of a quad's 768)."""
    text = bytes(data[:768]).decode("latin-1")
    fields = text.split(",")
    if fields[0] != "MQ1" or len(fields) < 9:
        raise MerlinError(f"{where}: expected a frame header 'MQ1,…', got {text[:40]!r}")
    try:
        seq, hbytes, chips, width, height = (int(f) for f in fields[1:6])
        pixel_type, layout = fields[6].strip(), fields[7].strip().lower()
        depth = int(fields[fields.index("MQ1A") + 3]) if "MQ1A" in fields else None
    except (ValueError, IndexError):
        raise MerlinError(f"{where}: malformed frame header {text[:80]!r}") from None
    if depth is None:  # headers without the MQ1A extension: processed data imply the depth
        depth = {"U08": 6, "U16": 12, "U32": 24}.get(pixel_type)
    header = FrameHeader(seq, hbytes, chips, width, height, pixel_type, layout, depth)
    problem = None
    if pixel_type not in (*PROCESSED_BYTES, "R64"):
        problem = f"unknown pixel type {pixel_type!r}"
    elif depth not in (1, 6, 12, 24):
        problem = f"unknown counter depth {depth!r}"
    elif header.raw and depth not in RAW_BITS:
        problem = f"RAW {depth}-bit data are not supported (1, 6 and 12 bit are)"
    elif layout not in ("1x1", "2x2") or (layout == "2x2") != (chips == 4) or hbytes < 256 or min(width, height) < 1:
        problem = f"inconsistent geometry ({chips} chips, layout {layout!r}, {width}×{height}, {hbytes}-byte header)"
    elif header.raw and layout == "2x2" and (width, height) != (4 * CHIP, CHIP):
        problem = f"a RAW quad frame must be {4 * CHIP}×{CHIP}, got {width}×{height}"
    elif not header.raw and depth not in _DEPTHS_OF[pixel_type]:
        problem = f"{pixel_type} pixels cannot hold a {depth}-bit counter (they hold {_DEPTHS_OF[pixel_type]})"
    if problem:
        raise MerlinError(f"{where}: frame header: {problem}")
    return header


# ---------------------------------------------------------------------- decoding kernels
@numba.njit(nogil=True, cache=True)
def _decode_raw1(data, out):
    """RAW 1-bit: ``data`` (m, P/8) → ``out`` (m, P); pixel 64s + 8b + k is bit k of byte 8s + 7 − b."""
    m, n = out.shape
    for f in range(m):
        for s in range(n // 64):
            for b in range(8):
                byte = data[f, s * 8 + 7 - b]
                for k in range(8):
                    out[f, 64 * s + 8 * b + k] = (byte >> k) & 1


@numba.njit(nogil=True, cache=True)
def _decode_raw_words(data, itemsize, out):
    """RAW 6/12-bit: ``itemsize``-byte big-endian pixels, the pixels of each 64-bit word reversed."""
    m, n = out.shape
    group = 8 // itemsize
    for f in range(m):
        for i in range(n):
            v = 0
            for b in range(itemsize):
                v = (v << 8) | data[f, i * itemsize + b]
            out[f, (i // group) * group + group - 1 - i % group] = v


def decode_frames(data: np.ndarray, header: FrameHeader) -> np.ndarray:
    """Pixel data of ``m`` frames → (m, *header.shape) counts in the Merlin's orientation.

    ``data``: (m, header.data_bytes) uint8 (any row stride: e.g. the data columns of a
    buffer of whole messages). Processed 8-bit data come back as a view of ``data``.
    """
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != header.data_bytes or data.dtype != np.uint8:
        raise ValueError(f"expected (m, {header.data_bytes}) uint8 pixel data, got {data.dtype} {data.shape}")
    m = data.shape[0]
    if header.pixel_type == "U08":
        return data.reshape((m,) + header.shape)
    if not header.raw:  # NumPy's byte swap (SIMD) is ~4× the numba loop
        big = np.ascontiguousarray(data).view(f">u{PROCESSED_BYTES[header.pixel_type]}")
        return big.astype(header.dtype).reshape((m,) + header.shape)
    flat = np.empty((m, header.width * header.height), header.dtype)
    if header.counter_depth == 1:
        _decode_raw1(data, flat)
    else:
        _decode_raw_words(data, RAW_BITS[header.counter_depth] // 8, flat)
    frames = flat.reshape(m, header.height, header.width)
    if header.raw and header.layout == "2x2":
        return assemble_quad(frames)
    return frames


def assemble_quad(chips: np.ndarray) -> np.ndarray:
    """RAW quad frames (m, 256, 1024), chips side by side → (m, 512, 512) (see module docstring)."""
    m = chips.shape[0]
    c = CHIP
    out = np.empty((m, 2 * c, 2 * c), chips.dtype)
    out[:, :c, :c] = chips[:, :, 3 * c :]
    out[:, :c, c:] = chips[:, :, 2 * c : 3 * c]
    out[:, c:, :c] = chips[:, ::-1, c : 2 * c][:, :, ::-1]
    out[:, c:, c:] = chips[:, ::-1, :c][:, :, ::-1]
    return out


def to_store_orientation(frames: np.ndarray) -> np.ndarray:
    """Frames (m, rows, cols) flipped vertically, as rosettasciio and ``stemdask ingest`` read a ``.mib`` (a view)."""
    return frames[:, ::-1, :]


def read_mib_header(path) -> FrameHeader:
    """The first frame header of a ``.mib`` file."""
    with open(path, "rb") as f:
        head = f.read(768)
    return parse_frame_header(head, str(path))


def _whole_frames(path, header: FrameHeader, size: int) -> int:
    """Frames in a ``size``-byte file of ``header``'s frames; a file that is not whole frames
    is refused, saying whether the counter depth or a truncated last frame is to blame."""
    n, rest = divmod(size, header.frame_bytes)
    if not rest:
        return n
    if not header.raw:
        for ptype, nbytes in PROCESSED_BYTES.items():
            other = header.header_bytes + header.width * header.height * nbytes
            if ptype != header.pixel_type and size % other == 0:
                raise MerlinError(
                    f"{path}: the counter depth does not match the file size: the frame header says "
                    f"{header.pixel_type} ({header.counter_depth}-bit) pixels, {header.frame_bytes}-byte frames, "
                    f"but the {size} bytes are {size // other} whole frames of {ptype} pixels")
    raise MerlinError(f"{path}: the last frame is truncated: {size} bytes are {n} whole {header.frame_bytes}-byte "
                      f"frames ({header.describe()}) and {rest} bytes of frame {n + 1}")


def mib_frames(path) -> tuple[FrameHeader, np.ndarray]:
    """A ``.mib`` file as (its first frame header, (n_frames, frame_bytes) uint8 memory map of whole frames)."""
    header = read_mib_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    n = _whole_frames(path, header, raw.size)
    return header, raw.reshape(n, header.frame_bytes)


def read_hdr(mib_path) -> tuple[Path, AcquisitionHeader] | tuple[None, None]:
    """The acquisition header saved beside a ``.mib`` (same name, ``.hdr``), if there is one."""
    hdr = Path(mib_path).with_suffix(".hdr")
    if not hdr.is_file():
        return None, None
    return hdr, parse_acquisition_header(hdr.read_bytes(), str(hdr))


class MibFile:
    """A ``.mib`` file as a read-only array-like of decoded frames ``(n, rows, cols)`` in the
    store orientation (:func:`to_store_orientation`), checked against the ``.hdr`` beside it.

    Checks at open: whole frames of the first frame's format (else: counter depth vs file
    size, or a truncated last frame); the ``.hdr``'s frame count, counter depth and chip
    assembly agree with the file. Checked on every read (``frames[a:b]``, or :meth:`check`
    before :meth:`decode`): each frame starts with ``MQ1,``, and the first and last of the
    range have the first frame's format. ``scan_shape``: (frames / frames-per-trigger,
    frames-per-trigger) from the ``.hdr`` when it records both and they divide, else None.
    """

    def __init__(self, path):
        self.path = Path(path)
        self.header, self._raw = mib_frames(self.path)
        self.shape = (self._raw.shape[0], *self.header.shape)
        self.dtype = self.header.dtype
        self.ndim = 3
        self.hdr_path, self.acquisition = read_hdr(self.path)
        self.scan_shape = None
        if self.acquisition is not None:
            self._check_hdr()

    def _check_hdr(self) -> None:
        acq, h, n = self.acquisition, self.header, self.shape[0]
        where = f"{self.path}: the .hdr beside it ({self.hdr_path.name})"
        if acq.frames is not None and acq.frames != n:
            raise MerlinError(f"{where} says {acq.frames} frames in the acquisition, the file holds {n} "
                              "(an acquisition split over several files, or the wrong .hdr: move it aside to "
                              "ingest this file's frames alone)")
        if acq.counter_depth is not None and acq.counter_depth != h.counter_depth:
            raise MerlinError(f"{where} says counter depth {acq.counter_depth}, the frames are "
                              f"{h.counter_depth}-bit ({h.describe()})")
        if acq.assembly is not None and acq.assembly != h.layout:
            raise MerlinError(f"{where} says chip assembly {acq.assembly}, the frames are {h.layout}")
        try:
            per_trigger = int(acq.fields.get("Frames per Trigger (Number)", ""))
        except ValueError:
            per_trigger = 0
        if per_trigger > 0 and n % per_trigger == 0:
            self.scan_shape = (n // per_trigger, per_trigger)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("MibFile reads contiguous ranges of frames: frames[a:b]")
        a, b, _ = key.indices(self.shape[0])
        self.check(a, b)
        return self.decode(a, b)

    def check(self, a: int, b: int) -> None:
        """Frames ``[a, b)`` each start with ``MQ1,``; the first and last have frame 1's format."""
        msgs = self._raw[a:max(a, b)]
        bad = np.flatnonzero((msgs[:, :4] != np.frombuffer(b"MQ1,", np.uint8)).any(axis=1))
        if bad.size:
            raise MerlinError(f"{self.path}: frame {a + int(bad[0]) + 1} does not start with a frame header "
                              f"'MQ1,' (got {bytes(msgs[bad[0], :16])!r}): the file is damaged")
        for i in (0, len(msgs) - 1) if len(msgs) else ():
            got = parse_frame_header(bytes(msgs[i, :768]), f"{self.path}: frame {a + i + 1}")
            if not got.same_format(self.header):
                raise MerlinError(f"{self.path}: frame {a + i + 1} is {got.describe()}, "
                                  f"frame 1 {self.header.describe()}")

    def decode(self, a: int, b: int) -> np.ndarray:
        """Frames ``[a, b)`` decoded, store orientation, without :meth:`check` (the caller did)."""
        return to_store_orientation(decode_frames(self._raw[a : max(a, b), self.header.header_bytes :], self.header))
