"""Notebook widgets (ipywidgets + matplotlib): interactive SSB refocusing.

:func:`ssb_widget` shows, side by side (Pelz et al. 2022, Fig. 2): aberration sliders, |G| at a
few scan frequencies (the trotters, where aberrations show as phase ramps and curvature),
and the SSB phase, which is recomputed from the kept G on every slider change (one pass of
trotter sums, no FFT). Figures are rendered to PNG into ``ipywidgets.Image`` widgets, so the
widget needs no interactive matplotlib backend and builds without a display.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np

from .optics import Aberrations

#: Slider name → (Aberrations field, min, max, step, unit).
SLIDERS = {
    "C10": ("C10", -1000.0, 1000.0, 1.0, "Å"),
    "C12": ("C12", 0.0, 500.0, 1.0, "Å"),
    "φ12": ("phi12", -90.0, 90.0, 1.0, "°"),
    "C21": ("C21", 0.0, 1e4, 10.0, "Å"),
    "φ21": ("phi21", -180.0, 180.0, 1.0, "°"),
    "C23": ("C23", 0.0, 1e4, 10.0, "Å"),
    "φ23": ("phi23", -60.0, 60.0, 1.0, "°"),
    "C30": ("C30", -1e6, 1e6, 1e3, "Å"),
}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return buf.getvalue()


def default_frequencies(result, n_radii: int = 3, n_angles: int = 3) -> list[tuple[float, float]]:
    """Scan frequencies (Å⁻¹) at 0.3–1.5 α/λ and ``n_angles`` directions: 9 by default."""
    radii = np.linspace(0.3, 1.5, n_radii) * result.k0
    angles = np.deg2rad(np.arange(n_angles) * 180.0 / n_angles)
    return [(float(r * np.sin(a)), float(r * np.cos(a))) for r in radii for a in angles]


class SSBWidget:
    """Aberration sliders driving :meth:`SSBResult.refocus`; see :func:`ssb_widget`.

    Attributes: ``widget`` (the ipywidgets container to display), ``sliders`` (name →
    FloatSlider), ``quantitative`` (Checkbox), ``phase`` (the last phase image, NumPy),
    ``phase_image`` / ``g_image`` (ipywidgets.Image).
    """

    def __init__(self, result, frequencies=None, *, cmap: str = "gray"):
        import ipywidgets as w
        from matplotlib.figure import Figure

        self.result = result.keep()
        self.cmap = cmap
        ab = result.aberrations
        self.sliders = {
            label: w.FloatSlider(value=getattr(ab, field), min=min(lo, getattr(ab, field)),
                                 max=max(hi, getattr(ab, field)), step=step, description=f"{label} ({unit})",
                                 continuous_update=False)
            for label, (field, lo, hi, step, unit) in SLIDERS.items()
        }
        self.quantitative = w.Checkbox(value=result.quantitative, description="quantitative")
        for control in (*self.sliders.values(), self.quantitative):
            control.observe(self.update, names="value")

        self.frequencies = list(frequencies) if frequencies is not None else default_frequencies(result)
        self.g_image = w.Image(format="png")
        self.g_image.value = _png(self._g_figure(Figure))
        self._figure = Figure(figsize=(4.2, 4))
        ax = self._figure.add_subplot()
        ny, nx = result.scan_shape
        sy, sx = result.calibration.scan_step_a
        self._im = ax.imshow(np.zeros((ny, nx)), cmap=cmap, origin="upper", extent=(0, nx * sx, ny * sy, 0))
        ax.set_xlabel("scan x (Å)")
        ax.set_ylabel("scan y (Å)")
        self._figure.colorbar(self._im, ax=ax, label="phase (rad)")
        self.phase_image = w.Image(format="png")
        self.update()
        self.widget = w.HBox([w.VBox([*self.sliders.values(), self.quantitative]), self.g_image, self.phase_image])

    def aberrations(self) -> Aberrations:
        """The aberrations the sliders show."""
        return dataclasses.replace(
            self.result.aberrations,
            **{SLIDERS[label][0]: s.value for label, s in self.sliders.items()},
        )

    def update(self, change=None) -> None:
        """Refocus with the sliders' aberrations and redraw the phase."""
        self.phase = np.asarray(self.result.refocus(self.aberrations(), quantitative=self.quantitative.value).values)
        self._im.set_data(self.phase)
        lo, hi = np.percentile(self.phase, [0.5, 99.5])
        self._im.set_clim(lo, hi if hi > lo else lo + 1e-9)
        self._im.axes.set_title(f"SSB phase, C10 = {self.sliders['C10'].value:g} Å")
        self.phase_image.value = _png(self._figure)

    def _g_figure(self, Figure):
        n = len(self.frequencies)
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        fig = Figure(figsize=(1.6 * cols, 1.6 * rows + 0.3))
        fig.suptitle("|G(k, Q)| on the detector")
        for i, (qy, qx) in enumerate(self.frequencies):
            ax = fig.add_subplot(rows, cols, i + 1)
            ax.imshow(np.abs(self.result.g_at(qy, qx)), cmap="magma")
            ax.set_title(f"Q=({qy:.2f},{qx:.2f})", fontsize=7)
            ax.set_axis_off()
        return fig

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)


def ssb_widget(result, frequencies=None, *, cmap: str = "gray") -> SSBWidget:
    """Interactive SSB for an :class:`~stemdask.methods.ssb.SSBResult` (G is kept first).

    ``frequencies``: scan frequencies (q_y, q_x) in Å⁻¹ whose |G| is shown (the nearest ones
    on the scan grid; default :func:`default_frequencies`). Display the returned object (or
    its ``.widget``) in a notebook.
    """
    return SSBWidget(result, frequencies, cmap=cmap)
