"""Read tasks hand on :class:`EncodedBlock`s (entry chunks checked, not decoded): their pieces
and their decoded form equal the decoded read, for any chunk length and row cut, and the
read's last guards still stop damaged data."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import stemdask
from stemdask.optics import Calibration
from stemdask.store import Block, CorruptStoreError, EncodedBlock, create_store

DET = (6, 7)


def _store(path, ny, nx, rows_per_block, chunk_events, weighted, has_toa, seed):
    """A store whose positions hold 0 to several chunks' worth of entries."""
    rng = np.random.default_rng(seed)
    cal = Calibration(scan_step_a=0.5, detector_pixel_mrad=1.0, semiangle_mrad=2.0, bf_center=(3.0, 3.5),
                      bf_radius=2.0)
    store = create_store(path, (ny, nx), DET, cal, rows_per_block=rows_per_block, chunk_events=chunk_events,
                         encoding="weighted" if weighted else "events", has_toa=has_toa, overwrite=True)
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        counts = rng.choice([0, 1, 3, 2 * chunk_events + 1], size=(r1 - r0, nx)).astype(np.uint32)
        n = int(counts.sum())
        indices = rng.integers(0, DET[0] * DET[1], n)
        weights = rng.integers(1, 5, n) if weighted else None
        toa = rng.integers(0, 1000, n) if has_toa else None
        store.write_block(b, counts, indices, toa=toa, weights=weights)
    return store.finalize()


@settings(max_examples=40, deadline=None)
@given(ny=st.integers(1, 6), nx=st.integers(1, 5), rows_per_block=st.integers(1, 4), chunk_events=st.integers(1, 9),
       kind=st.sampled_from(["events", "toa", "weighted"]), seed=st.integers(0, 99), data=st.data())
def test_pieces_and_decoded_equal_the_decoded_read(tmp_path_factory, ny, nx, rows_per_block, chunk_events, kind,
                                                  seed, data):
    store = _store(tmp_path_factory.mktemp("enc") / "s.zarr", ny, nx, rows_per_block, chunk_events,
                   kind == "weighted", kind == "toa", seed)
    r0 = data.draw(st.integers(0, ny - 1))
    r1 = data.draw(st.integers(r0 + 1, ny))
    stored = [store.block_rows(b) for b in range(store.n_blocks)]
    pieces = [(b, max(r0, a), min(r1, z)) for b, (a, z) in enumerate(stored) if max(r0, a) < min(r1, z)]
    plain = store.read_rows(pieces, 7)
    encoded = store.read_rows(pieces, 7, encoded=True)
    assert isinstance(plain, Block) and isinstance(encoded, EncodedBlock)
    whole = encoded.decoded()
    for name in ("counts", "indices", "toa", "weights", "entry_counts"):
        a, b = getattr(plain, name), getattr(whole, name)
        assert (a is None and b is None) or np.array_equal(a, b), name
    assert whole.row_start == plain.row_start == r0 and whole.index == 7
    a = data.draw(st.integers(0, r1 - r0 - 1))
    b = data.draw(st.integers(a + 1, r1 - r0))
    some, want = encoded.rows(a, b), plain.rows(a, b)  # only the chunks those rows need
    for name in ("counts", "indices", "toa", "weights", "entry_counts"):
        x, y = getattr(want, name), getattr(some, name)
        assert (x is None and y is None) or np.array_equal(x, y), name
    assert some.row_start == want.row_start
    # the pieces: consecutive whole positions, together every entry once, in order
    got_idx, got_w, p_end = [], [], 0
    for p0, p1, entries, indices, weights in encoded.pieces():
        assert p0 == p_end and p1 > p0 and np.array_equal(entries, plain.entries.ravel()[p0:p1])
        assert indices.size == int(entries.sum())
        got_idx.append(indices.copy())
        if weights is not None:
            got_w.append(weights.copy())
        p_end = p1
    assert p_end == plain.counts.size
    assert np.array_equal(np.concatenate(got_idx), plain.indices)
    if plain.weights is not None:
        assert np.array_equal(np.concatenate(got_w), plain.weights)


@pytest.mark.parametrize("kind", ["events", "weighted"])
def test_products_of_encoded_reads_equal_those_of_decoded_reads(tmp_path, monkeypatch, kind):
    """COM, virtual detectors (plain and masked/annular), PACBED and counts through the streamed
    pieces (chunks of 5 entries: positions straddle chunks) equal the decoded reads' exactly."""
    store = _store(tmp_path / "s.zarr", 9, 5, 4, 5, kind == "weighted", False, 3)

    def products(ds):
        masked = ds.with_mask(np.eye(*DET, dtype=bool), np.full(DET, 0.01))
        return dask_values(ds.com(reference=(2.0, 3.0)), ds.virtual_detectors({"bf": "bf", "adf": "adf"}),
                           ds.pacbed(), ds.counts(), masked.com(reference=(2.0, 3.0)),
                           masked.virtual_detectors({"bf": "bf"}))

    streamed = products(stemdask.open(store.path))
    original = type(store).read_rows
    monkeypatch.setattr(type(store), "read_rows", lambda self, pieces, index, **kw: original(self, pieces, index))
    stemdask.store._READ_HANDLES.clear()
    decoded = products(stemdask.open(store.path))
    for a, b in zip(streamed, decoded):
        np.testing.assert_array_equal(a, b)


def dask_values(*objs):
    import dask

    return [np.asarray(o.to_array().values if hasattr(o, "to_array") else o.values)
            for o in dask.compute(*objs, scheduler="threads")]


def test_a_damaged_index_with_valid_checksums_stops_a_streamed_reduction(tmp_path):
    """An index beyond the detector whose chunk and block checksums were rewritten to match (what
    no flipped bit does, but a buggy writer could): the streamed COM refuses it, naming the rows."""
    store = _store(tmp_path / "s.zarr", 4, 3, 2, 5, False, False, 1)
    arr = zarr.open_array(str(store.path / "indices"), mode="r+")
    arr[store.cap + 1] = 60000  # row block 1's second entry; zarr rewrites the chunk with its CRC
    handle = stemdask.store.open_store(store.path, mode="r+")
    counts = handle._read(handle._counts, 1, slice(2, 4))
    n = int(counts.sum())
    zarr.open_array(str(store.path / "block_crc"), mode="r+")[1] = handle.block_record(1, counts, n)
    with pytest.raises(CorruptStoreError, match=r"row block 1 \(rows 2..3\) holds detector index 60000"):
        stemdask.open(store.path).com().compute()


def test_decode_once_hands_decoded_blocks_to_every_product_with_the_same_results(tmp_path):
    store = _store(tmp_path / "s.zarr", 9, 5, 4, 5, False, False, 4)
    ds = stemdask.open(store.path)
    once = ds.decode_once()
    assert once is not ds and once._events.array.name != ds._events.array.name
    blocks = once._events.array.to_delayed().ravel()
    assert all(isinstance(b.compute(), Block) for b in blocks)
    assert all(isinstance(b.compute(), EncodedBlock) for b in ds._events.array.to_delayed().ravel())
    for a, b in zip(dask_values(ds.com(), ds.pacbed(), ds.virtual_detectors({"bf": "bf"})),
                    dask_values(once.com(), once.pacbed(), once.virtual_detectors({"bf": "bf"}))):
        np.testing.assert_array_equal(a, b)
    binned = ds.bin_scan(2)
    assert binned.decode_once() is binned  # its blocks are decoded already


def test_the_decoded_block_is_guarded_per_read_piece_even_where_no_entries_are(tmp_path):
    """A weighted position whose counts say electrons but whose entries say none — at the end of
    a read piece, where no entry marks it — is damage, both decoded whole and streamed."""
    import dataclasses

    store = _store(tmp_path / "s.zarr", 4, 3, 2, 5, True, False, 2)
    block = store.read_rows([(0, 0, 2), (1, 2, 4)], 0, encoded=True)
    counts = block.counts.copy()
    counts[1, -1] += 5  # the last position of read piece 0
    damaged = dataclasses.replace(block, counts=counts, entry_counts=np.where(np.arange(3) == 2, 0, block.entry_counts))
    with pytest.raises(CorruptStoreError, match=r"row block 0 \(rows 0..1\): its weights sum to"):
        damaged.decoded()
    with pytest.raises(CorruptStoreError, match="its weights sum to"):
        list(damaged.pieces())


def test_a_compressed_chunk_that_decodes_short_is_refused(tmp_path):
    """A chunk with a valid CRC-32C whose Blosc frame holds fewer elements than the chunk (Blosc
    would fill only its part of a reused buffer) is refused, naming the chunk."""
    import google_crc32c
    import numcodecs.blosc

    from stemdask.chunk_reads import ChunkReadError, DirectChunks

    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="a")
    from zarr.codecs import BloscCodec, Crc32cCodec

    arr = group.create_array("a", shape=(40,), chunks=(10,), dtype="uint32", fill_value=0,
                             compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()])
    arr[:] = np.arange(40, dtype=np.uint32) + 1
    body = numcodecs.blosc.compress(np.arange(6, dtype=np.uint32), b"lz4", 5, numcodecs.blosc.SHUFFLE)
    (tmp_path / "g.zarr" / "a" / "c" / "1").write_bytes(body + google_crc32c.value(body).to_bytes(4, "little"))
    with pytest.raises(ChunkReadError, match="chunk 1: it decodes to 24 bytes, not the chunk's 40"):
        DirectChunks.of(arr, tmp_path / "g.zarr" / "a").read(0, 40)
