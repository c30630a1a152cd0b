"""Outputs never destroy inputs: --overwrite replaces only what stemdask itself wrote."""

import numpy as np
import pytest

from stemdask.cli import main
from stemdask.testing import random_event_store


@pytest.fixture
def store(tmp_path):
    return random_event_store(tmp_path / "s.zarr", (8, 8), 16, 20, rows_per_block=4)


def test_ingest_refuses_to_write_over_its_input(tmp_path, capsys):
    src = tmp_path / "e.npz"
    np.savez(src, indices=np.zeros(4, np.uint16), offsets=np.array([0, 1, 2, 3, 4]))
    assert main(["ingest", str(src), str(src), "--scan-shape", "2", "2", "--detector-shape", "4", "4",
                 "--overwrite", "--quiet"]) == 2
    assert "output is the input" in capsys.readouterr().err
    assert np.load(src)["offsets"][-1] == 4  # untouched


def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path, capsys):
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    assert main(["simulate", str(folder), "--scan", "4", "4", "--detector", "8", "--overwrite", "--quiet"]) == 2
    assert "not a Zarr store" in capsys.readouterr().err and (folder / "notes.txt").exists()


def test_reconstruct_refuses_to_replace_its_event_store(store, capsys):
    assert main(["reconstruct", str(store.path), "--method", "com", "--out", str(store.path), "--overwrite",
                 "--quiet"]) == 2
    assert "the output is the input" in capsys.readouterr().err
    assert store.path.joinpath("indices").exists()


def test_reconstruct_overwrite_will_not_replace_an_event_store_with_results(store, tmp_path, capsys):
    other = random_event_store(tmp_path / "other.zarr", (8, 8), 16, 20)
    assert main(["reconstruct", str(store.path), "--method", "com", "--out", str(other.path), "--overwrite",
                 "--quiet"]) == 2
    assert "not a stemdask-result store" in capsys.readouterr().err and other.path.joinpath("indices").exists()
    result = tmp_path / "r.zarr"
    for _ in range(2):  # a result is replaced by the next one
        assert main(["reconstruct", str(store.path), "--method", "com", "--out", str(result), "--overwrite",
                     "--quiet"]) == 0


def test_missing_gpu_packages_are_a_clear_error(store, tmp_path, capsys):
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    assert main(["reconstruct", str(store.path), "--method", "ssb", "--gpu", "--out", str(tmp_path / "r.zarr"),
                 "--quiet"]) == 2
    assert "pip install 'stemdask[gpu]'" in capsys.readouterr().err


def test_com_reference_may_be_an_array(store):
    import stemdask

    ds = stemdask.open(store.path)
    a = ds.com(reference=np.array([8.0, 8.0])).compute()
    b = ds.com(reference=(8.0, 8.0)).compute()
    np.testing.assert_array_equal(a.com_y.values, b.com_y.values)


def test_methods_refuse_a_calibration_from_another_scan_sampling(store):
    import stemdask
    from stemdask.methods.icom import icom
    from stemdask.methods.ssb import ssb

    ds = stemdask.open(store.path)
    binned = ds.bin_scan(2)
    with pytest.raises(ValueError, match="scan_y coordinates are 1 Å apart but the calibration's scan step is 0.5 Å"):
        ssb(binned.densify(), ds.calibration)
    with pytest.raises(ValueError, match="calibration's scan step"):
        icom(binned.com(), ds.calibration)
    icom(binned.com(), binned.calibration)  # the binned dataset's own calibration is right
