"""Dense-frame kernels against brute-force NumPy."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from stemdask.kernels.dense import counted_frames_to_events, thresholded_frames_to_events


def brute_counted(frames):
    counts = frames.sum(axis=1).astype(np.int64)
    indices = np.concatenate([np.repeat(np.arange(f.size), f.astype(np.int64)) for f in frames] or [[]])
    return counts, indices.astype(np.uint32)


def brute_thresholded(frames, threshold):
    hit = frames.astype(np.float64) > threshold  # exact comparison (NumPy would round threshold to float32)
    indices = np.concatenate([np.flatnonzero(h) for h in hit] or [[]])
    return hit.sum(axis=1), indices.astype(np.uint32)


shapes = st.tuples(st.integers(0, 6), st.integers(1, 40))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.uint8, np.uint16, np.uint32, np.int32, np.float32, np.float64]))
def test_counted_matches_brute_force(data, dtype):
    frames = data.draw(arrays(dtype, shapes, elements=st.integers(0, 7)))
    counts, indices, n_bad = counted_frames_to_events(frames)
    exp_counts, exp_indices = brute_counted(frames)
    assert n_bad == 0
    np.testing.assert_array_equal(counts, exp_counts)
    np.testing.assert_array_equal(indices, exp_indices)
    assert indices.dtype == np.uint32


@settings(max_examples=40, deadline=None)
@given(frames=arrays(np.float64, shapes, elements=st.floats(-3, 3, allow_nan=False)))
def test_counted_flags_negative_and_fractional_values(frames):
    _, _, n_bad = counted_frames_to_events(frames)
    assert n_bad == int(np.count_nonzero((frames < 0) | (frames != np.floor(frames))))


def test_counted_flags_nan_and_inf():
    frames = np.array([[1.0, np.nan, 2.0, np.inf]])
    counts, indices, n_bad = counted_frames_to_events(frames)
    assert n_bad == 2 and counts.tolist() == [3] and indices.tolist() == [0, 2, 2]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), dtype=st.sampled_from([np.uint16, np.int16, np.float32]),
       threshold=st.floats(-2, 20, allow_nan=False))
def test_thresholded_matches_brute_force(data, dtype, threshold):
    frames = data.draw(
        arrays(dtype, shapes, elements=st.integers(-2, 20) if dtype != np.uint16 else st.integers(0, 20))
    )
    counts, indices = thresholded_frames_to_events(frames, threshold)
    exp_counts, exp_indices = brute_thresholded(frames, threshold)
    np.testing.assert_array_equal(counts, exp_counts)
    np.testing.assert_array_equal(indices, exp_indices)
