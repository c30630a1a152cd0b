"""``stemdask calibrate``: measure (BF disk, defects, descan, rotation/flip, C10) or, with
``--set``, only set optics values."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .common import CLIError, add_cluster_options
from .info import FIELD_LABELS


def add_parser(sub, common) -> dict:
    p = sub.add_parser(
        "calibrate", parents=[common], help="measure BF disk, defects, descan, rotation/flip and C10; or --set optics",
        description="Without --set: measure (BF disk, detector defects + --mask, descan, rotation/flip, C10) and "
                    "store it. With --set: only set the given values (origin 'set after ingest'), measure nothing.")
    p.add_argument("store", help="the event store (.zarr) to calibrate")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a value without measuring (repeatable): energy-kev (keV), scan-step (Å, or 'y,x'), "
                        "semiangle-mrad (mrad), detector-pixel-mrad (mrad/px), rotation-deg (°), flip (true/false) "
                        "(default: measure instead)")
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
    return {"calibrate": p}


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
    from ..optics import Calibration
    from ..store import open_store

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
        print(f"{FIELD_LABELS[field]:20s} {shown(field, getattr(new, field))}  "
              f"(was {shown(field, getattr(old, field))}, {old.origins.get(field, 'origin not recorded')})")
    optics = {"energy_ev", "scan_step_a", "detector_pixel_mrad"} & set(changes)
    if optics and old.c10_estimate_a is not None:
        print(f"note: the stored C10 estimate ({old.c10_estimate_a:.1f} Å) was measured with the old "
              f"{', '.join(FIELD_LABELS[f] for f in sorted(optics))}; "
              f"run `stemdask calibrate {args.store}` to re-measure")
    if args.dry_run:
        print("dry run: nothing stored")
        return 0
    store.set_calibration(new)
    print(f"stored in {store.path} (origin: set after ingest)")
    return 0


def cmd_calibrate(args) -> int:
    from ..calibrate import calibrate_store, calibration_lines
    from ..io.mask import load_mask
    from ..store import open_store

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
    result = calibrate_store(
        args.store, write=not args.dry_run, mask=mask, descan=args.descan or "plane", vacuum=args.descan_from
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for line in calibration_lines(result):
        print(line)
    if args.dry_run:
        print("dry run: nothing stored")
    return 0
