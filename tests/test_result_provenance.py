"""Results record how they were made: the calibration used (with origins), methods and their
options, the source store (absolute path, events, checksum), the version — at the Dataset
level only the run's own record; each method's attrs stay on its variables."""

from __future__ import annotations

import json

import pytest
import xarray as xr

import stemdask
from stemdask.cli import main
from stemdask.io import ingest
from stemdask.reconstruct import reconstruct
from stemdask.store import open_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from stemdask.simulate import SimulationParams, export_csr, simulate

    d = tmp_path_factory.mktemp("prov")
    p = SimulationParams(scan_shape=(32, 32), detector=32, dose=1000, seed=2)
    npz = export_csr(simulate(d / "sim.zarr", p, progress=False), d / "ev.npz")
    optics = {k: v for k, v in p.optics().items() if k != "semiangle_mrad"}  # the semi-angle is assumed
    s = ingest(npz, d / "events.zarr", progress=False, calibration=optics, assume_defaults=True)
    assert main(["calibrate", str(s.path)]) == 0
    return open_store(s.path)


def _reconstruct(store, out, *extra):
    argv = ["reconstruct", str(store.path), "--method", "com", "--method", "icom", "--method", "ssb",
            "--out", str(out), "--quiet", "--bin", "1", *extra]
    assert main(argv) == 0
    return xr.open_zarr(out)


def test_result_attrs_round_trip_through_open_zarr(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(store.path.parent)  # a relative store path is recorded absolute
    store_rel = open_store(store.path.name)
    saved = _reconstruct(store_rel, tmp_path / "r.zarr", "--rotation-deg", "7.5", "--no-flip")
    a = saved.attrs
    assert a["format"] == "stemdask-result" and list(a["methods"]) == ["com", "icom", "ssb"]
    assert a["store"] == str(store.path.resolve()) and a["store"].startswith("/")
    assert a["store_n_events"] == store.n_events
    assert a["source_sha256"] == store.provenance["source_sha256"] and len(a["source_sha256"]) == 64
    assert a["stemdask_version"] == stemdask.__version__
    cal = json.loads(a["calibration"])
    stored = store.calibration
    assert cal["bf_center"] == list(stored.bf_center) and cal["bf_radius"] == stored.bf_radius
    assert cal["rotation_deg"] == 7.5 and cal["flip"] is False  # the calibration actually used
    origins = json.loads(a["calibration_origins"])
    assert origins == cal["origins"]
    assert origins["rotation_deg"] == origins["flip"] == "command line"
    assert origins["bf_center"] == "measured" and origins["energy_ev"] == "command line"
    assert "semiangle_mrad" not in origins and cal["semiangle_mrad"] is None
    opts = json.loads(a["method_options"])
    assert opts["ssb"]["bin"] == 1 and "c10" in opts["ssb"] and opts["com"]["com_reference"] == "bf"
    assert set(opts) == {"com", "icom", "ssb"}


def test_method_attrs_stay_on_their_variables(store):
    from stemdask.events import open as open_dataset

    result = reconstruct(open_dataset(store.path), ["icom", "com"])
    assert "method" not in result.attrs  # icom's Dataset attrs ({"method": "icom"}) never reach the result level
    assert set(result.attrs) == {"format", "methods", "method_options", "calibration", "calibration_origins",
                                 "assumed_values", "store", "store_n_events", "source_sha256", "stemdask_version"}
    assert result["phase"].attrs["method"] == "icom" and result["phase"].attrs["units"] == "rad"
    assert result["com_y"].attrs.get("units")
    both = reconstruct(open_dataset(store.path), ["icom", "dpc"])
    assert both["icom_phase"].attrs["method"] == "icom" and both["dpc_phase"].attrs["method"] == "dpc"


def test_assumed_values_are_recorded_in_the_result(store, tmp_path):
    saved = _reconstruct(store, tmp_path / "r.zarr")
    assert "semiangle_mrad" not in saved.attrs["assumed_values"]
    origins = json.loads(saved.attrs["calibration_origins"])
    assert sorted(saved.attrs["assumed_values"]) == sorted(k for k, v in origins.items() if v == "assumed")


def test_info_describes_a_result_store(store, tmp_path, capsys):
    _reconstruct(store, tmp_path / "r.zarr", "--rotation-deg", "3")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "r.zarr")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"result       {(tmp_path / 'r.zarr').resolve()}")
    assert "methods      com, icom, ssb" in text
    lines = text.splitlines()
    phase = next(x for x in lines if x.strip().startswith("ssb_phase"))
    assert "32 × 32 (scan_y, scan_x)" in phase and " rad " in phase
    assert any(x.startswith("source store") and str(store.path.resolve()) in x and f"{store.n_events:,} events" in x
               for x in lines)
    assert "rotation 3° [command line]" in text and "[measured]" in text
    assert f"(made by stemdask {stemdask.__version__})" in text
    assert main(["info", str(tmp_path / "r.zarr"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "result" and info["calibration"]["rotation_deg"] == 3.0
    assert info["variables"]["com_y"]["units"] and info["variables"]["com_y"]["shape"] == [32, 32]
    # an event store is still described as one, with origins
    assert main(["info", str(store.path)]) == 0
    assert capsys.readouterr().out.startswith("store ")


def test_demo_records_the_simulation_origins(tmp_path):
    from stemdask.demo import run_demo

    res = run_demo(tmp_path / "demo", scan=24, detector=16, dose=500, cluster=None, progress=False)
    saved = xr.open_zarr(res["results"])
    origins = json.loads(saved.attrs["calibration_origins"])
    assert all(
        origins[k] == "simulation" for k in ("energy_ev", "scan_step_a", "semiangle_mrad", "detector_pixel_mrad")
    )
    assert saved.attrs["store"] == str((tmp_path / "demo" / "events.zarr").resolve())
    assert "method" not in saved.attrs and saved["virtual_bf"].attrs.get("units") is not None
    assert json.loads(saved.attrs["demo"])["scan"] == 24
