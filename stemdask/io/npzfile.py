"""Random access to the arrays inside a ``.npz`` without loading them.

``np.load(..., mmap_mode="r")`` ignores ``mmap_mode`` for ``.npz``. A member written by
``np.savez`` is *stored* (not compressed), so its bytes lie contiguously in the zip file:
we find them through the zip local header and memory-map them. A member written by
``np.savez_compressed`` is deflated and cannot be sliced; it is streamed once (16 MiB pieces)
into an uncompressed ``.npy`` in a scratch folder and memory-mapped there — one sequential
pass, instead of decompressing from the start for every row block (measured in
``benchmarks/ingest.py``).

Size limit (zip bombs): a deflated member is extracted (or, by :meth:`NpzArrays.small`,
loaded) only if its declared size is at most ``max(EXTRACT_FLOOR, EXTRACT_RATIO ×
its compressed size)`` and fits the scratch folder's free space; :mod:`zipfile` never yields
more than the declared size (a member that inflates further fails its CRC). Event data compress 2–4×; a member that
claims 100× more is refused with a hint to save it uncompressed (``np.savez``), which is
memory-mapped and never extracted.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .common import SourceError

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # zip local file header, 30 bytes
_PIECE = 1 << 24
#: A deflated member may expand to at most this many times its compressed size …
EXTRACT_RATIO = 100
#: … or to this many bytes, whichever is larger.
EXTRACT_FLOOR = 256 << 20


class NpzArrays:
    """Lazy arrays of one ``.npz``: ``keys()``, ``small(name)`` (loaded), ``array(name)`` (memmap).

    ``scratch``: folder for extracted deflated members (default: the system temp folder);
    :meth:`close` removes what was extracted. Holds no open file between calls (picklable).
    """

    def __init__(self, path: str | os.PathLike, scratch: str | os.PathLike | None = None):
        self.path = Path(path)
        self._scratch_parent = None if scratch is None else Path(scratch)
        self._scratch: Path | None = None
        self._located: dict[str, tuple[np.dtype, tuple, int, Path]] = {}  # dtype, shape, offset, file
        try:
            with zipfile.ZipFile(self.path) as z:
                self._members = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")}
        except (zipfile.BadZipFile, OSError) as e:
            raise SourceError(f"{self.path}: not a readable .npz file ({e})") from None

    def keys(self) -> list[str]:
        return list(self._members)

    def __contains__(self, name: str) -> bool:
        return name in self._members

    def small(self, name: str) -> np.ndarray:
        """Load a (small) member fully (within the size limit)."""
        info = self._members[name]
        self._check_size(name, info, None)
        with zipfile.ZipFile(self.path) as z, z.open(info) as f:
            return np.lib.format.read_array(f, allow_pickle=False)

    def _check_size(self, name: str, info: zipfile.ZipInfo, folder: Path | None) -> None:
        """Refuse a deflated member whose declared size passes the limit or ``folder``'s free space."""
        if info.compress_type == zipfile.ZIP_STORED:
            return
        limit = max(EXTRACT_FLOOR, EXTRACT_RATIO * info.compress_size)
        if info.file_size > limit:
            raise SourceError(
                f"{self.path}: member {name!r} would expand from {info.compress_size:,} to {info.file_size:,} bytes, "
                f"more than the limit of {limit:,} ({EXTRACT_RATIO}× its compressed size, at least "
                f"{EXTRACT_FLOOR >> 20} MiB); refusing to extract it — save it uncompressed (np.savez)"
            )
        if folder is not None and info.file_size > shutil.disk_usage(folder).free:
            raise SourceError(f"{self.path}: member {name!r} needs {info.file_size:,} bytes to extract, more than "
                              f"is free in {folder}; save it uncompressed (np.savez)")

    def array(self, name: str) -> np.ndarray:
        """A read-only memory map of member ``name`` (extracting it first if deflated)."""
        if name not in self._members:
            raise SourceError(f"{self.path}: has no array {name!r} (has {sorted(self._members)})")
        if name not in self._located:
            self._located[name] = self._locate(name)
        dtype, shape, offset, file = self._located[name]
        if int(np.prod(shape)) == 0:
            return np.empty(shape, dtype)
        return np.memmap(file, dtype=dtype, mode="r", offset=offset, shape=shape)

    def _locate(self, name: str):
        info = self._members[name]
        if info.compress_type == zipfile.ZIP_STORED:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
                if fields[0] != b"PK\x03\x04":
                    raise SourceError(f"{self.path}: damaged zip header for {name!r}")
                f.seek(fields[9] + fields[10], os.SEEK_CUR)  # name + extra field
                return (*_read_npy_header(f, self.path, name), self.path)
        target = self._scratch_dir() / f"{name}.npy"
        self._check_size(name, info, target.parent)
        try:
            with zipfile.ZipFile(self.path) as z, z.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, _PIECE)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise SourceError(f"{self.path}: cannot decompress {name!r} ({e})") from None
        with open(target, "rb") as f:
            return (*_read_npy_header(f, self.path, name), target)

    def _scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix=".stemdask-npz-", dir=self._scratch_parent))
        return self._scratch

    def close(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None
            self._located = {k: v for k, v in self._located.items() if v[3] == self.path}


def _read_npy_header(f, path, name) -> tuple[np.dtype, tuple, int]:
    """(dtype, shape, data offset) of the ``.npy`` starting at ``f``'s position."""
    try:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except ValueError as e:
        raise SourceError(f"{path}: member {name!r} is not a .npy array ({e})") from None
    if fortran and len(shape) > 1:
        raise SourceError(f"{path}: member {name!r} is Fortran-ordered; save it C-ordered")
    if dtype.hasobject:
        raise SourceError(f"{path}: member {name!r} holds Python objects; expected numbers")
    return dtype, shape, f.tell()
