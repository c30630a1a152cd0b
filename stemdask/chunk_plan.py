"""Chunk planning: how big each dask chunk is, from bytes and worker memory (pure functions).

Every graph stemdask builds is sized here, from a byte target, never from how a store happened
to be written (in the spirit of rechunker's planning module: plain integers in, chunk tuples
out, so the rules are tested on their own):

* row chunks of the events layer and of dense products (:func:`row_chunks`): as many scan rows
  as keep one chunk under the target, the same for every chunk but the last;
* chunks of SSB's scan-FFT cube G along the scan frequency q_x (:func:`regular_chunks` of
  :func:`chunk_length`): whole q_y and all BF pixels per chunk, so every reduction of G is one
  task per chunk with an output as small as one chunk's frequencies.

The target (:func:`target_bytes`) is the dask config value ``stemdask.chunk-bytes`` when set,
else :data:`CHUNK_BYTES`, lowered to :data:`WORKER_SHARE` of the smallest worker memory per
thread when the workers' limits are known (a task holds its input, its output and a few
temporaries of that size, and a worker runs one task per thread).
"""

from __future__ import annotations

import bisect
import math

#: Default target size of one chunk (bytes).
CHUNK_BYTES = 64 * 2**20
#: A chunk may take at most this share of a worker's memory per thread.
WORKER_SHARE = 1 / 24
#: Smallest target, whatever the worker memory (below this, per-task overheads dominate).
MIN_CHUNK_BYTES = 2**20


def target_bytes(configured: int | None = None, worker_memory_per_thread: int | None = None) -> int:
    """The chunk byte target: ``configured`` (the ``stemdask.chunk-bytes`` config, taken as
    given) or :data:`CHUNK_BYTES`, lowered to :data:`WORKER_SHARE` × ``worker_memory_per_thread``
    (bytes; None or 0: unknown) but not by that below :data:`MIN_CHUNK_BYTES`."""
    target = int(configured) if configured else CHUNK_BYTES
    if worker_memory_per_thread:
        target = min(target, max(MIN_CHUNK_BYTES, int(worker_memory_per_thread * WORKER_SHARE)))
    return max(1, target)


def chunk_length(n: int, bytes_per_item: float, target: int, *, min_chunks: int = 1) -> int:
    """Items per chunk when ``n`` items of ``bytes_per_item`` bytes each are cut into regular
    chunks of at most ``target`` bytes (at least one item per chunk, however large), and into
    at least ``min(min_chunks, n)`` chunks (parallelism). 0 for n = 0."""
    if n <= 0:
        return 0
    by_bytes = max(1, int(target // max(bytes_per_item, 1e-300)))
    k = max(1, min(min_chunks, n))
    by_count = n if k == 1 else math.ceil(n / (k - 1)) - 1  # the longest L with ceil(n / L) ≥ k
    return max(1, min(n, by_bytes, by_count))


def regular_chunks(n: int, length: int) -> tuple[int, ...]:
    """``n`` items in chunks of ``length`` (the last one shorter); () for n = 0."""
    if n <= 0:
        return ()
    full, rest = divmod(n, length)
    return (length,) * full + ((rest,) if rest else ())


def row_chunks(n_rows: int, bytes_per_row: float, target: int, stored: int | None = None) -> tuple[int, ...]:
    """Rows per chunk of a row-chunked product: :func:`regular_chunks` of
    :func:`chunk_length` (``bytes_per_row`` bytes per scan row, ``target`` bytes per chunk),
    :func:`aligned` to ``stored`` rows per stored block when given."""
    length = chunk_length(n_rows, bytes_per_row, target)
    return regular_chunks(n_rows, aligned(length, stored) if stored else length)


def aligned(length: int, block: int) -> int:
    """A chunk length of at most ``length`` rows that reads whole stored blocks of ``block``
    rows, or whole parts of one: a multiple of ``block`` when ``block ≤ length``, else the
    largest divisor of ``block`` not above ``length`` — when that is at least ``length / 2``
    (otherwise ``length`` itself: chunks then straddle blocks, which costs a second look at a
    block's counts, not a wrong result)."""
    if block <= length:
        return length // block * block
    divisor = max(d for d in range(1, length + 1) if block % d == 0)
    return divisor if 2 * divisor >= length else length


def row_pieces(starts, r0: int, r1: int) -> list[tuple[int, int, int]]:
    """The parts of rows [``r0``, ``r1``) in contiguous blocks whose first rows are ``starts``
    (ascending, then the end of the last block): (block number, first row, end row), rows
    absolute. O(log blocks + pieces)."""
    pieces = []
    b = bisect.bisect_right(starts, r0) - 1
    while b < len(starts) - 1 and starts[b] < r1:
        pieces.append((b, max(r0, starts[b]), min(r1, starts[b + 1])))
        b += 1
    return pieces
