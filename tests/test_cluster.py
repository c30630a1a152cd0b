"""Cluster profiles: loading, errors, and the job scripts SLURM/PBS would receive."""

import os
import time

import pytest
import yaml

from stemdask.cli import main
from stemdask.cluster import connect, job_script, load_profile, profile_names


def test_unknown_profile_names_the_choices():
    with pytest.raises(ValueError, match="unknown cluster profile 'nope'.*local"):
        load_profile("nope")


def test_profile_needs_a_known_kind(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("n_workers: 2\n")
    with pytest.raises(ValueError, match="needs a 'cluster:' kind"):
        load_profile(p)
    p.write_text("cluster: kubernetes\n")
    with pytest.raises(ValueError, match="unknown cluster kind 'kubernetes'"):
        load_profile(p)
    with pytest.raises(FileNotFoundError):
        load_profile(tmp_path / "missing.yaml")


def test_every_shipped_profile_parses():
    for name in profile_names():
        assert load_profile(name)["cluster"] in {"local", "local-cuda", "slurm", "pbs"}


def _script(name: str, **override) -> str:
    pytest.importorskip("dask_jobqueue")
    return job_script({**load_profile(name), **override})


def test_slurm_job_script_carries_directives_and_worker_command():
    script = _script("slurm", account="m1234")
    for line in ["#SBATCH -p regular", "#SBATCH -A m1234", "#SBATCH -t 01:00:00", "#SBATCH --cpus-per-task=32",
                 "#SBATCH --constraint=cpu", "source ~/stemdask-env/bin/activate"]:
        assert line in script
    assert "distributed.cli.dask_worker" in script and "--nworkers 8" in script and "--nthreads 4" in script
    # the worker runs the `python` the prologue put on PATH, not this process's absolute interpreter
    assert "\npython -m distributed.cli.dask_worker" in script


def test_slurm_gpu_job_runs_dask_cuda_worker():
    script = _script("slurm-gpu")
    assert "#SBATCH --gpus-per-node=4" in script
    assert "dask cuda worker" in script and "--rmm-pool-size 0.8" in script


def test_pbs_job_script_carries_resource_spec():
    script = _script("pbs")
    assert "#PBS -q workq" in script and "#PBS -l select=1:ncpus=36:mem=180GB" in script
    assert "#PBS -l walltime=01:00:00" in script and "--nworkers 6" in script


def test_local_profile_connects_and_computes(tmp_path):
    import dask.array as da

    p = tmp_path / "two.yaml"
    p.write_text(yaml.safe_dump({"cluster": "local", "n_workers": 2, "threads_per_worker": 1,
                                 "processes": False, "dashboard_address": None}))
    with connect(p) as client:
        assert len(client.scheduler_info()["workers"]) == 2
        assert float(da.ones((100, 100), chunks=10).sum().compute()) == 10000.0
        import dask

        assert dask.config.get("array.rechunk.method") == "p2p"


def test_no_spec_starts_nothing():
    with connect(None) as client:
        assert client is None


def test_cluster_show_prints_the_profile_and_its_job_script_without_submitting(capsys, tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch: showing needs none, and submits nothing
    assert main(["cluster", "show", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "queue: regular" in out and "#SBATCH -p regular" in out and "(not submitted;" in out
    assert "python -m distributed.cli.dask_worker" in out
    assert main(["cluster", "show", "local"]) == 0
    assert "no job script" in capsys.readouterr().out
    assert main(["cluster", "show", "nope"]) == 2
    assert "unknown cluster profile 'nope'" in capsys.readouterr().err


def _slurm_profile(tmp_path, **extra):
    p = tmp_path / "tiny-slurm.yaml"
    p.write_text(yaml.safe_dump({"cluster": "slurm", "queue": "debug", "cores": 1, "processes": 1, "memory": "1GB",
                                 "walltime": "00:05:00", "scale": 1, "python": "python", **extra}))
    return p


def test_missing_submission_command_is_one_line(tmp_path, monkeypatch, capsys):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.setenv("PATH", str(tmp_path))
    rc = main(["reconstruct", str(tmp_path / "s.zarr"), "--method", "com", "--out", str(tmp_path / "r.zarr"),
               "--cluster", str(_slurm_profile(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "submits its workers with 'sbatch', which is not on PATH" in err


@pytest.mark.parametrize("sbatch, said", [
    # refuses every job, as for a partition that does not exist (tests/test_slurm.py: a real SLURM)
    ("echo 'sbatch: error: invalid partition specified: debug' >&2\nexit 1",
     "sbatch refused the job: sbatch: error: invalid partition specified: debug"),
    # says nothing dask-jobqueue can read a job id from
    ("exit 0", "submitting the slurm job failed: ValueError: Could not parse job id")])
def test_failed_submission_is_one_line_at_once(tmp_path, monkeypatch, capsys, sbatch, said):
    """A stand-in sbatch on PATH; the command stops at once (not after --cluster-timeout)."""
    pytest.importorskip("dask_jobqueue")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(f"#!/bin/sh\n{sbatch}\n")
    (fake / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{os.environ['PATH']}")
    started = time.monotonic()
    rc = main(["reconstruct", str(tmp_path / "s.zarr"), "--method", "com", "--out", str(tmp_path / "r.zarr"),
               "--cluster", str(_slurm_profile(tmp_path)), "--cluster-timeout", "120"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert said in err and time.monotonic() - started < 60
