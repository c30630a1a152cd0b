"""One writer per output, atomic --overwrite, unsafe targets refused before computing, and
killed runs' leftovers cleaned: after anything, the old output is intact or the new one
complete — never neither."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from stemdask.cli import main
from stemdask.outputs import HOST, OutputBusyError, OutputSlot, leftovers
from stemdask.store import FORMAT_NAME, open_store
from stemdask.testing import random_event_store


@pytest.fixture
def store(tmp_path):
    return random_event_store(tmp_path / "s.zarr", (8, 8), 16, 20, rows_per_block=4)


@pytest.fixture
def live_pid():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _lock(out, pid, host=HOST):
    out.with_name(out.name + ".lock").write_text(json.dumps({"pid": pid, "host": host, "started": "then"}))


def _variables(path) -> list[str]:
    return sorted(xr.open_zarr(path).data_vars)


def _reconstruct(store, out, method, *extra):
    return main(["reconstruct", str(store.path), "--method", method, "--out", str(out), "--quiet", *extra])


def _csr_source(tmp_path):
    src = tmp_path / "ev.npz"
    rng = np.random.default_rng(0)
    counts = rng.poisson(5, 16)
    np.savez(src, indices=rng.integers(0, 16, counts.sum()), offsets=np.concatenate([[0], np.cumsum(counts)]))
    return src, ["--scan-shape", "4", "4", "--detector-shape", "4", "4", "--assume-defaults", "--quiet"]


def test_a_live_writer_locks_the_output_for_reconstruct_and_ingest(store, tmp_path, capsys, live_pid):
    out = tmp_path / "r.zarr"
    assert _reconstruct(store, out, "com") == 0
    _lock(out, live_pid)
    assert _reconstruct(store, out, "virtual", "--overwrite") == 2
    err = capsys.readouterr().err
    assert f"{out} is being written by PID {live_pid} on {HOST}" in err and "r.zarr.lock" in err
    assert _variables(out) == ["com_x", "com_y"]  # the old result, untouched
    src, opts = _csr_source(tmp_path)
    ingested = tmp_path / "i.zarr"
    _lock(ingested, live_pid)
    assert main(["ingest", str(src), str(ingested), *opts]) == 2
    assert f"is being written by PID {live_pid}" in capsys.readouterr().err and not ingested.exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    out = tmp_path / "r.zarr"
    _lock(out, dead_pid(), host="elsewhere")
    with pytest.raises(OutputBusyError, match="PID .* on elsewhere"):
        OutputSlot(out, kind="x").__enter__()


def test_two_slots_on_one_output_exclude_each_other(tmp_path):
    out = tmp_path / "o.zarr"
    with OutputSlot(out, kind="x"):
        with pytest.raises(OutputBusyError, match="is being written by PID"):
            with OutputSlot(out, kind="x"):
                pass
    with OutputSlot(out, kind="x"):  # released
        pass
    assert not out.with_name("o.zarr.lock").exists()


def test_a_stale_lock_is_removed_and_said(store, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    _lock(out, dead_pid())
    assert _reconstruct(store, out, "com") == 0
    assert "removed the stale lock" in capsys.readouterr().err
    assert _variables(out) == ["com_x", "com_y"] and leftovers(out) == []


def test_a_foreign_partial_is_never_deleted(store, tmp_path, capsys, live_pid):
    out = tmp_path / "r.zarr"
    mine = tmp_path / "r.zarr.partial"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's folder")
    other_host = tmp_path / "r.zarr.partial-elsewhere-12"
    other_host.mkdir()
    running = tmp_path / f"r.zarr.partial-{HOST}-{live_pid}"
    running.mkdir()
    assert _reconstruct(store, out, "com") == 0
    assert (mine / "notes.txt").read_text() == "a user's folder" and other_host.exists() and running.exists()
    assert _variables(out) == ["com_x", "com_y"]


def test_a_failed_run_leaves_the_old_output_and_no_partial(store, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    assert _reconstruct(store, out, "com") == 0
    chunk = f"indices/c/{store.cap // store._indices.chunks[0]}"  # row block 1's first
    (store.path / chunk).unlink()
    assert _reconstruct(store, out, "virtual", "--overwrite") == 2
    assert chunk in capsys.readouterr().err
    assert _variables(out) == ["com_x", "com_y"] and [p.name for p in tmp_path.glob("r.zarr*")] == ["r.zarr"]


# A run killed (os._exit, no cleanup) at one step of a replacement.
KILLED = """
import os, shutil, sys
import stemdask.outputs as outputs
import stemdask.reconstruct as reconstruct
step = sys.argv[1]
if step == "compute":
    reconstruct.compute = lambda *a, **k: os._exit(137)
else:
    calls, real = [], outputs._replace
    def replace(a, b):
        calls.append(a)
        if (step == "rename-old" and len(calls) == 1) or (step == "rename-new" and len(calls) == 2):
            os._exit(137)
        real(a, b)
    outputs._replace = replace
    if step == "delete-old":
        real_rmtree = shutil.rmtree
        def rmtree(path, *a, **k):
            if ".aside-" in str(path):
                os._exit(137)
            real_rmtree(path, *a, **k)
        shutil.rmtree = rmtree
from stemdask.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _killed(step, argv):
    return subprocess.run([sys.executable, "-c", KILLED, step, *argv], capture_output=True, text=True).returncode


@pytest.mark.slow
@pytest.mark.parametrize("step", ["compute", "rename-old", "rename-new", "delete-old"])
def test_reconstruct_overwrite_killed_at_each_step(store, tmp_path, capsys, step):
    out = tmp_path / "r.zarr"
    assert _reconstruct(store, out, "com") == 0
    argv = ["reconstruct", str(store.path), "--method", "virtual", "--out", str(out), "--overwrite", "--quiet"]
    assert _killed(step, argv) == 137
    if step == "rename-new":  # between the renames: both complete beside OUT
        assert not out.exists()
    else:
        assert _variables(out) == (["abf", "adf", "bf"] if step == "delete-old" else ["com_x", "com_y"])
    assert leftovers(out) and all(stale for _, stale in leftovers(out))
    # the next run puts things right first (old data back at OUT), then replaces
    assert _reconstruct(store, out, "virtual", "--overwrite") == 0
    notes = capsys.readouterr().err
    assert ("restored" in notes) == (step == "rename-new") and "removed" in notes
    assert _variables(out) == ["abf", "adf", "bf"] and leftovers(out) == []


@pytest.mark.slow
def test_reconstruct_killed_between_the_renames_then_a_plain_run_sees_the_old_output(store, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    assert _reconstruct(store, out, "com") == 0
    assert _killed("rename-new", ["reconstruct", str(store.path), "--method", "virtual", "--out", str(out),
                                  "--overwrite", "--quiet"]) == 137
    assert _reconstruct(store, out, "virtual") == 2  # restored first, then refused: it exists
    assert "restored" in capsys.readouterr().err and _variables(out) == ["com_x", "com_y"]


def test_ingest_overwrite_killed_between_the_renames_keeps_the_old_store(tmp_path, capsys):
    src, opts = _csr_source(tmp_path)
    out = tmp_path / "i.zarr"
    assert main(["ingest", str(src), str(out), *opts]) == 0
    old_events = open_store(out).n_events
    assert _killed("rename-new", ["ingest", str(src), str(out), *opts, "--overwrite"]) == 137
    assert not out.exists()
    assert main(["ingest", str(src), str(out), *opts, "--overwrite"]) == 0
    assert "restored" in capsys.readouterr().err
    assert open_store(out).n_events == old_events and leftovers(out) == []
    assert main(["validate", str(out)]) == 0


def test_validate_reports_what_killed_runs_left(tmp_path, capsys):
    src, opts = _csr_source(tmp_path)
    out = tmp_path / "i.zarr"
    assert main(["ingest", str(src), str(out), *opts]) == 0
    assert _killed("delete-old", ["ingest", str(src), str(out), *opts, "--overwrite"]) == 137
    _lock(out, dead_pid())
    capsys.readouterr()
    assert main(["validate", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"OK {out}")
    warnings = captured.err.splitlines()
    assert len(warnings) == 2 and all(w.startswith("stemdask validate: warning: ") for w in warnings)
    assert "i.zarr.aside-" in warnings[0] and "i.zarr.lock" in warnings[1] and "stale" in warnings[0]
    assert len(leftovers(out)) == 2  # validate only reports; the next run on the output removes them


def test_ingest_overwrite_never_destroys_the_old_store_on_a_bad_input(tmp_path, capsys):
    src, opts = _csr_source(tmp_path)
    out = tmp_path / "i.zarr"
    assert main(["ingest", str(src), str(out), *opts]) == 0
    bad = tmp_path / "bad.npz"
    np.savez(bad, indices=np.array([99]), offsets=np.array([0] + [1] * 16))
    assert main(["ingest", str(bad), str(out), *opts, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "detector index 99" in err and f"nothing was replaced: {out} is as it was" in err
    assert open_store(out).complete and [p.name for p in tmp_path.glob("i.zarr*")] == ["i.zarr"]
    assert not list(tmp_path.glob(".stemdask-scratch-*"))


@pytest.mark.parametrize("where", ["inside the store", "the store itself", "holding the store"])
def test_unsafe_targets_are_refused_before_computing(store, tmp_path, capsys, monkeypatch, where):
    import stemdask.reconstruct

    monkeypatch.setattr(stemdask.reconstruct, "compute", lambda *a, **k: pytest.fail("computed"))
    out = {"inside the store": store.path / "r.zarr", "the store itself": store.path,
           "holding the store": tmp_path}[where]
    assert _reconstruct(store, out, "com", "--overwrite") == 2
    err = capsys.readouterr().err
    assert {"inside the store": "is inside the Zarr store", "the store itself": "the output is the input",
            "holding the store": "the output folder holds the input"}[where] in err
    assert open_store(store.path).complete


def test_ingest_and_simulate_refuse_an_output_inside_a_store(store, tmp_path, capsys):
    src, opts = _csr_source(tmp_path)
    assert main(["ingest", str(src), str(store.path / "i.zarr"), *opts]) == 2
    assert "is inside the Zarr store" in capsys.readouterr().err
    assert main(["simulate", str(store.path / "sim.zarr"), "--scan", "4", "4", "--detector", "8", "--quiet"]) == 2
    assert "is inside the Zarr store" in capsys.readouterr().err
    assert not (store.path / "i.zarr").exists() and not (store.path / "sim.zarr").exists()


def test_simulate_overwrite_replaces_atomically(tmp_path, capsys):
    out = tmp_path / "sim.zarr"
    for seed in ("0", "1"):
        assert main(["simulate", str(out), "--scan", "4", "4", "--detector", "8", "--seed", seed, "--overwrite",
                     "--quiet"]) == 0
    assert open_store(out).attrs["format"] == FORMAT_NAME and leftovers(out) == []

