"""A real single-node SLURM (Debian's slurm-wlm + munge; `.ci/slurm-single-node.sh` starts one,
as root, and `.ci/run` does): `stemdask reconstruct --cluster <a SLURM profile>` runs its
workers as SLURM jobs and gives the local result; a refused submission and a job that never
starts each end in one line with every job cancelled. Skips, saying why, where no SLURM
controller answers."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from stemdask.cli import main
from stemdask.simulate import SimulationParams, simulate

pytest.importorskip("dask_jobqueue")


def _sinfo() -> str | None:
    if shutil.which("sinfo") is None:
        return None
    try:
        run = subprocess.run(["sinfo", "-h", "-o", "%P %t"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return None
    return run.stdout if run.returncode == 0 else None


@pytest.fixture(scope="module")
def partition() -> str:
    state = _sinfo()
    if not state or not any(s in state for s in ("idle", "mix")):
        pytest.skip("no SLURM controller with an idle node answers `sinfo` here; start a single-node one with "
                    "`sudo bash .ci/slurm-single-node.sh` (CI does)")
    return state.split()[0].rstrip("*")


def _our_jobs(wait: float = 30.0) -> list[str]:
    """This module's jobs still known to squeue, after up to ``wait`` s for cancelled ones to
    leave (a running job passes through COMPLETING)."""
    deadline = time.monotonic() + wait
    while True:
        out = subprocess.run(["squeue", "-h", "-n", "stemdask-test", "-o", "%i"], capture_output=True, text=True).stdout
        if not out.split() or time.monotonic() > deadline:
            return out.split()
        time.sleep(0.5)


def _profile(tmp_path, partition, directives=()) -> Path:
    """One job of one worker process, its output in ``tmp_path``; the prologue puts this
    interpreter's environment first on PATH, and the shipped profiles' `python: python` runs it."""
    p = tmp_path / "slurm-test.yaml"
    p.write_text(yaml.safe_dump({
        "cluster": "slurm", "queue": partition, "cores": 1, "processes": 1, "memory": "2GB", "walltime": "00:10:00",
        "job_name": "stemdask-test", "python": "python", "local_directory": str(tmp_path / "worker"),
        "job_extra_directives": [f"--output={tmp_path}/job-%j.out", *directives],
        "job_script_prologue": [f"export PATH={Path(sys.executable).parent}:$PATH"], "scale": 1}))
    return p


@pytest.mark.slow
def test_reconstruct_on_slurm_equals_the_local_result(tmp_path, partition, capsys):
    store = tmp_path / "s.zarr"
    simulate(store, SimulationParams(scan_shape=(24, 24), detector=32, dose=300, seed=3), progress=False)
    args = ["reconstruct", str(store), "--method", "com", "--method", "icom", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "local.zarr")]) == 0
    assert main([*args, "--out", str(tmp_path / "slurm.zarr"), "--cluster", str(_profile(tmp_path, partition)),
                 "--cluster-timeout", "120"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Error" not in captured.err, captured.err
    local, remote = xr.open_zarr(tmp_path / "local.zarr"), xr.open_zarr(tmp_path / "slurm.zarr")
    for name in local.data_vars:
        np.testing.assert_allclose(remote[name].values, local[name].values, rtol=1e-12, atol=1e-12, err_msg=name)
    jobs = list(tmp_path.glob("job-*.out"))  # the worker ran as a SLURM job, and said so
    assert len(jobs) == 1 and "Registered to:" in jobs[0].read_text()
    assert _our_jobs() == []  # cancelled at the end


def test_a_refused_submission_is_one_line_and_leaves_no_job(tmp_path, partition, capsys):
    rc = main(["reconstruct", str(tmp_path / "s.zarr"), "--method", "com", "--out", str(tmp_path / "r.zarr"),
               "--cluster", str(_profile(tmp_path, "no-such-partition"))])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "sbatch refused the job: sbatch: error: invalid partition specified: no-such-partition" in err
    assert _our_jobs() == []


@pytest.mark.slow
def test_a_job_that_never_starts_times_out_in_one_line_and_is_cancelled(tmp_path, partition, capsys):
    profile = _profile(tmp_path, partition, ["--begin=now+3600"])  # queued for an hour
    rc = main(["reconstruct", str(tmp_path / "s.zarr"), "--method", "com", "--out", str(tmp_path / "r.zarr"),
               "--cluster", str(profile), "--cluster-timeout", "4"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "no Dask worker joined within 4 s (--cluster-timeout); slurm job(s) " in err and "were cancelled" in err
    assert _our_jobs() == []
