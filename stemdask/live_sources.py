"""Sources of a live session: the MerlinEM data socket, and a ``.mib`` file or event store replayed at a rate.

Every source is an iterable of *batches* in scan order, each either dense frames
``("frames", (m, rows, cols) array)`` in the store's orientation (as ``stemdask ingest``
reads the same data from a file) or events ``("events", (counts (m,), indices))``.
A batch is only valid until the next one is requested (the socket buffer is reused).
Sources report ``detector_shape`` and ``n_frames`` once opened (:meth:`open`).

Errors are :class:`StreamError` (a ``ValueError``: the CLI prints one line, exit 2), naming
the source: bad framing or garbage before the header, a frame header that disagrees with
the acquisition header or the first frame, no data for ``timeout`` s, and
:class:`StreamEnded` for a connection closed before the scan's last frame.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from .io.merlin import (
    MPX_PREFIX_BYTES,
    AcquisitionHeader,
    FrameHeader,
    MerlinError,
    MibFile,
    decode_frames,
    mpx_prefix,
    parse_acquisition_header,
    parse_frame_header,
    parse_mpx_prefix,
    to_store_orientation,
)
from .store import open_store

#: Bytes of whole frames received per batch, at most (a batch is also at most one scan row).
BATCH_BYTES = 32 << 20


class StreamError(MerlinError):
    """A live source failed; the message names it and says what happened."""


class StreamEnded(StreamError):
    """The source ended (connection closed) before the scan's last frame."""


class MerlinSocket:
    """Client of a MerlinEM data socket, ``merlin://HOST:PORT`` (the Merlin's default data port is 6342).

    ``timeout`` (s): the longest wait for data (connecting, the header, or the next frame).
    ``batch_frames``: most frames per batch (e.g. one scan row); fewer are handed on as soon
    as the socket has nothing more ready, so a slow detector's frames are not held back.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, batch_frames: int = 256):
        parsed = urlparse(url)
        if parsed.scheme != "merlin" or not parsed.hostname or not parsed.port:
            raise StreamError(f"{url}: expected merlin://HOST:PORT")
        self.url, self.host, self.port = url, parsed.hostname, parsed.port
        self.timeout, self.batch_frames = float(timeout), max(1, int(batch_frames))
        self.acquisition: AcquisitionHeader | None = None
        self.frame_header: FrameHeader | None = None
        self.frames_received = 0
        self.batch_arrival = None
        self._sock = None
        self._pending = b""

    # ------------------------------------------------------------------ low level
    def _recv_exact(self, n: int, what: str) -> bytes:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            got += self._recv_into(view[got:], what)
        return bytes(out)

    def _recv_into(self, view: memoryview, what: str) -> int:
        try:
            n = self._sock.recv_into(view)
        except socket.timeout:
            raise StreamError(f"{self.url}: no data for {self.timeout:g} s while waiting for {what} "
                              f"({self.frames_received} frames received; detector slower than --timeout?)") from None
        if not n:
            raise StreamEnded(f"{self.url}: connection closed while waiting for {what} "
                              f"({self.frames_received} frames received)")
        return n

    # ------------------------------------------------------------------ protocol
    def open(self) -> "MerlinSocket":
        """Connect, read the acquisition header and the first frame's header; check they agree."""
        try:
            self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as e:
            raise StreamError(f"{self.url}: cannot connect ({e.strerror or e})") from None
        self._sock.settimeout(self.timeout)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        length = parse_mpx_prefix(self._recv_exact(MPX_PREFIX_BYTES, "the acquisition header"),
                                  f"{self.url}: start of stream")
        self.acquisition = parse_acquisition_header(self._recv_exact(length, "the acquisition header"), self.url)
        length = parse_mpx_prefix(self._recv_exact(MPX_PREFIX_BYTES, "the first frame"), f"{self.url}: frame 0")
        first = self._recv_exact(length, "the first frame")
        self.frame_header = header = parse_frame_header(first, f"{self.url}: frame 0")
        if header.frame_bytes != length:
            raise StreamError(f"{self.url}: frame 0 is {length} bytes, its header ({header.describe()}) "
                              f"says {header.frame_bytes}")
        acq = self.acquisition
        for name, ours, theirs in (("counter depth", header.counter_depth, acq.counter_depth),
                                   ("chip assembly", header.layout, acq.assembly)):
            if theirs is not None and ours != theirs:
                raise StreamError(f"{self.url}: frame 0's header says {name} {ours}, "
                                  f"the acquisition header {theirs}")
        self._pending = first
        return self

    @property
    def detector_shape(self) -> tuple[int, int]:
        return self.frame_header.shape

    @property
    def n_frames(self) -> int | None:
        return self.acquisition.frames

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def batches(self, n_frames: int):
        """Yield ``("frames", (m, rows, cols))`` for frames ``0 .. n_frames`` (store orientation)."""
        header = self.frame_header
        step = MPX_PREFIX_BYTES + header.frame_bytes
        per = max(1, min(self.batch_frames, BATCH_BYTES // step))
        buf = np.empty(per * step, np.uint8)
        view = memoryview(buf)
        # the first frame was read already: put it back as a whole message
        first = np.frombuffer(self._pending, np.uint8)
        buf[MPX_PREFIX_BYTES:step] = first
        self._pending = b""
        have = step
        ref_prefix = np.frombuffer(mpx_prefix(header.frame_bytes), np.uint8)
        buf[:MPX_PREFIX_BYTES] = ref_prefix
        first_bytes = first[:header.header_bytes]
        fixed = _fixed_header_span(first_bytes)
        ref_fixed = first_bytes[fixed].copy()
        while self.frames_received < n_frames:
            want = min(per, n_frames - self.frames_received) * step
            arrival = time.perf_counter() if have >= step else None
            ended = None
            while have < step or (have < want and self._ready()):
                try:
                    have += self._recv_into(view[have:want], f"frame {self.frames_received + have // step}")
                except StreamEnded as e:  # hand on the whole frames received before, then stop
                    if have < step:
                        raise
                    ended = e
                    break
                if arrival is None and have >= step:
                    arrival = time.perf_counter()
            self.batch_arrival = arrival  # when the batch's first frame was complete (perf_counter s)
            m = have // step
            msgs = buf[: m * step].reshape(m, step)
            bad = self._first_bad(msgs, ref_prefix, ref_fixed, fixed)
            good = m if bad is None else bad
            if good:
                data = msgs[:good, MPX_PREFIX_BYTES + header.header_bytes :]
                yield "frames", to_store_orientation(decode_frames(data, header))
                self.frames_received += good
            if bad is not None:
                raise self._disagreement(msgs[bad], ref_prefix)
            if ended is not None:
                raise StreamEnded(f"{self.url}: connection closed while waiting for frame {self.frames_received} "
                                  f"({self.frames_received} frames received)")
            rest = have - m * step
            buf[:rest] = buf[m * step : have]
            have = rest

    def _ready(self) -> bool:
        return bool(select.select([self._sock], [], [], 0)[0])

    def _first_bad(self, msgs, ref_prefix, ref_fixed, fixed) -> int | None:
        """The first message not framed like the first frame or of another frame format, if any."""
        bad_prefix = np.any(msgs[:, :MPX_PREFIX_BYTES] != ref_prefix, axis=1)
        head = msgs[:, MPX_PREFIX_BYTES : MPX_PREFIX_BYTES + fixed.stop]
        bad = np.flatnonzero(bad_prefix | np.any(head[:, fixed] != ref_fixed, axis=1))
        return int(bad[0]) if bad.size else None

    def _disagreement(self, msg, ref_prefix) -> StreamError:
        n = self.frames_received
        if np.any(msg[:MPX_PREFIX_BYTES] != ref_prefix):
            return StreamError(f"{self.url}: frame {n}: expected '{ref_prefix.tobytes().decode()}' "
                               f"(frames of one size), got {msg[:MPX_PREFIX_BYTES].tobytes()!r}")
        try:
            got = parse_frame_header(msg[MPX_PREFIX_BYTES:].tobytes(), f"{self.url}: frame {n}").describe()
        except MerlinError as e:
            got = str(e)
        return StreamError(f"{self.url}: frame {n}'s header ({got}) disagrees with the acquisition's first frame "
                           f"({self.frame_header.describe()})")


def _fixed_header_span(header: np.ndarray) -> slice:
    """Bytes of a frame header that every frame of an acquisition shares: from the header
    length to the sensor layout (fields 2–7; the sequence number, field 1, changes)."""
    commas = np.flatnonzero(header == ord(","))
    return slice(int(commas[1]) + 1, int(commas[7]))


#: Decoded frames a ``.mib`` replay hands on at once, at most (bytes): small enough to stay in
#: cache between decoding and COM (256² U16 frames: 16 at a time, 1.8× the end-to-end rate of 256).
CACHE_BATCH_BYTES = 2 << 20


class FileReplay:
    """A ``.mib`` file or an event store replayed at ``rate`` frames per second (None: at once).

    A store yields ``("events", (counts, indices, weights))`` a scan row at a time (weights
    None for an events store; see :mod:`stemdask.store`); a ``.mib`` yields
    frames (store orientation) — the same data ``stemdask ingest`` would store.
    """

    def __init__(self, path, *, rate: float | None = None, batch_frames: int = 256):
        self.path = Path(path)
        self.url = str(path)
        self.rate = None if rate is None else float(rate)
        if self.rate is not None and not self.rate > 0:
            raise StreamError(f"{path}: --rate must be > 0 frames/s, got {rate}")
        self.batch_frames = max(1, int(batch_frames))
        self.frames_received = 0

    def open(self) -> "FileReplay":
        if not self.path.exists():
            raise StreamError(f"{self.path}: no such file or store")
        if self.path.is_dir():
            self._store = open_store(self.path)
            self.detector_shape, self.n_frames = self._store.detector_shape, int(np.prod(self._store.scan_shape))
            self.calibration = self._store.calibration
            self.detector_mask = self._store.detector_mask()  # (mask, fill), as calibrate stored it
            self._mib = None
        else:
            self._mib = MibFile(self.path)  # checked as ingest checks it, .hdr included
            self.detector_shape, self.n_frames, self.calibration = self._mib.shape[1:], len(self._mib), None
        return self

    def close(self) -> None:
        self._mib = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    def _pace(self, t0: float, upto: int) -> None:
        if self.rate:
            time.sleep(max(0.0, t0 + upto / self.rate - time.perf_counter()))

    def batches(self, n_frames: int):
        t0 = time.perf_counter()
        if self._mib is not None:
            mib = self._mib
            if n_frames > len(mib):
                raise StreamError(f"{self.path}: holds {len(mib)} frames, the scan needs {n_frames}")
            frame_bytes = mib.shape[1] * mib.shape[2] * mib.dtype.itemsize
            step = min(self.batch_frames, max(1, CACHE_BATCH_BYTES // frame_bytes))
            checked = 0  # frames [0, checked) were checked: a batch at a time, decoded in cache-sized pieces
            for a in range(0, n_frames, step):
                b = min(a + step, n_frames)
                if b > checked:
                    mib.check(checked, min(checked + self.batch_frames, n_frames))
                    checked = min(checked + self.batch_frames, n_frames)
                self._pace(t0, b)
                yield "frames", mib.decode(a, b)
                self.frames_received = b
            return
        nx = self._store.scan_shape[1]
        for blk in self._store.iter_blocks():
            offsets = blk.offsets
            for r in range(blk.counts.shape[0]):
                p0 = (blk.row_start + r) * nx
                self._pace(t0, p0 + nx)
                row = slice(offsets[r * nx], offsets[(r + 1) * nx])
                yield "events", (blk.entries[r], blk.indices[row], None if blk.weights is None else blk.weights[row])
                self.frames_received = p0 + nx


def open_source(spec: str, *, timeout: float = 10.0, rate: float | None = None, batch_frames: int = 256):
    """``merlin://HOST:PORT`` → :class:`MerlinSocket`; a ``.mib`` file or event store → :class:`FileReplay`."""
    if str(spec).startswith("merlin://"):
        if rate is not None:
            raise StreamError(f"{spec}: --rate applies to a replayed file, not a detector")
        return MerlinSocket(spec, timeout=timeout, batch_frames=batch_frames)
    return FileReplay(spec, rate=rate, batch_frames=batch_frames)
