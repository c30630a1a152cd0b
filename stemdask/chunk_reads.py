"""Reading a stored 1-D entry array's chunks straight into one output buffer.

The entry arrays of an event store (``indices``, ``toa``, ``weights``) hold nearly all its
bytes, and zarr's read pipeline (async tasks, a buffer per chunk, a copy into the selection)
costs about 3× the decoding itself on them (``python benchmarks/reductions.py --read-path``).
For the layout stemdask writes — a local Zarr v3 array with a regular 1-D chunk grid and the
codecs ``bytes`` (little-endian), ``blosc``, ``crc32c`` — :class:`DirectChunks` reads each
chunk file, checks its CRC-32C (the 4 bytes zarr's ``crc32c`` codec appends) and lets Blosc
decompress it into its place in the output. Any other layout, store or dtype is read
through zarr; chunks that were never written read as the fill value, as in zarr.
"""

from __future__ import annotations

from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr


class ChunkReadError(Exception):
    """A chunk failed its checksum or could not be decoded: ``chunk`` says which, ``reason`` why."""

    def __init__(self, chunk: int, reason: str):
        super().__init__(f"chunk {chunk}: {reason}")
        self.chunk, self.reason = chunk, reason


class DirectChunks:
    """``read(start, stop)`` of a 1-D array of the layout above, or None from :meth:`of`."""

    def __init__(self, folder: Path, dtype: np.dtype, length: int, fill):
        self.folder, self.dtype, self.length, self.fill = folder, dtype, length, fill

    @classmethod
    def of(cls, array: zarr.Array, folder: Path) -> "DirectChunks | None":
        """The direct reader of ``array`` stored in ``folder``, or None where zarr must read it."""
        meta = array.metadata.to_dict()
        codecs = [c.get("name") for c in meta.get("codecs", [])]
        endian = meta["codecs"][0].get("configuration", {}).get("endian") if codecs else None
        grid = meta.get("chunk_grid", {}).get("name")
        keys = meta.get("chunk_key_encoding", {})
        if (codecs != ["bytes", "blosc", "crc32c"] or endian != "little" or grid != "regular" or array.ndim != 1
                or keys.get("name") != "default" or keys.get("configuration", {}).get("separator", "/") != "/"
                or not (folder / "zarr.json").is_file() or not np.dtype(array.dtype).isnative):
            return None
        return cls(folder, np.dtype(array.dtype), int(array.chunks[0]), array.fill_value)

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
            try:
                data = (self.folder / "c" / str(i)).read_bytes()
            except FileNotFoundError:
                out[lo - start : hi - start] = self.fill
                continue
            body, stored = np.frombuffer(data, np.uint8)[:-4], data[-4:]  # views, no copy
            if len(data) < 4 or google_crc32c.value(body).to_bytes(4, "little") != stored:
                raise ChunkReadError(i, "its CRC-32C does not match its bytes (damaged or truncated)")
            whole = lo == i * n and hi == (i + 1) * n
            target = out[lo - start : hi - start] if whole else partial
            try:
                numcodecs.blosc.decompress(body, target)
            except (RuntimeError, ValueError) as e:
                raise ChunkReadError(i, f"{type(e).__name__}: {e}") from None
            if not whole:
                out[lo - start : hi - start] = target[lo - i * n : hi - i * n]
        return out
