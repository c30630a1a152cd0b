"""No silent defaults: optics come from the source's metadata or the caller; otherwise ingest
refuses before creating anything, or — asked to — records what it assumed."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from stemdask.cli import main
from stemdask.io import MissingOpticsError, ingest, open_source
from stemdask.optics import wavelength_a
from stemdask.outputs import OutputFolderError
from stemdask.store import open_store

from helpers import (
    DET,
    SCAN,
    dense_from_csr,
    per_position,
    random_csr,
    write_mib,
    write_stempy,
)

FULL = {"energy_ev": 200e3, "scan_step_a": 0.5, "semiangle_mrad": 25.0, "detector_pixel_mrad": 2.0}
FLAGS = ["--energy-kev E", "--scan-step Å", "--semiangle-mrad A", "--detector-pixel-mrad P"]


@pytest.fixture
def csr(tmp_path):
    indices, offsets = random_csr()
    path = tmp_path / "ev.npz"
    np.savez(path, indices=indices, offsets=offsets, scan_shape=SCAN, detector_shape=DET)
    return path


@pytest.mark.parametrize("compressed", [False, True])  # compressed: members decompressed to a scratch folder
def test_python_ingest_refuses_before_creating_anything(tmp_path, csr, compressed):
    if compressed:
        with np.load(csr) as z:
            arrays = dict(z)
        csr.unlink()
        np.savez_compressed(csr, **arrays)
    out = tmp_path / "s.zarr"
    with pytest.raises(MissingOpticsError) as e:
        ingest(csr, out, progress=False)
    assert e.value.missing == ["energy_ev", "scan_step_a", "semiangle_mrad", "detector_pixel_mrad"]
    assert str(csr) in str(e.value) and all(f in str(e.value) for f in FLAGS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.npz"]  # not the store, no lock, no scratch
    with pytest.raises(OutputFolderError, match="does not exist"):  # and folders above an output: never made
        ingest(csr, tmp_path / "new" / "deeper" / "s.zarr", progress=False)
    assert not (tmp_path / "new").exists()


def test_cli_refusal_is_one_line_listing_only_the_missing_flags(tmp_path, csr, capsys):
    out = tmp_path / "s.zarr"
    assert main(["ingest", str(csr), str(out), "--energy-kev", "300", "--scan-step", "0.2", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        f"stemdask ingest: error: {csr}: the source does not record the probe semi-angle, "
        "detector pixel size; give --semiangle-mrad A --detector-pixel-mrad P or --assume-defaults"
    )
    assert "--energy-kev" not in err[0] and not out.exists()


def test_assume_defaults_records_assumed_and_given_origins(tmp_path, csr, capsys):
    out = tmp_path / "s.zarr"
    assert main(["ingest", str(csr), str(out), "--energy-kev", "80", "--assume-defaults", "--quiet"]) == 0
    assert "ASSUMED" in capsys.readouterr().out
    cal = open_store(out).calibration
    assert cal.energy_ev == 80e3 and cal.scan_step_a == (1.0, 1.0) and cal.detector_pixel_mrad == 1.0
    assert cal.semiangle_mrad is None  # unknown, not invented
    assert cal.origins["energy_ev"] == "command line"
    assert cal.origins["scan_step_a"] == cal.origins["detector_pixel_mrad"] == "assumed"
    assert cal.origins["rotation_deg"] == cal.origins["flip"] == "assumed"
    assert "semiangle_mrad" not in cal.origins
    # the Python API: the same, and a full calibration is "command line" throughout
    s = ingest(csr, tmp_path / "p.zarr", assume_defaults=True, progress=False).calibration
    assert s.energy_ev == 300e3 and s.origins["energy_ev"] == "assumed"
    s = ingest(csr, tmp_path / "q.zarr", calibration=FULL, progress=False).calibration
    assert all(s.origins[k] == "command line" for k in FULL) and s.scan_step_a == (0.5, 0.5)


def test_info_shows_each_origin_and_flags_assumed_ones(tmp_path, csr, capsys):
    out = tmp_path / "s.zarr"
    ingest(csr, out, calibration={"energy_ev": 60e3, "semiangle_mrad": 21.0}, assume_defaults=True, progress=False)
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "60 keV [command line]" in text and "semi-angle 21 mrad [command line]" in text
    assert "1 × 1 Å [ASSUMED]" in text and "1 mrad/px [ASSUMED]" in text
    assert any(
        line.startswith("ASSUMED") and "scan step" in line and "detector pixel size" in line
        for line in text.splitlines()
    )
    assert main(["info", str(out), "--json"]) == 0
    origins = json.loads(capsys.readouterr().out)["calibration"]["origins"]
    assert origins["scan_step_a"] == "assumed" and origins["energy_ev"] == "command line"


def test_csr_metadata_is_used_and_the_command_line_wins(tmp_path, capsys):
    indices, offsets = random_csr()
    src = tmp_path / "ev.npz"
    np.savez(src, indices=indices, offsets=offsets, scan_shape=SCAN, detector_shape=DET, energy_kev=300.0,
             scan_step_a=[0.25, 0.3], semiangle_mrad=20.0, detector_pixel_mrad=1.5)
    out = tmp_path / "s.zarr"
    assert main(["ingest", str(src), str(out), "--scan-step", "0.4", "--quiet"]) == 0
    cal = open_store(out).calibration
    assert cal.energy_ev == 300e3 and cal.semiangle_mrad == 20.0 and cal.detector_pixel_mrad == 1.5
    assert cal.scan_step_a == (0.4, 0.4) and cal.origins["scan_step_a"] == "command line"
    assert cal.origins["energy_ev"] == cal.origins["semiangle_mrad"] == "source metadata"
    bad = tmp_path / "bad.npz"
    np.savez(bad, indices=indices, offsets=offsets, scan_shape=SCAN, detector_shape=DET, energy_ev=-1.0)
    assert main(["ingest", str(bad), str(tmp_path / "b.zarr"), "--quiet"]) == 2
    assert "energy_ev" in capsys.readouterr().err and not (tmp_path / "b.zarr").exists()


def test_stempy_metadata_group(tmp_path):
    indices, offsets = random_csr()
    src = tmp_path / "ev.h5"
    write_stempy(src, per_position(indices, offsets), SCAN, DET, version=3)
    with pytest.raises(MissingOpticsError):
        ingest(src, tmp_path / "none.zarr", progress=False)
    with h5py.File(src, "a") as f:
        meta = f.require_group("metadata")
        meta.attrs["energy_kev"] = 300.0
        meta.attrs["scan_step_a"] = 0.2
        meta.attrs["detector_pixel_mrad"] = 1.0
        meta.attrs["semiangle_mrad"] = 20.0
        meta.attrs["beam energy"] = "ignored: not one of stemdask's names"
    cal = ingest(src, tmp_path / "s.zarr", progress=False).calibration
    assert (cal.energy_ev, cal.scan_step_a, cal.detector_pixel_mrad, cal.semiangle_mrad) == (300e3, (0.2, 0.2), 1.0,
                                                                                             20.0)
    assert all(cal.origins[k] == "source metadata" for k in FULL)


def test_rosettasciio_metadata_and_axes(tmp_path):
    rsciio_hspy = pytest.importorskip("rsciio.hspy")
    indices, offsets = random_csr(seed=3)
    frames = dense_from_csr(indices, offsets)
    units = ["nm", "nm", "1/nm", "1/nm"]
    scales = [0.05, 0.04, 0.5, 0.5]
    axes = [
        {"size": n, "index_in_array": i, "name": nm, "scale": sc, "offset": 0.0, "units": u, "navigate": i < 2}
        for i, (n, nm, sc, u) in enumerate(zip(frames.shape, ["y", "x", "ky", "kx"], scales, units))
    ]
    src = tmp_path / "scan.hspy"
    rsciio_hspy.file_writer(
        str(src),
        {
            "data": frames,
            "axes": axes,
            "metadata": {"General": {"title": ""}, "Signal": {"signal_type": ""},
                         "Acquisition_instrument": {"TEM": {"beam_energy": 200.0, "convergence_angle": 22.0}}},
            "original_metadata": {},
            "attributes": {"_lazy": False},
            "tmp_parameters": {},
            "package_info": {"name": "stemdask-tests", "version": "0"},
            "learning_results": {},
            "models": {},
        },
    )
    with open_source(src) as s:
        optics = s.optics()
    assert optics["energy_ev"] == 200e3 and optics["semiangle_mrad"] == 22.0
    assert optics["scan_step_a"] == pytest.approx((0.5, 0.4))  # nm → Å
    # 0.5 nm⁻¹ = 0.05 Å⁻¹ per pixel × λ(200 kV) → mrad
    assert optics["detector_pixel_mrad"] == pytest.approx(0.05 * wavelength_a(200e3) * 1e3)
    cal = ingest(src, tmp_path / "s.zarr", progress=False).calibration
    assert all(cal.origins[k] == "source metadata" for k in FULL)


def test_merlin_records_no_optics(tmp_path, capsys):
    pytest.importorskip("rsciio.quantumdetector")
    indices, offsets = random_csr(seed=6)
    frames = dense_from_csr(indices, offsets)
    src = tmp_path / "scan.mib"
    write_mib(src, frames.reshape(-1, *DET))
    with open_source(src, scan_shape=SCAN) as s:
        assert s.optics() == {}
    assert main(["ingest", str(src), str(tmp_path / "s.zarr"), "--scan-shape", *map(str, SCAN), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not record the beam energy" in err and len(err.strip().splitlines()) == 1


def test_shared_csr_file_is_refused_without_optics(tmp_path, capsys, abtem_case):
    src = abtem_case / "events_dose50.npz"  # shipped in tests/data: runs in every checkout
    out = tmp_path / "o.zarr"
    assert (
        main(["ingest", str(src), str(out), "--scan-shape", "96", "96", "--detector-shape", "96", "96", "--quiet"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "events_dose50.npz: the source does not record the beam energy" in err[0]
    assert "--assume-defaults" in err[0] and not out.exists()
