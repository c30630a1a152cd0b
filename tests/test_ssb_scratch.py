"""Keeping G: in memory, or spilled to a Zarr scratch store when it outgrows the workers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

from stemdask.methods.ssb import ssb
from stemdask.optics import Aberrations, Calibration

from helpers import as_dense, simulated

AB = Aberrations(C10=-60.0, C30=2e4)


def test_explicit_scratch_store_gives_the_same_phase(tmp_path):
    counts, _, cal = simulated(-60.0, scan=(24, 24), detector=16, dose=1e4)
    in_memory = ssb(as_dense(counts, cal), cal, AB).keep()
    assert in_memory.scratch is None
    spilled = ssb(as_dense(counts, cal), cal, AB, scratch=tmp_path / "G.zarr").keep()
    assert (tmp_path / "G.zarr").exists() and spilled.G.name.startswith("from-zarr")
    np.testing.assert_array_equal(spilled.refocus(C10=-30.0).values, in_memory.refocus(C10=-30.0).values)


def test_scratch_threshold_picks_a_temporary_store():
    counts, _, cal = simulated(scan=(16, 16), detector=16, dose=1e3)
    result = ssb(as_dense(counts, cal), cal, scratch_threshold=1000).keep()
    assert result.scratch is not None and str(result.scratch).endswith("G.zarr")
    expected = ssb(as_dense(counts, cal), cal).phase.values
    np.testing.assert_array_equal(result.phase.values, expected)


def test_kept_in_distributed_memory(tmp_path):
    distributed = pytest.importorskip("distributed")
    counts, _, cal = simulated(-60.0, scan=(24, 24), detector=16, dose=1e4)
    expected = ssb(as_dense(counts, cal), cal, AB).refocus(C10=-30.0).values
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=":0") as client:
        result = ssb(as_dense(counts, cal), cal, AB).keep()
        assert result.scratch is None
        assert all(key in client.futures for key in result.G.__dask_keys__()[0][0])  # held by the workers
        got = result.refocus(C10=-30.0).values
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


# ---------------------------------------------------------------------- larger than a worker
SCAN, CROP, ROWS = (224, 224), 64, 4


def _synthetic_block(block_info=None):
    """Deterministic counts for one row block (pure function of the block's position)."""
    r0, r1 = block_info[None]["array-location"][0]
    rng = np.random.default_rng(r0)
    return rng.random(size=(r1 - r0, SCAN[1], CROP, CROP), dtype=np.float32) * 100


def synthetic_dense(cal) -> xr.DataArray:
    """A dense array made on the workers (never in the client), 0.8 GB in all."""
    data = da.map_blocks(_synthetic_block, dtype=np.float32,
                         chunks=((ROWS,) * (SCAN[0] // ROWS), (SCAN[1],), (CROP,), (CROP,)))
    k = (np.arange(CROP) - CROP // 2) * cal.detector_pixel_mrad
    return xr.DataArray(data, dims=("scan_y", "scan_x", "k_y", "k_x"), coords={"k_y": k, "k_x": k})


@pytest.mark.slow
def test_G_larger_than_the_worker_memory_spills_and_matches(tmp_path):
    distributed = pytest.importorskip("distributed")
    # BF disk filling most of the 64×64 crop: ~3100 pixels → G ≈ 224·113·3100·8 B ≈ 630 MB,
    # more than the worker's whole memory (a bare worker with stemdask imported is ≈ 260 MB).
    cal = Calibration(energy_ev=300e3, scan_step_a=0.2, detector_pixel_mrad=0.6, semiangle_mrad=18.5,
                      bf_center=(CROP / 2, CROP / 2))
    limit = 550 * 2**20
    small_buffers = {"distributed.p2p.comm.buffer": "32 MiB", "distributed.p2p.storage.buffer": "16 MiB",
                     "temporary-directory": str(tmp_path)}  # p2p's defaults assume GBs per worker
    with dask.config.set(small_buffers):
        with distributed.LocalCluster(n_workers=1, threads_per_worker=2, memory_limit=limit, processes=True,
                                      dashboard_address=None, local_directory=str(tmp_path)) as cluster:
            with distributed.Client(cluster):
                result = ssb(synthetic_dense(cal), cal, AB)  # G chunks from the worker memory
                assert result.G.nbytes > limit
                rechunks = [k for k in result.G.__dask_graph__() if "p2p" in str(k[0] if isinstance(k, tuple) else k)]
                assert rechunks  # the rechunk is a p2p shuffle under distributed
                refocused = result.refocus(C10=-30.0).values  # keeps G: too big → Zarr scratch
                assert result.scratch is not None
    with dask.config.set(scheduler="threads"):
        expected = ssb(synthetic_dense(cal), cal, AB, qx_chunk=2).refocus(C10=-30.0).values
    np.testing.assert_allclose(refocused, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_temporary_scratch_outlives_the_result_object():
    """A refocused phase built from a temporary G store stays valid after the SSBResult is gone."""
    import gc

    counts, _, cal = simulated(scan=(16, 16), detector=16, dose=1e3)
    dense = as_dense(counts, cal)
    want = ssb(dense, cal).refocus(C10=0.0).values
    phase = ssb(dense, cal, scratch_threshold=0).refocus(C10=0.0)  # G → a temporary Zarr store
    gc.collect()
    got = phase.values
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_spilled_g_goes_under_the_configured_scratch_folder(tmp_path):
    counts, _, cal = simulated(scan=(16, 16), detector=16, dose=1e3)
    with dask.config.set({"stemdask.scratch": str(tmp_path / "shared")}):
        result = ssb(as_dense(counts, cal), cal, scratch_threshold=1000).keep()
    assert str(result.scratch).startswith(str(tmp_path / "shared" / "stemdask-ssb-"))
    np.testing.assert_array_equal(result.phase.values, ssb(as_dense(counts, cal), cal).phase.values)


def _can_unshare_mounts() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_worker_that_cannot_see_the_scratch_folder_makes_ssb_refuse(tmp_path, monkeypatch):
    """A real worker process in a mount namespace of its own, where ``hidden/`` is an empty tmpfs:
    like a worker on another node, it cannot see a scratch folder there (this machine's
    temporary folder, here), so SSB refuses to spill G in one line until it gets one the worker
    sees (``shared/``) — and then gives the in-memory phase."""
    distributed = pytest.importorskip("distributed")
    if not _can_unshare_mounts():
        pytest.skip("needs `unshare --mount` (root) to start a worker with a filesystem view of its own")
    hidden, shared = tmp_path / "hidden", tmp_path / "shared"
    hidden.mkdir()
    monkeypatch.setenv("TMPDIR", str(hidden))
    monkeypatch.setattr(tempfile, "tempdir", None)  # this machine's temporary folder: hidden/
    counts, _, cal = simulated(scan=(16, 16), detector=16, dose=1e3)
    expected = ssb(as_dense(counts, cal), cal).phase.values
    with distributed.LocalCluster(n_workers=0, processes=False, protocol="tcp://", host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        worker = subprocess.Popen(
            ["unshare", "--mount", "sh", "-c", f"mount -t tmpfs none {hidden} && exec {sys.executable} -m "
             f"distributed.cli.dask_worker {cluster.scheduler_address} --nthreads 1 --no-nanny --no-dashboard "
             f"--local-directory {shared}"])
        try:
            client.wait_for_workers(1, timeout=60)
            with pytest.raises(ValueError, match=r"under this machine's temporary folder, which 1 worker\(s\) cannot "
                                                 r"see \(tcp://.*\): give --scratch DIR"):
                ssb(as_dense(counts, cal), cal, scratch_threshold=1000).keep()
            with dask.config.set({"stemdask.scratch": str(shared)}):
                result = ssb(as_dense(counts, cal), cal, scratch_threshold=1000).keep()
                assert str(result.scratch).startswith(str(shared))
                phase = result.phase.values
        finally:
            worker.terminate()
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:  # its graceful close can wait on the scheduler: not under test
                worker.kill()
                worker.wait(30)
    np.testing.assert_array_equal(phase, expected)
