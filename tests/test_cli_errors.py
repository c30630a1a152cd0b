"""The command line's errors: each kind is one line naming the file or option and the problem
(exit status 2), nothing is created where it should not be, and a stemdask bug keeps its
traceback."""

from __future__ import annotations

import pytest

import stemdask.reconstruct
from stemdask.cli import main
from stemdask.simulate import SimulationParams, simulate


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.zarr"
    simulate(path, SimulationParams(scan_shape=(16, 16), detector=16, dose=200), rows_per_block=8, progress=False)
    return path


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"stemdask {command}: error: ")
    return errors[0]


def test_an_option_of_a_method_not_asked_for_is_refused(store, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    assert main(["reconstruct", str(store), "--method", "com", "--kernel-size", "31", "--out", str(out)]) == 2
    line = one_error_line(capsys, "reconstruct")
    assert "--kernel-size applies to --method ricom, not to com" in line and not out.exists()
    assert main(["reconstruct", str(store), "--method", "icom", "--bin", "7", "--out", str(out)]) == 2
    assert "--bin applies to --method ssb" in one_error_line(capsys, "reconstruct")
    assert main(["live", str(store), "--scan-shape", "16", "16", "--c10", "-50"]) == 2
    assert "--c10 applies to --method ssb" in one_error_line(capsys, "live")
    assert main(["ingest", "x.npz", str(tmp_path / "i.zarr"), "--threshold", "3"]) == 2
    assert "--threshold applies to --mode threshold" in one_error_line(capsys, "ingest")


def test_an_unknown_flag_is_reported_against_its_subcommand(store, capsys):
    with pytest.raises(SystemExit) as done:
        main(["reconstruct", str(store), "--method", "com", "--out", "o.zarr", "--kernal-size", "3"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: stemdask reconstruct ")
    assert "stemdask reconstruct: error: unrecognized arguments: --kernal-size 3" in err
    with pytest.raises(SystemExit):
        main(["cluster", "show", "local", "--bogus"])
    assert "stemdask cluster show: error: unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("make", ["folder", "file", "zarr group"])
def test_something_that_is_not_a_store_is_named_without_library_internals(make, tmp_path, capsys):
    path = tmp_path / "x.zarr"
    if make == "folder":
        path.mkdir()
    elif make == "file":
        path.write_text("hello")
    else:
        import zarr

        zarr.open_group(str(path), mode="w")
    assert main(["reconstruct", str(path), "--method", "com", "--out", str(tmp_path / "r.zarr")]) == 2
    line = one_error_line(capsys, "reconstruct")
    assert str(path) in line and ("not a stemdask" in line or "a file, not a store" in line)
    assert "Error" not in line.split("error:", 1)[1] and "path ''" not in line


@pytest.mark.parametrize("option", ["--out", "--png"])
def test_outputs_never_create_folders_above_them(store, tmp_path, option, capsys):
    missing = tmp_path / "no" / "such"
    argv = ["reconstruct", str(store), "--method", "com", "--out", str(tmp_path / "r.zarr"), "--quiet"]
    argv += [option, str(missing / "x.zarr" if option == "--out" else missing / "x.png")]
    assert main(argv) == 2
    line = one_error_line(capsys, "reconstruct")
    assert f"the folder {missing} does not exist" in line and not (tmp_path / "no").exists()
    assert main(["ingest", str(store), str(missing / "i.zarr")]) == 2
    assert "does not exist" in one_error_line(capsys, "ingest") and not (tmp_path / "no").exists()
    assert main(["demo", "--out", str(missing / "demo"), "--cluster", "none", "--quiet"]) == 2
    assert "does not exist" in one_error_line(capsys, "demo") and not (tmp_path / "no").exists()


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    from stemdask.store import StoreError

    with pytest.raises(StoreError, match="no such store"):
        main(["info", str(tmp_path / "missing.zarr"), "--debug"])


def test_a_stemdask_bug_keeps_its_traceback(store, tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise ValueError("an internal invariant broke")  # not a user error: no one-line message

    monkeypatch.setattr(stemdask.reconstruct, "reconstruct", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["reconstruct", str(store), "--method", "com", "--out", str(tmp_path / "r.zarr"), "--quiet"])


def test_cluster_none_means_threads_for_every_command(store, tmp_path, capsys):
    out = tmp_path / "r.zarr"
    assert main(["reconstruct", str(store), "--method", "com", "--out", str(out), "--cluster", "none", "--quiet"]) == 0
    assert out.exists()


def test_a_missing_extra_is_one_line(store, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("dask_cuda") is not None:
        pytest.skip("dask-cuda is installed here: the gpu extra is not missing")
    argv = ["reconstruct", str(store), "--method", "com", "--out", str(tmp_path / "r.zarr"), "--cluster", "local-cuda"]
    assert main(argv) == 2
    assert "needs dask_cuda: pip install 'stemdask[gpu]'" in one_error_line(capsys, "reconstruct")


def test_live_without_a_bf_radius_says_there_are_no_virtual_images():
    from stemdask.errors import InvalidParameter
    from stemdask.live_session import LiveSession
    from stemdask.optics import Calibration

    calibration = Calibration(bf_center=(8.0, 8.0))  # a centre, no radius
    with pytest.warns(UserWarning, match="no virtual images: the BF/ABF/ADF virtual detectors need the BF-disk radius"):
        session = LiveSession((4, 4), (16, 16), calibration)
    assert session.detectors == {} and session.ricom is not None
    with pytest.raises(InvalidParameter, match="need the BF-disk radius"):
        LiveSession((4, 4), (16, 16), calibration, methods=["virtual"])
    assert set(LiveSession((4, 4), (16, 16), calibration, outer_mrad=5.0).detectors) == {"image"}


def test_live_records_optics_nobody_gave_as_assumed(tmp_path):
    from types import SimpleNamespace

    from stemdask.cli.live import live_calibration

    args = SimpleNamespace(calibration_from=None, energy_kev=200.0, scan_step=None, detector_pixel_mrad=None,
                           bf_center=[8, 8], bf_radius=None, rotation_deg=None, flip=None)
    with pytest.warns(UserWarning, match=r"ASSUMED.*1 Å \(--scan-step\), 1 mrad/px \(--detector-pixel-mrad\)"):
        calibration = live_calibration(args, SimpleNamespace(calibration=None))
    assert calibration.energy_ev == 200e3 and calibration.origins["energy_ev"] == "command line"
    assert calibration.origins["scan_step_a"] == calibration.origins["detector_pixel_mrad"] == "assumed"
    assert calibration.origins["bf_center"] == "command line"
