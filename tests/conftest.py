"""Shared fixtures: small simulated stores and the shared abTEM case."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_CASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "abtem-srtio3-thin-defocus150"


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


@pytest.fixture(scope="session")
def abtem_case() -> Path:
    """Directory of the independent abTEM SrTiO3 case; skips when ../shared is absent."""
    if not (SHARED_CASE / "events_dose1000.npz").exists():
        pytest.skip("../shared/data/abtem-srtio3-thin-defocus150 not present")
    return SHARED_CASE.resolve()


def pearson(a, b) -> float:
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def realistic_calibrated(path: Path, rows_per_block: int, **params):
    """A realistic recording (off-centre disk, descan, hot/dead pixels, a dead column, no Bragg
    disks; ``params`` of :meth:`SimulationParams.realistic`), calibrated: its open store."""
    from stemdask.calibrate import calibrate_store
    from stemdask.simulate import SimulationParams, simulate
    from stemdask.store import open_store

    simulate(path, SimulationParams.realistic(bragg=0.0, **params), rows_per_block=rows_per_block, progress=False)
    calibrate_store(path)
    store = open_store(path)
    mask, _ = store.detector_mask()
    assert mask is not None and mask.any() and store.calibration.descan is not None
    return store

