"""``stemdask simulate`` and ``stemdask ingest``: make an event store."""

from __future__ import annotations

from .common import OPTICS_OPTIONS, CLIError, add_cluster_options, add_optics_options, add_quiet, check_output_path
from .info import FIELD_LABELS


def add_parsers(sub, common) -> dict:
    p = sub.add_parser("simulate", parents=[common], help="simulate a dataset with a known phase into an event store",
                       description="Simulate a 4D-STEM scan of a weak phase object with a known phase (stored as "
                                   "'phase_truth') into an event store; --realistic adds the faults of real data.")
    p.add_argument("out", help="output event store (.zarr)")
    p.add_argument("--scan", nargs=2, type=int, default=[64, 64], metavar=("NY", "NX"),
                   help="probe positions (default 64 64)")
    p.add_argument("--detector", type=int, default=64, metavar="N", help="N×N detector pixels, even (default 64)")
    p.add_argument("--dose", type=float, default=1000.0, metavar="E",
                   help="electrons per probe position (default 1000)")
    p.add_argument("--c10", type=float, default=0.0, metavar="Å",
                   help="defocus C10, Å; C10 < 0 is underfocus (default 0)")
    p.add_argument("--max-phase", type=float, default=0.5, metavar="RAD",
                   help="phase of the strongest column, rad (default 0.5)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g = p.add_argument_group("realistic detector and microscope (default: none of these)")
    g.add_argument("--realistic", action="store_true",
                   help="the faults every real dataset has: 17° scan rotation, BF disk off centre by (2.6, −3.3) px, "
                        "plane descan, a hot pixel, dead pixels, a dead column, Bragg background 0.6, TDS 0.05; "
                        "the options below replace their part (default: an ideal detector)")
    g.add_argument("--rotation-deg", type=float, metavar="DEG",
                   help="scan rotation, degrees, any angle (default 0; --realistic 17)")
    g.add_argument("--flip", action="store_true", help="mirror the detector (default: no flip)")
    g.add_argument("--bf-offset", nargs=2, type=float, metavar=("DY", "DX"),
                   help="BF-disk centre offset from the detector middle, px (default 0 0; --realistic 2.6 −3.3)")
    g.add_argument("--descan", nargs="+", metavar="MODEL C",
                   help="disk drift over the scan: 'plane AY BY AX BX' or 'quadratic' with 5 + 5 coefficients "
                        "(px per unit of the centred scan fractions u (rows), v (columns) ∈ [−½, ½]; default none; "
                        "--realistic a plane of a few px)")
    g.add_argument("--hot-pixel", nargs=3, type=float, action="append", metavar=("Y", "X", "RATE"),
                   help="a hot pixel at (Y, X) px with RATE spurious events per position "
                        "(repeatable; default none; --realistic: see above)")
    g.add_argument("--dead-pixel", nargs=2, type=int, action="append", metavar=("Y", "X"),
                   help="a dead pixel at (Y, X) px (repeatable; default none; --realistic: see above)")
    g.add_argument("--dead-column", type=int, action="append", metavar="X",
                   help="a dead detector column X, px (repeatable; default none; --realistic: see above)")
    g.add_argument("--dead-row", type=int, action="append", metavar="Y",
                   help="a dead detector row Y, px (repeatable; default none; --realistic: see above)")
    g.add_argument("--bragg", type=float, metavar="W",
                   help="tilted-crystal Bragg-disk background, peak weight relative to the BF plateau (default 0; "
                        "--realistic 0.6)")
    g.add_argument("--bragg-tilt", nargs=2, type=float, metavar=("TY", "TX"),
                   help="Laue-circle centre of the Bragg pattern, units of α/λ (default 0.6 0.3)")
    g.add_argument("--tds", type=float, metavar="F",
                   help="thermal diffuse scattering: fraction of the electrons the strongest column scatters "
                        "into the dark field (default 0; --realistic 0.05)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    add_quiet(p)
    add_cluster_options(p)
    p.set_defaults(func=cmd_simulate)
    made = {"simulate": p}

    p = sub.add_parser("ingest", parents=[common], help="convert detector data into an event store",
                       description="Convert detector data (4D Camera / stempy HDF5, CSR .npz, dense frames: .npy, "
                                   "HDF5, Merlin .mib, rosettasciio formats; time-stamped event lists) into an event "
                                   "store. The optics come from the file or the flags, never silently.")
    p.add_argument("input", help="the detector file (an HDF5 dataset as FILE.h5:/path)")
    p.add_argument("out", help="output event store (.zarr)")
    p.add_argument("--format", default="auto", choices=["auto", "stempy", "csr", "dense", "mib", "events"],
                   help="input format (default auto: detected from the file)")
    p.add_argument("--mode", default="counts", choices=["counts", "threshold"],
                   help="dense input: pixel value = electrons (counts) or one electron above --threshold "
                        "(default counts)")
    p.add_argument("--threshold", type=float, default=None, metavar="T",
                   help="--mode threshold: pixel values above T are one electron, detector units (no default)")
    p.add_argument("--encoding", default="auto", choices=["auto", "events", "weighted"],
                   help="dense counted frames: one entry per electron (events) or per counted pixel with its count "
                        "(weighted) (default auto: whichever is smaller on the first frames)")
    p.add_argument("--scan-shape", nargs=2, type=int, metavar=("NY", "NX"),
                   help="probe positions (default: from the file, e.g. a .mib's .hdr)")
    p.add_argument("--detector-shape", nargs=2, type=int, metavar=("DY", "DX"),
                   help="detector pixels (default: from the file)")
    p.add_argument("--rows-per-block", type=int, metavar="R",
                   help="scan rows per row block (default: as many as keep a block near 64 MiB)")
    p.add_argument("--dwell-ns", type=float, metavar="NS",
                   help="--format events: dwell time per position, ns (no default)")
    p.add_argument("--frames-range", nargs=2, type=int, metavar=("START", "STOP"),
                   help="dense stack / .mib: take frames [START, STOP) (must be NY·NX of them; default: all, and a "
                        "file with more or fewer frames than the scan is refused)")
    add_optics_options(p, "the source's metadata", dict.fromkeys(OPTICS_OPTIONS, "required"))
    p.add_argument("--assume-defaults", action="store_true",
                   help="fill optics neither the source nor the flags give with 300 keV, 1 Å, 1 mrad/px "
                        "(semi-angle: unknown) and record them as ASSUMED (default: refuse and list what is missing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output (default: refuse)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted ingest into OUT (default: start anew)")
    add_quiet(p)
    add_cluster_options(p)
    p.set_defaults(func=cmd_ingest)
    return {**made, "ingest": p}


def _descan_record(values: list[str] | None) -> dict | None:
    """``--descan MODEL C…`` → a ``Calibration.descan`` record (CLIError when malformed)."""
    from ..optics import DESCAN_TERMS, check_descan

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
    from ..optics import Aberrations
    from ..simulate import SimulationParams

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
    from ..outputs import OutputSlot
    from ..simulate import simulate
    from ..store import FORMAT_NAME

    check_output_path("simulate", args.out)

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
def _calibration_overrides(args) -> dict:
    """The optics given on the command line, as :class:`~stemdask.optics.Calibration` fields."""
    fields = {
        "energy_ev": None if args.energy_kev is None else args.energy_kev * 1e3,
        "scan_step_a": args.scan_step,
        "semiangle_mrad": args.semiangle_mrad,
        "detector_pixel_mrad": args.detector_pixel_mrad,
    }
    return {k: v for k, v in fields.items() if v is not None}


def cmd_ingest(args) -> int:
    from ..io import ingest

    check_output_path("ingest", args.out)
    if args.threshold is not None and args.mode != "threshold":
        raise CLIError("--threshold applies to --mode threshold only (dense analogue frames)")
    if args.mode == "threshold" and args.threshold is None:
        raise CLIError("--mode threshold needs --threshold T")

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
    assumed = [FIELD_LABELS[k] for k in ("energy_ev", "scan_step_a", "detector_pixel_mrad")
               if origins.get(k) == "assumed"]
    if assumed:
        print(
            f"ASSUMED (neither in the source nor given): {', '.join(assumed)} — set the real values with "
            f"`stemdask calibrate {store.path} --set energy-kev=… --set scan-step=… --set detector-pixel-mrad=…`"
        )
    return 0
