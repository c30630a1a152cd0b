"""The O(C) event kernels against brute-force NumPy on dense patterns built from the same events."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdask.kernels import events as K


@st.composite
def event_blocks(draw, max_positions=12, max_events=40):
    """(counts (P,), indices, det_y, det_x, rng) with random, unsorted events."""
    det_y = draw(st.integers(1, 9))
    det_x = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n_pos = draw(st.integers(0, max_positions))
    counts = rng.integers(0, max_events, n_pos).astype(np.uint32)
    counts[rng.random(n_pos) < 0.2] = 0  # empty positions
    dtype = draw(st.sampled_from([np.uint16, np.uint32]))
    indices = rng.integers(0, det_y * det_x, int(counts.sum())).astype(dtype)
    return counts, indices, det_y, det_x, rng


def dense(counts, indices, det_y, det_x) -> np.ndarray:
    """Brute force: (P, det_y, det_x) integer patterns."""
    out = np.zeros((counts.size, det_y * det_x), np.int64)
    pos = np.repeat(np.arange(counts.size), counts.astype(np.int64))
    np.add.at(out, (pos, indices.astype(np.int64)), 1)
    return out.reshape(counts.size, det_y, det_x)


@given(event_blocks(), st.floats(-5, 15), st.floats(-5, 15))
@settings(max_examples=60, deadline=None)
def test_center_of_mass_equals_dense_centroid(block, ref_y, ref_x):
    counts, indices, det_y, det_x, _ = block
    pat = dense(counts, indices, det_y, det_x).astype(np.float64)
    y, x = np.meshgrid(np.arange(det_y), np.arange(det_x), indexing="ij")
    total = pat.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        exp_y = (pat * y).sum(axis=(1, 2)) / total - ref_y
        exp_x = (pat * x).sum(axis=(1, 2)) / total - ref_x
    got_y, got_x = K.center_of_mass(counts, indices, det_x, ref_y, ref_x)
    np.testing.assert_allclose(got_y, exp_y, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got_x, exp_x, rtol=0, atol=1e-9)
    assert np.array_equal(np.isnan(got_y), total == 0)


def test_pixel_split_is_exact_for_large_detectors():
    det_x = 4099
    idx = np.arange(0, 4099 * 4099, 997, dtype=np.uint32)
    idx = np.concatenate([idx, np.arange(det_x - 2, det_x * det_x, det_x, dtype=np.uint32)])  # row ends
    idx = np.concatenate([idx, np.arange(0, det_x * det_x, det_x, dtype=np.uint32)])  # row starts
    counts = np.ones(idx.size, np.uint32)
    y, x = K.center_of_mass(counts, idx, det_x, 0.0, 0.0)
    np.testing.assert_array_equal(y, idx // det_x)
    np.testing.assert_array_equal(x, idx % det_x)


@given(event_blocks(), st.booleans(), st.floats(-5, 15), st.floats(-5, 15))
@settings(max_examples=60, deadline=None)
def test_unmasked_center_of_mass_equals_the_general_kernel_exactly(block, weighted, ref_y, ref_x):
    counts, indices, det_y, det_x, rng = block
    weights = rng.integers(1, 40, indices.size).astype(np.uint16) if weighted else None
    want = K.center_of_mass_kept(counts, indices, weights, det_x, ref_y, ref_x, K.ALL_PIXELS)
    got = K.center_of_mass_unmasked(counts, indices, weights, det_x, ref_y, ref_x)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("det_y, det_x", [(1448, 1448), (2, 2**20), (2**20, 2), (576, 576), (1023, 2049)])
def test_float32_row_split_is_exact_up_to_its_bound(det_y, det_x):
    """Every row start and end, and a stride through the rest, of detectors up to
    FLOAT32_SPLIT_PIXELS pixels: the fast kernel's y and x are the integer division's."""
    assert det_y * det_x <= K.FLOAT32_SPLIT_PIXELS
    n = det_y * det_x
    rows = np.arange(det_y, dtype=np.int64) * det_x
    idx = np.unique(np.concatenate([rows, rows + det_x - 1, np.arange(0, n, 7919)])).astype(np.uint32)
    counts = np.ones(idx.size, np.uint32)
    y, x = K.center_of_mass(counts, idx, det_x, 0.0, 0.0, n_pixels=n)
    np.testing.assert_array_equal(y, idx // det_x)
    np.testing.assert_array_equal(x, idx % det_x)


@pytest.mark.parametrize("det_y, det_x", [(2**21, 1), (2**20, 2), (1448, 1448), (576, 576)])
def test_unmasked_center_of_mass_sums_long_positions_exactly(det_y, det_x):
    """Positions of several summing runs, every entry on the last row (the largest sums), equal
    the general kernel's exactly."""
    n = 3 * K.ROW_SUM_RUN + 17
    counts = np.array([n, 1, 0, 2 * K.ROW_SUM_RUN], np.uint32)
    last = det_y * det_x - 1
    indices = np.concatenate([np.full(n, last), [0], np.arange(last - 2 * K.ROW_SUM_RUN + 1, last + 1)])
    indices = indices.astype(np.uint32)
    want = K.center_of_mass_kept(counts, indices, None, det_x, 0.0, 0.0, K.ALL_PIXELS)
    got = K.center_of_mass_unmasked(counts, indices, None, det_x, 0.0, 0.0)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    assert got[0][0] == det_y - 1


@given(event_blocks(), st.integers(1, 5))
@settings(max_examples=60, deadline=None)
def test_masked_counts_equals_dense_mask_sums(block, n_det):
    counts, indices, det_y, det_x, rng = block
    masks = rng.random((n_det, det_y * det_x)) < 0.4
    groups, labels = np.unique(masks.T, axis=0, return_inverse=True)
    got = K.masked_counts(counts, indices, None, labels.reshape(-1).astype(np.uint8), groups.astype(np.uint32))
    pat = dense(counts, indices, det_y, det_x).reshape(counts.size, det_y * det_x)
    expected = pat @ masks.T.astype(np.int64)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, expected)


@given(event_blocks())
@settings(max_examples=40, deadline=None)
def test_histogram_is_the_summed_pattern(block):
    counts, indices, det_y, det_x, _ = block
    got = K.histogram(indices, None, det_y * det_x)
    np.testing.assert_array_equal(got, dense(counts, indices, det_y, det_x).sum(axis=0).ravel())


@given(event_blocks(), st.integers(-4, 6), st.integers(-4, 6), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4))
@settings(max_examples=80, deadline=None)
def test_densify_equals_crop_and_bin_of_dense(block, y0, x0, b, out_y, out_x):
    counts, indices, det_y, det_x, _ = block
    pat = dense(counts, indices, det_y, det_x)
    # brute force: pad generously, slice the window, sum bins
    pad = 30
    padded = np.pad(pat, ((0, 0), (pad, pad), (pad, pad)))
    win = padded[:, pad + y0 : pad + y0 + out_y * b, pad + x0 : pad + x0 + out_x * b]
    expected = win.reshape(counts.size, out_y, b, out_x, b).sum(axis=(2, 4))
    out = np.zeros((counts.size, out_y, out_x), np.float32)
    got = K.densify(counts, indices, None, K.densify_lookup(det_y, det_x, y0, x0, b, out_y, out_x), out)
    assert got is out
    assert got.dtype == np.float32 and got.shape == (counts.size, out_y, out_x)
    np.testing.assert_array_equal(got, expected)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 7), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_densify_with_scan_bin_targets_sums_the_binned_positions(f, groups, nx, seed):
    rng = np.random.default_rng(seed)
    det, rows = 5, f * groups
    counts = rng.integers(0, 6, (rows, nx)).astype(np.uint32)
    indices = rng.integers(0, det * det, int(counts.sum())).astype(np.uint16)
    lookup = K.densify_lookup(det, det, 1, 0, 2, 2, 3)
    each = K.densify(counts.ravel(), indices, None, lookup, np.zeros((rows * nx, 2, 3), np.float32))
    oy, ox = rows // f, nx // f
    want = each.reshape(rows, nx, 2, 3)[: oy * f, : ox * f].reshape(oy, f, ox, f, 2, 3).sum(axis=(1, 3))
    target = K.scan_bin_targets(rows, nx, f)
    got = K.densify(counts.ravel(), indices, None, lookup, np.zeros((oy * ox, 2, 3), np.float32), target)
    np.testing.assert_array_equal(got.reshape(want.shape), want)
    # the same rows in two parts, the second from its first row on, into one output
    cut = rows // 2 * nx
    twice = np.zeros((oy * ox, 2, 3), np.float32)
    entries = int(counts.ravel()[:cut].sum())
    K.densify(counts.ravel()[:cut], indices[:entries], None, lookup, twice, K.scan_bin_targets(rows // 2, nx, f))
    K.densify(counts.ravel()[cut:], indices[entries:], None, lookup, twice,
              K.scan_bin_targets(rows - rows // 2, nx, f, first_row=rows // 2))
    np.testing.assert_array_equal(twice, got)
    with pytest.raises(IndexError, match="beyond the output"):
        K.densify(counts.ravel(), indices, None, lookup, np.zeros((oy * ox, 2, 3), np.float32), target + oy * ox + 1)


@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 7), st.integers(0, 2**32 - 1))
@settings(max_examples=60, deadline=None)
def test_bin_scan_merges_neighbouring_positions(f, groups, nx, seed):
    rng = np.random.default_rng(seed)
    rows = f * groups
    det = 5
    counts = rng.integers(0, 6, (rows, nx)).astype(np.uint32)
    indices = rng.integers(0, det * det, int(counts.sum())).astype(np.uint16)
    out_counts, out_idx, _ = K.bin_scan(counts, indices, f)
    pat = dense(counts.ravel(), indices, det, det).reshape(rows, nx, det, det)
    ox = nx // f
    expected = pat[:, : ox * f].reshape(groups, f, ox, f, det, det).sum(axis=(1, 3))
    assert out_idx.dtype == np.uint16
    np.testing.assert_array_equal(out_counts, expected.sum(axis=(2, 3)))
    np.testing.assert_array_equal(dense(out_counts.ravel(), out_idx, det, det).reshape(expected.shape), expected)


@given(event_blocks(), st.integers(0, 60), st.integers(0, 60))
@settings(max_examples=60, deadline=None)
def test_select_toa_keeps_events_in_the_window(block, t0, t1):
    counts, indices, det_y, det_x, rng = block
    toa = rng.integers(0, 50, indices.size).astype(np.uint32)
    got_counts, got_idx, got_toa = K.select_toa(counts, indices, toa, t0, t1)
    keep = (toa >= t0) & (toa < t1)
    pos = np.repeat(np.arange(counts.size), counts.astype(np.int64))
    np.testing.assert_array_equal(got_counts, np.bincount(pos[keep], minlength=counts.size))
    np.testing.assert_array_equal(got_idx, indices[keep])
    np.testing.assert_array_equal(got_toa, toa[keep])


def test_empty_block():
    counts = np.zeros(0, np.uint32)
    idx = np.zeros(0, np.uint16)
    assert K.center_of_mass(counts, idx, 4, 0.0, 0.0)[0].shape == (0,)
    lookup = K.densify_lookup(4, 4, 0, 0, 1, 2, 2)
    assert K.densify(counts, idx, None, lookup, np.zeros((0, 2, 2), np.float32)).shape == (0, 2, 2)
    assert K.masked_counts(counts, idx, None, np.zeros(16, np.uint8), np.ones((1, 1), np.uint32)).shape == (0, 1)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_kernels_accept_both_index_dtypes(dtype):
    counts = np.array([2, 1], np.uint32)
    idx = np.array([0, 5, 3], dtype)
    y, x = K.center_of_mass(counts, idx, 4, 0.0, 0.0)
    np.testing.assert_allclose(y, [0.5, 0.0])
    np.testing.assert_allclose(x, [0.5, 3.0])
