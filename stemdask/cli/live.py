"""``stemdask live``: riCOM, virtual images and COM while a scan arrives (Merlin socket or replay)."""

from __future__ import annotations

import argparse
import warnings

from .common import CLIError, add_optics_options, check_output_path

#: Options that only a method of ``--method`` uses: option → method.
_METHOD_ONLY = {"kernel_size": "ricom", "kmin": "ricom", "kmax": "ricom", "ssb_crop": "ssb", "c10": "ssb",
                "inner_mrad": "virtual", "outer_mrad": "virtual"}


def add_parser(sub, common) -> dict:
    p = sub.add_parser("live", parents=[common], help="riCOM, virtual images and COM while a scan arrives",
                       description="Images while a scan arrives from the MerlinEM data socket (merlin://HOST:PORT), "
                                   "or replayed from a .mib file or an event store: riCOM, virtual images and COM "
                                   "(and SSB when the scan completes); optionally saved as an event store.")
    p.add_argument("source", help="merlin://HOST:PORT (the MerlinEM data socket), or a .mib file / event store "
                                  "to replay (--rate)")
    p.add_argument("--scan-shape", nargs=2, type=int, required=True, metavar=("NY", "NX"),
                   help="probe positions of the scan (required)")
    p.add_argument("--method", action="append", choices=["ricom", "virtual", "com", "ssb"],
                   help="repeat for several (default ricom, virtual and com; ssb keeps the scan-x FFT of every row's "
                        "BF-disk pixels in memory, said at the start, and gives its phase when the scan completes)")
    p.add_argument("--out", help="write the final images here (.zarr, the variables of `reconstruct`; default: none)")
    p.add_argument("--save", metavar="STORE", help="save the electrons to this event store as they arrive, a row block "
                   "at a time (dense frames in the encoding `stemdask ingest` would choose; default: not saved)")
    p.add_argument("--overwrite", action="store_true", help="replace existing --out / --save outputs (default: refuse)")
    p.add_argument("--rows-per-block", type=int, metavar="R",
                   help="row block height of --save, scan rows (default: as ingest chooses)")
    p.add_argument("--rate", type=float, metavar="HZ", help="replay a file at this many frames/s (default: at once)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="longest wait for the detector's next data, seconds (default 10)")
    p.add_argument("--view", action="store_true", help="serve a live view on http://127.0.0.1:PORT (default: off)")
    p.add_argument("--port", type=int, default=5006, help="port of --view (default 5006)")
    p.add_argument("--kernel-size", type=int, metavar="N",
                   help="riCOM kernel full width, scan pixels, odd (default 61)")
    p.add_argument("--kmin", type=float, metavar="Å⁻¹", help="riCOM band-pass lower cut-off, Å⁻¹ (default none)")
    p.add_argument("--kmax", type=float, metavar="Å⁻¹", help="riCOM band-pass upper cut-off, Å⁻¹ (default none)")
    p.add_argument("--ssb-crop", type=int, metavar="N",
                   help="--method ssb: largest side of the crop of each position, output pixels (the BF disk, "
                        "ceil(1.1·R) + 1 px around its centre, is binned to fit; default 32)")
    p.add_argument("--c10", type=float, metavar="Å",
                   help="--method ssb: defocus C10, Å, < 0 underfocus (default: the calibration's stored estimate, "
                        "else 0)")
    p.add_argument("--inner-mrad", type=float, metavar="MRAD",
                   help="one virtual detector 'image' from this angle, mrad (default: 0 with --outer-mrad, else the "
                        "named BF/ABF/ADF annuli of the calibrated BF radius, as reconstruct)")
    p.add_argument("--outer-mrad", type=float, metavar="MRAD",
                   help="that detector's outer angle, mrad (default: the detector edge)")
    p.add_argument("--calibration-from", metavar="STORE",
                   help="take the calibration (and the detector mask) of this calibrated store (default: a replayed "
                        "store's own, else the options below)")
    p.add_argument("--bf-center", nargs=2, type=float, metavar=("Y", "X"),
                   help="BF-disk centre, detector px (default: from --calibration-from)")
    p.add_argument("--bf-radius", type=float, metavar="R", help="BF-disk radius, px (default: from --calibration-from)")
    p.add_argument("--rotation-deg", type=float, metavar="DEG",
                   help="scan rotation, degrees (default: from --calibration-from, else 0)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="detector flip (default: from --calibration-from, else no flip)")
    add_optics_options(p, "--calibration-from or a replayed store",
                       {"--energy-kev": "300", "--scan-step": "1", "--detector-pixel-mrad": "1"})
    p.set_defaults(func=run_live)
    return {"live": p}


def _refuse_unused(args) -> None:
    """An option of a method that is not among ``--method`` is refused (one line)."""
    methods = args.method or ["ricom", "virtual", "com"]
    for option, method in _METHOD_ONLY.items():
        if getattr(args, option) is not None and method not in methods:
            raise CLIError(f"--{option.replace('_', '-')} applies to --method {method}, not to {', '.join(methods)}")


def live_calibration(args, source):
    """The session's calibration: ``--calibration-from STORE`` (or a replayed store's own), then
    the explicit options (--bf-center, --bf-radius, --rotation-deg, --flip, --scan-step, …)."""
    from ..optics import Calibration
    from ..store import open_store

    if args.calibration_from:
        calibration = open_store(args.calibration_from, allow_incomplete=True).calibration
    else:
        calibration = getattr(source, "calibration", None)
    changes = {"energy_ev": None if args.energy_kev is None else args.energy_kev * 1e3,
               "scan_step_a": args.scan_step, "detector_pixel_mrad": args.detector_pixel_mrad,
               "bf_center": None if args.bf_center is None else tuple(args.bf_center), "bf_radius": args.bf_radius,
               "rotation_deg": args.rotation_deg, "flip": args.flip}
    changes = {k: v for k, v in changes.items() if v is not None}
    origins = {} if calibration is None else dict(calibration.origins)
    origins.update(dict.fromkeys(changes, "command line"))
    if calibration is None:  # a Merlin socket or a .mib records no optics: what nobody gave is assumed, and said
        calibration = Calibration()
        assumed = [f for f in ("energy_ev", "scan_step_a", "detector_pixel_mrad") if f not in changes]
        origins.update(dict.fromkeys(assumed, "assumed"))
        if assumed:
            shown = {"energy_ev": f"{calibration.energy_ev / 1e3:g} keV (--energy-kev)",
                     "scan_step_a": f"{calibration.scan_step_a[0]:g} Å (--scan-step)",
                     "detector_pixel_mrad": f"{calibration.detector_pixel_mrad:g} mrad/px (--detector-pixel-mrad)"}
            warnings.warn("ASSUMED, neither given nor from --calibration-from: "
                          + ", ".join(shown[f] for f in assumed) + "; the result records them as assumed",
                          stacklevel=2)
    return calibration.replace(**changes, origins=origins)


def run_live(args) -> int:
    """``stemdask live``: open the source, run the session (and its view), save, report."""
    import numpy as np

    from ..live_session import LiveSession
    from ..live_sources import StreamError, open_source
    from ..optics import Aberrations
    from ..reconstruct import RESULT_FORMAT, write_result
    from ..store import open_store

    check_output_path("--out", args.out)
    check_output_path("--save", args.save)
    _refuse_unused(args)

    ny, nx = args.scan_shape
    source = open_source(args.source, timeout=args.timeout, rate=args.rate, batch_frames=nx)
    with source:
        if source.n_frames is not None and source.n_frames < ny * nx:
            raise StreamError(f"{args.source}: the acquisition has {source.n_frames} frames, "
                              f"the {ny}×{nx} scan needs {ny * nx}")
        # the mask comes from where the calibration comes from (live_calibration)
        mask, fill = open_store(args.calibration_from, allow_incomplete=True).detector_mask() \
            if args.calibration_from else getattr(source, "detector_mask", (None, None))
        given = {k: getattr(args, k) for k in ("kernel_size", "ssb_crop") if getattr(args, k) is not None}
        session = LiveSession(
            (ny, nx), source.detector_shape, live_calibration(args, source), methods=args.method, mask=mask,
            fill=fill, aberrations=None if args.c10 is None else Aberrations(C10=args.c10), kmin=args.kmin,
            kmax=args.kmax, inner_mrad=args.inner_mrad, outer_mrad=args.outer_mrad, save=args.save,
            overwrite=args.overwrite, rows_per_block=args.rows_per_block,
            provenance={"source": str(args.source), "format": "live"}, **given,
        )
        if session.live_ssb is not None:
            c10 = "" if session.ssb_c10_magnitude is not None else f" = {session.aberrations.C10:g} Å"
            print(f"{session.live_ssb.describe()}; SSB C10{c10} ({session.ssb_c10_source})", flush=True)
        view = None
        if args.view:
            from ..live_view import serve

            view = serve(session, port=args.port)
            print(f"live view on {view.url}", flush=True)
        failure = None
        try:
            session.run(source)
        except StreamError as e:
            failure = e
    store = session.finish()
    if args.out:
        result = session.result()
        result.attrs.update({"format": RESULT_FORMAT, "source": str(args.source)})
        if store is not None:
            result.attrs.update({"store": str(store.path.resolve()), "store_n_events": int(store.n_events)})
        write_result(result, args.out, overwrite=args.overwrite, progress=False)
    lat = np.array(session.latencies) * 1e3
    summary = (
        f"{session.positions_done:,} of {session.n_positions:,} positions, "
        f"{session.frames_per_second:,.0f} frames/s; latency to the snapshot median "
        f"{np.median(lat) if lat.size else 0:.1f} ms, max {lat.max(initial=0):.1f} ms"
        + (f"; SSB phase {session.ssb_seconds:.2f} s after the last frame" if session.ssb_seconds is not None else "")
    )
    if failure is not None:
        raise StreamError(f"{failure}; {session.saved}{'; partial images in ' + str(args.out) if args.out else ''}")
    print(
        summary
        + (f"; wrote {store.path}" if store is not None else "")
        + (f"; images in {args.out}" if args.out else "")
    )
    if view is not None:
        view.stop()
    return 0
