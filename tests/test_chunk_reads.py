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
@pytest.mark.parametrize("compressed", [True, False])
def test_any_range_equals_zarr(tmp_path_factory, size, chunk, dtype, data, compressed):
    tmp = tmp_path_factory.mktemp("direct")
    values = np.random.default_rng(size).integers(0, 1000, size).astype(dtype)
    values[: size // 3] = 7  # chunks of only the fill value are not written: they read as the fill
    arr, folder = stored(tmp, values, chunk, dtype, None if compressed else [Crc32cCodec()])
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
    assert set(store._direct) == {"counts", "block_crc", "indices"} and None not in store._direct.values()
    direct = [store.read_block(b) for b in range(store.n_blocks)]
    store._direct = {}  # through zarr
    for b, block in enumerate(direct):
        assert np.array_equal(block.indices, store.read_block(b).indices)
        assert np.array_equal(block.counts, store.read_block(b).counts)


@settings(max_examples=30, deadline=None)
@given(ny=st.integers(1, 40), nx=st.integers(1, 9), rows=st.integers(1, 12), data=st.data())
def test_whole_rows_of_a_2d_array_equal_zarr(tmp_path_factory, ny, nx, rows, data):
    """Chunks spanning every axis but the first (an event store's counts), the edge chunk
    included, read as flat elements: any whole-row range equals zarr's."""
    tmp = tmp_path_factory.mktemp("direct2d")
    values = np.random.default_rng(ny * nx).integers(0, 1000, (ny, nx)).astype(np.uint32)
    values[: ny // 3] = 7
    group = zarr.open_group(str(tmp / "g.zarr"), mode="a")
    arr = group.create_array("a", shape=(ny, nx), chunks=(rows, nx), dtype="uint32", fill_value=7,
                             compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()])
    arr[:] = values
    direct = DirectChunks.of(arr, tmp / "g.zarr" / "a")
    assert direct is not None
    r0 = data.draw(st.integers(0, ny))
    r1 = data.draw(st.integers(r0, ny))
    assert np.array_equal(direct.read(r0 * nx, r1 * nx).reshape(-1, nx), arr[r0:r1])
    column_chunks = group.create_array("b", shape=(ny, nx), chunks=(rows, 1), dtype="uint32", fill_value=0)
    assert DirectChunks.of(column_chunks, tmp / "g.zarr" / "b") is None


def test_an_uncompressed_chunk_of_the_wrong_length_is_named(tmp_path):
    """A chunk whose CRC-32C is valid but whose bytes are not one chunk (e.g. another array's
    chunk copied over it) is refused, not reinterpreted."""
    import google_crc32c

    arr, folder = stored(tmp_path, np.arange(40, dtype=np.uint32), 10, "uint32", [Crc32cCodec()])
    body = np.arange(12, dtype=np.uint32).tobytes()
    (folder / "c" / "2").write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))
    with pytest.raises(ChunkReadError, match="chunk 2: it holds 48 bytes, not the chunk's 40"):
        DirectChunks.of(arr, folder).read(0, 40)
