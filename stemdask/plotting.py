"""Figures of results: a panel of 2-D images with scale bars (Å) and colour bars (units)."""

from __future__ import annotations

import math
import os

import numpy as np
import xarray as xr


def _nice_length(target: float) -> float:
    """A round length (1, 2 or 5 × 10ⁿ) not above ``target``."""
    exp = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**exp <= target:
            return m * 10**exp
    return 10**exp


def _add_scale_bar(ax, image: xr.DataArray) -> None:
    x = image.coords[image.dims[1]].values
    if x.size < 2:
        return
    step = float(x[1] - x[0])
    width = step * x.size
    length = _nice_length(width / 4)
    ny = image.shape[0]
    x0, y0 = 0.05 * x.size, 0.92 * ny
    ax.plot([x0, x0 + length / step], [y0, y0], color="white", lw=3, solid_capstyle="butt")
    ax.plot([x0, x0 + length / step], [y0, y0], color="black", lw=1, solid_capstyle="butt")
    ax.text(x0 + length / step / 2, y0 - 0.03 * ny, f"{length:g} Å", color="white", ha="center", va="bottom",
            fontsize=8, bbox=dict(facecolor="black", alpha=0.4, pad=1, lw=0))


def image_panel(images: dict[str, xr.DataArray], path: str | os.PathLike, title: str | None = None) -> str:
    """Write a PNG panel of 2-D images (dims scan_y, scan_x) with scale and colour bars."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [k for k, v in images.items() if v.ndim == 2]
    if not names:
        raise ValueError("nothing to plot: no 2-D images in the result")
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        img = images[name]
        data = np.asarray(img.values, dtype=float)
        lo, hi = np.nanpercentile(data, [0.5, 99.5])
        im = ax.imshow(data, cmap="gray" if "phase" not in name else "magma", vmin=lo, vmax=hi, interpolation="nearest")
        _add_scale_bar(ax, img)
        ax.set_title(img.attrs.get("long_name", name), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
        bar.set_label(img.attrs.get("units", ""), fontsize=8)
        bar.ax.tick_params(labelsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
