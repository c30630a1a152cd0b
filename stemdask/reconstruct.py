"""Run several reconstruction methods in one pass over the events and write the result.

The methods' lazy graphs share the per-block read tasks of one
:class:`stemdask.events.EventDataset`, so computing them together reads every row block once.
"""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import xarray as xr

from .methods import load_methods
from .outputs import OutputSlot
from .progress import compute

#: The ``format`` attr of result stores: ``--overwrite`` replaces only these.
RESULT_FORMAT = "stemdask-result"


def build_result(ds, methods: list[str], args: argparse.Namespace) -> xr.Dataset:
    """The lazy xarray Dataset of all ``methods`` on ``ds``.

    Variables keep their method's names (``phase``, ``image``, ``com_y``…); when two
    methods produce the same name, each is prefixed with its method (``ssb_phase``).
    """
    registry = load_methods()
    unknown = [m for m in methods if m not in registry]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(registry)}")
    parts = {m: registry[m].run(ds, args) for m in dict.fromkeys(methods)}
    seen: dict[str, int] = {}
    for part in parts.values():
        for name in part.data_vars:
            seen[name] = seen.get(name, 0) + 1
    renamed = []
    for m, part in parts.items():
        renamed.append(part.rename({n: f"{m}_{n}" for n in part.data_vars if seen[n] > 1}))
    result = xr.merge(renamed, combine_attrs="drop_conflicts")
    result.attrs.update({"format": RESULT_FORMAT, "methods": list(parts), "store": str(ds.store.path)})
    return result


def write_result(result: xr.Dataset, out: str | os.PathLike, *, overwrite: bool = False, progress: bool = True) -> Path:
    """Write ``result`` to a Zarr store, computing its dask graph once with a progress bar.

    Written through :class:`stemdask.outputs.OutputSlot`: the target is checked (never the
    event store read, nor inside one) and locked before anything is computed; the result is
    written under this run's own partial name and moved into place when complete, so a failed,
    interrupted or concurrent run never leaves a half-written result at ``out``.
    """
    inputs = [result.attrs["store"]] if "store" in result.attrs else []
    with OutputSlot(out, kind=RESULT_FORMAT, overwrite=overwrite, inputs=inputs) as slot:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
            delayed = result.to_zarr(slot.target, mode="w", compute=False, consolidated=True)
        compute(delayed, progress=progress, desc="reconstruct")
        return slot.commit()


def reconstruct_cli(args: argparse.Namespace) -> int:
    """``stemdask reconstruct``; the CLI has already connected to ``--cluster``."""
    from .events import open as open_dataset

    ds = open_dataset(args.store)
    overrides = {}
    if args.rotation_deg is not None:
        overrides["rotation_deg"] = args.rotation_deg
    if args.flip is not None:
        overrides["flip"] = args.flip
    if overrides:
        ds = ds.with_calibration(**overrides)
    result = build_result(ds, args.method, args)
    out = write_result(result, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out}: variables {sorted(result.data_vars)}")
    if args.png:
        from .plotting import image_panel

        saved = xr.open_zarr(out)
        image_panel({k: saved[k] for k in saved.data_vars}, args.png, title=f"{args.store}: {', '.join(args.method)}")
        print(f"wrote {args.png}")
    return 0
