"""Reconstruction methods behind ``stemdask reconstruct --method NAME``.

Each method module registers itself with :func:`register`: a name, its own CLI options and a
``run(dataset, args) -> xarray.Dataset`` that builds a *lazy* result from a
:class:`stemdask.events.EventDataset`. Several methods in one call share one read of the
events because their graphs share the per-block read tasks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from typing import Callable

METHODS: dict[str, "Method"] = {}

#: Modules that register methods; imported by :func:`load_methods`.
METHOD_MODULES = [
    "stemdask.methods.reductions",  # virtual, com
    "stemdask.methods.ssb",  # ssb
    "stemdask.methods.integration",  # icom, dpc, ricom
]


@dataclasses.dataclass
class Method:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable


def register(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """Decorator: register ``run(dataset, args)`` as method ``name``."""

    def deco(run):
        METHODS[name] = Method(name, help, add_arguments or (lambda p: None), run)
        return run

    return deco


def add_option(parser: argparse.ArgumentParser, *flags, **kwargs) -> None:
    """``parser.add_argument`` that tolerates an option another method already added."""
    if any(f in parser._option_string_actions for f in flags):
        return
    parser.add_argument(*flags, **kwargs)


def load_methods() -> dict[str, Method]:
    for mod in METHOD_MODULES:
        importlib.import_module(mod)
    return METHODS
