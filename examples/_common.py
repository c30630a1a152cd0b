"""Shared set-up of the examples: problem size, output folder, headless plotting.

Environment:

* ``STEMDASK_EXAMPLE_SIZE``: ``"full"`` (default; sizes worth looking at) or ``"small"``
  (tiny scans, a few seconds per example, what CI runs).
* ``STEMDASK_EXAMPLE_OUT``: folder for stores and figures (default: a new temporary folder).

In a notebook figures show inline; as a script matplotlib runs headless (Agg) and every
figure is written to the output folder as ``<name>.png``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

SIZES = ("small", "full")


def in_notebook() -> bool:
    """True inside a Jupyter kernel."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ == "ZMQInteractiveShell"


if not in_notebook():
    import matplotlib

    matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def size() -> str:
    """The problem size from ``STEMDASK_EXAMPLE_SIZE``."""
    value = os.environ.get("STEMDASK_EXAMPLE_SIZE", "full").strip().lower()
    if value not in SIZES:
        raise ValueError(f"STEMDASK_EXAMPLE_SIZE must be one of {SIZES}, got {value!r}")
    return value


def pick(*, small, full):
    """``small`` or ``full`` according to :func:`size`."""
    return small if size() == "small" else full


def output_dir(name: str) -> Path:
    """``$STEMDASK_EXAMPLE_OUT/<name>`` (created), or a new temporary folder."""
    root = os.environ.get("STEMDASK_EXAMPLE_OUT")
    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="stemdask-examples-"))
    out = base / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def save(fig, out: Path, name: str) -> None:
    """Write ``fig`` to ``out/<name>.png``; outside a notebook also close it."""
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    if not in_notebook():
        plt.close(fig)


def pearson(a, b) -> float:
    """Pearson correlation of two images."""
    import numpy as np

    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])
