"""``stemdask info`` (an event store or a result, and where each optics value came from) and
``stemdask validate`` (every chunk, block and total of a store)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parsers(sub, common) -> dict:
    p = sub.add_parser("info", parents=[common], help="describe an event store or a result store",
                       description="Describe an event store (shape, electrons, encoding, optics and where each value "
                                   "came from) or a result store (variables, methods and options, calibration used).")
    p.add_argument("store", help="an event store (.zarr) or a `reconstruct`/`demo` result (.zarr)")
    p.add_argument("--json", action="store_true", help="print everything as JSON (default: a summary)")
    p.set_defaults(func=cmd_info)
    made = {"info": p}

    p = sub.add_parser("validate", parents=[common], help="verify every chunk, block and total of an event store",
                       description="Read and verify every chunk and row block of an event store and its totals: one "
                                   "line per problem and exit status 2, or one OK line.")
    p.add_argument("store", help="the event store (.zarr)")
    p.add_argument("--against", metavar="SOURCE",
                   help="also recompute the source file's SHA-256 and event total (default: the store alone)")
    p.set_defaults(func=cmd_validate)
    return {**made, "validate": p}


def store_info(path) -> dict:
    from ..store import open_store

    store = open_store(path, allow_incomplete=True)
    ny, nx = store.scan_shape
    n_events = store.n_events
    stored = store.nbytes_stored()
    return {
        "path": str(store.path),
        "format_version": store.attrs["format_version"],
        "checksums": "every chunk and block, verified on each read" if store.version >= 2 else
                     "block CRCs only, checked by validate (format 1: no per-chunk checksums)",
        "complete": store.complete,
        "n_events": n_events,
        "scan_shape": list(store.scan_shape),
        "detector_shape": list(store.detector_shape),
        "rows_per_block": store.rows_per_block,
        "n_blocks": store.n_blocks,
        "index_dtype": store.index_dtype.name,
        "has_toa": store.has_toa,
        "encoding": store.encoding,
        "weight_dtype": store.weight_dtype.name if store.weighted else None,
        "n_entries": store.n_entries,
        "events_per_position": n_events / (ny * nx),
        "stored_bytes": stored,
        "bytes_per_event": stored / n_events if n_events else None,
        "dense_uint16_bytes": ny * nx * store.detector_shape[0] * store.detector_shape[1] * 2,
        "calibration": store.calibration.to_dict(),
        "provenance": store.provenance,
    }


#: How ``info`` names each calibration field (and ``calibrate --set`` spells it).
FIELD_LABELS = {"energy_ev": "energy", "scan_step_a": "scan step", "semiangle_mrad": "semi-angle",
                 "detector_pixel_mrad": "detector pixel size", "rotation_deg": "rotation", "flip": "flip",
                 "bf_center": "BF centre", "bf_radius": "BF radius", "descan": "descan",
                 "c10_estimate_a": "C10 estimate"}


def _origin(cal: dict, field: str) -> str:
    """`` [origin]`` for a field, in capitals when it is an assumption."""
    origin = (cal.get("origins") or {}).get(field)
    if origin is None:
        return ""
    return " [ASSUMED]" if origin == "assumed" else f" [{origin}]"


def _assumed(cal: dict) -> list[str]:
    return [FIELD_LABELS.get(k, k) for k, v in (cal.get("origins") or {}).items() if v == "assumed"]


def _fmt_centre(c) -> str:
    return "None (never calibrated)" if c is None else f"({c[0]:.2f}, {c[1]:.2f})"


def _calibration_lines(cal: dict, sampling: bool = True) -> list[str]:
    def o(field):
        return _origin(cal, field)

    semi = "unknown" if cal.get("semiangle_mrad") is None else f"{cal['semiangle_mrad']:g} mrad"
    radius = "None" if cal.get("bf_radius") is None else f"{cal['bf_radius']:.2f}"
    reliable = ("" if cal.get("rotation_reliable") is None
                else f" ({'reliable' if cal['rotation_reliable'] else 'NOT reliable'})")
    lines = [f"beam         {cal['energy_ev'] / 1e3:g} keV{o('energy_ev')}, semi-angle {semi}{o('semiangle_mrad')}"]
    if sampling:
        lines.append(f"sampling     scan step {cal['scan_step_a'][0]:.4g} × {cal['scan_step_a'][1]:.4g} Å"
                     f"{o('scan_step_a')}, detector {cal['detector_pixel_mrad']:.4g} mrad/px{o('detector_pixel_mrad')}")
    lines.append(f"calibration  BF centre {_fmt_centre(cal.get('bf_center'))}, radius {radius} px{o('bf_center')}, "
                 f"rotation {cal['rotation_deg']:g}°{o('rotation_deg')}, flip {cal['flip']}{o('flip')}{reliable}")
    extra = []
    if cal.get("descan"):
        extra.append(f"descan {cal['descan'].get('model')}{o('descan')}")
    if cal.get("c10_estimate_a") is not None:
        extra.append(f"C10 estimate {cal['c10_estimate_a']:.1f} Å{o('c10_estimate_a')}")
    if extra:
        lines.append("             " + ", ".join(extra))
    assumed = _assumed(cal)
    if assumed:
        lines.append(f"ASSUMED      {', '.join(assumed)}: nobody measured or gave these; set them with "
                     "`stemdask calibrate STORE --set FIELD=VALUE` (or measure: `stemdask calibrate STORE`)")
    return lines


def result_info(path) -> dict | None:
    """A result store's description, or None when ``path`` is not one."""
    from ..reconstruct import RESULT_FORMAT, result_record

    path = Path(path)
    if not (path / "zarr.json").is_file():
        return None
    try:
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except ValueError:
        return None
    if attrs.get("format") != RESULT_FORMAT:
        return None
    import xarray as xr

    saved = xr.open_zarr(path)
    variables = {name: {"dims": list(v.dims), "shape": list(v.shape), "units": v.attrs.get("units"),
                        "long_name": v.attrs.get("long_name")} for name, v in saved.data_vars.items()}
    return {"path": str(path.resolve()), "kind": "result", "variables": variables, **result_record(dict(saved.attrs))}


def _print_result_info(info: dict) -> None:
    cal = info.get("calibration") if isinstance(info.get("calibration"), dict) else None
    lines = [f"result       {info['path']}  (made by stemdask {info.get('stemdask_version', '?')})",
             f"methods      {', '.join(info.get('methods', []))}"]
    for m, opts in (info.get("method_options") or {}).items():
        if opts:
            lines.append(f"  {m:10s} " + ", ".join(f"{k}={v}" for k, v in opts.items()))
    lines.append("variables")
    for name, v in info["variables"].items():
        lines.append(f"  {name:16s} {' × '.join(map(str, v['shape']))} ({', '.join(v['dims'])})"
                     f"  {v['units'] or 'no units'}" + (f"  {v['long_name']}" if v["long_name"] else ""))
    if info.get("source") is not None:  # a live session's
        lines.append(f"source       {info['source']} ({info.get('positions_done', '?')} of "
                     f"{info.get('n_positions', '?')} positions{'' if info.get('complete') else ', INCOMPLETE'})")
    if info.get("store") is not None:
        lines.append(f"source store {info['store']}  ({info.get('store_n_events', 0):,} events"
                     + (f", source SHA-256 {str(info['source_sha256'])[:16]}…)" if info.get("source_sha256") else ")"))
    if cal is not None:
        lines += _calibration_lines(cal)
    print("\n".join(lines))


def cmd_info(args) -> int:
    result = result_info(args.store)
    if result is not None:
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_result_info(result)
        return 0
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cal = info["calibration"]
    ratio = info["dense_uint16_bytes"] / max(info["stored_bytes"], 1)
    lines = [
        f"store        {info['path']}  ({'complete' if info['complete'] else 'INCOMPLETE — ingest interrupted?'})",
        f"scan         {info['scan_shape'][0]} × {info['scan_shape'][1]} positions, step "
        f"{cal['scan_step_a'][0]:.4g} × {cal['scan_step_a'][1]:.4g} Å{_origin(cal, 'scan_step_a')}",
        f"detector     {info['detector_shape'][0]} × {info['detector_shape'][1]} px, "
        f"{cal['detector_pixel_mrad']:.4g} mrad/px{_origin(cal, 'detector_pixel_mrad')}",
        f"electrons    {info['n_events']:,}  ({info['events_per_position']:.1f} per position)",
        f"encoding     {info['encoding']}" + (f": {info['n_entries']:,} (pixel, count) entries, "
                                              f"{info['weight_dtype']} counts" if info['weight_dtype'] else
                                              ": one entry per electron"),
        f"on disk      {info['stored_bytes'] / 1e6:.2f} MB, {info['bytes_per_event'] or 0:.2f} B/electron, "
        f"{ratio:.0f}× smaller than dense uint16",
        *_calibration_lines(cal, sampling=False),
        f"row blocks   {info['n_blocks']} × {info['rows_per_block']} rows",
        f"format       version {info['format_version']}; checksums: {info['checksums']}",
    ]
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------- validate
def cmd_validate(args) -> int:
    """Read and verify every block; one line per problem on stderr and exit 2, or one OK line.
    What interrupted runs left beside the store (locks, partials, asides) is reported, not removed."""
    from ..io import check_against_source
    from ..outputs import leftovers
    from ..store import StoreError, open_store

    try:
        store = open_store(args.store, allow_incomplete=True)
        if not store.complete:
            raise StoreError(f"{store.path}: store is incomplete (its ingest was interrupted or is still running); "
                             f"finish it with stemdask ingest … --resume")
        if args.against:
            problems, summary = check_against_source(store, args.against)
        else:
            problems, total = store.check()
            summary = {"n_events": total}
    except StoreError as e:
        problems = [str(e)]
    for line in problems:
        print(f"stemdask validate: error: {line}", file=sys.stderr)
    for path, stale in leftovers(args.store):
        state = "stale, its run is gone; the next run on this output removes it" if stale else \
            "not stale or not ours: left alone"
        print(f"stemdask validate: warning: {path} left beside the store ({state})", file=sys.stderr)
    if problems:
        return 2
    against = f", matches {summary['source']} (SHA-256 and {summary['source_events']:,} events)" if args.against else ""
    scope = ("every chunk's and block's checksum verified" if store.version >= 2 else
             "format version 1: block CRCs verified, no per-chunk checksums (re-ingest for them)")
    print(f"OK {store.path}: {store.n_blocks} row blocks, {summary['n_events']:,} events, {scope}{against}")
    return 0


