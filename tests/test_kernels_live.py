"""kernels.live.frame_sums against brute-force NumPy sums, any strides and dtypes."""

import numpy as np
import pytest

from stemdask.kernels.events import center_of_mass
from stemdask.kernels.live import frame_sums
from stemdask.kernels.ricom import accumulator_zero


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.float32])
def test_frame_sums_equal_numpy(dtype):
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 50, size=(7, 12, 10)).astype(dtype)[:, ::-1]  # a flipped view, as live uses
    masks = (rng.random((3, 12, 10)) < 0.4).astype(np.uint8)
    total, sum_y, sum_x, inside = frame_sums(frames, masks, accumulator_zero(frames.dtype))
    f = frames.astype(np.float64)
    assert np.array_equal(total, f.sum((1, 2)))
    assert np.array_equal(sum_y, (f * np.arange(12)[:, None]).sum((1, 2)))
    assert np.array_equal(sum_x, (f * np.arange(10)[None, :]).sum((1, 2)))
    assert np.array_equal(inside, np.einsum("myx,kyx->mk", f, masks))


def test_frame_com_is_bit_identical_to_the_events_com():
    rng = np.random.default_rng(1)
    frames = rng.poisson(0.3, size=(20, 16, 16)).astype(np.uint8)
    frames[3] = 0  # no electrons: NaN in both
    total, sum_y, sum_x, _ = frame_sums(frames, np.zeros((0, 16, 16), np.uint8), np.int64(0))
    flat = frames.reshape(20, -1)
    counts = flat.sum(1)
    indices = np.concatenate([np.repeat(np.arange(256), f) for f in flat])
    ey, ex = center_of_mass(counts, indices, 16, 0.0, 0.0)
    with np.errstate(invalid="ignore"):
        assert np.array_equal(sum_y / total, ey, equal_nan=True) and np.array_equal(sum_x / total, ex, equal_nan=True)
