"""Ingest: detector data → a finalized event store, one parallel job per row block.

Order of work, so that a bad input never leaves a store behind and an interrupted ingest
always leaves one marked incomplete: refuse an existing output (unless ``overwrite`` or
``resume``); validate the calibration; take the output's lock and refuse an unsafe target
(:class:`stemdask.outputs.OutputSlot`); open and check the source (shapes, indices layout);
settle the optics (:func:`resolve_optics`: refuse, before any store is created, when the
source and the caller leave one unknown); stream the source through SHA-256; create the
store (provenance already holds the source's checksum and the ingest parameters); run the
block jobs (each reads only its rows and
writes with :meth:`EventStore.write_block`, idempotent, commit mark last); finalize.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InvalidParameter
from ..optics import Calibration
from ..outputs import SCRATCH_PREFIX, OutputSlot, run_tag
from ..progress import run_jobs
from ..store import (
    FORMAT_NAME,
    CorruptStoreError,
    EventStore,
    StoreError,
    create_store,
    open_store,
)
from .common import OPTICS_FIELDS, Source, SourceError, file_sha256
from .formats import open_source

_CALIBRATION_KEYS = tuple(f.name for f in dataclasses.fields(Calibration))

#: What ``assume_defaults`` / ``--assume-defaults`` fills in for optics nobody gave, each
#: recorded as "assumed" in ``Calibration.origins``. The semi-angle stays None (unknown).
ASSUMED_DEFAULTS = {"energy_ev": 300e3, "scan_step_a": (1.0, 1.0), "detector_pixel_mrad": 1.0, "semiangle_mrad": None}

#: For each optics field: what it is, and the CLI flag that gives it.
OPTICS_FLAGS = {
    "energy_ev": ("beam energy", "--energy-kev E"),
    "scan_step_a": ("scan step", "--scan-step Å"),
    "semiangle_mrad": ("probe semi-angle", "--semiangle-mrad A"),
    "detector_pixel_mrad": ("detector pixel size", "--detector-pixel-mrad P"),
}


class MissingOpticsError(SourceError):
    """Neither the source nor the caller gives some optics (``.missing``: field names)."""

    def __init__(self, path, missing):
        self.missing = list(missing)
        what = ", ".join(OPTICS_FLAGS[m][0] for m in self.missing)
        flags = " ".join(OPTICS_FLAGS[m][1] for m in self.missing)
        super().__init__(
            f"{path}: the source does not record the {what}; give {flags} "
            "or --assume-defaults (300 keV, 1 Å, 1 mrad/px, semi-angle unknown; recorded as assumed)"
        )


def resolve_optics(given: dict, recorded: dict, assume_defaults: bool, path) -> dict:
    """Calibration fields for a new store, with ``origins``: each optics field from ``given``
    (the caller: "command line"), else ``recorded`` (the source: "source metadata"), else —
    only with ``assume_defaults`` — :data:`ASSUMED_DEFAULTS` ("assumed"); otherwise raise
    :class:`MissingOpticsError` listing every one missing. ``given`` may hold any other
    Calibration field ("command line" too) and ``origins`` of its own, which win. Rotation
    and flip nobody gave are recorded as "assumed" (0°, no flip) until ``stemdask calibrate``
    measures them. A given ``semiangle_mrad=None`` means "unknown" and is not asked for.
    """
    given = dict(given)
    caller_origins = dict(given.pop("origins", None) or {})
    fields, origins = {}, {}
    missing = []
    for name in OPTICS_FIELDS:
        if name in given and (given[name] is not None or name == "semiangle_mrad"):
            fields[name] = given[name]
            if given[name] is not None:
                origins[name] = "command line"
        elif recorded.get(name) is not None:
            fields[name], origins[name] = recorded[name], "source metadata"
        elif assume_defaults:
            fields[name] = ASSUMED_DEFAULTS[name]
            if fields[name] is not None:
                origins[name] = "assumed"
        else:
            missing.append(name)
    if missing:
        raise MissingOpticsError(path, missing)
    for name, value in given.items():
        if name not in OPTICS_FIELDS:
            fields[name] = value
            origins[name] = "command line"
    for name in ("rotation_deg", "flip"):
        origins.setdefault(name, "assumed")
    origins.update(caller_origins)
    fields["origins"] = origins
    return fields


def _calibration(overrides: dict | None) -> Calibration:
    overrides = dict(overrides or {})
    unknown = set(overrides) - set(_CALIBRATION_KEYS)
    if unknown:
        raise InvalidParameter(f"unknown calibration fields {sorted(unknown)}; known: {_CALIBRATION_KEYS}")
    return Calibration(**overrides)  # raises ValueError naming a negative / NaN field


def _provenance(src: Source, sha: str, rows_per_block) -> dict:
    return {
        "source": str(Path(src.path).resolve()),
        "format": src.format,
        "source_sha256": sha,
        "ingest": {**src.params(), "rows_per_block": rows_per_block},
        "stemdask_version": __version__,
    }


def _check_resumable(store: EventStore, prov: dict, rows_per_block) -> None:
    old = store.provenance
    if old.get("source_sha256") != prov["source_sha256"]:
        raise StoreError(
            f"{store.path}: cannot resume: it was made from a different source (SHA-256 "
            f"{str(old.get('source_sha256'))[:12]}…, {old.get('source')}) than {prov['source']} "
            f"({prov['source_sha256'][:12]}…); use --overwrite to start again"
        )
    before = {k: v for k, v in old.get("ingest", {}).items() if k != "rows_per_block"}
    now = {k: v for k, v in prov["ingest"].items() if k != "rows_per_block"}
    if before != now:
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        raise StoreError(f"{store.path}: cannot resume with different ingest parameters {changed}; use --overwrite")
    if rows_per_block is not None and min(int(rows_per_block), store.scan_shape[0]) != store.rows_per_block:
        raise StoreError(
            f"{store.path}: cannot resume with rows_per_block {rows_per_block} (store has {store.rows_per_block})"
        )


def ingest(
    input,
    out,
    format: str = "auto",
    mode: str = "counts",
    scan_shape=None,
    detector_shape=None,
    rows_per_block: int | None = None,
    calibration: dict | None = None,
    threshold: float | None = None,
    dwell_ns: float | None = None,
    frames_range: tuple[int, int] | None = None,
    encoding: str = "auto",
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    assume_defaults: bool = False,
) -> EventStore:
    """Convert ``input`` into a finalized event store at ``out`` and return it.

    ``format``: ``auto`` (sniffed, see :func:`stemdask.io.sniff_format`), ``stempy``, ``csr``,
    ``dense``, ``mib`` or ``events``. ``scan_shape`` / ``detector_shape``: (ny, nx) /
    (dy, dx), required where the file does not record them, checked where it does.
    ``mode`` / ``threshold``: dense frames only (``counts``: value = electrons; ``threshold``:
    value > threshold = one electron). ``dwell_ns``: event lists only (ns per position).
    ``frames_range``: dense frame stacks only, ``(start, stop)``: ingest frames
    ``[start, stop)`` — a stack with more or fewer frames than the scan has positions is
    refused without it (recorded in provenance).
    ``encoding``: dense frames in counts mode only: ``events`` (one entry per electron),
    ``weighted`` (one entry per counted pixel, its count as weight) or ``auto`` (the smaller,
    judged on the first piece of frames; see :mod:`stemdask.io.dense`); other sources store events.
    ``calibration``: :class:`~stemdask.optics.Calibration` fields (``energy_ev`` in eV,
    ``scan_step_a`` Å, ``semiangle_mrad`` mrad, ``detector_pixel_mrad`` mrad/px, or any other
    field, and optionally ``origins``), recorded as given by the caller ("command line").

    No silent defaults: energy, scan step, semi-angle and detector pixel size come from
    ``calibration`` or, where it leaves one out, from the source's own metadata (each
    reader's docstring says what it reads); if neither gives one, ingest raises
    :class:`MissingOpticsError` (a ValueError listing the missing ones) before creating
    anything — unless ``assume_defaults=True``, which fills in :data:`ASSUMED_DEFAULTS` and
    records them as "assumed" in ``Calibration.origins`` (``stemdask info`` flags them; fix
    them later with ``stemdask calibrate STORE --set …``). BF centre and rotation are found
    by ``stemdask calibrate``.
    ``resume``: finish an interrupted ingest of the same source into ``out`` (checked by the
    recorded SHA-256 and parameters), skipping committed blocks; the result is identical to
    an uninterrupted ingest. Without ``overwrite``/``resume`` an existing ``out`` is refused;
    ``overwrite`` writes the new store beside ``out`` and swaps it in when complete (see
    :mod:`stemdask.outputs`: one writer per output, the old store intact until then).
    """
    out = Path(out)
    if overwrite and resume:
        raise InvalidParameter("choose one of overwrite (start again) and resume (finish an interrupted ingest)")
    if out.exists() and not (overwrite or resume):
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it, --resume to finish it)")
    given = dict(calibration or {})
    _calibration(given)  # unknown / negative / NaN fields: refused before reading anything
    return _ingest_in_slot(input, out, format, mode, scan_shape, detector_shape, rows_per_block, given,
                           threshold, dwell_ns, frames_range, encoding, overwrite, resume, progress, assume_defaults)


def _ingest_in_slot(input, out, format, mode, scan_shape, detector_shape, rows_per_block, given, threshold,
                    dwell_ns, frames_range, encoding, overwrite, resume, progress, assume_defaults) -> EventStore:
    with OutputSlot(
        out, kind=FORMAT_NAME, overwrite=overwrite, inputs=[str(input).split(":/")[0]], in_place=True
    ) as slot:
        scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}-{run_tag()}-", dir=out.resolve().parent))
        try:
            with open_source(input, format, mode=mode, scan_shape=scan_shape, detector_shape=detector_shape,
                             threshold=threshold, dwell_ns=dwell_ns, frames_range=frames_range, encoding=encoding,
                             scratch=scratch) as src:
                resuming = resume and out.exists()
                if not resuming:
                    cal = _calibration(resolve_optics(given, src.optics(), assume_defaults, src.path))
                prov = _provenance(src, file_sha256(src.path), rows_per_block)
                if resuming:
                    store = open_store(out, allow_incomplete=True, mode="r+")
                    _check_resumable(store, prov, rows_per_block)
                    if given:
                        old = store.calibration
                        origins = {
                            **old.origins,
                            **{k: "command line" for k in given if k != "origins"},
                            **given.get("origins", {}),
                        }
                        store.set_calibration(old.replace(**{**given, "origins": origins}))
                    if store.complete:
                        return store
                    todo = np.flatnonzero(~store.committed_blocks())
                else:
                    store = create_store(slot.target, src.scan_shape, src.detector_shape, cal,
                                         rows_per_block=rows_per_block, has_toa=src.has_toa, provenance=prov,
                                         encoding=src.encoding, weight_dtype=src.weight_dtype or "uint16",
                                         bytes_per_position=src.bytes_per_position)
                    todo = np.arange(store.n_blocks)
                _run(store, src, todo, progress, replacing=slot.out if slot.target != slot.out else None)
                stored = store.n_events
                source_events = src.count_events() if src.cheap_count else stored
                if source_events != stored:
                    raise CorruptStoreError(
                        f"{store.path}: source {src.path} holds {source_events} events, "
                        f"{stored} were stored; the store stays incomplete"
                    )
                store.finalize(source_events=source_events)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return open_store(slot.commit())


def _run(store: EventStore, src: Source, todo, progress: bool, replacing: Path | None = None) -> None:
    """Write blocks ``todo``; a failure's message says what is left: an incomplete store to
    resume, or (``replacing`` an existing store) the old store untouched."""

    def job(b: int) -> int:
        r0, r1 = store.block_rows(b)
        return store.write_block(b, *src.read_rows(r0, r1))

    try:
        run_jobs(job, [int(b) for b in todo], desc="ingest", progress=progress)
    except Exception as e:
        done = int(store.committed_blocks().sum())
        left = f"{store.path} is left incomplete ({done} of {store.n_blocks} row blocks written)"
        if replacing is not None:
            note = f"nothing was replaced: {replacing} is as it was"
        elif isinstance(e, SourceError):  # the source's own data: resuming would meet it again
            note = f"{left} and cannot be resumed: delete it, or ingest again with other options and --overwrite"
        else:
            note = f"{left}; fix the cause and re-run with --resume, or --overwrite"
        if isinstance(e, (ValueError, OSError, StoreError)) and len(e.args) == 1:
            raise type(e)(f"{e}; {note}") from e  # the CLI prints the message: the note on its line
        e.add_note(note)
        raise


def check_against_source(store, source=None) -> tuple[list[str], dict]:
    """Every problem of a store checked against the file it was made from, one line each,
    and a summary: :meth:`EventStore.check` with the source's recomputed SHA-256, and the
    source's event total (recounted by a pass independent of the ingest path where the
    format allows) compared with the store's.

    ``store``: an :class:`EventStore` or a path; ``source``: the source file (default: the
    recorded one).
    """
    if not isinstance(store, EventStore):
        store = open_store(store)
    prov = store.provenance
    params = dict(prov.get("ingest", {}))
    spec = source if source is not None else prov.get("source")
    if spec is None:
        raise StoreError(f"{store.path}: records no source file; pass it")
    if params.get("dataset"):
        spec = f"{spec}:{params['dataset']}"
    opts = {k: params.get(k) for k in ("scan_shape", "detector_shape", "mode", "threshold", "dwell_ns", "frames_range")}
    with (tempfile.TemporaryDirectory(prefix=".stemdask-validate-") as scratch,
          open_source(spec, params.get("format", "auto"), scratch=scratch, **opts) as src):
        sha = file_sha256(src.path)
        total = src.count_events()
    problems, stored = store.check(source_checksum=sha)
    if not problems and total != stored:
        problems.append(f"{store.path}: source {spec} holds {total} events, the store {stored}")
    summary = {"n_events": stored, "blocks": store.n_blocks, "ok": not problems, "source": str(spec),
               "source_sha256": sha, "source_events": total}
    return problems, summary


def validate_against_source(store, source=None, *, progress: bool = False) -> dict:
    """:func:`check_against_source`, raising :class:`~stemdask.store.CorruptStoreError` with
    every problem (one per line) if there is any; else its summary."""
    problems, summary = check_against_source(store, source)
    if problems:
        raise CorruptStoreError("\n".join(problems))
    return summary
