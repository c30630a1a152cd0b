"""Reconstruction methods: one module per method, named as the method.

Each module has the method's science functions and a typed entry point

    run(ds: EventDataset, *, option=default, ...) -> xarray.Dataset

that builds the method's *lazy* result from an :class:`~stemdask.events.EventDataset`. Its
keyword-only parameters are the method's options; the docstring's ``Parameters`` section
states each one's meaning and units. ``stemdask reconstruct`` builds its command-line
options from these signatures (:mod:`stemdask.cli.method_options`), and
:func:`stemdask.reconstruct.reconstruct` runs several methods in one pass over the events
(their graphs share the per-block read tasks).
"""

from __future__ import annotations

import importlib
from typing import Annotated, Callable

from ..errors import InvalidParameter


class Positive:
    """Marks an option that must be > 0 (the command line refuses others while parsing)."""


PositiveFloat = Annotated[float, Positive]
PositiveInt = Annotated[int, Positive]

#: The methods, in the order results list them.
NAMES = ("virtual", "com", "icom", "dpc", "ricom", "ssb")


def runner(name: str) -> Callable:
    """The ``run`` function of method ``name`` (its module is imported on first use)."""
    if name not in NAMES:
        raise InvalidParameter(f"unknown method {name!r}; choose from {', '.join(NAMES)}")
    return importlib.import_module(f"{__name__}.{name}").run


def summary(name: str) -> str:
    """The first line of method ``name``'s ``run`` docstring: what it computes."""
    return (runner(name).__doc__ or "").strip().splitlines()[0].rstrip(".")
