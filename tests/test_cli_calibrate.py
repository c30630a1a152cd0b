"""`stemdask calibrate`: --set fixes optics after ingest (sets only, measures nothing); --mask
and --descan reach calibrate_store; bad input is one line, exit 2, store unchanged; an
unreliable rotation is said in exactly one line; reconstruct calibrates a store that never was."""

from __future__ import annotations

import numpy as np
import pytest

from stemdask.cli import main
from stemdask.io import SourceError, ingest
from stemdask.io.mask import load_mask
from stemdask.store import open_store

SCAN, DET = (8, 8), (16, 16)


def _store(tmp_path, name="s.zarr", **cal):
    rng = np.random.default_rng(0)
    counts = rng.poisson(30, SCAN[0] * SCAN[1])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    indices = rng.integers(0, DET[0] * DET[1], offsets[-1]).astype(np.uint32)
    src = tmp_path / f"{name}.npz"
    np.savez(src, indices=indices, offsets=offsets, scan_shape=SCAN, detector_shape=DET)
    return ingest(src, tmp_path / name, calibration=cal or None, assume_defaults=True, progress=False)


def _attrs_bytes(store) -> bytes:
    return (store.path / "zarr.json").read_bytes()


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory):
    """A small simulated dataset, exported and ingested as a user would (never calibrated)."""
    from stemdask.simulate import SimulationParams, export_csr, simulate

    d = tmp_path_factory.mktemp("sim")
    p = SimulationParams(scan_shape=(32, 32), detector=32, dose=1000, seed=0)
    return {"npz": export_csr(simulate(d / "sim.zarr", p, progress=False), d / "ev.npz"), "optics": p.optics()}


def _fresh(sim_store, tmp_path):
    return ingest(sim_store["npz"], tmp_path / "s.zarr", calibration=sim_store["optics"], progress=False)


# ------------------------------------------------------------------ --set
def test_set_fixes_optics_without_measuring(tmp_path, capsys, monkeypatch):
    import stemdask.calibrate

    store = _store(tmp_path)
    monkeypatch.setattr(stemdask.calibrate, "calibrate_store", lambda *a, **k: pytest.fail("--set measured"))
    assert main(["calibrate", str(store.path), "--set", "scan-step=0.2", "--set", "energy-kev=300",
                 "--set", "semiangle-mrad=20", "--set", "detector-pixel-mrad=1.0",
                 "--set", "rotation-deg=-12.5", "--set", "flip=true"]) == 0
    out = capsys.readouterr().out
    assert "set after ingest" in out and "was 1 × 1 Å, assumed" in out
    cal = open_store(store.path).calibration
    assert (cal.scan_step_a, cal.energy_ev, cal.semiangle_mrad, cal.detector_pixel_mrad) == ((0.2, 0.2), 300e3, 20.0,
                                                                                             1.0)
    assert (cal.rotation_deg, cal.flip) == (-12.5, True)
    for f in ("scan_step_a", "energy_ev", "semiangle_mrad", "detector_pixel_mrad", "rotation_deg", "flip"):
        assert cal.origins[f] == "set after ingest"
    assert main(["calibrate", str(store.path), "--set", "scan-step=0.3,0.25"]) == 0
    assert open_store(store.path).calibration.scan_step_a == (0.3, 0.25)
    capsys.readouterr()
    assert main(["info", str(store.path)]) == 0
    assert "0.3 × 0.25 Å [set after ingest]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "item, needle",
    [
        ("bogus=1", "unknown field 'bogus'"),
        ("scan-step=-0.2", "positive finite"),
        ("energy-kev=0", "positive finite"),
        ("energy-kev=inf", "positive finite"),
        ("semiangle-mrad=nan", "positive finite"),
        ("detector-pixel-mrad=abc", "not a number"),
        ("rotation-deg=nan", "finite"),
        ("flip=maybe", "true or false"),
        ("scan-step", "expected NAME=VALUE"),
    ],
)
def test_bad_set_is_one_line_and_leaves_the_store_unchanged(tmp_path, capsys, item, needle):
    store = _store(tmp_path)
    before = _attrs_bytes(store)
    assert main(["calibrate", str(store.path), "--set", "energy-kev=200", "--set", item]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stemdask calibrate: error: --set") and needle in err[0], err
    assert _attrs_bytes(store) == before


def test_set_only_sets_and_refuses_measuring_options(tmp_path, capsys):
    store = _store(tmp_path)
    np.save(tmp_path / "m.npy", np.zeros(DET, bool))
    before = _attrs_bytes(store)
    assert main(["calibrate", str(store.path), "--set", "energy-kev=200", "--mask", str(tmp_path / "m.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set only sets" in err[0]
    assert _attrs_bytes(store) == before


# ------------------------------------------------------------------ masks
def test_load_mask_npy_and_tif(tmp_path):
    from PIL import Image

    m = np.zeros(DET, bool)
    m[3, 4] = True
    m[10, :] = True
    np.save(tmp_path / "b.npy", m)
    np.save(tmp_path / "i.npy", m.astype(np.int64))
    Image.fromarray(m.astype(np.uint8)).save(tmp_path / "u.tif")
    Image.fromarray(m).save(tmp_path / "b.tiff")
    for name in ("b.npy", "i.npy", "u.tif", "b.tiff"):
        got = load_mask(tmp_path / name, DET)
        assert got.dtype == bool and np.array_equal(got, m), name


@pytest.mark.parametrize(
    "case, needle",
    [
        ("shape", "the mask has shape (16, 15), the detector is 16×16"),
        ("values", "only 0 and 1"),
        ("garbage", "not a readable mask"),
        ("suffix", "a mask must be a .npy or .tif"),
        ("missing", "no such mask file"),
    ],
)
def test_bad_mask_is_one_line_naming_the_file_and_leaves_the_store_unchanged(
    tmp_path, capsys, monkeypatch, case, needle
):
    import stemdask.calibrate

    store = _store(tmp_path)
    path = tmp_path / {"suffix": "m.png", "garbage": "m.tif"}.get(case, "m.npy")
    if case == "shape":
        np.save(path, np.zeros((16, 15), bool))
    elif case == "values":
        np.save(path, np.full(DET, 2, np.uint8))
    elif case in ("garbage", "suffix"):
        path.write_bytes(b"not an image at all")
    with pytest.raises(SourceError, match=str(path.name)):
        load_mask(path, DET)
    monkeypatch.setattr(stemdask.calibrate, "calibrate_store", lambda *a, **k: pytest.fail("measured anyway"))
    before = _attrs_bytes(store)
    assert main(["calibrate", str(store.path), "--mask", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and needle in err[0], err
    assert _attrs_bytes(store) == before


def test_mask_and_descan_reach_calibrate_store(tmp_path, capsys, monkeypatch):
    import stemdask.calibrate

    store = _store(tmp_path)
    m = np.zeros(DET, np.uint8)
    m[2, 3] = 1
    np.save(tmp_path / "m.npy", m)
    seen = {}

    def fake(path, write=True, mask=None, descan="plane", vacuum=None):
        seen.update(path=str(path), write=write, mask=mask, descan=descan, vacuum=vacuum)
        return {"rotation_reliable": True, "bf_center": [8.0, 8.0], "bf_radius": 3.0, "rotation_deg": 0.0,
                "flip": False, "c10_estimate_a": None, "messages": ["a warning"], "summary": "the summary"}

    monkeypatch.setattr(stemdask.calibrate, "calibrate_store", fake)
    assert (
        main(["calibrate", str(store.path), "--mask", str(tmp_path / "m.npy"), "--descan", "quadratic", "--dry-run"])
        == 0
    )
    assert seen["descan"] == "quadratic" and seen["write"] is False
    assert seen["mask"].dtype == bool and np.array_equal(seen["mask"], m.astype(bool))
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == ["the summary", "a warning"] and not any("NOT reliable" in x for x in lines)
    assert main(["calibrate", str(store.path)]) == 0
    assert seen["descan"] == "plane" and seen["mask"] is None and seen["write"] is True and seen["vacuum"] is None


def test_descan_from_a_vacuum_scan_refuses_what_cannot_be_one(tmp_path, capsys):
    store = _store(tmp_path)
    before = open_store(store.path).calibration
    for argv, message in [
        (["--descan-from", str(store.path)], "the sample store itself"),
        (["--descan-from", str(tmp_path / "none.zarr")], "none.zarr"),
        (["--descan-from", str(store.path), "--descan", "off"], "nothing would be fitted"),
    ]:
        assert main(["calibrate", str(store.path), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert open_store(store.path).calibration == before


@pytest.mark.parametrize("with_message", [True, False])
def test_unreliable_rotation_is_exactly_one_line(tmp_path, capsys, monkeypatch, with_message):
    import stemdask.calibrate

    store = _store(tmp_path)
    messages = ["the ADF image does not decide the half turn"]
    if with_message:  # calibrate_store's own line: printed once, not doubled
        messages.append(
            "rotation/flip NOT reliable: the ADF image does not decide the half turn — kept the stored "
            "rotation 0°, flip False (set them with `stemdask calibrate --set rotation-deg=… "
            "--set flip=…` or `reconstruct --rotation-deg`)"
        )
    monkeypatch.setattr(
        stemdask.calibrate,
        "calibrate_store",
        lambda *a, **k: {"rotation_reliable": False, "bf_center": [8.0, 8.0], "bf_radius": 3.0, "rotation_deg": 177.0,
                         "flip": False, "c10_estimate_a": None, "messages": messages, "summary": "summary line"},
    )
    assert main(["calibrate", str(store.path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    flagged = [x for x in lines if "NOT reliable" in x]
    assert len(flagged) == 1 and "rotation/flip" in flagged[0] and "--set rotation-deg" in flagged[0]
    assert lines[0] == "summary line"


def test_calibrate_measures_with_a_mask(sim_store, tmp_path, capsys):
    store = _fresh(sim_store, tmp_path)
    mask = np.zeros(store.detector_shape, bool)
    mask[0, 0] = mask[31, 31] = True
    np.save(tmp_path / "m.npy", mask)
    assert main(["calibrate", str(store.path), "--mask", str(tmp_path / "m.npy"), "--descan", "off"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("BF centre")
    cal = open_store(store.path).calibration
    assert cal.bf_center is not None and cal.origins["bf_center"] == "measured" and cal.descan is None
    assert cal.report["defects"]["user_mask_pixels"] == 2
    stored, _ = open_store(store.path).detector_mask()
    assert stored[0, 0] and stored[31, 31]


def test_mask_hiding_the_bf_disk_is_refused(sim_store, tmp_path, capsys):
    store = _fresh(sim_store, tmp_path)
    mask = np.zeros(store.detector_shape, bool)
    mask[8:24, 8:24] = True
    np.save(tmp_path / "m.npy", mask)
    before = _attrs_bytes(store)
    assert main(["calibrate", str(store.path), "--mask", str(tmp_path / "m.npy")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stemdask calibrate: error:" in err[0]
    assert _attrs_bytes(store) == before


# ------------------------------------------------------------------ reconstruct calibrates first
def test_reconstruct_calibrates_a_store_that_never_was(sim_store, tmp_path, capsys):
    store = _fresh(sim_store, tmp_path)
    assert store.calibration.bf_center is None
    assert main(["reconstruct", str(store.path), "--method", "com", "--out", str(tmp_path / "r.zarr"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "never calibrated; calibrating it first" in err and "BF centre (" in err
    cal = open_store(store.path).calibration
    assert cal.bf_center is not None and cal.origins["bf_radius"] == "measured"
    # a calibrated store is not calibrated again
    assert main(["reconstruct", str(store.path), "--method", "com", "--out", str(tmp_path / "r2.zarr"), "--quiet"]) == 0
    assert "never calibrated" not in capsys.readouterr().err
