"""What every subcommand shares: the user-error class of the command line, the options every
subcommand has, cluster options, and the output-path check."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError

#: The shipped cluster profiles (cluster_configs/; not imported from stemdask.cluster: start-up time).
PROFILES = "local, local-lowmem, local-cuda, slurm, slurm-gpu, pbs"
#: The default of --cluster-timeout (s); stemdask.cluster.DEFAULT_TIMEOUT (a test keeps them equal).
CLUSTER_TIMEOUT = 300.0


class CLIError(UserError):
    """A problem with what the user asked for on the command line."""


def common_options() -> argparse.ArgumentParser:
    """The options of every subcommand (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true",
                   help="on an error, show the full traceback instead of one line (default: one line for errors "
                        "in what was given; a stemdask bug always shows its traceback)")
    return p


def add_quiet(p) -> None:
    p.add_argument("--quiet", action="store_true",
                   help="no progress display (default: a bar on a terminal, else a line every few seconds)")


def add_cluster_options(p, default: str | None = None) -> None:
    """--cluster and --cluster-timeout; ``default``: --cluster's default (None: threads here)."""
    shown = "threads in this process" if default is None else default
    p.add_argument("--cluster", default=default, metavar="PROFILE",
                   help=f"run on a Dask cluster: a profile name ({PROFILES}), a profile YAML, a scheduler address "
                        f"tcp://host:port, or 'none' for threads in this process (default: {shown})")
    p.add_argument("--cluster-timeout", type=float, default=CLUSTER_TIMEOUT, metavar="S",
                   help="SLURM/PBS: longest wait for the first worker's job to start, seconds; then every job is "
                        f"cancelled and the command stops (default {CLUSTER_TIMEOUT:g})")


#: The optics options: flag → (metavar, what it is, unit).
OPTICS_OPTIONS = {
    "--energy-kev": ("KEV", "beam energy", "keV"),
    "--scan-step": ("Å", "scan step", "Å per position"),
    "--semiangle-mrad": ("MRAD", "probe convergence semi-angle", "mrad"),
    "--detector-pixel-mrad": ("MRAD", "detector sampling", "mrad per pixel"),
}


def add_optics_options(p, source: str, otherwise: dict[str, str]) -> None:
    """The optics options a command takes (the flags in ``otherwise``): a value not given comes
    from ``source``, else ``otherwise[flag]`` (e.g. "required", "300")."""
    for flag, fallback in otherwise.items():
        metavar, what, unit = OPTICS_OPTIONS[flag]
        p.add_argument(flag, type=float, metavar=metavar,
                       help=f"{what}, {unit} (default: from {source}, else {fallback})")


def check_output_path(option: str, path: str | None) -> None:
    """``path``'s folder must exist: stemdask creates only the last path component."""
    if path is None:
        return
    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: the folder {parent} does not exist (stemdask creates only the last path "
                       "component)")
