"""Scale-out: out-of-core COM under small worker memory limits, and surviving a killed worker."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

import stemdask
from dask.utils import parse_bytes

from stemdask.cluster import connect, load_profile, peak_rss_per_worker
from stemdask.optics import Calibration
from stemdask.store import create_store

distributed = pytest.importorskip("distributed")


def synthetic_store(path, scan_shape, detector, events_per_position, rows_per_block, seed=0):
    """A store of Poisson-many events per position at scattered detector pixels (fast to make)."""
    rng = np.random.default_rng(seed)
    ny, nx = scan_shape
    store = create_store(path, scan_shape, (detector, detector), Calibration(scan_step_a=0.5, bf_center=(detector / 2, detector / 2)),
                         rows_per_block=rows_per_block)
    n_pix = detector * detector
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        counts = rng.poisson(events_per_position, size=(r1 - r0, nx)).astype(np.uint32)
        idx = (np.arange(int(counts.sum()), dtype=np.int64) * 7919 + b) % n_pix
        store.write_block(b, counts, idx)
    return store.finalize()




@pytest.mark.slow
def test_com_out_of_core_with_bounded_worker_memory(tmp_path):
    """Event bytes ≥ 4× the workers' total memory limit (profile local-lowmem: 2 × 300 MB);
    COM completes, equals the in-process result, and each worker's peak RSS stays far below
    the event bytes it processed (memory does not grow with the data)."""
    profile = load_profile("local-lowmem")
    limit = parse_bytes(profile["memory_limit"])
    store = synthetic_store(tmp_path / "big.zarr", (512, 512), 512, 2400, rows_per_block=4)
    event_bytes = store.n_events * store.index_dtype.itemsize
    assert event_bytes >= 4 * profile["n_workers"] * limit
    expected = stemdask.open(store.path).com().compute(scheduler="threads")
    with connect("local-lowmem") as client:
        workers = set(client.scheduler_info()["workers"])
        got = stemdask.open(store.path).com().compute()
        peaks = peak_rss_per_worker(client)
        assert set(client.scheduler_info()["workers"]) == workers  # none died and restarted
    assert len(peaks) == 2 and max(peaks.values()) < 600e6 < event_bytes / 4
    np.testing.assert_allclose(got.com_y.values, expected.com_y.values)
    np.testing.assert_allclose(got.com_x.values, expected.com_x.values)


@pytest.mark.slow
def test_killed_worker_does_not_change_the_result(tmp_path):
    store = synthetic_store(tmp_path / "s.zarr", (256, 128), 128, 400, rows_per_block=2)
    expected = stemdask.open(store.path).com().compute(scheduler="threads")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        com = stemdask.open(store.path).com()
        fut = client.compute(com)
        # wait until the computation is under way, then kill one worker process outright
        distributed.wait(client.compute(com.com_y.data.blocks[0]), timeout=60)
        victim = list(client.scheduler_info()["workers"])[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        got = fut.result(timeout=120)
        assert not fut.status == "error"
    np.testing.assert_array_equal(got.com_y.values, expected.com_y.values)
    np.testing.assert_array_equal(got.com_x.values, expected.com_x.values)
