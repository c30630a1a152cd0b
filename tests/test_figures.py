"""Result figures do not mislead: clipping shown, parameters in titles, scale and colour bars, square pixels.

The panel builder (`panel_figure`) is inspected through matplotlib's objects, not only the PNG.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

from stemdask.errors import InvalidParameter
from stemdask.plotting import colour_limits, image_panel, panel_figure

NY, NX = 48, 40
STEP_Y, STEP_X = 0.3, 0.2  # Å: unequal scan steps

# variable: (long_name, units, which side clips)
CASES = {
    "ssb_phase": ("SSB phase (C10 −150 Å)", "rad", "max"),
    "ricom_phase": ("riCOM phase (kernel 61, band 0.05–∞ Å⁻¹)", "rad", "both"),
    "icom_phase": ("iCOM phase (mirror pad)", "rad", "min"),
    "dpc_phase": ("DPC phase (≤100 steps of μ 0.5, λ1 0 Å⁻², λ2 0 Å²)", "rad", "neither"),
    "virtual_bf": ("virtual BF 0–20.2 mrad", "electrons", "neither"),
}


def _results() -> xr.Dataset:
    y = 1.5 + STEP_Y * np.arange(NY)
    x = -2.0 + STEP_X * np.arange(NX)
    yy, xx = np.meshgrid(y, x, indexing="ij")
    smooth = np.sin(2 * np.pi * xx / 3.9) * np.cos(2 * np.pi * yy / 3.9)  # lattice-like, in [-1, 1]
    rng = np.random.default_rng(0)
    spots = rng.choice(NY * NX, size=6, replace=False)
    high, low = spots[:3], spots[3:]

    def with_outliers(up: bool, down: bool) -> np.ndarray:
        img = smooth.copy().ravel()
        if up:
            img[high] = 40.0
        if down:
            img[low] = -25.0
        return img.reshape(NY, NX)

    data = {
        "ssb_phase": with_outliers(True, False),
        "ricom_phase": with_outliers(True, True),
        "icom_phase": with_outliers(False, True),
        "dpc_phase": 0.3 * smooth,
        "virtual_bf": 1000 + 200 * smooth,  # light image (gray colour map)
    }
    coords = {"scan_y": ("scan_y", y, {"units": "Å", "long_name": "scan y"}),
              "scan_x": ("scan_x", x, {"units": "Å", "long_name": "scan x"})}
    ds = xr.Dataset(
        {name: (("scan_y", "scan_x"), data[name], {"long_name": CASES[name][0], "units": CASES[name][1]})
         for name in CASES},
        coords=coords,
    )
    ds["focus_power"] = xr.DataArray(np.arange(5.0), dims="c10", attrs={"units": "rad²"})  # 1-D: not plotted
    return ds


@pytest.fixture(scope="module")
def results() -> xr.Dataset:
    return _results()


@pytest.fixture(scope="module")
def panels(results):
    """(figure, {variable: (axes, AxesImage)}) of the panel of every variable."""
    fig = panel_figure({k: results[k] for k in results.data_vars}, title="store.zarr: ssb, ricom, icom, dpc, virtual")
    fig.canvas.draw()  # layout and text extents as they are written
    by_name = {}
    for ax in fig.axes:
        if ax.images and ax.get_title():
            name = ax.get_title().split(":")[0]
            by_name[name] = (ax, ax.images[0])
    return fig, by_name


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def test_only_2d_images_are_panels(panels):
    _, by_name = panels
    assert sorted(by_name) == sorted(CASES)


def test_colour_bar_extend_matches_clipping(panels, results):
    _, by_name = panels
    for name, (_, im) in by_name.items():
        bar = im.colorbar
        assert bar is not None, name
        assert bar.extend == CASES[name][2], (name, bar.extend)
        # and it is what the data do against the limits actually used
        data = results[name].values
        below, above = data.min() < im.norm.vmin, data.max() > im.norm.vmax
        assert bar.extend == {(True, True): "both", (True, False): "min",
                              (False, True): "max", (False, False): "neither"}[(below, above)], name


def test_clipping_keeps_the_image_contrast(panels):
    """The outliers are clipped, not allowed to flatten the lattice into one colour."""
    _, by_name = panels
    for name in ("ssb_phase", "ricom_phase", "icom_phase"):
        norm = by_name[name][1].norm
        assert -1.5 < norm.vmin < -0.9 and 0.9 < norm.vmax < 1.5, (name, norm.vmin, norm.vmax)


def test_titles_carry_variable_name_and_parameters(panels):
    _, by_name = panels
    for name, (ax, _) in by_name.items():
        assert _one_line(ax.get_title()) == f"{name}: {CASES[name][0]}"
    assert "C10 −150 Å" in _one_line(by_name["ssb_phase"][0].get_title())
    assert "kernel 61, band 0.05–∞ Å⁻¹" in _one_line(by_name["ricom_phase"][0].get_title())


def test_long_titles_wrap_and_are_not_cut(panels):
    fig, by_name = panels
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    dpc_title = by_name["dpc_phase"][0].title
    assert "\n" in dpc_title.get_text()  # 60 characters: wrapped
    lines = dpc_title.get_text().split("\n")
    assert all(len(line) <= 40 for line in lines)
    assert any("μ 0.5" in line for line in lines)  # broken between parameters, not inside one
    titles = [ax.title for ax, _ in by_name.values()] + [fig._suptitle]
    for text in titles:
        box = text.get_window_extent(renderer)
        assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, text.get_text()
    # and titles of neighbouring panels do not run into each other
    boxes = sorted((ax.title.get_window_extent(renderer) for ax, _ in by_name.values()), key=lambda b: (b.y0, b.x0))
    for a in boxes:
        for b in boxes:
            if a is not b:
                assert not a.overlaps(b)


def test_every_panel_has_colour_bar_with_units(panels):
    _, by_name = panels
    for name, (_, im) in by_name.items():
        assert im.colorbar.ax.get_ylabel() == CASES[name][1], name


def test_every_panel_has_a_round_scale_bar_in_angstrom(panels):
    _, by_name = panels
    for name, (ax, _) in by_name.items():
        bars = [c for c in ax.get_children() if isinstance(c, AnchoredSizeBar)]
        assert len(bars) == 1, name
        label = bars[0].txt_label.get_text()
        m = re.fullmatch(r"(\S+) Å", label)
        assert m, label
        length = float(m.group(1))
        mantissa = length / 10 ** np.floor(np.log10(length))
        assert any(np.isclose(mantissa, v) for v in (1, 2, 5)), label
        # the bar is drawn in data units (Å) and is that long
        rect = bars[0].size_bar.get_children()[0]
        assert rect.get_width() == pytest.approx(length)
        assert length <= NX * STEP_X / 2


def test_axes_are_equal_aspect_with_unequal_scan_steps(panels, results):
    _, by_name = panels
    for name, (ax, im) in by_name.items():
        assert ax.get_aspect() == 1.0, name
        left, right, bottom, top = im.get_extent()
        assert right - left == pytest.approx(NX * STEP_X)
        assert bottom - top == pytest.approx(NY * STEP_Y)  # row 0 at the top
        assert left == pytest.approx(float(results.scan_x[0]) - STEP_X / 2)
        assert top == pytest.approx(float(results.scan_y[0]) - STEP_Y / 2)
        # pixels are squares in Å: the drawn box has the shape of the scanned area
        box = ax.get_position()
        fig_w, fig_h = ax.figure.get_size_inches()
        assert (box.height * fig_h) / (box.width * fig_w) == pytest.approx((NY * STEP_Y) / (NX * STEP_X), rel=0.02)


def test_image_panel_writes_the_png(tmp_path, results):
    out = tmp_path / "panel.png"
    got = image_panel({k: results[k] for k in results.data_vars}, out, title="results")
    assert got == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_image_panel_refuses_nothing_to_plot(tmp_path, results):
    with pytest.raises(InvalidParameter, match="no 2-D images"):
        image_panel({"focus_power": results["focus_power"]}, tmp_path / "x.png")


def test_colour_limits_edge_cases():
    assert colour_limits(np.full((8, 8), 3.0))[2] == "neither"
    lo, hi, ext = colour_limits(np.full((8, 8), 3.0))
    assert lo < 3.0 < hi
    assert colour_limits(np.full((4, 4), np.nan)) == (0.0, 1.0, "neither")
    img = np.linspace(0, 1, 400).reshape(20, 20)
    img[0, 0] = np.nan
    assert colour_limits(img)[2] == "neither"
    img[1, 1] = 1e6
    lo, hi, ext = colour_limits(img)
    assert ext == "max" and hi < 2
