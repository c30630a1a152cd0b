"""Generate each example's notebook ``NN_name.ipynb`` from its script ``NN_name.py``.

The scripts are the single source: Jupytext "percent" format, ``# %%`` starts a code cell
and ``# %% [markdown]`` a Markdown cell whose lines are comments (``# text``). Notebooks are
written without outputs (nbformat 4.5 JSON, deterministic cell ids).

    python examples/make_notebooks.py           # (re)write every notebook
    python examples/make_notebooks.py --check   # exit 1 if a notebook is out of date

Jupytext users can pair them instead (the notebooks' metadata declares ``py:percent``).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = re.compile(r"^\d\d_\w+\.py$")
MARKER = re.compile(r"^# %%(?P<rest>.*)$")

METADATA = {
    "jupytext": {"formats": "ipynb,py:percent"},
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def example_scripts(folder: Path = HERE) -> list[Path]:
    """The example scripts ``NN_name.py`` in ``folder``, in order."""
    return sorted(p for p in folder.iterdir() if SCRIPT.match(p.name))


def _trim(lines: list[str]) -> list[str]:
    while lines and not lines[0].strip():
        lines = lines[1:]
    while lines and not lines[-1].strip():
        lines = lines[:-1]
    return lines


def _uncomment(line: str, where: str) -> str:
    if line == "#":
        return ""
    if line.startswith("# "):
        return line[2:]
    if not line.strip():
        return ""
    raise ValueError(f"{where}: a Markdown cell line must start with '# ', got {line!r}")


def parse_cells(text: str, name: str = "<script>") -> list[tuple[str, str]]:
    """Split a percent-format script into ``(cell_type, source)`` pairs ("code" or "markdown")."""
    cells: list[tuple[str, list[str]]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        match = MARKER.match(line)
        if match:
            rest = match["rest"].strip()
            if rest.startswith("[") and rest != "[markdown]":
                raise ValueError(f"{name}:{number}: unsupported cell type {rest!r} (only [markdown])")
            cells.append(("markdown" if rest == "[markdown]" else "code", []))
        elif cells:
            kind, lines = cells[-1]
            lines.append(_uncomment(line, f"{name}:{number}") if kind == "markdown" else line)
        elif line.strip():
            raise ValueError(f"{name}:{number}: text before the first '# %%' cell marker")
    if not cells:
        raise ValueError(f"{name}: no '# %%' cell markers")
    return [(kind, "\n".join(_trim(lines))) for kind, lines in cells if _trim(lines)]


def notebook(text: str, name: str = "<script>") -> dict:
    """The nbformat-4 notebook (a JSON-ready dict, no outputs) of a percent-format script."""
    cells = []
    for i, (kind, source) in enumerate(parse_cells(text, name)):
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": source.splitlines(keepends=True)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {"cells": cells, "metadata": METADATA, "nbformat": 4, "nbformat_minor": 5}


def render(script: Path) -> str:
    """The notebook file's text for ``script``."""
    nb = notebook(script.read_text(encoding="utf-8"), script.name)
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that every notebook is up to date")
    args = parser.parse_args(argv)
    stale = []
    for script in example_scripts():
        target = script.with_suffix(".ipynb")
        text = render(script)
        if target.exists() and target.read_text(encoding="utf-8") == text:
            continue
        stale.append(target.name)
        if not args.check:
            target.write_text(text, encoding="utf-8")
    verb = "out of date" if args.check else "written"
    print(f"{verb}: {', '.join(stale)}" if stale else "all notebooks up to date")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
