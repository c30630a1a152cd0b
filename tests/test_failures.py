"""Cluster failures end in one line: a worker killed for memory, a computation that stalls."""

from __future__ import annotations

import time

import dask
import pytest
from dask.utils import format_bytes

from stemdask.cli import main
from stemdask.progress import StalledError, compute
from stemdask.testing import random_event_store


@pytest.fixture
def store(tmp_path):
    return random_event_store(tmp_path / "s.zarr", (8, 8), 16, 20, rows_per_block=4)


def _reconstruct(store, out, method, *extra):
    return main(["reconstruct", str(store.path), "--method", method, "--out", str(out), "--quiet", *extra])


def test_a_worker_memory_death_is_one_line_naming_the_limit(store, tmp_path, capsys, monkeypatch):
    from distributed import KilledWorker

    import stemdask.reconstruct

    class Worker:
        address, memory_limit = "tcp://127.0.0.1:4321", 300 * 2**20

    def die(*args):
        raise KilledWorker(("com-abc", 1, 0), Worker(), 3)

    monkeypatch.setattr(stemdask.reconstruct, "reconstruct", die)
    assert _reconstruct(store, tmp_path / "r.zarr", "com") == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "died 4 times running task ('com-abc', 1, 0)" in err and "worker memory limit 300.00 MiB" in err
    # no cluster to measure a worker at rest on: 250 MB assumed; twice the 0.95 × 300 MiB − 250 MB room
    wanted = (250e6 + 2 * (0.95 * 300 * 2**20 - 250e6)) / 0.95
    assert f"by {format_bytes(wanted - 300 * 2**20)} to at least {format_bytes(wanted)} per worker" in err
    assert "(assumed)" in err


def test_a_task_larger_than_a_worker_is_one_line(store, tmp_path, capsys, monkeypatch):
    """distributed refuses a task whose inputs exceed a worker's memory_limit with a MemoryError
    (e.g. one q_x column of G of a huge scan): under a cluster that is one line, not a traceback."""
    import distributed

    import stemdask.reconstruct

    def refuse(*args):
        raise MemoryError("Task ('rechunk-merge', 0, 0, 0) has 489.04 MiB worth of input dependencies, but worker "
                          "tcp://127.0.0.1:4321 has memory_limit set to 429.15 MiB.")

    monkeypatch.setattr(stemdask.reconstruct, "reconstruct", refuse)
    with distributed.LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster:
        assert _reconstruct(store, tmp_path / "r.zarr", "com", "--cluster", cluster.scheduler_address) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has memory_limit set to 429.15 MiB: raise memory_limit in the cluster profile" in err[0]


@pytest.mark.slow
def test_a_real_out_of_memory_worker_is_one_line_saying_by_how_much(tmp_path, capsys):
    """A dense crop whose every scan row is larger than the worker's whole memory: the nanny
    restarts the worker until dask gives up; the command says so in one line, with a limit."""
    pytest.importorskip("distributed")
    store = random_event_store(tmp_path / "wide.zarr", (4, 96), 1024, 50, bf_radius=400.0)  # crop 883² px
    profile = tmp_path / "tiny.yaml"
    profile.write_text("cluster: local\nn_workers: 1\nthreads_per_worker: 1\nmemory_limit: 400MB\n"
                       "processes: true\ndashboard_address: null\nsilence_logs: CRITICAL\n"
                       "dask:\n  distributed.scheduler.allowed-failures: 1\n")
    assert _reconstruct(store, tmp_path / "r.zarr", "ssb", "--cluster", str(profile)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    err = [line for line in lines if "error" in line]
    assert len(err) == 1 and err[0].startswith("stemdask reconstruct: error: ") and "Traceback" not in lines, lines
    # distributed says KilledWorker, or cancels the result whose data died with the worker
    assert "died" in err[0] and "most likely out of memory: worker memory limit 381.47 MiB" in err[0]
    assert not any("P2PBarrierTask" in line for line in lines)  # dask's own noise about p2p graphs
    assert "raise memory_limit in the cluster profile by" in err[0] and "(assumed)" not in err[0]  # measured
    assert not (tmp_path / "r.zarr").exists()


@pytest.mark.slow
@pytest.mark.parametrize("progress", [False, True])
def test_the_watchdog_stops_a_computation_that_makes_no_progress(progress):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=None) as cluster, \
            Client(cluster), dask.config.set({"stemdask.watchdog-s": 1.0}):
        assert compute(dask.delayed(sum)([1, 2]), progress=progress) == (3,)  # progressing: untouched
        t = time.monotonic()
        with pytest.raises(StalledError, match="no task made progress for 1 s .*memory limit"):
            compute(dask.delayed(time.sleep)(6), progress=progress)
        assert time.monotonic() - t < 5


def test_a_stalled_computation_is_one_line_from_the_cli(store, tmp_path, capsys, monkeypatch):
    import stemdask.reconstruct

    def stall(*args):
        raise StalledError("no task made progress for 600 s")

    monkeypatch.setattr(stemdask.reconstruct, "reconstruct", stall)
    assert _reconstruct(store, tmp_path / "r.zarr", "com") == 2
    assert capsys.readouterr().err == "stemdask reconstruct: error: no task made progress for 600 s\n"
