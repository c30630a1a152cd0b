"""Reading a stored array's chunks straight into one output buffer.

The entry arrays of an event store (``indices``, ``toa``, ``weights``) hold nearly all its
bytes, and zarr's read pipeline (async tasks, a buffer per chunk, a copy into the selection)
costs about 3× the decoding itself on them (``python benchmarks/reductions.py --read-path``).
For the layout stemdask writes — a local Zarr v3 array with a regular 1-D chunk grid and the
codecs ``bytes`` (little-endian), ``blosc``, ``crc32c`` (or ``bytes``, ``crc32c``:
uncompressed) — :class:`DirectChunks` reads each chunk file, checks its CRC-32C (the 4 bytes
zarr's ``crc32c`` codec appends) and lets Blosc decompress it (or copies it) into its place in
the output. An N-D array whose chunks span every axis but the
first (an event store's ``counts``: whole scan rows) reads the same way, as its flat C-order
elements. Any other layout, store or dtype is read
through zarr; chunks that were never written read as the fill value, as in zarr.

A chunk file is read into a scratch buffer kept per thread (:func:`_file_bytes`), not into a
fresh ``bytes`` object: a fresh megabytes-sized allocation is a new memory mapping whose
pages fault in on first touch. Measured on the 131 M-event benchmark store (231 MB of chunk
files, page cache warm): 0.15 s of CPU into fresh objects, 0.09 s into the reused buffer,
against 0.12 s to decompress them.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr

_scratch = threading.local()


def _file_bytes(path: Path) -> np.ndarray:
    """The whole file at ``path`` as a uint8 view of this thread's scratch buffer (grown when
    needed; valid until this thread's next call). FileNotFoundError if there is none."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.size < size + 1:
            buf = _scratch.buf = np.empty(max(size + 1, 1 << 20), np.uint8)
        view, got = memoryview(buf), 0
        while got <= size:  # to the end of the file, one byte more: a file that grew is seen
            n = f.readinto(view[got : size + 1])
            if not n:
                break
            got += n
    return buf[:got]


class ChunkReadError(Exception):
    """A chunk failed its checksum or could not be decoded: ``chunk`` says which, ``reason`` why."""

    def __init__(self, chunk: int, reason: str):
        super().__init__(f"chunk {chunk}: {reason}")
        self.chunk, self.reason = chunk, reason


class DirectChunks:
    """``read(start, stop)`` of the flat elements of an array of the layout above, or None from
    :meth:`of`."""

    def __init__(self, folder: Path, dtype: np.dtype, length: int, fill, ndim: int = 1, compressed: bool = True):
        self.folder, self.dtype, self.length, self.fill, self.compressed = folder, dtype, length, fill, compressed
        self._key_tail = "/0" * (ndim - 1)  # the one chunk along every axis but the first

    @classmethod
    def of(cls, array: zarr.Array, folder: Path) -> "DirectChunks | None":
        """The direct reader of ``array`` stored in ``folder``, or None where zarr must read it."""
        meta = array.metadata.to_dict()
        codecs = [c.get("name") for c in meta.get("codecs", [])]
        endian = meta["codecs"][0].get("configuration", {}).get("endian") if codecs else None
        grid = meta.get("chunk_grid", {}).get("name")
        keys = meta.get("chunk_key_encoding", {})
        layout_ok = (codecs in (["bytes", "blosc", "crc32c"], ["bytes", "crc32c"]) and endian == "little"
                     and grid == "regular" and array.ndim >= 1 and tuple(array.chunks[1:]) == tuple(array.shape[1:]))
        keys_ok = keys.get("name") == "default" and keys.get("configuration", {}).get("separator", "/") == "/"
        if not (layout_ok and keys_ok and (folder / "zarr.json").is_file() and np.dtype(array.dtype).isnative):
            return None
        return cls(folder, np.dtype(array.dtype), int(np.prod(array.chunks)), array.fill_value, array.ndim,
                   compressed="blosc" in codecs)

    def body(self, i: int, fresh: bool = False) -> np.ndarray | None:
        """Chunk ``i``'s stored bytes without the CRC-32C trailer, checked against it (uint8; a
        view of this thread's scratch buffer unless ``fresh``, then an array of its own); None
        for a chunk never written. :class:`ChunkReadError` if the check fails."""
        path = self.folder / "c" / f"{i}{self._key_tail}"
        try:
            data = np.fromfile(path, np.uint8) if fresh else _file_bytes(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ChunkReadError(i, f"it cannot be read ({type(e).__name__}: {e})") from None
        body, stored = data[:-4], data[-4:].tobytes()
        if data.size < 4 or google_crc32c.value(body).to_bytes(4, "little") != stored:
            raise ChunkReadError(i, "its CRC-32C does not match its bytes (damaged or truncated)")
        return body

    def decode(self, i: int, body: np.ndarray | None, target: np.ndarray) -> None:
        """Chunk ``i`` from its checked ``body`` (:meth:`body`; None: the fill value) into
        ``target``, all the chunk's elements; :class:`ChunkReadError` if it does not decode."""
        if body is None:
            target[:] = self.fill
        elif not self.compressed:
            if body.size != target.nbytes:
                raise ChunkReadError(i, f"it holds {body.size} bytes, not the chunk's {target.nbytes}")
            target[:] = body.view(self.dtype)
        else:
            # the Blosc header's uncompressed size (bytes 4–7): Blosc would fill only that much of
            # the target, leaving the rest as it was
            size = int.from_bytes(body[4:8].tobytes(), "little") if body.size >= 16 else -1
            if size != target.nbytes:
                raise ChunkReadError(i, f"it decodes to {size} bytes, not the chunk's {target.nbytes}")
            try:
                numcodecs.blosc.decompress(body, target)
            except (RuntimeError, ValueError) as e:
                raise ChunkReadError(i, f"{type(e).__name__}: {e}") from None

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[start, stop)`` (decoded into ``out``, contiguous, when given);
        :class:`ChunkReadError` for a damaged chunk."""
        out = np.empty(stop - start, self.dtype) if out is None else out
        if stop <= start:
            return out
        n = self.length
        partial = np.empty(n, self.dtype) if start % n or stop % n else None  # a chunk only partly wanted
        for i in range(start // n, (stop - 1) // n + 1):
            lo, hi = max(start, i * n), min(stop, (i + 1) * n)
            whole = lo == i * n and hi == (i + 1) * n
            target = out[lo - start : hi - start] if whole else partial
            self.decode(i, self.body(i), target)
            if not whole:
                out[lo - start : hi - start] = target[lo - i * n : hi - i * n]
        return out
