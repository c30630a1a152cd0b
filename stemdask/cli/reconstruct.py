"""``stemdask reconstruct`` (methods on an event store → a result store and a figure),
``stemdask demo`` and ``stemdask cluster show``."""

from __future__ import annotations

import argparse
import sys

from ..methods import NAMES
from .common import PROFILES, add_cluster_options, add_quiet, check_output_path


def add_parsers(sub, common, full=lambda command: True) -> dict:
    """``full(command)``: whether to build that command's options from the Python API (which
    imports it: only for the command being run, or for the whole help)."""
    p = sub.add_parser("reconstruct", parents=[common], help="compute images from an event store",
                       description="Compute one or more methods in one pass over the events of an event store and "
                                   "write them as one result store (an xarray Dataset in Zarr), optionally a figure. "
                                   "A store never calibrated is calibrated first.")
    p.add_argument("store", help="the event store (.zarr)")
    p.add_argument("--method", required=True, action="append", choices=NAMES,
                   help="a method; repeat for several in one pass over the events (no default)")
    p.add_argument("--out", required=True, help="result store (.zarr, an xarray Dataset); its folder must exist")
    p.add_argument("--png", help="also write a figure of every image; its folder must exist (default: none)")
    p.add_argument("--rotation-deg", type=float, metavar="DEG",
                   help="override the calibrated scan rotation, degrees; recorded in the result as 'command line' "
                        "(default: the stored one)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="override the calibrated detector flip; recorded as 'command line' (default: the stored one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing result (default: refuse)")
    add_quiet(p)
    add_cluster_options(p)
    if full("reconstruct"):
        from .method_options import add_method_options

        add_method_options(p)
    p.set_defaults(func=cmd_reconstruct)
    made = {"reconstruct": p}

    p = sub.add_parser("demo", parents=[common], help="simulate, ingest, calibrate and run every method",
                       description="The whole pipeline on a simulated sample with a known phase: simulate → CSR "
                                   "events → ingest → calibrate → every method on a local Dask cluster → "
                                   "results.zarr + results.png, and each phase's correlation with the truth.")
    if full("demo"):
        _add_demo_options(p)
    p.set_defaults(func=cmd_demo)
    made["demo"] = p

    p = sub.add_parser("cluster", parents=[common], help="show a cluster profile and the job script it would submit",
                       description="Cluster profiles: `stemdask cluster show PROFILE` prints the profile as it "
                                   "resolves and its SLURM/PBS job script; it submits nothing.")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = csub.add_parser("show", parents=[common], help="print the resolved profile and its job script; submits nothing",
                        description="Print a cluster profile as stemdask resolves it, and the SLURM/PBS job script "
                                    "each of its jobs would run. Nothing is submitted.")
    q.add_argument("profile", help=f"a profile name ({PROFILES}) or a profile YAML file")
    q.set_defaults(func=cmd_cluster_show)
    return {**made, "cluster": p, "cluster show": q}


def _add_demo_options(p) -> None:
    """The demo's options, with the defaults of :func:`stemdask.demo.run_demo`."""
    import inspect

    from ..demo import run_demo

    d = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
    p.add_argument("--out", default=d["out_dir"],
                   help=f"output folder; a previous demo's folder is replaced (default {d['out_dir']})")
    for flag, kind, metavar, what in (("--scan", int, "N", "N×N probe positions"),
                                      ("--detector", int, "N", "N×N detector pixels, even"),
                                      ("--dose", float, "E", "electrons per probe position"),
                                      ("--c10", float, "Å", "simulated defocus C10, Å; reconstruct is not told: SSB "
                                                            "uses the C10 calibrate estimates"),
                                      ("--seed", int, "S", "random seed of the simulation")):
        default = d[flag[2:]]
        p.add_argument(flag, type=kind, default=default, metavar=metavar, help=f"{what} (default {default:g})")
    add_cluster_options(p, d["cluster"])
    add_quiet(p)


def cmd_reconstruct(args) -> int:
    """``stemdask reconstruct``; the CLI has already connected to ``--cluster``."""
    from ..calibrate import calibrate_store, calibration_lines
    from ..events import open as open_dataset
    from ..reconstruct import reconstruct, write_result
    from .method_options import chosen_options

    check_output_path("--out", args.out)
    check_output_path("--png", args.png)
    options = chosen_options(args, args.method)
    ds = open_dataset(args.store)
    if ds.calibration.bf_center is None:
        print(
            f"{args.store}: never calibrated; calibrating it first (as `stemdask calibrate {args.store}` would)",
            file=sys.stderr,
        )
        for line in calibration_lines(calibrate_store(args.store)):
            print(line, file=sys.stderr)
        ds = open_dataset(args.store)
    overrides = {k: v for k, v in (("rotation_deg", args.rotation_deg), ("flip", args.flip)) if v is not None}
    if overrides:
        origins = {**ds.calibration.origins, **{k: "command line" for k in overrides}}
        ds = ds.with_calibration(**overrides, origins=origins)
    result = reconstruct(ds, options)
    out = write_result(result, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out}: variables {sorted(result.data_vars)}")
    if args.png:
        import xarray as xr

        from ..plotting import image_panel

        saved = xr.open_zarr(out)
        image_panel({k: saved[k] for k in saved.data_vars}, args.png, title=f"{args.store}: {', '.join(args.method)}")
        print(f"wrote {args.png}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import run_demo

    run_demo(args.out, scan=args.scan, detector=args.detector, dose=args.dose, c10=args.c10, seed=args.seed,
             cluster=args.cluster, cluster_timeout=args.cluster_timeout, progress=not args.quiet)
    return 0


def cmd_cluster_show(args) -> int:
    import yaml

    from ..cluster import job_script, load_profile

    profile = load_profile(args.profile)
    print(f"# profile {args.profile}, as stemdask resolves it")
    print(yaml.safe_dump(profile, sort_keys=False).rstrip())
    script = job_script(profile)
    if script is None:
        print(f"# a {profile['cluster']} cluster starts its workers on this machine: no job script")
    else:
        print(
            f"# the job script each of its {profile.get('scale', 0)} job(s) would run (not submitted; the "
            "scheduler address is this command's: a run starts a scheduler of its own)"
        )
        print(script.rstrip())
    return 0
