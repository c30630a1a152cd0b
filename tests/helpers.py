"""Plain helpers shared by the test modules (no fixtures: those live in ``conftest.py``).

Test modules import from here only — never from another test module or from ``conftest``.
Sections: correlations; ingest sources and writers (small random event sets, stempy HDF5,
Merlin ``.mib``); COM of the simulator (iCOM/DPC/riCOM); dense SSB inputs and band limits;
the abTEM case (detrended correlation, its event store); realistic calibrated recordings.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import dask.array as da
import h5py
import numpy as np
import xarray as xr

from stemdask.optics import Aberrations
from stemdask.simulate import (
    SimulationParams,
    diffraction_rows,
    phase_object,
    probe_real_space,
    simulate_dense,
    truth_on_scan,
)


# ---------------------------------------------------------------------- correlations
def pearson(a, b) -> float:
    """Pearson r of two images (any array-likes of one size)."""
    a = np.asarray(a, float).ravel()
    b = np.asarray(b, float).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def slope(y, x) -> float:
    """Least-squares slope of y against x (means removed)."""
    y = np.ravel(y) - np.mean(y)
    x = np.ravel(x) - np.mean(x)
    return float((x * y).sum() / (x * x).sum())


# ---------------------------------------------------------------------- ingest: test data and writers
SCAN = (12, 10)
DET = (16, 16)


def random_csr(seed=0, scan=SCAN, det=DET, mean=20.0):
    """A random event set: (indices uint32, offsets int64), ascending within a position."""
    rng = np.random.default_rng(seed)
    n_pos, n_pix = scan[0] * scan[1], det[0] * det[1]
    counts = rng.poisson(mean, n_pos)
    counts[3 % n_pos] = 0  # an empty position
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate([np.sort(rng.integers(0, n_pix, c)) for c in counts]).astype(np.uint32)
    return indices, offsets


def per_position(indices, offsets):
    return [indices[offsets[p] : offsets[p + 1]] for p in range(offsets.size - 1)]


def write_stempy(path, events, scan_file, det, version=1, frames_per_position=1, two_d=False, split=False,
                 shuffle=False):
    """A stempy HDF5 file exactly as stempy lays it out (see stemdask.io.stempy).

    ``events``: one array per file position (scan_file order). v1: one frame per position;
    v2 with ``split``: each position's events in two frames, the second frames appended after
    all first frames (scan_positions repeats, non-contiguous); v3: ``frames_per_position``
    frames per position, flattened (or 2-D with ``two_d``). ``shuffle``: frames stored in a
    random order, scan_positions saying where each belongs.
    Returns (indices, offsets) of what an ingest must give: each position's frames merged
    in file order.
    """
    rng = np.random.default_rng(1)
    n = len(events)
    F = frames_per_position
    parts = [np.array_split(ev, sorted(rng.integers(0, ev.size + 1, F - 1))) for ev in events]
    if version < 3 and split:
        first = [ev[: ev.size // 2] for ev in events]
        second = [ev[ev.size // 2 :] for ev in events]
        frames = first + second
        positions = np.concatenate([np.arange(n), np.arange(n)])
    elif version < 3:
        frames, positions = list(events), np.arange(n)
    else:
        frames, positions = [f for p in parts for f in p], np.arange(n)
    if shuffle:
        assert version < 3, "v3 frames are tied to their row; shuffle v1/v2 only"
        perm = rng.permutation(len(frames))
        frames, positions = [frames[i] for i in perm], positions[perm]
    vlen = h5py.vlen_dtype(np.uint32)
    with h5py.File(path, "w") as f:
        if version > 1:
            f.attrs["version"] = version
        g = f.create_group("electron_events")
        sp = g.create_dataset("scan_positions", data=positions.astype(np.int32))
        sp.attrs["Nx"], sp.attrs["Ny"] = scan_file[1], scan_file[0]
        if two_d:
            fr = g.create_dataset("frames", (n, F), dtype=vlen)
            for i in range(n):
                for j in range(F):
                    fr[i, j] = parts[i][j].astype(np.uint32)
        else:
            fr = g.create_dataset("frames", (len(frames),), dtype=vlen)
            for i, x in enumerate(frames):
                fr[i] = np.asarray(x, np.uint32)
        fr.attrs["Nx"], fr.attrs["Ny"] = det[0], det[1]
    if version >= 3:
        return np.concatenate(events), np.concatenate([[0], np.cumsum([e.size for e in events])])
    merged = [np.concatenate([x for x, q in zip(frames, positions) if q == p] or [np.empty(0, np.uint32)])
              for p in range(n)]
    return np.concatenate(merged).astype(np.uint32), np.concatenate([[0], np.cumsum([m.size for m in merged])])


def dense_from_csr(indices, offsets, scan=SCAN, det=DET, dtype=np.uint16):
    frames = np.zeros((scan[0] * scan[1], det[0] * det[1]), dtype)
    pos = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    np.add.at(frames, (pos, indices.astype(np.int64)), 1)
    return frames.reshape(*scan, *det)


def write_mib(path, frames, dtype=">u2"):
    """Merlin .mib: per frame a 384-byte ASCII header (comma-separated; rosettasciio reads the
    size at fields 4/5, the pixel type at 6, timestamp/exposure at fields −4/−3) + big-endian data."""
    n, h, w = frames.shape
    kind = {">u1": "U08", ">u2": "U16", ">u4": "U32"}[dtype]
    with open(path, "wb") as f:
        for i, frame in enumerate(frames):
            head = (f"MQ1,{i + 1:06d},00384,01,{w:04d},{h:04d},{kind},   1x1,01,2024-01-01 00:00:00.000000,"
                    f"0.001000,0,0,0,1.000000E+2,0,0,0,0,0,0,0,12,0,0,0,0,0,0,"
                    f"2024-01-01T00:00:{i // 100:02d}.{i % 100:06d}000Z,1000000ns,12,")
            f.write(head.ljust(384).encode())
            f.write(np.ascontiguousarray(frame, dtype=dtype).tobytes())


# ---------------------------------------------------------------------- COM of the simulator (iCOM, DPC, riCOM)
@functools.lru_cache(maxsize=8)
def expected_com(p: SimulationParams):
    """Noise-free COM (px from pixel N/2, detector frame) of the simulator's expected patterns,
    and the true phase on the scan; rows in batches to keep memory small."""
    obj = phase_object(p)
    probe = probe_real_space(p)
    n = p.detector
    k = np.arange(n) - n // 2
    ny, nx = p.scan_shape
    cy, cx = np.empty((ny, nx)), np.empty((ny, nx))
    for r0 in range(0, ny, 16):
        rows = range(r0, min(r0 + 16, ny))
        inten = diffraction_rows(p, rows, obj, probe)
        tot = inten.sum((-2, -1))
        cy[rows.start : rows.stop] = (inten.sum(-1) * k).sum(-1) / tot
        cx[rows.start : rows.stop] = (inten.sum(-2) * k).sum(-1) / tot
    return cy, cx, truth_on_scan(obj, p).astype(np.float64)


def probe_blurred(truth: np.ndarray, p: SimulationParams) -> np.ndarray:
    """Σ_r |ψ(r − R)|² φ(r) on the periodic scan (needs scan_step_px = 1)."""
    assert p.scan_step_px == 1
    inten = np.abs(probe_real_space(p)) ** 2
    m = inten.shape[0]
    ny, nx = truth.shape
    kernel = np.zeros((ny, nx))
    iy, ix = np.meshgrid(np.arange(m) - m // 2, np.arange(m) - m // 2, indexing="ij")
    np.add.at(kernel, (iy % ny, ix % nx), inten)
    return np.fft.ifft2(np.fft.fft2(truth) * np.conj(np.fft.fft2(kernel))).real


def com_dataset(cy, cx, p: SimulationParams, units: str = "px", chunks=16) -> xr.Dataset:
    """A lazy COM Dataset shaped like ``EventDataset.com()``'s output."""
    ny, nx = cy.shape
    coords = {"scan_y": np.arange(ny) * p.scan_step, "scan_x": np.arange(nx) * p.scan_step}
    scale = p.pixel_mrad if units == "mrad" else 1.0
    return xr.Dataset({
        name: xr.DataArray(da.from_array(v * scale, chunks=(chunks, nx)), dims=("scan_y", "scan_x"),
                           coords=coords, attrs={"units": units})
        for name, v in (("com_y", cy), ("com_x", cx))
    })


WEAK = SimulationParams(scan_shape=(64, 64), detector=64, max_phase=0.1)


# ---------------------------------------------------------------------- SSB: dense inputs, band limits
HIGH_DOSE = 1e6  # electrons per position: Poisson noise well below a 0.08 rad object's signal


def as_dense(counts: np.ndarray, calibration, rows_per_block: int = 8, shift_px: float = 0.0) -> xr.DataArray:
    """(ny, nx, N, N) counts as ``densify`` gives them: float32, row-block chunks, k in mrad
    relative to the calibrated BF centre (``shift_px`` mis-states that centre on purpose)."""
    ny, nx, n, _ = counts.shape
    cy, cx = calibration.bf_center
    p = calibration.detector_pixel_mrad
    data = da.from_array(counts.astype(np.float32), chunks=(rows_per_block, nx, n, n))
    sy, sx = calibration.scan_step_a
    return xr.DataArray(
        data, dims=("scan_y", "scan_x", "k_y", "k_x"),
        coords={"scan_y": np.arange(ny) * sy, "scan_x": np.arange(nx) * sx,
                "k_y": (np.arange(n) - cy + shift_px) * p, "k_x": (np.arange(n) - cx + shift_px) * p},
    )


def simulated(c10=0.0, *, scan=(48, 48), detector=32, dose=HIGH_DOSE, seed=0, **kw):
    """Poisson counts (ny, nx, N, N), true phase, calibration of a weak phase object (0.08 rad)."""
    p = SimulationParams(scan_shape=scan, detector=detector, max_phase=0.08,
                         aberrations=Aberrations(C10=c10), **kw)
    intensity, truth = simulate_dense(p)
    counts = np.random.default_rng(seed).poisson(intensity * dose).astype(np.float32)
    return counts, truth, p.calibration()


def scan_frequencies(shape, step):
    qy = np.fft.fftfreq(shape[0], d=step[0])
    qx = np.fft.fftfreq(shape[1], d=step[1])
    return np.meshgrid(qy, qx, indexing="ij")


def filtered(truth, step, transfer):
    """``truth`` filtered by ``transfer(q_y, q_x)`` on the full scan-frequency plane."""
    qy, qx = scan_frequencies(truth.shape, step)
    return np.fft.ifft2(np.fft.fft2(truth) * transfer(qy, qx)).real


def band_limited(truth, step, q_max):
    return filtered(truth, step, lambda qy, qx: (np.hypot(qy, qx) < q_max) & (np.hypot(qy, qx) > 0))


# ---------------------------------------------------------------------- the abTEM case
ABTEM_CASE = "abtem-srtio3-thin-defocus150"  # the folder name under a test-data folder


def detrended(a):
    """``a`` minus its least-squares 2nd-order polynomial background."""
    y, x = np.mgrid[: a.shape[0], : a.shape[1]] / max(a.shape)
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], -1).reshape(-1, 6)
    coef, *_ = np.linalg.lstsq(basis, a.ravel().astype(float), rcond=None)
    return a - (basis @ coef).reshape(a.shape)


def r_detrended(image, truth) -> float:
    return float(np.corrcoef(detrended(image).ravel(), detrended(truth).ravel())[0, 1])


def abtem_event_store(case: Path, events: Path, out: Path):
    """``events`` (a CSR ``.npz`` of the abTEM case in folder ``case``) in an event store at
    ``out`` (calibration from params.json, 16 rows per block), and the truth and params:
    (EventDataset, phase truth float64, params)."""
    import stemdask
    from stemdask.optics import Calibration
    from stemdask.store import create_store

    params = json.loads((case / "params.json").read_text())
    det = params["detector"]
    cal = Calibration(energy_ev=params["energy_eV"], scan_step_a=params["scan"]["step_A"],
                      detector_pixel_mrad=det["pixel_size_mrad"], semiangle_mrad=params["semiangle_mrad"],
                      bf_center=det["bf_center_px_yx"], bf_radius=det["bf_radius_px"])
    with np.load(events) as z:
        indices, offsets = z["indices"], z["offsets"]
    ny, nx = params["scan"]["shape_yx"]
    store = create_store(out, (ny, nx), tuple(det["shape_yx"]), cal, rows_per_block=16)
    counts = np.diff(offsets).reshape(ny, nx)
    for b in range(store.n_blocks):
        r0, r1 = store.block_rows(b)
        store.write_block(b, counts[r0:r1], indices[offsets[r0 * nx] : offsets[r1 * nx]])
    store.finalize()
    truth = np.load(case / "phase_truth.npy").astype(np.float64)
    return stemdask.open(store.path), truth, params


# ---------------------------------------------------------------------- realistic recordings
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
