"""Run several reconstruction methods in one pass over the events and write the result.

``reconstruct(ds, {"ssb": {"c10": -150.0}, "com": {}})`` is the Python form of
``stemdask reconstruct STORE --method ssb --c10 -150 --method com``: each method's options are
the keyword parameters of its ``run`` (:mod:`stemdask.methods`).

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

import inspect
import json
import math
import os
import warnings
from pathlib import Path

import xarray as xr

from .errors import InvalidParameter
from .methods import runner
from .outputs import OutputSlot
from .progress import compute

#: The ``format`` attr of result stores: ``--overwrite`` replaces only these.
RESULT_FORMAT = "stemdask-result"


def reconstruct(ds, methods: dict[str, dict] | list[str] | tuple[str, ...]) -> xr.Dataset:
    """The lazy xarray Dataset of ``methods`` on the event dataset ``ds``.

    ``methods``: ``{name: {option: value}}`` (options of :func:`stemdask.methods.<name>.run`;
    those not given take its defaults), or a list of names with default options. Variables
    keep their method's names (``phase``, ``image``, ``com_y``…); when two methods produce the
    same name, each is prefixed with its method (``ssb_phase``). The Dataset's attrs are the
    run record (module docstring).
    """
    requested = dict.fromkeys(methods, None) if isinstance(methods, (list, tuple)) else dict(methods)
    options = {name: bound_options(name, opts or {}) for name, opts in requested.items()}
    reads = ds.decode_once() if len(options) > 1 else ds  # several products of each read: decode it once
    parts = {name: runner(name)(reads, **opts) for name, opts in options.items()}
    result = merge_method_parts(parts)
    result.attrs = run_record(ds, options)
    return result


def bound_options(name: str, given: dict) -> dict:
    """Every option of method ``name``: ``given`` and the defaults of the rest."""
    signature = inspect.signature(runner(name))
    known = [p for p in signature.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    unknown = sorted(set(given) - {p.name for p in known})
    if unknown:
        raise InvalidParameter(f"method {name!r} has no option {', '.join(map(repr, unknown))}; "
                               f"its options: {', '.join(p.name for p in known)}")
    return {p.name: given.get(p.name, p.default) for p in known}


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


def run_record(ds, options: dict[str, dict]) -> dict:
    """The result's Dataset attrs: how it was made (module docstring); ``options``: each
    method's options (:func:`bound_options`)."""
    return {
        "format": RESULT_FORMAT,
        "methods": list(options),
        "method_options": json.dumps({m: {k: _json_safe(v) for k, v in o.items()} for m, o in options.items()}),
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
            # dask's delayed of a graph with a p2p rechunk (SSB under distributed) cannot rename
            # its keys against reuse by another computation; this graph is computed once, alone
            warnings.filterwarnings("ignore", message="Cannot block reusing for graphs including a P2PBarrierTask")
            delayed = result.to_zarr(slot.target, mode="w", compute=False, consolidated=True)
            compute(delayed, progress=progress, desc="reconstruct")
        return slot.commit()
