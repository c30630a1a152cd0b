"""The package's layering, enforced from its imports (every import statement, also those inside
functions): a module imports only modules of its own layer or below (README, "Layout")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stemdask"

#: Layers, lowest first: module-name prefix → layer (the longest matching prefix decides).
LAYERS = {
    "stemdask.errors": 0,
    "stemdask.optics": 1, "stemdask.kernels": 1, "stemdask.chunk_plan": 1,
    "stemdask.store": 2,
    "stemdask.chunk_reads": 2, "stemdask.outputs": 2, "stemdask.progress": 2, "stemdask.io": 2, "stemdask.cluster": 2,
    "stemdask.events": 3, "stemdask.reductions": 3, "stemdask.methods": 3, "stemdask.calibrate": 3,
    "stemdask.simulate": 3, "stemdask.live_ricom": 3, "stemdask.live_ssb": 3, "stemdask.live_sources": 3,
    "stemdask.reconstruct": 4, "stemdask.plotting": 4, "stemdask.live_session": 4, "stemdask.widgets": 4,
    "stemdask.testing": 4,
    "stemdask.demo": 5, "stemdask.live_view": 5,
    "stemdask.cli": 6,
}
#: Third-party packages a layer must not import: pure kernels take and give arrays only.
FORBIDDEN = {"stemdask.kernels": ("dask", "distributed", "xarray", "zarr", "argparse"),
             "stemdask.optics": ("dask", "distributed", "xarray", "zarr", "argparse")}


def layer_of(module: str) -> int:
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's layout)")
    return LAYERS[max(matches, key=len)]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` imports (absolute names; ``from . import x`` counts as ``pkg.x``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "stemdask" or not node.module:  # from . import x: x may be a module
                found |= {f"{base}.{a.name}" for a in node.names}
            found.add(base)
    return found


def test_every_module_has_a_layer():
    for module in modules():
        if module != "stemdask":
            layer_of(module)


@pytest.mark.parametrize("module", sorted(m for m in modules() if m != "stemdask"))
def test_imports_go_down_the_layers(module):
    path = modules()[module]
    own = layer_of(module)
    known = modules()
    for name in sorted(imports(module, path)):
        if name.startswith("stemdask.") and name in known and name != "stemdask":
            assert layer_of(name) <= own, f"{module} (layer {own}) imports {name} (layer {layer_of(name)})"
        for prefix, banned in FORBIDDEN.items():
            if module == prefix or module.startswith(prefix + "."):
                assert name.split(".")[0] not in banned, f"{module} is pure array code but imports {name}"
        if name == "argparse":
            assert module.startswith("stemdask.cli"), f"{module} imports argparse: options belong to the CLI"


def test_import_stemdask_and_the_cli_load_no_heavy_modules():
    code = ("import sys, stemdask, stemdask.cli; from stemdask.cli import parse; parse(['info', 'x']); "
            "print(sorted(m for m in ('numpy', 'dask', 'xarray', 'zarr', 'distributed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
