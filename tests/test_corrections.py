"""Detector mask (excluded + filled) and descan in every product, against brute force on dense patterns."""

from __future__ import annotations

import numpy as np
import pytest

import stemdask
from stemdask.optics import Calibration, descan_offsets
from stemdask.store import create_store

DET = (12, 14)
SCAN = (6, 5)
CAL = Calibration(scan_step_a=0.5, detector_pixel_mrad=1.0, bf_center=(5.6, 6.3), bf_radius=3.5)
DESCAN = {"model": "plane", "coef_y": [1.2, -0.7], "coef_x": [0.4, 1.5]}


@pytest.fixture
def dense_store(tmp_path):
    rng = np.random.default_rng(3)
    dense = rng.poisson(2.0, size=SCAN + DET).astype(np.int64)
    store = create_store(tmp_path / "s.zarr", SCAN, DET, CAL, rows_per_block=4)
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        flat = dense[r0:r1].reshape((r1 - r0) * SCAN[1], -1)
        indices = np.concatenate([np.repeat(np.arange(flat.shape[1]), row) for row in flat])
        store.write_block(b, flat.sum(axis=1).reshape(r1 - r0, SCAN[1]), indices)
    store.finalize()
    mask = np.zeros(DET, bool)
    mask[4, 5] = mask[7, 9] = True
    mask[:, 11] = True
    fill = np.where(mask, rng.uniform(0.001, 0.01, DET), 0.0)
    return store, dense.astype(np.float64), mask, fill


def filled(dense, mask, fill):
    kept = dense * ~mask
    return kept + kept.sum(axis=(2, 3), keepdims=True) * fill


def test_com_with_mask_and_descan_equals_brute_force(dense_store):
    store, dense, mask, fill = dense_store
    ds = stemdask.open(store.path).with_mask(mask, fill).with_calibration(descan=DESCAN)
    com = ds.com().compute()
    pat = filled(dense, mask, fill)
    yy, xx = np.indices(DET)
    n = pat.sum(axis=(2, 3))
    off_y, off_x = descan_offsets(DESCAN, SCAN)
    want_y = (pat * yy).sum(axis=(2, 3)) / n - CAL.bf_center[0] - off_y
    want_x = (pat * xx).sum(axis=(2, 3)) / n - CAL.bf_center[1] - off_x
    np.testing.assert_allclose(com.com_y.values, want_y, atol=1e-9)
    np.testing.assert_allclose(com.com_x.values, want_x, atol=1e-9)
    assert com.com_y.attrs["descan"] == "plane" and com.com_y.attrs["masked_pixels"] == int(mask.sum())


def test_annular_detectors_follow_the_descan_and_fill_masked_pixels(dense_store):
    store, dense, mask, fill = dense_store
    ds = stemdask.open(store.path).with_mask(mask, fill).with_calibration(descan=DESCAN)
    got = ds.virtual_detectors({"bf": "bf", "adf": "adf"}).compute()
    pat = filled(dense, mask, fill)
    yy, xx = np.indices(DET)
    off_y, off_x = descan_offsets(DESCAN, SCAN)
    for name, (lo, hi) in {"bf": (0.0, 1.0), "adf": (1.2, np.inf)}.items():
        want = np.empty(SCAN)
        for iy in range(SCAN[0]):
            for ix in range(SCAN[1]):
                r = np.hypot(yy - CAL.bf_center[0] - off_y[iy, ix], xx - CAL.bf_center[1] - off_x[iy, ix])
                sel = (r >= lo * CAL.bf_radius) & (r < hi * CAL.bf_radius)
                want[iy, ix] = pat[iy, ix][sel].sum()
        np.testing.assert_allclose(got[name].values, want, rtol=1e-12)


def test_pacbed_fills_masked_pixels_and_masks_do_not_change_unmasked_products(dense_store):
    store, dense, mask, fill = dense_store
    ds = stemdask.open(store.path)
    pac = ds.with_mask(mask, fill).pacbed().values
    total = dense.sum(axis=(0, 1))
    kept = total[~mask].sum()
    np.testing.assert_allclose(pac, np.where(mask, kept * fill, total))
    np.testing.assert_array_equal(ds.pacbed().values, total)  # no mask: the plain sum


def test_densify_shifted_with_zero_shift_equals_densify_and_integer_shifts_move_the_crop(dense_store):
    store, dense, mask, fill = dense_store
    ds = stemdask.open(store.path)
    plain = ds.densify(radius_px=4, bin=1).values
    zero = ds.with_calibration(descan={"model": "plane", "coef_y": [0.0, 0.0], "coef_x": [0.0, 0.0]})
    np.testing.assert_array_equal(zero.densify(radius_px=4, bin=1).values, plain)
    # a plane descan of exactly one pixel per scan row (u = iy/ny - …): check one position by hand
    moved = ds.with_calibration(descan={"model": "plane", "coef_y": [float(SCAN[0]), 0.0], "coef_x": [0.0, 0.0]})
    got = moved.densify(radius_px=4, bin=1).values
    off_y, _ = descan_offsets(moved.calibration.descan, SCAN)
    iy = 0  # offset −2.5 px: the pattern is read 2.5 px higher, shared between two rows
    a = int(np.floor(-off_y[iy, 0]))
    frac = -off_y[iy, 0] - a
    want = (1 - frac) * np.roll(plain[iy, 0], a, axis=0) + frac * np.roll(plain[iy, 0], a + 1, axis=0)
    inner = slice(4, plain.shape[2] - 4)  # away from rows rolled in from the other edge
    np.testing.assert_allclose(got[iy, 0][inner], want[inner], atol=1e-5)
    assert got.sum() == pytest.approx(plain.sum(), rel=0.05)


@pytest.mark.parametrize("f, chunk_bytes", [(2, None), (3, None), (4, None), (2, 150), (2, 7000)])
@pytest.mark.parametrize("corrected", [False, True])
def test_densify_of_a_binned_scan_sums_each_positions_own_pattern(dense_store, f, chunk_bytes, corrected):
    """``bin_scan(f).densify()`` bins as it densifies: every position cropped with its own
    descan and mask fill, then summed over its f × f bin (trailing rows and columns dropped;
    small chunks: several output chunks, each drawing on more than one read)."""
    import dask

    store, dense, mask, fill = dense_store
    with dask.config.set({"stemdask.chunk-bytes": chunk_bytes}):
        ds = stemdask.open(store.path)
        if corrected:
            ds = ds.with_mask(mask, fill).with_calibration(descan=DESCAN)
        each = ds.densify(radius_px=4, bin=2).values.astype(np.float64)
        binned = ds.bin_scan(f).densify(radius_px=4, bin=2)
    oy, ox = SCAN[0] // f, SCAN[1] // f
    want = each[: oy * f, : ox * f].reshape(oy, f, ox, f, *each.shape[2:]).sum(axis=(1, 3))
    assert binned.shape == want.shape
    assert chunk_bytes is None or len(binned.data.chunks[0]) > 1
    assert max(binned.data.chunks[0]) * f <= max(max(ds.row_chunks), f)  # a task reads about one read's rows
    np.testing.assert_allclose(binned.values, want, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(binned.scan_y.values, 0.5 * (np.arange(oy) * f + (f - 1) / 2))
    assert binned.attrs["descan"] == ("plane" if corrected else "off")
