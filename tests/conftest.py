"""Shared fixtures: the test-data folder (the independent abTEM case, real Merlin files), GPU skips,
and a report of which data the run used and which data-dependent tests skipped.

Test data are looked up in, first that exists:
  1. ``$STEMDASK_TEST_DATA`` — a folder holding ``abtem-srtio3-thin-defocus150/`` and/or ``real-merlin/``;
  2. ``../shared/data`` beside the repository (developers' and CI's full set);
  3. ``tests/data`` — shipped: the abTEM case at dose 50 only (no dose 1000, no real Merlin files).
The abTEM case falls back to the shipped copy when the chosen folder lacks it. Tests needing a
file that is absent skip with a reason starting ``test data:``; the summary lists them.

Plain helpers (correlations, writers, ...) are in ``helpers.py``: test modules import from there.
"""

from __future__ import annotations

import os
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from helpers import ABTEM_CASE, abtem_event_store

TESTS = Path(__file__).resolve().parent
SHIPPED_DATA = TESTS / "data"
SHARED_DATA = TESTS.parent.parent / "shared" / "data"  # ../shared/data beside the repository
ENV = "STEMDASK_TEST_DATA"
DATA_SKIP = "test data:"  # every skip for missing data starts so (the terminal summary counts them)
ABTEM_DOSES = (50, 1000)  # events_dose{N}.npz; only dose 50 is shipped in tests/data


def data_root() -> tuple[Path, str]:
    """The test-data folder and where it came from (see the module docstring)."""
    env = os.environ.get(ENV)
    if env:
        return Path(env).expanduser().resolve(), f"${ENV}"
    if SHARED_DATA.is_dir():
        return SHARED_DATA.resolve(), "../shared/data"
    return SHIPPED_DATA, "tests/data (shipped)"


def abtem_case_dir() -> Path:
    """The abTEM case folder: the data folder's, else the shipped copy."""
    root, _ = data_root()
    return root / ABTEM_CASE if (root / ABTEM_CASE / "params.json").exists() else SHIPPED_DATA / ABTEM_CASE


def real_merlin_path() -> Path:
    return data_root()[0] / "real-merlin" / "Merlin_Single_Quad.zip"


def _missing(what: Path, note: str = "") -> str:
    return (f"{DATA_SKIP} {what} not present{note}; set {ENV} to a folder holding "
            f"{what.parent.name}/{what.name} (or have ../shared/data beside the repository)")


# ---------------------------------------------------------------------- report
def pytest_report_header(config):
    root, source = data_root()
    case = abtem_case_dir()
    doses = [d for d in ABTEM_DOSES if (case / f"events_dose{d}.npz").exists()]
    merlin = real_merlin_path()
    return [
        f"test data: {root} (from {source})",
        f"test data: abTEM case {case}, doses {doses or 'none'}"
        + ("" if 1000 in doses else " (dose-1000 tests skip)"),
        f"test data: real Merlin files {'present' if merlin.exists() else 'absent (their tests skip)'}",
    ]


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Says how many tests skipped for want of test data, and why (each reason once)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if DATA_SKIP in _skip_reason(r)]
    root, source = data_root()
    reasons = Counter(_skip_reason(r) for r in skipped)
    terminalreporter.write_sep("-", "test data")
    terminalreporter.write_line(f"data folder: {root} (from {source}); abTEM case: {abtem_case_dir()}")
    terminalreporter.write_line(f"data-dependent tests skipped: {len(skipped)}")
    for reason, n in reasons.most_common():
        terminalreporter.write_line(f"  {n} × {reason}")
        for r in skipped:
            if _skip_reason(r) == reason:
                terminalreporter.write_line(f"      {r.nodeid}")


# ---------------------------------------------------------------------- GPU
def pytest_collection_modifyitems(config, items):
    """Skip GPU tests cleanly when CUDA is not usable."""
    try:
        import cupy

        has_gpu = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs CUDA (cupy with a GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# ---------------------------------------------------------------------- the abTEM case
@pytest.fixture(scope="session")
def abtem_case() -> Path:
    """Folder of the independent abTEM SrTiO3 case: params.json, phase_truth.npy, events_dose50.npz
    (always: shipped in tests/data) and perhaps events_dose1000.npz (use ``abtem_dose1000``)."""
    case = abtem_case_dir()
    for name in ("params.json", "phase_truth.npy", "events_dose50.npz"):
        if not (case / name).exists():
            pytest.skip(_missing(case / name))
    return case


def _events(case: Path, dose: int) -> Path:
    path = case / f"events_dose{dose}.npz"
    if not path.exists():
        pytest.skip(_missing(path, " (7 MB, not shipped in tests/data)" if dose == 1000 else ""))
    return path


@pytest.fixture(scope="session")
def abtem_dose1000(abtem_case) -> Path:
    """events_dose1000.npz of the abTEM case, for tests whose thresholds only dose 1000 reaches;
    skips (saying so) where only the shipped tests/data is available."""
    return _events(abtem_case, 1000)


@pytest.fixture(scope="session", params=ABTEM_DOSES, ids=[f"dose{d}" for d in ABTEM_DOSES])
def abtem_events(request, abtem_case) -> tuple[int, Path]:
    """(dose, events file) of the abTEM case, once per dose; dose 1000 skips where it is absent."""
    return request.param, _events(abtem_case, request.param)


@pytest.fixture(scope="session")
def abtem_ssb_case(abtem_case, abtem_events, tmp_path_factory):
    """(dose, EventDataset, truth, params): the abTEM events of ``abtem_events`` in an event
    store (calibration from params.json), built once per dose for the session (read only)."""
    dose, events = abtem_events
    ds, truth, params = abtem_event_store(abtem_case, events, tmp_path_factory.mktemp(f"abtem{dose}") / "events.zarr")
    return dose, ds, truth, params


# ---------------------------------------------------------------------- real Merlin files
@pytest.fixture(scope="session")
def real_merlin_zip() -> Path:
    """The real Merlin files' zip (rosettasciio's test set); not shipped: skips without it."""
    path = real_merlin_path()
    if not path.exists():
        pytest.skip(_missing(path, " (not shipped in tests/data)"))
    return path


@pytest.fixture(scope="session")
def real_merlin(real_merlin_zip, tmp_path_factory) -> Path:
    """The real Merlin files, extracted once: a folder of ``.mib`` + ``.hdr``."""
    out = tmp_path_factory.mktemp("real-merlin")
    with zipfile.ZipFile(real_merlin_zip) as z:
        z.extractall(out)
    return out
