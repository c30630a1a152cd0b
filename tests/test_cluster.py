"""Cluster profiles: loading, errors, and the job scripts SLURM/PBS would receive."""

import pytest
import yaml

from stemdask.cluster import connect, load_profile, make_cluster, profile_names


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
    profile = {k: v for k, v in load_profile(name).items() if k != "scale"}
    profile.update(override)
    cluster = make_cluster(profile)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


def test_slurm_job_script_carries_directives_and_worker_command():
    script = _script("slurm", account="m1234")
    for line in ["#SBATCH -p regular", "#SBATCH -A m1234", "#SBATCH -t 01:00:00", "#SBATCH --cpus-per-task=32",
                 "#SBATCH --constraint=cpu", "source ~/stemdask-env/bin/activate"]:
        assert line in script
    assert "distributed.cli.dask_worker" in script and "--nworkers 8" in script and "--nthreads 4" in script


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
