"""The ``stemdask`` command: simulate, ingest, info, validate, calibrate, reconstruct."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .optics import Aberrations
from .outputs import OutputSlot, leftovers
from .progress import StalledError
from .store import FORMAT_NAME, StoreError, open_store

CLUSTER_HELP = "run on a Dask cluster: a profile name (local, local-lowmem, local-cuda, slurm, slurm-gpu, pbs), " \
    "a profile YAML, or a scheduler address tcp://host:port (default: threads in this process)"
#: The default of --cluster-timeout (s); stemdask.cluster.DEFAULT_TIMEOUT, not imported here (start-up time).
CLUSTER_TIMEOUT = 300.0


def add_cluster_options(p, default=None, cluster_help=CLUSTER_HELP) -> None:
    """--cluster and --cluster-timeout."""
    p.add_argument("--cluster", default=default, help=cluster_help)
    p.add_argument("--cluster-timeout", type=float, default=CLUSTER_TIMEOUT, metavar="S",
                   help=f"SLURM/PBS: longest wait for the first worker's job to start, s (default {CLUSTER_TIMEOUT:g}); "
                        "then every job is cancelled and the command stops")


class CLIError(Exception):
    """A problem with what the user asked for; printed without a traceback."""


def _calibration_overrides(args) -> dict:
    fields = {
        "energy_ev": None if getattr(args, "energy_kev", None) is None else args.energy_kev * 1e3,
        "scan_step_a": getattr(args, "scan_step", None),
        "semiangle_mrad": getattr(args, "semiangle_mrad", None),
        "detector_pixel_mrad": getattr(args, "detector_pixel_mrad", None),
    }
    return {k: v for k, v in fields.items() if v is not None}


# ---------------------------------------------------------------------- simulate
def _descan_record(values: list[str] | None) -> dict | None:
    """``--descan MODEL C…`` → a ``Calibration.descan`` record (CLIError when malformed)."""
    from .optics import DESCAN_TERMS, check_descan

    if not values:
        return None
    model, coefs = values[0], values[1:]
    if model not in DESCAN_TERMS:
        raise CLIError(f"--descan: model must be one of {', '.join(sorted(DESCAN_TERMS))}, got {model!r}")
    n = len(DESCAN_TERMS[model])
    try:
        numbers = [float(c) for c in coefs]
    except ValueError:
        raise CLIError(f"--descan {model}: coefficients must be numbers (px), got {' '.join(coefs)}") from None
    if len(numbers) != 2 * n:
        raise CLIError(f"--descan {model}: give {2 * n} coefficients (px): {n} for y then {n} for x, terms "
                       f"{', '.join(DESCAN_TERMS[model])} of the centred scan fractions u (rows), v (columns)")
    record = {"model": model, "coef_y": numbers[:n], "coef_x": numbers[n:]}
    check_descan(record)
    return record


def simulation_params(args):
    """The :class:`~stemdask.simulate.SimulationParams` of ``stemdask simulate``'s options:
    ``--realistic`` starts from :meth:`SimulationParams.realistic`, every fault option given
    replaces its part of it."""
    from .simulate import SimulationParams

    kw = dict(scan_shape=tuple(args.scan), detector=args.detector, dose=args.dose,
              aberrations=Aberrations(C10=args.c10), seed=args.seed, max_phase=args.max_phase)
    given = {"rotation_deg": args.rotation_deg, "flip": args.flip or None, "tds": args.tds, "bragg": args.bragg,
             "bf_offset_px": tuple(args.bf_offset) if args.bf_offset else None, "descan": _descan_record(args.descan),
             "bragg_tilt": tuple(args.bragg_tilt) if args.bragg_tilt else None,
             "hot_pixels": tuple(tuple(h) for h in args.hot_pixel) if args.hot_pixel else None,
             "dead_pixels": tuple(tuple(d) for d in args.dead_pixel) if args.dead_pixel else None,
             "dead_columns": tuple(args.dead_column) if args.dead_column else None,
             "dead_rows": tuple(args.dead_row) if args.dead_row else None}
    kw.update({k: v for k, v in given.items() if v is not None})
    return SimulationParams.realistic(**kw) if args.realistic else SimulationParams(**kw)


def cmd_simulate(args) -> int:
    from .simulate import simulate

    params = simulation_params(args)
    with OutputSlot(args.out, kind=FORMAT_NAME, overwrite=args.overwrite) as slot:
        store = simulate(slot.target, params, progress=not args.quiet)
        out = slot.commit()
    print(f"wrote {out}: {store.n_events:,} events, scan {params.scan_shape}, "
          f"detector {params.detector}×{params.detector}, step {params.scan_step:.4f} Å, "
          f"C10 {params.aberrations.C10:g} Å; true phase in array 'phase_truth'")
    f = params.faults()
    if any([f["rotation_deg"] % 360, f["flip"], params.bf_offset_px != (0.0, 0.0), f["descan"], f["hot_pixels"],
            f["dead_pixels"], params.bragg, params.tds]):
        print(f"faults: rotation {f['rotation_deg']:g}°, flip {f['flip']}, BF centre ({f['bf_center'][0]:g}, "
              f"{f['bf_center'][1]:g}) px, descan {f['descan']['model'] if f['descan'] else 'none'}, "
              f"{len(f['hot_pixels'])} hot / {len(f['dead_pixels'])} dead pixels, Bragg {params.bragg:g}, "
              f"TDS {params.tds:g}; all of it in the store's provenance (stemdask.simulate.load_faults)")
    return 0


# ---------------------------------------------------------------------- ingest
def cmd_ingest(args) -> int:
    from .io import ingest

    store = ingest(
        args.input, args.out, format=args.format, mode=args.mode,
        scan_shape=args.scan_shape, detector_shape=args.detector_shape,
        rows_per_block=args.rows_per_block, calibration=_calibration_overrides(args),
        threshold=args.threshold, dwell_ns=args.dwell_ns, frames_range=args.frames_range,
        encoding=args.encoding, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
        assume_defaults=args.assume_defaults,
    )
    print(f"wrote {store.path}: {store.n_events:,} electrons ({store.encoding}), scan {store.scan_shape}, "
          f"detector {store.detector_shape}")
    origins = store.calibration.origins
    assumed = [_FIELD_LABELS[k] for k in ("energy_ev", "scan_step_a", "detector_pixel_mrad") if origins.get(k) == "assumed"]
    if assumed:
        print(f"ASSUMED (neither in the source nor given): {', '.join(assumed)} — set the real values with "
              f"`stemdask calibrate {store.path} --set energy-kev=… --set scan-step=… --set detector-pixel-mrad=…`")
    return 0


# ---------------------------------------------------------------------- info
def store_info(path) -> dict:
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
_FIELD_LABELS = {"energy_ev": "energy", "scan_step_a": "scan step", "semiangle_mrad": "semi-angle",
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
    return [_FIELD_LABELS.get(k, k) for k, v in (cal.get("origins") or {}).items() if v == "assumed"]


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
    from .reconstruct import RESULT_FORMAT, result_record

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
    from .io import check_against_source

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


# ---------------------------------------------------------------------- calibrate
#: ``calibrate --set NAME=VALUE``: name → (Calibration field, unit for messages).
SETTABLE = {
    "energy-kev": ("energy_ev", "keV"),
    "scan-step": ("scan_step_a", "Å"),
    "semiangle-mrad": ("semiangle_mrad", "mrad"),
    "detector-pixel-mrad": ("detector_pixel_mrad", "mrad/px"),
    "rotation-deg": ("rotation_deg", "°"),
    "flip": ("flip", ""),
}
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


def _number(name: str, text: str, positive: bool = True) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise CLIError(f"--set {name}={text}: not a number") from None
    if not math.isfinite(v) or (positive and v <= 0):
        raise CLIError(f"--set {name}={text}: must be a {'positive ' if positive else ''}finite number")
    return v


def parse_settings(items: list[str]) -> dict:
    """``["scan-step=0.2", "flip=true", …]`` → Calibration field changes; CLIError on any bad one."""
    changes = {}
    for item in items:
        name, sep, text = item.partition("=")
        name, text = name.strip().lower().replace("_", "-"), text.strip()
        if not sep or name not in SETTABLE:
            raise CLIError(f"--set {item}: unknown field {name!r} (expected NAME=VALUE); "
                           f"settable: {', '.join(SETTABLE)}")
        field = SETTABLE[name][0]
        if name == "energy-kev":
            changes[field] = _number(name, text) * 1e3
        elif name == "scan-step":
            parts = text.split(",")
            if len(parts) not in (1, 2):
                raise CLIError(f"--set {item}: give one step or 'y,x' in Å")
            steps = [_number(name, t) for t in parts]
            changes[field] = (steps[0], steps[-1])
        elif name == "rotation-deg":
            changes[field] = _number(name, text, positive=False)
        elif name == "flip":
            if text.lower() not in _TRUE + _FALSE:
                raise CLIError(f"--set {item}: flip must be true or false")
            changes[field] = text.lower() in _TRUE
        else:
            changes[field] = _number(name, text)
    return changes


def _set_calibration(args) -> int:
    from .optics import Calibration

    if args.mask is not None or args.descan is not None or args.descan_from is not None:
        raise CLIError("--set only sets values; run `stemdask calibrate STORE` without --set to measure "
                       "(with --mask / --descan)")
    changes = parse_settings(args.set)
    store = open_store(args.store, mode="r" if args.dry_run else "r+")
    old = store.calibration
    d = old.to_dict()
    d.update(changes)
    origins = {**old.origins, **{k: "set after ingest" for k in changes}}
    if {"rotation_deg", "flip"} & set(changes):
        d["rotation_reliable"] = None  # the user's word, not evidence in the data
    d["origins"] = origins
    new = Calibration.from_dict(d)  # validates every field before anything is written
    def shown(field, v):
        unit = next(u for f, u in SETTABLE.values() if f == field)
        if v is None:
            return "unknown"
        if field == "energy_ev":
            return f"{v / 1e3:g} {unit}"
        if field == "scan_step_a":
            return f"{v[0]:g} × {v[1]:g} {unit}"
        return f"{v:g} {unit}".strip() if isinstance(v, float) else f"{v}"

    for field in changes:
        print(f"{_FIELD_LABELS[field]:20s} {shown(field, getattr(new, field))}  "
              f"(was {shown(field, getattr(old, field))}, {old.origins.get(field, 'origin not recorded')})")
    optics = {"energy_ev", "scan_step_a", "detector_pixel_mrad"} & set(changes)
    if optics and old.c10_estimate_a is not None:
        print(f"note: the stored C10 estimate ({old.c10_estimate_a:.1f} Å) was measured with the old "
              f"{', '.join(_FIELD_LABELS[f] for f in sorted(optics))}; run `stemdask calibrate {args.store}` to re-measure")
    if args.dry_run:
        print("dry run: nothing stored")
        return 0
    store.set_calibration(new)
    print(f"stored in {store.path} (origin: set after ingest)")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_store
    from .io.mask import load_mask
    from .reconstruct import calibration_lines

    if args.set:
        return _set_calibration(args)
    store = open_store(args.store)
    mask = load_mask(args.mask, store.detector_shape) if args.mask is not None else None
    if args.descan_from is not None:
        open_store(args.descan_from)  # an event store, or one clear line
        if args.descan == "off":
            raise CLIError("--descan-from with --descan off: nothing would be fitted")
        if Path(args.descan_from).resolve() == Path(args.store).resolve():
            raise CLIError(f"--descan-from {args.descan_from}: that is the sample store itself; give a vacuum scan")
    result = calibrate_store(args.store, write=not args.dry_run, mask=mask, descan=args.descan or "plane",
                             vacuum=args.descan_from)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for line in calibration_lines(result):
        print(line)
    if args.dry_run:
        print("dry run: nothing stored")
    return 0


# ---------------------------------------------------------------------- reconstruct
def cmd_reconstruct(args) -> int:
    from .reconstruct import reconstruct_cli

    return reconstruct_cli(args)


# ---------------------------------------------------------------------- live
def cmd_live(args) -> int:
    from .live_session import run_live

    return run_live(args)


def add_live_parser(sub) -> None:
    """``stemdask live SOURCE --scan-shape NY NX``: images while a scan arrives (its own block)."""
    import math

    p = sub.add_parser("live", help="riCOM, virtual images and COM while a scan arrives (Merlin socket or replay)")
    p.add_argument("source", help="merlin://HOST:PORT (the MerlinEM data socket), or a .mib file / event store "
                                  "to replay (--rate)")
    p.add_argument("--scan-shape", nargs=2, type=int, required=True, metavar=("NY", "NX"))
    p.add_argument("--method", action="append", choices=["ricom", "virtual", "com", "ssb"],
                   help="repeat for several (default ricom, virtual and com; ssb keeps the scan-x FFT of every row's "
                        "BF-disk pixels in memory, said at the start, and gives its phase when the scan completes)")
    p.add_argument("--out", help="write the final images here (.zarr, the variables of `reconstruct`)")
    p.add_argument("--save", metavar="STORE", help="save the electrons to this store as they arrive, a row block at a time "
                   "(dense frames in the encoding `stemdask ingest` would choose)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --save outputs")
    p.add_argument("--rows-per-block", type=int, metavar="R", help="row block height of --save")
    p.add_argument("--rate", type=float, metavar="HZ", help="replay a file at this many frames/s (default: at once)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="longest wait for the detector's next data (s, default 10)")
    p.add_argument("--view", action="store_true", help="serve a live view on http://127.0.0.1:PORT")
    p.add_argument("--port", type=int, default=5006, help="port of --view (default 5006)")
    p.add_argument("--kernel-size", type=int, default=61, metavar="N", help="riCOM kernel full width, odd (default 61)")
    p.add_argument("--kmin", type=float, metavar="K", help="riCOM band-pass lower cut-off (Å⁻¹)")
    p.add_argument("--kmax", type=float, metavar="K", help="riCOM band-pass upper cut-off (Å⁻¹)")
    p.add_argument("--ssb-crop", type=int, default=32, metavar="N",
                   help="--method ssb: largest side of the crop of each position (output pixels; the BF disk, "
                        "ceil(1.1·R) + 1 px around its centre, is binned to fit; default 32)")
    p.add_argument("--c10", type=float, metavar="Å",
                   help="--method ssb: defocus C10 (Å, < 0 underfocus; default the calibration's stored estimate, else 0)")
    p.add_argument("--inner-mrad", type=float, default=0.0, metavar="MRAD", help="virtual detector inner angle")
    p.add_argument("--outer-mrad", type=float, default=math.inf, metavar="MRAD", help="virtual detector outer angle")
    p.add_argument("--calibration-from", metavar="STORE", help="take the calibration (and the detector mask) of this calibrated store")
    p.add_argument("--bf-center", nargs=2, type=float, metavar=("Y", "X"), help="BF-disk centre (detector px)")
    p.add_argument("--bf-radius", type=float, metavar="R", help="BF-disk radius (px)")
    p.add_argument("--rotation-deg", type=float, help="scan rotation (deg)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None, help="detector flip")
    p.add_argument("--energy-kev", type=float, metavar="E")
    p.add_argument("--scan-step", type=float, metavar="Å")
    p.add_argument("--detector-pixel-mrad", type=float, metavar="P")
    p.set_defaults(func=cmd_live)


# ---------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.out, scan=args.scan, detector=args.detector, dose=args.dose, c10=args.c10, seed=args.seed,
             cluster=None if args.cluster == "none" else args.cluster, cluster_timeout=args.cluster_timeout,
             progress=not args.quiet)
    return 0


def cmd_cluster_show(args) -> int:
    import yaml

    from .cluster import job_script, load_profile

    profile = load_profile(args.profile)
    print(f"# profile {args.profile}, as stemdask resolves it")
    print(yaml.safe_dump(profile, sort_keys=False).rstrip())
    script = job_script(profile)
    if script is None:
        print(f"# a {profile['cluster']} cluster starts its workers on this machine: no job script")
    else:
        print(f"# the job script each of its {profile.get('scale', 0)} job(s) would run (not submitted; the "
              "scheduler address is this command's: a run starts a scheduler of its own)")
        print(script.rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .methods import add_option, load_methods

    parser = argparse.ArgumentParser(
        prog="stemdask", description="4D-STEM phase-contrast imaging from electron events, on Dask."
    )
    parser.add_argument("--version", action="version", version=f"stemdask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="simulate, ingest, calibrate and run every method; write results + a figure")
    p.add_argument("--out", default="stemdask-demo", help="output folder (default stemdask-demo; a previous demo's folder is replaced)")
    p.add_argument("--scan", type=int, default=128, metavar="N", help="N×N probe positions (default 128)")
    p.add_argument("--detector", type=int, default=64, metavar="N", help="N×N detector pixels (default 64)")
    p.add_argument("--dose", type=float, default=2000.0, metavar="E", help="electrons per position (default 2000)")
    p.add_argument("--c10", type=float, default=0.0, metavar="Å",
                   help="simulated defocus C10 (Å; default 0); reconstruct is not told: SSB uses the C10 calibrate estimates")
    p.add_argument("--seed", type=int, default=1, help="random seed of the simulation (default 1)")
    add_cluster_options(p, "local", CLUSTER_HELP + "; 'none' for threads (default local)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("simulate", help="simulate a dataset with a known phase into an event store")
    p.add_argument("out", help="output store (.zarr)")
    p.add_argument("--scan", nargs=2, type=int, default=[64, 64], metavar=("NY", "NX"))
    p.add_argument("--detector", type=int, default=64, metavar="N", help="N×N detector pixels (even)")
    p.add_argument("--dose", type=float, default=1000.0, metavar="E_PER_POSITION")
    p.add_argument("--c10", type=float, default=0.0, metavar="Å", help="defocus C10 (Å); C10 < 0 is underfocus")
    p.add_argument("--max-phase", type=float, default=0.5, metavar="RAD", help="phase of the strongest column")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("realistic detector and microscope (default: none of these)")
    g.add_argument("--realistic", action="store_true",
                   help="the faults every real dataset has: 17° scan rotation, BF disk off centre by (2.6, −3.3) px, "
                        "plane descan, a hot pixel, dead pixels, a dead column, Bragg background 0.6, TDS 0.05; "
                        "the options below replace their part")
    g.add_argument("--rotation-deg", type=float, metavar="DEG", help="scan rotation (degrees, any angle)")
    g.add_argument("--flip", action="store_true", help="mirror the detector (default: no flip)")
    g.add_argument("--bf-offset", nargs=2, type=float, metavar=("DY", "DX"),
                   help="BF-disk centre offset from the detector middle (px)")
    g.add_argument("--descan", nargs="+", metavar="MODEL C",
                   help="disk drift over the scan: 'plane AY BY AX BX' or 'quadratic' with 5 + 5 coefficients "
                        "(px per unit of the centred scan fractions u (rows), v (columns) ∈ [−½, ½])")
    g.add_argument("--hot-pixel", nargs=3, type=float, action="append", metavar=("Y", "X", "RATE"),
                   help="a hot pixel with RATE spurious events per position (repeatable)")
    g.add_argument("--dead-pixel", nargs=2, type=int, action="append", metavar=("Y", "X"), help="repeatable")
    g.add_argument("--dead-column", type=int, action="append", metavar="X", help="repeatable")
    g.add_argument("--dead-row", type=int, action="append", metavar="Y", help="repeatable")
    g.add_argument("--bragg", type=float, metavar="W",
                   help="tilted-crystal Bragg-disk background, peak weight relative to the BF plateau")
    g.add_argument("--bragg-tilt", nargs=2, type=float, metavar=("TY", "TX"),
                   help="Laue-circle centre of the Bragg pattern (units of α/λ; default 0.6 0.3)")
    g.add_argument("--tds", type=float, metavar="F",
                   help="thermal diffuse scattering: fraction of the electrons the strongest column scatters "
                        "into the dark field (default 0; --realistic 0.05)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_cluster_options(p)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ingest", help="convert detector data into an event store")
    p.add_argument("input")
    p.add_argument("out", help="output store (.zarr)")
    p.add_argument("--format", default="auto", choices=["auto", "stempy", "csr", "dense", "mib", "events"])
    p.add_argument("--mode", default="counts", choices=["counts", "threshold"],
                   help="dense input: pixel value = electrons (counts) or 1 electron above --threshold")
    p.add_argument("--threshold", type=float, default=None, help="threshold for --mode threshold")
    p.add_argument("--encoding", default="auto", choices=["auto", "events", "weighted"],
                   help="dense counted frames: one entry per electron (events) or per counted pixel with its count "
                        "(weighted); auto: whichever is smaller on the first frames")
    p.add_argument("--scan-shape", nargs=2, type=int, metavar=("NY", "NX"))
    p.add_argument("--detector-shape", nargs=2, type=int, metavar=("DY", "DX"))
    p.add_argument("--rows-per-block", type=int, metavar="R")
    p.add_argument("--dwell-ns", type=float, help="events input: dwell time per position (ns)")
    p.add_argument("--frames-range", nargs=2, type=int, metavar=("START", "STOP"),
                   help="dense stack / .mib: take frames [START, STOP) (must be NY·NX of them); without it a "
                        "file with more or fewer frames than the scan is refused")
    p.add_argument("--energy-kev", type=float, metavar="E",
                   help="beam energy (keV; default: from the source's metadata, else required)")
    p.add_argument("--scan-step", type=float, metavar="Å",
                   help="scan step (Å per position; default: from the source's metadata, else required)")
    p.add_argument("--semiangle-mrad", type=float, metavar="A",
                   help="probe convergence semi-angle (mrad; default: from the source's metadata, else required)")
    p.add_argument("--detector-pixel-mrad", type=float, metavar="P",
                   help="detector sampling (mrad per pixel; default: from the source's metadata, else required)")
    p.add_argument("--assume-defaults", action="store_true",
                   help="fill optics neither the source nor the flags give with 300 keV, 1 Å, 1 mrad/px "
                        "(semi-angle: unknown) and record them as ASSUMED (default: refuse and list what is missing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true", help="finish an interrupted ingest into OUT")
    p.add_argument("--quiet", action="store_true")
    add_cluster_options(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="describe an event store or a result store (where each optics value came from)")
    p.add_argument("store", help="an event store (.zarr) or a `reconstruct`/`demo` result (.zarr)")
    p.add_argument("--json", action="store_true", help="print everything as JSON (default: a summary)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("validate", help="verify every chunk, block and total of an event store (exit 2 on any problem)")
    p.add_argument("store")
    p.add_argument("--against", metavar="SOURCE", help="also recompute the source file's SHA-256 and event total")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser(
        "calibrate", help="measure BF disk, defects, descan, rotation/flip, C10 and store them; or --set optics",
        description="Without --set: measure (BF disk, detector defects + --mask, descan, rotation/flip, C10) and "
                    "store it. With --set: only set the given values (origin 'set after ingest'), measure nothing.")
    p.add_argument("store")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a value without measuring (repeatable): energy-kev (keV), scan-step (Å, or 'y,x'), "
                        "semiangle-mrad (mrad), detector-pixel-mrad (mrad/px), rotation-deg (°), flip (true/false)")
    p.add_argument("--mask", metavar="FILE",
                   help="detector pixels to exclude: .npy or .tif/.tiff of the detector's shape, bool or 0/1 "
                        "(1 = exclude), joined with the defects found (default: only the defects found)")
    p.add_argument("--descan", choices=["off", "plane", "quadratic"], default=None,
                   help="model of the BF-disk drift over the scan (default plane)")
    p.add_argument("--descan-from", metavar="VACUUM.zarr",
                   help="fit the descan to this event store: the same scan recorded without a sample (default: the "
                        "sample's own COM, whose plane part also holds the sample's — 0.05–0.1 px, enough to bend "
                        "an iCOM image)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON (default: summary lines)")
    p.add_argument("--dry-run", action="store_true", help="print, do not store (default: store)")
    add_cluster_options(p)
    p.set_defaults(func=cmd_calibrate)

    methods = load_methods()
    p = sub.add_parser("reconstruct", help="compute images from an event store")
    p.add_argument("store")
    p.add_argument("--method", required=True, action="append", choices=sorted(methods),
                   help="repeat for several methods in one pass over the events")
    p.add_argument("--out", required=True, help="result store (.zarr, an xarray Dataset)")
    p.add_argument("--png", help="also write a figure")
    p.add_argument("--rotation-deg", type=float, metavar="DEG",
                   help="override the calibrated scan rotation (degrees; default: the stored one); "
                        "recorded in the result as 'command line'")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="override the calibrated detector flip (default: the stored one); recorded as 'command line'")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    for m in methods.values():
        m.add_arguments(p)
    add_cluster_options(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("cluster", help="show a cluster profile as it resolves, and the job script it would submit")
    csub = p.add_subparsers(dest="action", required=True)
    q = csub.add_parser("show", help="print the resolved profile and its SLURM/PBS job script; submits nothing")
    q.add_argument("profile", help="a profile name (local, local-lowmem, local-cuda, slurm, slurm-gpu, pbs) or a YAML file")
    q.set_defaults(func=cmd_cluster_show)

    add_live_parser(sub)
    return parser


def worker_death_message(e, client) -> str:
    """One line for a ``distributed.KilledWorker``: which task, the workers' memory limit (the
    usual cause: the kernel's memory use passed it and the nanny restarted the worker)."""
    worker = e.last_worker
    limit = getattr(worker, "memory_limit", None)
    if not limit and client is not None:
        limits = {w.get("memory_limit") for w in client.scheduler_info().get("workers", {}).values()}
        limit = max((v for v in limits if v), default=None)
    from dask.utils import format_bytes

    shown = format_bytes(limit) if limit else "unknown"
    return (f"Dask workers died {e.allowed_failures + 1} times running task {e.task!r} (last on "
            f"{getattr(worker, 'address', worker)}), most likely out of memory: worker memory limit {shown}; "
            f"use a cluster profile with more memory per worker, or a store with fewer --rows-per-block")


def main(argv=None) -> int:
    from .cluster import ClusterError, connect

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("simulate", "ingest", "calibrate", "reconstruct"):
            with connect(args.cluster, timeout=args.cluster_timeout) as client:
                try:
                    return args.func(args)
                except Exception as e:
                    if type(e).__name__ != "KilledWorker":
                        raise
                    raise CLIError(worker_death_message(e, client)) from None
        return args.func(args)
    except (CLIError, StoreError, StalledError, ClusterError, ValueError, FileExistsError, FileNotFoundError,
            KeyError, OSError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"stemdask {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stemdask {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
