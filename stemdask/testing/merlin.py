"""Write Merlin ``.mib`` data and replay it over TCP exactly as a MerlinEM data socket sends it.

The encoders are written independently of :mod:`stemdask.io.merlin`'s decoders (NumPy bit
and byte shuffles here, numba loops there), so a round trip tests both. Frames are given in
the Merlin's orientation (row 0 first, as :func:`stemdask.io.merlin.decode_frames` returns).

:class:`MerlinReplayServer` listens on ``127.0.0.1`` (port 0: any free port), accepts one
connection and sends ``MPX,<length>,HDR…`` then ``MPX,<length>,MQ1…<pixels>`` per frame —
optionally at a fixed rate, and with the faults a live reader must survive: garbage before
the header, a connection dropped after some frames, or a detector that stops sending.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import InvalidParameter
from ..io.merlin import CHIP, MPX_PREFIX_BYTES, RAW_BITS, mib_frames, mpx_prefix

_PIXEL_TYPE = {1: "U08", 6: "U08", 12: "U16", 24: "U32"}
_CHIP_DACS = (
    "3RX,011,511,000,000,000,000,000,000,175,010,200,125,100,100,093,100,099,030,128,004,255,140,128,191,179,511,511,"
)


def acquisition_header(n_frames: int, counter_depth: int, quad: bool = False, **extra) -> bytes:
    """An ``HDR`` acquisition header as the Merlin software writes it (2048 bytes); ``extra``
    adds or replaces ``key: value`` lines."""
    fields = {
        "Chip Type (Medipix 3.0, Medipix 3.1, Medipix 3RX)": "Medipix 3RX",
        "Assembly Size (NX1, 2X2)": "   2x2" if quad else "   1x1",
        "Counter Depth (number)": str(counter_depth),
        "Frames in Acquisition (Number)": str(n_frames),
        "Frames per Trigger (Number)": str(n_frames),
        **extra,
    }
    text = "HDR,\t\r\n" + "".join(f"{k}:\t{v}\r\n" for k, v in fields.items()) + "End\t"
    return text.encode("latin-1").ljust(2048, b" ")


def frame_header(seq: int, shape: tuple[int, int], counter_depth: int, raw: bool = False, quad: bool = False) -> bytes:
    """An ``MQ1`` frame header for pixel data of ``shape`` (rows, cols) as sent."""
    chips = 4 if quad else 1
    size = 768 if quad else 384
    ptype = "R64" if raw else _PIXEL_TYPE[counter_depth]
    text = (
        f"MQ1,{seq:06d},{size:05d},{chips:02d},{shape[1]:04d},{shape[0]:04d},{ptype},"
        f"{'   2x2' if quad else '   1x1'},{'0F' if quad else '01'},2021-04-15 15:01:00.320786,0.001000,0,0,0,"
        + "2.000000E+0,5.110000E+2,"
        + "0.000000E+0," * 6
        + _CHIP_DACS * chips
        + f"MQ1A,2021-04-15T14:01:00.320786181Z,1000000ns,{counter_depth},"
    )
    return text.encode("latin-1").ljust(size, b" ")


def split_quad(frames: np.ndarray) -> np.ndarray:
    """(m, 512, 512) → the RAW quad layout (m, 256, 1024): chips 0..3 side by side."""
    c = CHIP
    return np.concatenate(
        [frames[:, c:, c:][:, ::-1, ::-1], frames[:, c:, :c][:, ::-1, ::-1], frames[:, :c, c:], frames[:, :c, :c]],
        axis=2,
    )


def encode_pixels(frames: np.ndarray, counter_depth: int, raw: bool = False) -> np.ndarray:
    """Frames (m, rows, cols) of counts → (m, bytes) uint8 pixel data as the Merlin sends them."""
    frames = np.asarray(frames)
    m = frames.shape[0]
    if frames.max(initial=0) >= 1 << counter_depth or frames.min(initial=0) < 0:
        raise InvalidParameter(f"values outside a {counter_depth}-bit counter")
    if not raw:
        dtype = {"U08": ">u1", "U16": ">u2", "U32": ">u4"}[_PIXEL_TYPE[counter_depth]]
        return frames.astype(dtype).reshape(m, -1).view(np.uint8)
    flat = frames.reshape(m, -1)
    if counter_depth == 1:
        packed = np.packbits(flat.astype(np.uint8), axis=1, bitorder="little")
        return packed.reshape(m, -1, 8)[:, :, ::-1].reshape(m, -1)
    bits = RAW_BITS[counter_depth]
    group = 64 // bits
    words = flat.astype(f">u{bits // 8}").reshape(m, -1, group)[:, :, ::-1]
    return np.ascontiguousarray(words).reshape(m, -1).view(np.uint8)


def encode_frames(frames: np.ndarray, counter_depth: int, raw: bool = False, first_seq: int = 1) -> np.ndarray:
    """Frames (m, rows, cols) → whole ``.mib`` frames (m, header + data bytes) uint8."""
    frames = np.asarray(frames)
    quad = frames.shape[1:] == (2 * CHIP, 2 * CHIP)
    sent = split_quad(frames) if raw and quad else frames
    data = encode_pixels(sent, counter_depth, raw)
    headers = np.stack(
        [
            np.frombuffer(frame_header(first_seq + i, sent.shape[1:], counter_depth, raw, quad), np.uint8)
            for i in range(frames.shape[0])
        ]
    )
    return np.concatenate([headers, data], axis=1)


def write_mib(path, frames: np.ndarray, counter_depth: int = 6, raw: bool = False) -> Path:
    """Write ``frames`` (m, rows, cols; Merlin orientation) as ``path`` (``.mib``) and its ``.hdr``."""
    path = Path(path)
    frames = np.asarray(frames)
    path.write_bytes(encode_frames(frames, counter_depth, raw).tobytes())
    quad = frames.shape[1:] == (2 * CHIP, 2 * CHIP)
    path.with_suffix(".hdr").write_bytes(acquisition_header(frames.shape[0], counter_depth, quad))
    return path


class MerlinReplayServer(threading.Thread):
    """A MerlinEM data socket replaying frames to the first client that connects.

    ``frames``: a ``.mib`` path (its ``.hdr`` beside it is the acquisition header unless
    ``hdr`` is given) or whole frames (n, frame_bytes) uint8 with ``hdr``. ``n_frames``:
    frames to send (default all; more cycles through them). ``rate``: frames per second
    (default: as fast as the socket takes them). Faults: ``garbage`` bytes before the
    header; ``drop_after`` frames, then close the connection; ``stall_after`` frames, then
    send nothing more until :meth:`stop`. Use as a context manager; ``port`` is where it listens.
    """

    def __init__(
        self,
        frames,
        *,
        hdr: bytes | None = None,
        n_frames: int | None = None,
        rate: float | None = None,
        garbage: bytes = b"",
        drop_after: int | None = None,
        stall_after: int | None = None,
        chunk_frames: int = 256,
    ):
        super().__init__(daemon=True, name="merlin-replay")
        if isinstance(frames, (str, Path)):
            path = Path(frames)
            frames = mib_frames(path)[1]
            hdr = path.with_suffix(".hdr").read_bytes() if hdr is None else hdr
        if hdr is None:
            raise InvalidParameter("replaying frames needs an acquisition header (hdr=)")
        self.frames, self.hdr = np.asarray(frames), hdr
        self.n_frames = self.frames.shape[0] if n_frames is None else int(n_frames)
        self.rate, self.garbage = rate, garbage
        self.drop_after, self.stall_after = drop_after, stall_after
        self.chunk_frames = 1 if rate else int(chunk_frames)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._halt = threading.Event()
        self.sent = 0
        self.error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"merlin://127.0.0.1:{self.port}"

    def __enter__(self) -> "MerlinReplayServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._halt.set()
        self._listener.close()
        self.join(timeout=10)

    def run(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:  # stopped before anyone connected
            return
        with conn:
            try:
                self._send(conn)
            except OSError as e:  # the client went away: normal at the end of a test
                self.error = e
            if self.stall_after is not None:
                self._halt.wait()

    def _send(self, conn) -> None:
        conn.sendall(self.garbage + mpx_prefix(len(self.hdr)) + self.hdr)
        n, fb = self.frames.shape
        last = min(x for x in (self.n_frames, self.drop_after, self.stall_after) if x is not None)
        messages = np.empty((n, MPX_PREFIX_BYTES + fb), np.uint8)  # built once: sending is one copy
        messages[:, :MPX_PREFIX_BYTES] = np.frombuffer(mpx_prefix(fb), np.uint8)
        messages[:, MPX_PREFIX_BYTES:] = self.frames
        t0 = time.perf_counter()
        while self.sent < last and not self._halt.is_set():
            i = self.sent % n
            k = min(self.chunk_frames, last - self.sent, n - i)
            if self.rate:
                time.sleep(max(0.0, t0 + self.sent / self.rate - time.perf_counter()))
            conn.sendall(messages[i : i + k])
            self.sent += k
