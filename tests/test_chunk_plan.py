"""Chunk planning (pure rules, hypothesis) and what it changes: products equal whatever the chunks,
G cut by scan frequency, reads sized by bytes instead of stored blocks."""

from __future__ import annotations

import dask
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stemdask
from stemdask import chunk_plan
from stemdask.events import event_bytes_per_row, event_row_chunks
from stemdask.methods.ssb import ssb
from stemdask.optics import Aberrations
from stemdask.simulate import SimulationParams, simulate
from stemdask.store import create_store
from stemdask.testing import random_event_store

from helpers import as_dense, simulated

sizes = st.integers(0, 5000)
item_bytes = st.floats(0.5, 1e8)
targets = st.integers(1, 2**30)


@given(sizes, item_bytes, targets, st.integers(1, 64))
def test_chunk_length_is_the_largest_within_the_target_and_the_count(n, per_item, target, min_chunks):
    length = chunk_plan.chunk_length(n, per_item, target, min_chunks=min_chunks)
    if n == 0:
        assert length == 0
        return
    assert 1 <= length <= n
    chunks = chunk_plan.regular_chunks(n, length)
    assert sum(chunks) == n and len(chunks) >= min(min_chunks, n)
    assert length == 1 or length * per_item <= target  # within the target unless one item is more
    bigger = length + 1
    assert bigger > n or bigger * per_item > target or len(chunk_plan.regular_chunks(n, bigger)) < min(min_chunks, n)


@given(st.integers(1, 3000), st.integers(1, 3000))
def test_aligned_lengths_read_whole_blocks_or_whole_parts_of_one(length, block):
    got = chunk_plan.aligned(length, block)
    assert 1 <= got <= length
    if block <= length:
        assert got % block == 0 and got > length - block  # whole blocks, as many as fit
    elif block % got == 0:
        assert 2 * got >= length  # a divisor of the block, not much below the length
    else:
        assert got == length and not any(block % d == 0 for d in range((length + 1) // 2, length + 1))


@given(sizes, st.integers(1, 6000))
def test_regular_chunks_are_equal_but_the_last(n, length):
    chunks = chunk_plan.regular_chunks(n, length)
    assert sum(chunks) == n and all(c == length for c in chunks[:-1]) and (not chunks or 0 < chunks[-1] <= length)


@given(st.lists(st.integers(1, 30), min_size=1, max_size=12), st.data())
def test_row_pieces_are_the_intersections_with_the_blocks(rows, data):
    starts = np.cumsum([0] + rows).tolist()
    bounds = list(zip(starts[:-1], starts[1:]))
    r0 = data.draw(st.integers(0, starts[-1] - 1))
    r1 = data.draw(st.integers(r0 + 1, starts[-1]))
    pieces = chunk_plan.row_pieces(starts, r0, r1)
    assert pieces == [(b, max(r0, s), min(r1, e)) for b, (s, e) in enumerate(bounds) if s < r1 and e > r0]
    assert pieces[0][1] == r0 and pieces[-1][2] == r1
    assert all(a[2] == b[1] for a, b in zip(pieces, pieces[1:]))
    assert all(bounds[b][0] <= lo < hi <= bounds[b][1] for b, lo, hi in pieces)


def test_target_follows_config_and_worker_memory():
    assert chunk_plan.target_bytes() == chunk_plan.CHUNK_BYTES
    assert chunk_plan.target_bytes(1000) == 1000  # given: taken as given
    assert chunk_plan.target_bytes(None, 2**30) == 2**30 // 24  # 1 GiB per thread → 43 MiB
    assert chunk_plan.target_bytes(None, 300e6) == int(300e6 / 24)
    assert chunk_plan.target_bytes(None, 1e6) == chunk_plan.MIN_CHUNK_BYTES  # never below 1 MiB from workers


# ---------------------------------------------------------------------- the events layer
@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A simulated store in row blocks of 5 rows (23 rows: the last block short)."""
    path = tmp_path_factory.mktemp("plan") / "s.zarr"
    params = SimulationParams(scan_shape=(23, 19), detector=24, dose=300, max_phase=0.4, seed=3)
    return simulate(path, params, rows_per_block=5, progress=False)


def products(ds):
    return (ds.com(), ds.virtual_detectors({"bf": "bf", "adf": "adf"}), ds.pacbed(), ds.densify(),
            ds.bin_scan(3).com(), ds.counts())


@pytest.mark.parametrize("rows, read", [(1, 1), (2, 1), (3, 3), (4, 4), (7, 5), (12, 10), (23, 20)])
def test_products_are_the_same_whatever_the_read_chunks(stored, rows, read):
    """Chunks cut from a block (1), straddling blocks (3, 4: no divisor of 5 near them), whole
    blocks (5) or merging several (10, 20): identical products."""
    with dask.config.set(scheduler="threads"):
        want = dask.compute(*products(stemdask.open(stored.path)))
        with dask.config.set({"stemdask.chunk-bytes": int((rows + 0.5) * event_bytes_per_row(stored))}):
            ds = stemdask.open(stored.path)
            assert ds.row_chunks == chunk_plan.regular_chunks(23, read)
            got = dask.compute(*products(ds))
    for g, w in zip(got, want):
        assert g.identical(w)


def test_reads_are_sized_by_bytes_not_by_how_the_store_was_written(tmp_path):
    one_row = random_event_store(tmp_path / "one.zarr", (64, 32), 64, 200, rows_per_block=1)
    big = create_store(tmp_path / "big.zarr", (64, 32), (64, 64), one_row.calibration, rows_per_block=64)
    big.write_block(0, one_row.counts(), one_row.to_csr()[0])  # the same events in one block
    big = big.finalize()
    target = int(16.5 * event_bytes_per_row(one_row))
    assert event_row_chunks(one_row, target) == event_row_chunks(big, target) == (16, 16, 16, 16)
    with dask.config.set({"stemdask.chunk-bytes": target}):
        a, b = stemdask.open(one_row.path), stemdask.open(big.path)
        assert a.row_chunks == b.row_chunks == (16,) * 4
        np.testing.assert_array_equal(a.com().com_y.values, b.com().com_y.values)


@pytest.mark.parametrize("rows", [1, 3, 4, 7])
def test_densify_chunks_are_sized_by_their_bytes_and_regular(stored, rows, tmp_path):
    """Dense chunks of about ``rows`` rows: regular (Zarr takes them as they are), equal values."""
    dense = stemdask.open(stored.path).densify()
    per_row = dense.shape[1] * dense.shape[2] * dense.shape[3] * 4
    with dask.config.set({"stemdask.chunk-bytes": int((rows + 0.5) * per_row)}):
        ds = stemdask.open(stored.path)
        small = ds.densify()
    assert small.data.chunks[0] == chunk_plan.regular_chunks(23, chunk_plan.aligned(rows, max(ds.row_chunks)))
    np.testing.assert_array_equal(small.values, dense.values)
    small.to_dataset(name="dense").to_zarr(tmp_path / "dense.zarr")


def _counts_of(parts):
    return np.concatenate([part.counts for part in parts]).astype(np.float64)


def test_row_products_straddling_two_reads_get_the_parts_of_both(stored):
    """Reads of 5 rows, products in chunks of 3: rows 3..5, 9..11, … need two reads each."""
    with dask.config.set({"stemdask.chunk-bytes": int(5.5 * event_bytes_per_row(stored))}):
        ds = stemdask.open(stored.path)
        assert ds.row_chunks == (5, 5, 5, 5, 3)
        out = ds.map_event_rows(_counts_of, dtype=np.float64, row_bytes=chunk_plan.CHUNK_BYTES, trailing=(),
                                name="test-counts")
        merged = ds.map_event_rows(_counts_of, dtype=np.float64, row_bytes=1, trailing=(), name="merged")
    assert out.chunks[0] == (1,) * 23 and merged.chunks[0] == (20, 3)  # cut from reads; whole reads joined
    with dask.config.set({"stemdask.chunk-bytes": int(5.5 * event_bytes_per_row(stored))}):
        three = ds.map_event_rows(_counts_of, dtype=np.float64, row_bytes=event_bytes_per_row(stored) * 5.5 / 3.5,
                                  trailing=(), name="three")
    assert three.chunks[0] == chunk_plan.regular_chunks(23, 3)
    np.testing.assert_array_equal(three.compute(), ds.counts().values)


# ---------------------------------------------------------------------- G by scan frequency
def test_G_is_cut_by_scan_frequency_and_a_refocus_is_one_task_per_chunk():
    counts, _, cal = simulated(-50.0, scan=(24, 30), detector=16, dose=1e4)
    result = ssb(as_dense(counts, cal, rows_per_block=5), cal, Aberrations(C10=-50), qx_chunk=4)
    ny, nqx, npix = result.G.shape
    assert result.G.chunks == ((ny,), chunk_plan.regular_chunks(nqx, 4), (npix,))
    phase = result.refocus(C10=-40.0)
    graph = dict(phase.data.__dask_graph__())
    trotter = [k for k in graph if isinstance(k, tuple) and k[0].startswith("ssb-trotter-sum")]
    assert len(trotter) == len(result.G.chunks[1])  # one per q_x chunk, and no tree sum after them
    assert not any(isinstance(k, tuple) and "sum" in k[0] and not k[0].startswith("ssb-trotter") for k in graph)
    one = ssb(as_dense(counts, cal, rows_per_block=5), cal, Aberrations(C10=-50), qx_chunk=nqx)
    np.testing.assert_allclose(phase.values, one.refocus(C10=-40.0).values, rtol=0,
                               atol=1e-6 * np.abs(phase.values).max())


def test_g_at_reads_one_chunk_of_G():
    counts, _, cal = simulated(-50.0, scan=(24, 30), detector=16, dose=1e4)
    result = ssb(as_dense(counts, cal), cal, Aberrations(C10=-50), qx_chunk=4).keep()
    got = []
    original = result.G

    def counting(block, block_info=None):
        got.append(block_info[0]["chunk-location"])
        return block

    result.G = original.map_blocks(counting, dtype=original.dtype)
    result.g_at(result.q_y[3], result.q_x[9])
    assert got == [(0, 2, 0)]
