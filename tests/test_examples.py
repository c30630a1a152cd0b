"""The examples run headless at the small size, and every notebook is generated from its script.

Each ``examples/NN_name.py`` runs as a subprocess with ``STEMDASK_EXAMPLE_SIZE=small`` and
asserts its own physics (the SSB sweep finds the simulated defocus, riCOM matches its
transfer function, live riCOM ends at batch riCOM, ...); here we check it exits cleanly and
writes its figures. ``examples/NN_name.ipynb`` must hold the cells its script defines.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_notebooks = _load("make_notebooks")
SCRIPTS = make_notebooks.example_scripts(EXAMPLES)

#: What each example writes into its output folder.
OUTPUTS = {
    "01_lazy_exploration": ["products.png", "products.zarr"],
    "02_ssb_aberration_tuning": ["focus_sweep.png", "trotters.png"],
    "03_ricom_kernel_tuning": ["kernel_sizes.png", "frequency_response.png", "band_pass.png"],
    "04_live_ricom_replay": ["live_view.png", "snapshots.png"],
}


def test_every_example_is_listed():
    assert [p.stem for p in SCRIPTS] == sorted(OUTPUTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_example_runs_headless_at_the_small_size(script, tmp_path):
    env = {**os.environ, "STEMDASK_EXAMPLE_SIZE": "small", "STEMDASK_EXAMPLE_OUT": str(tmp_path)}
    env.pop("MPLBACKEND", None)
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=180)
    assert run.returncode == 0, f"{script.name} failed:\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"
    out = tmp_path / script.stem
    for name in OUTPUTS[script.stem]:
        path = out / name
        assert path.exists(), f"{script.name} did not write {name}"
        if path.suffix == ".png":
            assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_is_generated_from_its_script(script):
    target = script.with_suffix(".ipynb")
    assert target.exists(), f"{target.name} missing: run python examples/make_notebooks.py"
    stored = json.loads(target.read_text(encoding="utf-8"))
    wanted = make_notebooks.notebook(script.read_text(encoding="utf-8"), script.name)
    assert stored["nbformat"] == 4
    cells = lambda nb: [(c["cell_type"], "".join(c["source"])) for c in nb["cells"]]  # noqa: E731
    assert cells(stored) == cells(wanted), f"{target.name} is out of date: run python examples/make_notebooks.py"


def test_percent_format_parsing():
    text = "# %% [markdown]\n# # Title\n#\n# Some *text*.\n\n# %%\nx = 1  # a comment\n\n\n# %%\n\n"
    assert make_notebooks.parse_cells(text) == [("markdown", "# Title\n\nSome *text*."), ("code", "x = 1  # a comment")]
    nb = make_notebooks.notebook(text)
    assert [c["id"] for c in nb["cells"]] == ["cell-00", "cell-01"]
    assert nb["cells"][0]["source"] == ["# Title\n", "\n", "Some *text*."]
    assert nb["cells"][1]["outputs"] == [] and nb["cells"][1]["execution_count"] is None
    with pytest.raises(ValueError, match="before the first"):
        make_notebooks.parse_cells("import os\n# %%\nx = 1\n")
    with pytest.raises(ValueError, match="must start with '# '"):
        make_notebooks.parse_cells("# %% [markdown]\nnot a comment\n")
    with pytest.raises(ValueError, match="unsupported cell type"):
        make_notebooks.parse_cells("# %% [raw]\n# x\n")


def test_example_size_is_checked(monkeypatch):
    common = _load("_common")
    monkeypatch.setenv("STEMDASK_EXAMPLE_SIZE", "small")
    assert common.pick(small=1, full=2) == 1
    monkeypatch.delenv("STEMDASK_EXAMPLE_SIZE")
    assert common.pick(small=1, full=2) == 2
    monkeypatch.setenv("STEMDASK_EXAMPLE_SIZE", "huge")
    with pytest.raises(ValueError, match="STEMDASK_EXAMPLE_SIZE"):
        common.size()
