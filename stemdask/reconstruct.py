"""Run several reconstruction methods in one pass over the events and write the result.

The methods' lazy graphs share the per-block read tasks of one
:class:`stemdask.events.EventDataset`, so computing them together reads every row block once.

A result records how it was made. Its Dataset-level attrs hold only the run's own record
(:func:`run_record`): ``format``, ``methods``, ``method_options`` (JSON: each method's
options as given or defaulted, e.g. SSB's ``c10``, ``bin``), ``calibration`` (JSON:
:meth:`Calibration.to_dict` of the calibration actually used, with its ``origins``:
measured / assumed / command line …), ``calibration_origins`` (JSON) and
``assumed_values`` (the fields nobody measured or gave), ``store`` (absolute path),
``store_n_events``, ``source_sha256``, ``stemdask_version``. Each method's own attrs stay
on its variables (a method's Dataset attrs are copied onto each of its variables, never
onto the result). JSON strings, because every Zarr/xarray reader round-trips them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
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
    result = merge_method_parts(parts)
    result.attrs = run_record(ds, list(parts), args)
    return result


def merge_method_parts(parts: dict[str, xr.Dataset]) -> xr.Dataset:
    """One Dataset of each method's variables (``{method: Dataset}``): a name that two methods
    produce is prefixed with each method (``ricom_phase``, ``ssb_phase``); a method's Dataset
    attrs go onto its own variables."""
    seen: dict[str, int] = {}
    for part in parts.values():
        for name in part.data_vars:
            seen[name] = seen.get(name, 0) + 1
    renamed = []
    for m, part in parts.items():
        part = part.copy()
        for name in part.data_vars:
            part[name].attrs = {**part.attrs, **part[name].attrs}
        part.attrs = {}
        renamed.append(part.rename({n: f"{m}_{n}" for n in part.data_vars if seen[n] > 1}))
    return xr.merge(renamed, combine_attrs="drop_conflicts")  # parts carry no Dataset attrs now


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return str(value)


def method_options(methods: list[str], args: argparse.Namespace) -> dict:
    """Each method's own CLI options and their values in ``args`` (defaults included)."""
    registry = load_methods()
    out = {}
    for m in methods:
        probe = argparse.ArgumentParser(add_help=False)
        registry[m].add_arguments(probe)
        dests = [a.dest for a in probe._actions if a.dest not in ("help", "cluster")]
        out[m] = {d: _json_safe(getattr(args, d, None)) for d in dests}
    return out


def run_record(ds, methods: list[str], args: argparse.Namespace | None) -> dict:
    """The result's Dataset attrs: how it was made (module docstring)."""
    return {
        "format": RESULT_FORMAT,
        "methods": list(methods),
        "method_options": json.dumps(method_options(methods, args) if args is not None else {}),
        **calibration_record(ds.calibration),
        "store": str(Path(ds.store.path).resolve()),
        "store_n_events": int(ds.store.n_events),
        "source_sha256": str(ds.store.provenance.get("source_sha256")),
    }


def calibration_record(cal) -> dict:
    """The calibration part of a result's attrs (batch and live): the calibration used, its
    origins, the fields nobody measured or gave, and the stemdask version."""
    from . import __version__

    origins = dict(cal.origins)
    return {
        "calibration": json.dumps(cal.to_dict()),
        "calibration_origins": json.dumps(origins),
        "assumed_values": sorted(k for k, v in origins.items() if v == "assumed"),
        "stemdask_version": __version__,
    }


def result_record(attrs: dict) -> dict:
    """The run record of a result store's attrs with its JSON strings decoded."""
    out = dict(attrs)
    for key in ("method_options", "calibration", "calibration_origins"):
        if isinstance(out.get(key), str):
            try:
                out[key] = json.loads(out[key])
            except ValueError:
                pass
    return out


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


def calibrate_first(path, quiet: bool = False) -> dict:
    """Calibrate a store that never was (``bf_center`` is None) and print what was found."""
    from .calibrate import calibrate_store

    print(f"{path}: never calibrated; calibrating it first (as `stemdask calibrate {path}` would)", file=sys.stderr)
    found = calibrate_store(path)
    for line in calibration_lines(found):
        print(line, file=sys.stderr)
    return found


def calibration_lines(found: dict) -> list[str]:
    """What ``calibrate_store`` found, as lines to print: the summary, each message, and
    exactly one line on the rotation/flip when they are not reliable."""
    lines = [str(found.get("summary", ""))]
    unreliable = [m for m in found.get("messages", []) if str(m).startswith("rotation/flip NOT reliable")]
    lines += [str(m) for m in found.get("messages", []) if m not in unreliable]
    if not found.get("rotation_reliable", False):
        lines.append(unreliable[0] if unreliable else
                     "rotation/flip: NOT reliable; kept the stored rotation and flip — set them with "
                     "`stemdask calibrate STORE --set rotation-deg=… --set flip=…` or `reconstruct --rotation-deg`")
    return [line for line in lines if line]


def reconstruct_cli(args: argparse.Namespace) -> int:
    """``stemdask reconstruct``; the CLI has already connected to ``--cluster``."""
    from .events import open as open_dataset

    ds = open_dataset(args.store)
    if ds.calibration.bf_center is None:
        calibrate_first(args.store, quiet=args.quiet)
        ds = open_dataset(args.store)
    overrides = {}
    if args.rotation_deg is not None:
        overrides["rotation_deg"] = args.rotation_deg
    if args.flip is not None:
        overrides["flip"] = args.flip
    if overrides:
        origins = {**ds.calibration.origins, **{k: "command line" for k in overrides}}
        ds = ds.with_calibration(**overrides, origins=origins)
    result = build_result(ds, args.method, args)
    out = write_result(result, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out}: variables {sorted(result.data_vars)}")
    if args.png:
        from .plotting import image_panel

        saved = xr.open_zarr(out)
        image_panel({k: saved[k] for k in saved.data_vars}, args.png, title=f"{args.store}: {', '.join(args.method)}")
        print(f"wrote {args.png}")
    return 0
