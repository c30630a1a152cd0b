"""The README's quick start and CI stay in step; shipped profiles are installed."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    return lines[-1].strip()


def test_ci_runs_exactly_the_readme_test_command():
    cmd = _ci_test_command()
    assert "pytest" in cmd
    assert cmd in (ROOT / "README.md").read_text()


def test_cluster_profiles_are_shipped():
    from stemdask.cluster import profile_names

    assert {"local", "local-cuda", "slurm", "slurm-gpu", "pbs"} <= set(profile_names())
