"""Figures of results: a panel of 2-D images with scale bars (Å) and colour bars (units).

The figure is meant not to mislead:

* colour limits are the (0.5, 99.5) percentiles, so a few outliers cannot wash the image
  out; a side whose data go beyond its limit is drawn as an extend arrow on the colour bar
  (``extend`` "min", "max", "both" or "neither"). A side whose data stay within
  :data:`SNAP_FRACTION` of the percentile span of it is not clipped at all (the limit moves
  to the data's extreme), so arrows mark real outliers, not the 0.5 % tails every image has;
* each title is ``"variable: long_name"`` — the methods put the parameters that change the
  image (C10, kernel, band, padding, steps…) into ``long_name`` — wrapped, never cut off;
* every panel has a colour bar labelled with the units and a scale bar of a round length
  (1, 2 or 5 × 10ⁿ) in the coordinates' units (Å for scan images); axes are equal-aspect
  in those units (``extent`` from the coordinates), so unequal scan steps are honoured.

:func:`panel_figure` builds the :class:`~matplotlib.figure.Figure` (Agg canvas, no pyplot
state); :func:`image_panel` writes it as a PNG.
"""

from __future__ import annotations

import math
import os
import re
import textwrap

import numpy as np
import xarray as xr

from .errors import InvalidParameter

PERCENTILES = (0.5, 99.5)
SNAP_FRACTION = 0.05  # a side beyond its percentile by no more than this × (hi − lo) is not clipped
TITLE_CHARS = 40  # wrap width of a panel title (characters; a panel is 3.6 in wide at 9 pt)


#: Unit names as the attrs spell them (pint / cf-xarray) → as a figure shows them.
_SYMBOLS = {"angstrom": "Å", "1/angstrom": "Å⁻¹"}


def _nice_length(target: float) -> float:
    """A round length (1, 2 or 5 × 10ⁿ) not above ``target``."""
    exp = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**exp <= target:
            return m * 10**exp
    return 10**exp


def colour_limits(data) -> tuple[float, float, str]:
    """``(vmin, vmax, extend)`` of an image: percentile limits, and which sides clip.

    ``extend`` is "min", "max", "both" or "neither" — exactly the sides where finite data lie
    beyond ``vmin`` / ``vmax``.
    """
    values = np.asarray(data, dtype=float)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0, "neither"
    dmin, dmax = float(finite.min()), float(finite.max())
    lo, hi = (float(v) for v in np.percentile(finite, PERCENTILES))
    tol = SNAP_FRACTION * (hi - lo)
    if dmin >= lo - tol:
        lo = dmin
    if dmax <= hi + tol:
        hi = dmax
    if hi <= lo:  # a constant image: a range around the value, nothing clips
        half = 0.5 * max(abs(lo), 1.0)
        return lo - half, hi + half, "neither"
    below, above = dmin < lo, dmax > hi
    extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get((below, above), "neither")
    return lo, hi, extend


def panel_title(name: str, image: xr.DataArray, width: int = TITLE_CHARS) -> str:
    """``"name: long_name"`` (just the name when long_name is absent or the same), wrapped."""
    long_name = str(image.attrs.get("long_name", "") or "").strip()
    text = f"{name}: {long_name}" if long_name and long_name != name else str(name)
    text = " ".join(text.split())
    return _wrap(text, width) or name


def _wrap(text: str, width: int) -> str:
    """Wrap ``text`` at ``width`` characters, breaking after ``,`` / ``:`` or before ``(`` where it
    can, so a parameter stays with its value ("μ 0.5", "C10 −150 Å")."""
    lines: list[str] = []
    for chunk in re.split(r"(?<=[,:]) | (?=\()", text):
        if lines and len(lines[-1]) + 1 + len(chunk) <= width:
            lines[-1] += " " + chunk
        elif len(chunk) <= width:
            lines.append(chunk)
        else:
            lines.extend(textwrap.wrap(chunk, width=width, break_on_hyphens=False))
    return "\n".join(lines)


def _axis(image: xr.DataArray, i: int) -> tuple[float, float, int, str]:
    """``(first, step, n, units)`` of image axis ``i``: its coordinate, else pixel indices."""
    dim = image.dims[i]
    n = image.shape[i]
    if dim in image.coords and n >= 2:
        c = image.coords[dim]
        try:
            v = np.asarray(c.values, dtype=float)
        except (TypeError, ValueError):
            v = None
        if v is not None and np.all(np.isfinite(v)) and v[-1] != v[0]:
            units = str(c.attrs.get("units", "") or "") or ("angstrom" if str(dim).startswith("scan") else "")
            units = _SYMBOLS.get(units, units)
            return float(v[0]), float(v[-1] - v[0]) / (n - 1), n, units
    return 0.0, 1.0, n, "px"


def _extent(image: xr.DataArray) -> tuple[list[float], float, str]:
    """imshow ``extent`` (pixel edges, row 0 at the top), the width and the x units."""
    y0, dy, ny, _ = _axis(image, 0)
    x0, dx, nx, units = _axis(image, 1)
    left, right = x0 - dx / 2, x0 + dx * (nx - 0.5)
    top, bottom = y0 - dy / 2, y0 + dy * (ny - 0.5)
    return [left, right, bottom, top], abs(right - left), units


def _add_scale_bar(ax, width: float, units: str, height: float) -> None:
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    length = _nice_length(width / 4)
    bar = AnchoredSizeBar(ax.transData, length, f"{length:g} {units}".strip(), loc="lower left",
                          pad=0.3, borderpad=0.5, sep=3, color="white", frameon=True,
                          size_vertical=height / 80, fontproperties=FontProperties(size=8))
    bar.patch.set_facecolor("black")
    bar.patch.set_alpha(0.55)
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def panel_figure(images: dict[str, xr.DataArray], title: str | None = None):
    """The :class:`~matplotlib.figure.Figure` of a panel of the 2-D images in ``images``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [k for k, v in images.items() if v.ndim == 2]
    if not names:
        raise InvalidParameter("nothing to plot: no 2-D images in the result")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    titles = {name: panel_title(name, images[name]) for name in names}
    lines = [max(titles[n].count("\n") + 1 for n in names[r * cols:(r + 1) * cols]) for r in range(rows)]
    suptitle = _wrap(" ".join(title.split()), int(TITLE_CHARS * 1.1 * cols)) if title else ""
    height = sum(3.3 + 0.16 * (n - 1) for n in lines) + 0.2 * (suptitle.count("\n") + 1 if suptitle else 0)
    fig = Figure(figsize=(3.6 * cols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        img = images[name]
        data = np.asarray(img.values, dtype=float)
        vmin, vmax, extend = colour_limits(data)
        extent, width, units = _extent(img)
        im = ax.imshow(data, cmap="magma" if "phase" in name else "gray", vmin=vmin, vmax=vmax,
                       interpolation="nearest", extent=extent, origin="upper", aspect="equal")
        _add_scale_bar(ax, width, units, abs(extent[2] - extent[3]))
        ax.set_title(titles[name], fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03, extend=extend)
        bar.set_label(str(img.attrs.get("units", "") or "no units"), fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return fig


def image_panel(images: dict[str, xr.DataArray], path: str | os.PathLike, title: str | None = None) -> str:
    """Write a PNG panel of 2-D images (dims scan_y, scan_x) with scale and colour bars."""
    fig = panel_figure(images, title)
    fig.savefig(path, dpi=110)
    return str(path)
