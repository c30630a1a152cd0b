"""Two real processes writing one output at the same moment (issue 11: "two writers to one
output (ingest and reconstruct) … old data intact or new data complete, never neither").

Each round starts two ``stemdask`` processes that wait at a gate file and then run the same
command to the same output within a millisecond or so of each other. Exactly one may write:
every run either succeeds or says in one line that the output is being written by the other
(exit 2); afterwards the output is complete, validates, holds what one run wrote, and no lock,
``.partial`` or aside folder is left.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import xarray as xr

from stemdask.outputs import leftovers
from stemdask.store import open_store
from stemdask.testing import random_event_store

ROUNDS = 3
GATED = ("import os, sys, time\n"
         "from stemdask.cli import main\n"
         # what the commands load on first use, loaded before the gate: after it both go straight
         # to their output, so a loaded machine does not let one finish before the other starts
         "import stemdask.io.ingest, stemdask.reconstruct, stemdask.methods.com, stemdask.methods.virtual\n"
         "gate, ready = sys.argv[1:3]\n"
         "open(ready, 'w').close()\n"
         "while not os.path.exists(gate): time.sleep(0.0005)\n"
         "sys.exit(main(sys.argv[3:]))\n")


def _race(tmp_path, argv, tag):
    """Run ``stemdask argv`` in two processes released together: [(exit status, stderr)] × 2."""
    gate = tmp_path / f"gate-{tag}"
    ready = [tmp_path / f"ready-{tag}-{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", GATED, str(gate), str(r), *argv],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ready]
    t0 = time.monotonic()
    while not all(r.exists() for r in ready):  # both imported and waiting at the gate
        assert time.monotonic() - t0 < 120 and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    gate.touch()
    return [(p.wait(timeout=240), p.communicate()[1]) for p in procs]


def _check_outcomes(outcomes, out) -> bool:
    """The rules of the module docstring; returns whether the two runs overlapped (one refused)."""
    codes = sorted(rc for rc, _ in outcomes)
    assert codes in ([0, 0], [0, 2]), outcomes
    for rc, err in outcomes:
        if rc == 2:
            lines = err.strip().splitlines()
            assert len(lines) == 1 and str(out) in lines[0] and "being written by PID" in lines[0], err
    lock = out.with_name(out.name + ".lock")
    assert not lock.exists() and not leftovers(out), (lock.exists(), leftovers(out))
    return codes == [0, 2]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return random_event_store(tmp_path_factory.mktemp("race") / "s.zarr", (48, 48), 32, 400, rows_per_block=8)


@pytest.mark.slow
@pytest.mark.parametrize("stale_lock", [False, True], ids=["free", "stale-lock"])
def test_two_reconstructs_to_one_output(store, tmp_path, stale_lock):
    out = tmp_path / "r.zarr"
    expected, overlapped = None, 0
    for r in range(ROUNDS):
        if stale_lock:  # a killed run's lock: both see it stale; only one may take it over
            dead = subprocess.Popen([sys.executable, "-c", "pass"])
            dead.wait()
            out.with_name(out.name + ".lock").write_text(
                json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname(), "started": "then"}))
        outcomes = _race(tmp_path, ["reconstruct", str(store.path), "--method", "com", "--method", "virtual",
                                    "--out", str(out), "--overwrite", "--quiet"], f"r{r}")
        overlapped += _check_outcomes(outcomes, out)
        got = xr.open_zarr(out).load()
        assert set(got.data_vars) >= {"com_y", "com_x", "bf", "abf", "adf"}
        if expected is None:
            expected = got
        np.testing.assert_array_equal(got.com_y.values, expected.com_y.values)
    assert overlapped, "the two runs never overlapped: the test did not race them"


@pytest.mark.slow
def test_two_ingests_to_one_output(store, tmp_path):
    src = tmp_path / "ev.npz"
    indices, offsets = store.to_csr()
    np.savez(src, indices=indices, offsets=offsets)
    out = tmp_path / "in.zarr"
    argv = ["ingest", str(src), str(out), "--scan-shape", *map(str, store.scan_shape), "--detector-shape",
            *map(str, store.detector_shape), "--assume-defaults", "--overwrite", "--quiet"]
    overlapped = 0
    for r in range(ROUNDS):
        overlapped += _check_outcomes(_race(tmp_path, argv, f"i{r}"), out)
        got = open_store(out)
        got.validate()
        assert got.n_events == store.n_events
        np.testing.assert_array_equal(got.counts(), store.counts())
    assert overlapped, "the two runs never overlapped: the test did not race them"
