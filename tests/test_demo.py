"""`stemdask demo` end to end at a small size: files written, every phase method finds the atoms."""

import pytest
import xarray as xr

from stemdask.cli import main


@pytest.mark.slow
def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--scan", "72", "--detector", "32", "--dose", "3000",
                 "--cluster", "none", "--quiet"]) == 0
    result = xr.open_zarr(out / "results.zarr")
    for name in ["virtual_bf", "virtual_adf", "com_y", "com_x", "icom_phase", "dpc_phase", "ricom_phase", "ssb_phase"]:
        assert name in result and result[name].shape == (72, 72)
        assert result[name].attrs.get("units")
    assert (out / "results.png").stat().st_size > 10_000
    truth = result["phase_truth"].values
    for m in ["icom", "dpc", "ricom", "ssb"]:
        phase = result[f"{m}_phase"].values
        r = float(xr.corr(xr.DataArray(phase), xr.DataArray(truth)))
        assert r > 0.8, (m, r)  # positive: atoms come out bright


def test_demo_refuses_nothing_but_reports_bad_sizes(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--detector", "31", "--cluster", "none", "--quiet"]) == 2
    assert "detector must be an even number" in capsys.readouterr().err


def test_demo_never_replaces_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--cluster", "none", "--quiet"]) == 2
    assert "not a stemdask demo folder" in capsys.readouterr().err and (tmp_path / "thesis.tex").exists()
