"""Scale-out: out-of-core COM, riCOM and SSB under small worker memory limits, the CLI with a
cluster profile, and surviving a killed worker."""

from __future__ import annotations

import os
import signal

import dask
import numpy as np
import pytest
import yaml
from dask.utils import parse_bytes

import stemdask
from stemdask.cli import main
from stemdask.cluster import connect, load_profile
from stemdask.testing import peak_rss_per_worker, random_event_store

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory):
    """More event bytes than the local-lowmem profile's workers hold together (2 × 1 GB), with a
    realistic 20 px BF disk on a 128² detector (SSB: a 47² dense crop, 1257 BF pixels)."""
    profile = load_profile("local-lowmem")
    store = random_event_store(tmp_path_factory.mktemp("big") / "big.zarr", (384, 384), 128, 7600,
                               bf_radius=20.0, bf_fraction=0.7)
    event_bytes = store.n_events * store.index_dtype.itemsize
    assert event_bytes > profile["n_workers"] * parse_bytes(profile["memory_limit"])
    return store


def _methods(ds):
    from stemdask.methods.ricom import ricom
    from stemdask.methods.ssb import ssb

    com = ds.com()
    return com, ricom(com, ds.calibration, kernel_size=21).phase, ssb(ds.densify(), ds.calibration).phase


@pytest.mark.slow
def test_out_of_core_com_ricom_ssb_under_dask_default_memory_limits(big_store):
    """COM, riCOM and SSB complete on 2 × 1 GB workers under dask's own memory thresholds (pause
    80 %, restart 95 %: none turned off), no worker lost, each worker's peak RSS below its
    limit, and the results equal the in-process ones."""
    profile = load_profile("local-lowmem")
    assert not any("pause" in k or "terminate" in k for k in profile.get("dask", {}))  # dask's defaults
    limit = parse_bytes(profile["memory_limit"])
    expected = [r.compute(scheduler="threads") for r in _methods(stemdask.open(big_store.path))]
    with connect("local-lowmem") as client:
        assert dask.config.get("distributed.worker.memory.pause") == 0.8
        workers = set(client.scheduler_info()["workers"])
        got = [r.compute() for r in _methods(stemdask.open(big_store.path))]
        peaks = peak_rss_per_worker(client)
        assert set(client.scheduler_info()["workers"]) == workers  # none died and restarted
    assert len(peaks) == 2 and max(peaks.values()) < limit
    np.testing.assert_allclose(got[0].com_y.values, expected[0].com_y.values)
    np.testing.assert_allclose(got[0].com_x.values, expected[0].com_x.values)
    np.testing.assert_allclose(got[1].values, expected[1].values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(
        got[2].values, expected[2].values, rtol=1e-4, atol=1e-6 * np.abs(expected[2].values).max()
    )


@pytest.mark.slow
def test_cli_reconstruct_com_on_the_small_worker_profile(big_store, tmp_path, capsys):
    profile = tmp_path / "two-small-workers.yaml"
    profile.write_text(yaml.safe_dump(load_profile("local-lowmem")))
    out = tmp_path / "com.zarr"
    assert (
        main(
            ["reconstruct", str(big_store.path), "--method", "com", "--cluster", str(profile), "--out", str(out),
             "--quiet"]
        )
        == 0
    )
    import xarray as xr

    com = xr.open_zarr(out)
    assert com.com_y.shape == (384, 384) and np.isfinite(com.com_y.values).all()


@pytest.mark.slow
def test_killed_worker_does_not_change_the_result(tmp_path):
    store = random_event_store(tmp_path / "s.zarr", (256, 128), 128, 400, rows_per_block=2)
    expected = stemdask.open(store.path).com().compute(scheduler="threads")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=50
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        com = stemdask.open(store.path).com()
        fut = client.compute(com)
        # wait until the computation is under way, then kill one worker process outright
        distributed.wait(client.compute(com.com_y.data.blocks[0]), timeout=60)
        victim = list(client.scheduler_info()["workers"])[0]
        pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)
        got = fut.result(timeout=120)
        assert victim not in client.scheduler_info()["workers"]  # it really died
    np.testing.assert_array_equal(got.com_y.values, expected.com_y.values)
    np.testing.assert_array_equal(got.com_x.values, expected.com_x.values)
