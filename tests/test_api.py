"""The Python API the command line is built on: reconstruct() with each method's own options,
laziness, and objects that print briefly."""

from __future__ import annotations

import json

import pytest

import stemdask
from stemdask.errors import InvalidParameter
from stemdask.methods.ssb import ssb
from stemdask.reconstruct import reconstruct
from stemdask.testing import raise_if_dask_computes, random_event_store


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    store = random_event_store(tmp_path_factory.mktemp("api") / "r.zarr", (16, 16), 32, 50, rows_per_block=8)
    return stemdask.open(store.path)


def test_reconstruct_takes_each_methods_options_and_records_all_of_them(ds):
    with raise_if_dask_computes():
        result = reconstruct(ds, {"ricom": {"kernel_size": 9}, "ssb": {"c10": -20.0}, "virtual": {}})
    assert set(result.data_vars) == {"ricom_phase", "ssb_phase", "bf", "abf", "adf"}
    options = json.loads(result.attrs["method_options"])
    assert options["ricom"] == {"com_reference": "mean", "kernel_size": 9, "kmin": None, "kmax": None}
    assert options["ssb"]["c10"] == -20.0 and options["ssb"]["bin"] == 1
    assert result["ssb_phase"].attrs["long_name"] == "SSB phase (C10 −20 Å)"
    assert result["ricom_phase"].attrs["long_name"] == "riCOM phase (kernel 9)"
    assert result["adf"].attrs["long_name"].startswith("virtual ADF ≥ ")
    assert result["bf"].attrs["long_name"].startswith("virtual BF 0–") and "mrad" in result["bf"].attrs["long_name"]
    assert result.scan_x.attrs["units"] == "angstrom"


def test_an_option_a_method_does_not_have_is_refused(ds):
    with pytest.raises(InvalidParameter, match="method 'com' has no option 'kernel_size'; its options: com_reference"):
        reconstruct(ds, {"com": {"kernel_size": 9}})
    with pytest.raises(InvalidParameter, match="unknown method 'ptycho'"):
        reconstruct(ds, ["ptycho"])


def test_an_ssb_result_prints_briefly(ds):
    text = repr(ssb(ds.densify(), ds.calibration))
    assert text.startswith("<SSBResult G 16×9×") and "lazy" in text and len(text) < 200
