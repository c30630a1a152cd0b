"""The lazy dataset handle: laziness, one read per block, and every product against brute force."""

from __future__ import annotations

import math
import pickle

import cloudpickle
import dask
import numpy as np
import pytest
import xarray as xr

import stemdask
from stemdask.events import EventDataset, event_bytes_per_row
from stemdask.optics import Calibration
from stemdask.reductions import Annulus
from stemdask.simulate import SimulationParams, simulate
from stemdask.store import EventStore, create_store
from stemdask.testing import raise_if_dask_computes

DET = (14, 12)
CAL = Calibration(scan_step_a=(0.5, 0.25), detector_pixel_mrad=2.0, bf_center=(6.6, 5.3), bf_radius=3.2)


def write_random_store(path, scan_shape=(11, 7), rows_per_block=3, seed=0, has_toa=False, cal=CAL):
    rng = np.random.default_rng(seed)
    store = create_store(path, scan_shape, DET, cal, rows_per_block=rows_per_block, has_toa=has_toa)
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        counts = rng.integers(0, 30, (r1 - r0, scan_shape[1]))
        counts[rng.random(counts.shape) < 0.1] = 0
        # events concentrated around the BF centre, like real patterns
        n = int(counts.sum())
        y = np.clip(np.round(rng.normal(6.6, 3, n)), 0, DET[0] - 1).astype(np.int64)
        x = np.clip(np.round(rng.normal(5.3, 3, n)), 0, DET[1] - 1).astype(np.int64)
        toa = rng.integers(0, 1000, n) if has_toa else None
        store.write_block(b, counts, y * DET[1] + x, toa)
    return store.finalize()


def dense_of(store: EventStore, toa_window=None) -> np.ndarray:
    """Brute force: the full dense (ny, nx, det_y, det_x) int64 data of a store."""
    ny, nx = store.scan_shape
    out = np.zeros((ny * nx, DET[0] * DET[1]), np.int64)
    for blk in store.iter_blocks():
        p0 = blk.row_start * nx
        pos = p0 + np.repeat(np.arange(blk.counts.size), blk.counts.ravel().astype(np.int64))
        keep = slice(None) if toa_window is None else (blk.toa >= toa_window[0]) & (blk.toa < toa_window[1])
        np.add.at(out, (pos[keep], blk.indices[keep].astype(np.int64)), 1)
    return out.reshape(ny, nx, *DET)


@pytest.fixture
def rstore(tmp_path):
    """11 rows in stored blocks of 5, read in chunks of 4 rows: two of three chunks straddle two
    blocks (rows 4..7 and 8..10)."""
    store = write_random_store(tmp_path / "r.zarr", rows_per_block=5)
    with dask.config.set({"stemdask.chunk-bytes": int(4.5 * event_bytes_per_row(store))}):
        assert stemdask.open(store.path).row_chunks == (4, 4, 3)
        yield store


@pytest.fixture
def count_reads(monkeypatch):
    """The scan rows EventStore.read_rows reads, once per read (the threaded scheduler runs
    them in this process)."""
    calls = []
    original = EventStore.read_rows

    def counting(self, pieces, index, **kw):
        calls.extend(row for _, lo, hi in pieces for row in range(lo, hi))
        return original(self, pieces, index, **kw)

    monkeypatch.setattr(EventStore, "read_rows", counting)
    return calls


def test_open_gives_the_contract(rstore):
    ds = stemdask.open(rstore.path)
    assert isinstance(ds, EventDataset)
    assert ds.scan_shape == (11, 7) and ds.detector_shape == DET
    assert ds.calibration == CAL and isinstance(ds.store, EventStore)
    ds2 = ds.with_calibration(rotation_deg=30.0, flip=True)
    assert ds2.calibration.rotation_deg == 30.0 and ds2.calibration.flip and ds.calibration.rotation_deg == 0.0
    assert stemdask.open(rstore).scan_shape == ds.scan_shape


def test_open_refuses_incomplete_store(tmp_path):
    store = create_store(tmp_path / "inc.zarr", (4, 4), DET, CAL, rows_per_block=2)
    store.write_block(0, np.ones((2, 4)), np.zeros(8, np.uint16))
    with pytest.raises(stemdask.IncompleteStoreError):
        stemdask.open(store.path)
    with pytest.raises(stemdask.IncompleteStoreError):
        stemdask.open(store)
    ds = stemdask.open(store.path, allow_incomplete=True)
    with pytest.raises(stemdask.IncompleteStoreError, match="never written"):
        ds.counts().compute()


def all_products(ds):
    return (
        ds.counts(), ds.com(), ds.com(reference="mean", units="mrad"),
        ds.virtual_detectors({"bf": "bf", "abf": "abf", "adf": "adf"}), ds.virtual(1.0, 5.0),
        ds.pacbed(), ds.radial_profile(), ds.densify(radius_px=3, bin=1), ds.densify(bin=3),
        ds.bin_scan(2).com(),
    )


def test_building_graphs_reads_nothing_and_computing_together_reads_each_row_once(rstore, count_reads):
    ds = stemdask.open(rstore.path)
    with raise_if_dask_computes():
        products = all_products(ds)
    assert count_reads == []
    with dask.config.set(scheduler="threads"):
        dask.compute(*products)
    assert sorted(count_reads) == list(range(rstore.scan_shape[0]))


def test_to_zarr_of_merged_products_reads_each_block_once(rstore, count_reads, tmp_path):
    ds = stemdask.open(rstore.path)
    merged = xr.merge([ds.com(), ds.virtual_detectors({"bf": "bf", "adf": "adf"})], combine_attrs="drop_conflicts")
    with raise_if_dask_computes():
        delayed = merged.to_zarr(tmp_path / "out.zarr", compute=False)
    assert count_reads == []
    dask.compute(delayed, scheduler="threads")
    assert sorted(count_reads) == list(range(rstore.scan_shape[0]))
    back = xr.open_zarr(tmp_path / "out.zarr")
    assert back.com_y.attrs["units"] == "px" and back.scan_x.attrs["units"] == "angstrom"


def test_graph_pickles_for_distributed_workers(rstore):
    com = stemdask.open(rstore.path).com()
    graph = dict(com.com_x.data.__dask_graph__())
    again = pickle.loads(cloudpickle.dumps(graph))
    keys = com.com_x.data.__dask_keys__()
    got = dask.get(again, keys)
    np.testing.assert_array_equal(np.block([list(row) for row in got]), com.com_x.values)


def test_counts_and_pacbed(rstore):
    ds = stemdask.open(rstore.path)
    d = dense_of(rstore)
    np.testing.assert_array_equal(ds.counts().values, d.sum(axis=(2, 3)))
    pac = ds.pacbed()
    np.testing.assert_array_equal(pac.values, d.sum(axis=(0, 1)))
    assert pac.k_y.attrs["units"] == "mrad"
    np.testing.assert_allclose(pac.k_y.values, (np.arange(DET[0]) - 6.6) * 2.0)
    np.testing.assert_allclose(pac.k_x.values, (np.arange(DET[1]) - 5.3) * 2.0)


def test_com_equals_numpy_com_of_dense_data(rstore):
    ds = stemdask.open(rstore.path)
    d = dense_of(rstore).astype(float)
    y, x = np.meshgrid(np.arange(DET[0]), np.arange(DET[1]), indexing="ij")
    with np.errstate(invalid="ignore"):
        cy = (d * y).sum(axis=(2, 3)) / d.sum(axis=(2, 3))
        cx = (d * x).sum(axis=(2, 3)) / d.sum(axis=(2, 3))
    com = ds.com()
    assert com.com_y.dims == ("scan_y", "scan_x") and com.com_y.data.chunks[0] == (4, 4, 3)
    np.testing.assert_allclose(com.com_y.values, cy - 6.6, atol=1e-12)
    np.testing.assert_allclose(com.com_x.values, cx - 5.3, atol=1e-12)
    np.testing.assert_allclose(ds.com(units="mrad").com_x.values, (cx - 5.3) * 2.0, atol=1e-12)
    np.testing.assert_allclose(ds.com(reference=(1.0, 2.0)).com_y.values, cy - 1.0, atol=1e-12)
    mean = ds.com(reference="mean")
    np.testing.assert_allclose(mean.com_x.values, cx - np.nanmean(cx), atol=1e-12)
    vac = ds.com(reference="vacuum", vacuum=(slice(0, 3), slice(2, 5)))
    np.testing.assert_allclose(vac.com_y.values, cy - np.nanmean(cy[0:3, 2:5]), atol=1e-12)
    one = ds.com(reference="vacuum", vacuum=(4, 1))
    np.testing.assert_allclose(one.com_x.values, cx - cx[4, 1], atol=1e-12)
    # coordinates in Å from the calibrated steps
    np.testing.assert_allclose(com.scan_y.values, 0.5 * np.arange(11))
    np.testing.assert_allclose(com.scan_x.values, 0.25 * np.arange(7))


def test_com_bad_input(rstore):
    ds = stemdask.open(rstore.path)
    with pytest.raises(ValueError, match="units"):
        ds.com(units="Å")
    with pytest.raises(ValueError, match="reference"):
        ds.com(reference="centre")
    with pytest.raises(ValueError, match="vacuum"):
        ds.com(reference="vacuum")
    with pytest.raises(ValueError, match="no BF-disk centre"):
        ds.with_calibration(bf_center=None).com()


def test_virtual_detectors_equal_dense_masks(rstore):
    ds = stemdask.open(rstore.path)
    d = dense_of(rstore)
    yy, xx = np.meshgrid(np.arange(DET[0]), np.arange(DET[1]), indexing="ij")
    r = np.hypot(yy - 6.6, xx - 5.3)
    R = 3.2
    custom = (yy + xx) % 3 == 0
    out = ds.virtual_detectors({"bf": "bf", "abf": "abf", "adf": "adf", "custom": custom,
                                "ring": Annulus(2.0, 8.0, "mrad"), "ringpx": Annulus(1.5, 4.5, "px")})
    expect = {"bf": r < R, "abf": (r >= R / 2) & (r < R), "adf": r >= 1.2 * R, "custom": custom,
              "ring": (r >= 1.0) & (r < 4.0), "ringpx": (r >= 1.5) & (r < 4.5)}
    for name, mask in expect.items():
        np.testing.assert_array_equal(out[name].values, (d * mask).sum(axis=(2, 3)), err_msg=name)
    assert out.bf.attrs["outer_px"] == pytest.approx(R) and out.adf.attrs["outer_mrad"] == math.inf
    assert out.ring.attrs["inner_px"] == pytest.approx(1.0)
    single = ds.virtual(2.0, 8.0)
    assert single.name == "image"
    np.testing.assert_array_equal(single.values, out.ring.values)


def test_virtual_bad_input(rstore):
    ds = stemdask.open(rstore.path)
    with pytest.raises(ValueError, match="inner < outer"):
        ds.virtual(5.0, 2.0)
    with pytest.raises(ValueError, match="preset"):
        ds.virtual_detectors({"x": "haadf"})
    with pytest.raises(ValueError, match="boolean array of the detector's shape"):
        ds.virtual_detectors({"x": np.ones((3, 3), bool)})
    with pytest.raises(ValueError, match="no BF-disk radius"):
        ds.with_calibration(bf_radius=None).virtual_detectors({"bf": "bf"})


def test_radial_profile_is_ring_mean_of_pacbed(rstore):
    ds = stemdask.open(rstore.path)
    pac = dense_of(rstore).sum(axis=(0, 1)).astype(float)
    yy, xx = np.meshgrid(np.arange(DET[0]), np.arange(DET[1]), indexing="ij")
    ring = (np.hypot(yy - 6.6, xx - 5.3) / 1.5).astype(int)
    prof = ds.radial_profile(bin_px=1.5)
    for i in range(ring.max() + 1):
        assert prof.values[i] == pytest.approx(pac[ring == i].mean() / 77)
    np.testing.assert_allclose(prof.k.values, (np.arange(prof.size) + 0.5) * 1.5 * 2.0)


@pytest.mark.parametrize("radius, b", [(3, 1), (4.2, 1), (3, 2), (5, 3), (None, 1)])
def test_densify_is_a_crop_and_bin_of_the_dense_data(rstore, radius, b):
    ds = stemdask.open(rstore.path)
    d = dense_of(rstore)
    out = ds.densify(radius_px=radius, bin=b)
    n = out.shape[2]
    assert n % 2 == 1 and out.shape == (11, 7, n, n) and out.dtype == np.float32
    # a row of patterns is larger than the chunk target: one row per chunk, cut from the reads
    assert out.data.chunks[:2] == ((1,) * 11, (7,)) and out.data.chunks[2:] == ((n,), (n,))
    y0, x0 = out.attrs["crop_origin_px"]
    pad = 40
    padded = np.pad(d, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    win = padded[:, :, pad + y0 : pad + y0 + n * b, pad + x0 : pad + x0 + n * b]
    expected = win.reshape(11, 7, n, b, n, b).sum(axis=(3, 5))
    np.testing.assert_array_equal(out.values, expected)
    # coverage: the crop's pixel edges lie at least radius_px from the BF centre
    r = out.attrs["radius_px"]
    assert y0 - 0.5 <= 6.6 - r and y0 + n * b - 0.5 >= 6.6 + r
    assert x0 - 0.5 <= 5.3 - r and x0 + n * b - 0.5 >= 5.3 + r
    centre = np.abs(out.k_y.values).argmin()
    assert centre == n // 2 and abs(out.k_y.values[centre]) <= b / 2 * 2.0
    # coords are output pixel centres relative to the BF centre, in mrad
    np.testing.assert_allclose(out.k_x.values, (x0 + np.arange(n) * b + (b - 1) / 2 - 5.3) * 2.0)


def test_densify_bad_input(rstore):
    ds = stemdask.open(rstore.path)
    with pytest.raises(ValueError, match="bin"):
        ds.densify(bin=0)
    with pytest.raises(ValueError, match="radius_px"):
        ds.densify(radius_px=-1)
    with pytest.raises(ValueError, match="center"):
        ds.densify(center=(1.0,))


@pytest.mark.parametrize("rows_per_block, f", [(3, 3), (3, 2), (4, 2), (2, 3)])
def test_bin_scan_equals_binned_dense_data(tmp_path, rows_per_block, f):
    store = write_random_store(tmp_path / "b.zarr", scan_shape=(11, 7), rows_per_block=rows_per_block)
    ds = stemdask.open(store.path)
    d = dense_of(store)
    oy, ox = 11 // f, 7 // f
    expected = d[: oy * f, : ox * f].reshape(oy, f, ox, f, *DET).sum(axis=(1, 3))
    binned = ds.bin_scan(f)
    assert binned.scan_shape == (oy, ox)
    assert binned.calibration.scan_step_a == (0.5 * f, 0.25 * f)
    np.testing.assert_array_equal(binned.counts().values, expected.sum(axis=(2, 3)))
    dense_binned = binned.densify(radius_px=20)
    y0, x0 = dense_binned.attrs["crop_origin_px"]
    assert y0 < 0 and x0 < 0 and dense_binned.shape[2] >= DET[0] - y0
    np.testing.assert_array_equal(dense_binned.values[:, :, -y0 : -y0 + DET[0], -x0 : -x0 + DET[1]], expected)
    # bin centres
    np.testing.assert_allclose(binned.com().scan_y.values, 0.5 * (np.arange(oy) * f + (f - 1) / 2))
    with pytest.raises(ValueError, match="positive integer"):
        ds.bin_scan(1.5)


def test_dose_fractionation(tmp_path):
    store = write_random_store(tmp_path / "t.zarr", has_toa=True)
    ds = stemdask.open(store.path)
    part = ds.fractionate(400.0)
    np.testing.assert_array_equal(part.counts().values, dense_of(store, (0, 400)).sum(axis=(2, 3)))
    window = ds.fractionate(700.0, t_min_ns=250.0)
    np.testing.assert_array_equal(window.pacbed().values, dense_of(store, (250, 700)).sum(axis=(0, 1)))
    assert part.counts().sum() < ds.counts().sum()
    with pytest.raises(ValueError, match="t_min_ns < t_max_ns"):
        ds.fractionate(10.0, t_min_ns=20.0)
    with pytest.raises(ValueError, match="fractionate first"):
        ds.bin_scan(2).fractionate(100.0)
    np.testing.assert_array_equal(part.bin_scan(2).counts().values,
                                  dense_of(store, (0, 400))[:10, :6].reshape(5, 2, 3, 2, *DET).sum(axis=(1, 3, 4, 5)))
    plain = write_random_store(tmp_path / "p.zarr")
    with pytest.raises(ValueError, match="no arrival times"):
        stemdask.open(plain.path).fractionate(100.0)


def test_com_on_simulator_matches_dense_simulation_and_points_along_the_phase_gradient(tmp_path):
    """The physics: COM (detector frame, no rotation) follows +∇φ of the simulated object."""
    p = SimulationParams(scan_shape=(16, 16), detector=32, dose=3000, seed=3, max_phase=0.3)
    simulate(tmp_path / "s.zarr", p, overwrite=True, progress=False, rows_per_block=5)
    ds = stemdask.open(tmp_path / "s.zarr")
    com = ds.com().compute()
    from stemdask.simulate import load_truth

    phase = load_truth(tmp_path / "s.zarr").astype(float)
    gy, gx = np.gradient(phase)
    r_y = np.corrcoef(com.com_y.values.ravel(), gy.ravel())[0, 1]
    r_x = np.corrcoef(com.com_x.values.ravel(), gx.ravel())[0, 1]
    assert r_y > 0.8 and r_x > 0.8


@pytest.mark.parametrize("n_det", [1, 3, 9])
def test_mask_groups_reproduce_every_mask(n_det):
    from stemdask.reductions import mask_groups

    masks = np.random.default_rng(n_det).random((n_det, 7, 5)) < 0.5
    labels, table = mask_groups(masks)
    assert labels.shape == (35,) and table.shape[1] == n_det
    np.testing.assert_array_equal(table[labels].T.astype(bool), masks.reshape(n_det, -1))
    assert len(np.unique(table, axis=0)) == len(table)  # groups are distinct
