"""The ``stemdask`` command: simulate, ingest, info, validate, calibrate, reconstruct."""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .optics import Aberrations
from .outputs import OutputSlot, leftovers
from .progress import StalledError
from .store import FORMAT_NAME, StoreError, open_store


CLUSTER_HELP = "run on a Dask cluster: a profile name (local, local-lowmem, local-cuda, slurm, slurm-gpu, pbs), " \
    "a profile YAML, or a scheduler address tcp://host:port (default: threads in this process)"


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
def cmd_simulate(args) -> int:
    from .simulate import SimulationParams, simulate

    params = SimulationParams(
        scan_shape=tuple(args.scan), detector=args.detector, dose=args.dose,
        aberrations=Aberrations(C10=args.c10), seed=args.seed, max_phase=args.max_phase,
    )
    with OutputSlot(args.out, kind=FORMAT_NAME, overwrite=args.overwrite) as slot:
        store = simulate(slot.target, params, progress=not args.quiet)
        out = slot.commit()
    print(f"wrote {out}: {store.n_events:,} events, scan {params.scan_shape}, "
          f"detector {params.detector}×{params.detector}, step {params.scan_step:.4f} Å, "
          f"C10 {params.aberrations.C10:g} Å; true phase in array 'phase_truth'")
    return 0


# ---------------------------------------------------------------------- ingest
def cmd_ingest(args) -> int:
    from .io import ingest

    store = ingest(
        args.input, args.out, format=args.format, mode=args.mode,
        scan_shape=args.scan_shape, detector_shape=args.detector_shape,
        rows_per_block=args.rows_per_block, calibration=_calibration_overrides(args),
        threshold=args.threshold, dwell_ns=args.dwell_ns, frames_range=args.frames_range,
        overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
    )
    print(f"wrote {store.path}: {store.n_events:,} events, scan {store.scan_shape}, detector {store.detector_shape}")
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
        "events_per_position": n_events / (ny * nx),
        "stored_bytes": stored,
        "bytes_per_event": stored / n_events if n_events else None,
        "dense_uint16_bytes": ny * nx * store.detector_shape[0] * store.detector_shape[1] * 2,
        "calibration": store.calibration.to_dict(),
        "provenance": store.provenance,
    }


def cmd_info(args) -> int:
    info = store_info(args.store)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    cal = info["calibration"]
    ratio = info["dense_uint16_bytes"] / max(info["stored_bytes"], 1)
    lines = [
        f"store        {info['path']}  ({'complete' if info['complete'] else 'INCOMPLETE — ingest interrupted?'})",
        f"scan         {info['scan_shape'][0]} × {info['scan_shape'][1]} positions, step "
        f"{cal['scan_step_a'][0]:.4g} × {cal['scan_step_a'][1]:.4g} Å",
        f"detector     {info['detector_shape'][0]} × {info['detector_shape'][1]} px, "
        f"{cal['detector_pixel_mrad']:.4g} mrad/px",
        f"events       {info['n_events']:,}  ({info['events_per_position']:.1f} per position)",
        f"on disk      {info['stored_bytes'] / 1e6:.2f} MB, {info['bytes_per_event'] or 0:.2f} B/event, "
        f"{ratio:.0f}× smaller than dense uint16",
        f"beam         {cal['energy_ev'] / 1e3:g} keV"
        + (f", semi-angle {cal['semiangle_mrad']:g} mrad" if cal.get("semiangle_mrad") else ""),
        f"calibration  BF centre {cal.get('bf_center')}, radius {cal.get('bf_radius')} px, "
        f"rotation {cal['rotation_deg']:g}°, flip {cal['flip']}",
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
def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_store

    result = calibrate_store(args.store, write=not args.dry_run)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in result.items():
            print(f"{k:14s} {v}")
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
    p.add_argument("--method", action="append", choices=["ricom", "virtual", "com"],
                   help="repeat for several (default all three)")
    p.add_argument("--out", help="write the final images here (.zarr, the variables of `reconstruct`)")
    p.add_argument("--save", metavar="STORE", help="save the events to this event store as they arrive")
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
    p.add_argument("--inner-mrad", type=float, default=0.0, metavar="MRAD", help="virtual detector inner angle")
    p.add_argument("--outer-mrad", type=float, default=math.inf, metavar="MRAD", help="virtual detector outer angle")
    p.add_argument("--calibration-from", metavar="STORE", help="take the calibration of this (calibrated) store")
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

    run_demo(args.out, scan=args.scan, detector=args.detector, dose=args.dose, c10=args.c10,
             cluster=None if args.cluster == "none" else args.cluster, progress=not args.quiet)
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
    p.add_argument("--c10", type=float, default=0.0, metavar="Å", help="defocus C10 (Å); SSB corrects it")
    p.add_argument("--cluster", default="local", help=CLUSTER_HELP + "; 'none' for threads (default local)")
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
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--cluster", help=CLUSTER_HELP)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("ingest", help="convert detector data into an event store")
    p.add_argument("input")
    p.add_argument("out", help="output store (.zarr)")
    p.add_argument("--format", default="auto", choices=["auto", "stempy", "csr", "dense", "mib", "events"])
    p.add_argument("--mode", default="counts", choices=["counts", "threshold"],
                   help="dense input: pixel value = electrons (counts) or 1 electron above --threshold")
    p.add_argument("--threshold", type=float, default=None, help="threshold for --mode threshold")
    p.add_argument("--scan-shape", nargs=2, type=int, metavar=("NY", "NX"))
    p.add_argument("--detector-shape", nargs=2, type=int, metavar=("DY", "DX"))
    p.add_argument("--rows-per-block", type=int, metavar="R")
    p.add_argument("--dwell-ns", type=float, help="events input: dwell time per position (ns)")
    p.add_argument("--frames-range", nargs=2, type=int, metavar=("START", "STOP"),
                   help="dense stack / .mib: take frames [START, STOP) (must be NY·NX of them); without it a "
                        "file with more or fewer frames than the scan is refused")
    p.add_argument("--energy-kev", type=float, metavar="E")
    p.add_argument("--scan-step", type=float, metavar="Å")
    p.add_argument("--semiangle-mrad", type=float, metavar="A")
    p.add_argument("--detector-pixel-mrad", type=float, metavar="P")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--resume", action="store_true", help="finish an interrupted ingest into OUT")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--cluster", help=CLUSTER_HELP)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("info", help="describe an event store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("validate", help="verify every chunk, block and total of an event store (exit 2 on any problem)")
    p.add_argument("store")
    p.add_argument("--against", metavar="SOURCE", help="also recompute the source file's SHA-256 and event total")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("calibrate", help="find BF centre/radius and scan rotation/flip; store them")
    p.add_argument("store")
    p.add_argument("--json", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="print, do not store")
    p.add_argument("--cluster", help=CLUSTER_HELP)
    p.set_defaults(func=cmd_calibrate)

    methods = load_methods()
    p = sub.add_parser("reconstruct", help="compute images from an event store")
    p.add_argument("store")
    p.add_argument("--method", required=True, action="append", choices=sorted(methods),
                   help="repeat for several methods in one pass over the events")
    p.add_argument("--out", required=True, help="result store (.zarr, an xarray Dataset)")
    p.add_argument("--png", help="also write a figure")
    p.add_argument("--rotation-deg", type=float, help="override the calibrated scan rotation (deg)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="override the calibrated detector flip")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    for m in methods.values():
        m.add_arguments(p)
    add_option(p, "--cluster", help=CLUSTER_HELP)
    p.set_defaults(func=cmd_reconstruct)

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
    from .cluster import connect

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command in ("simulate", "ingest", "calibrate", "reconstruct"):
            with connect(args.cluster) as client:
                try:
                    return args.func(args)
                except Exception as e:
                    if type(e).__name__ != "KilledWorker":
                        raise
                    raise CLIError(worker_death_message(e, client)) from None
        return args.func(args)
    except (CLIError, StoreError, StalledError, ValueError, FileExistsError, FileNotFoundError, KeyError, OSError,
            ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"stemdask {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stemdask {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
