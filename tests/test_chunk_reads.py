"""Direct reads of an entry array's chunks equal zarr's reads, fill included, and name a damaged chunk."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from zarr.codecs import BloscCodec, Crc32cCodec

from stemdask.chunk_reads import ChunkReadError, DirectChunks
from stemdask.testing import random_event_store


def stored(tmp_path, values, chunk, dtype, compressors=None, name="a"):
    compressors = [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()] \
        if compressors is None else compressors
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="a")
    arr = group.create_array(name, shape=(values.size,), chunks=(chunk,), dtype=dtype, fill_value=7,
                             compressors=compressors, overwrite=True)
    arr[:] = values
    return arr, tmp_path / "g.zarr" / name


@settings(max_examples=40, deadline=None)
@given(size=st.integers(1, 300), chunk=st.integers(1, 64), dtype=st.sampled_from(["uint16", "uint32", "int64"]),
       data=st.data())
def test_any_range_equals_zarr(tmp_path_factory, size, chunk, dtype, data):
    tmp = tmp_path_factory.mktemp("direct")
    values = np.random.default_rng(size).integers(0, 1000, size).astype(dtype)
    values[: size // 3] = 7  # chunks of only the fill value are not written: they read as the fill
    arr, folder = stored(tmp, values, chunk, dtype)
    direct = DirectChunks.of(arr, folder)
    assert direct is not None
    start = data.draw(st.integers(0, size))
    stop = data.draw(st.integers(start, size))
    got = direct.read(start, stop)
    assert got.dtype == arr.dtype and np.array_equal(got, arr[start:stop])


def test_other_layouts_are_left_to_zarr(tmp_path):
    values = np.arange(100, dtype=np.uint32)
    arr, folder = stored(tmp_path, values, 10, "uint32", compressors=[BloscCodec(cname="lz4")])  # no CRC
    assert DirectChunks.of(arr, folder) is None


def test_a_damaged_chunk_is_named(tmp_path):
    arr, folder = stored(tmp_path, np.arange(100, dtype=np.uint32) + 100, 10, "uint32")
    chunk = folder / "c" / "3"
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    chunk.write_bytes(bytes(raw))
    direct = DirectChunks.of(arr, folder)
    assert np.array_equal(direct.read(0, 30), np.arange(30) + 100)  # chunks 0–2 are fine
    with pytest.raises(ChunkReadError, match="chunk 3: its CRC-32C does not match its bytes"):
        direct.read(25, 45)


def test_event_stores_read_their_entries_directly(tmp_path):
    store = random_event_store(tmp_path / "s.zarr", (8, 8), 32, 20, rows_per_block=2)
    assert set(store._direct) == {"indices"} and store._direct["indices"] is not None
    direct = [store.read_block(b).indices for b in range(store.n_blocks)]
    store._direct = {}  # through zarr
    assert all(np.array_equal(a, store.read_block(b).indices) for b, a in enumerate(direct))
