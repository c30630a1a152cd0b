"""A browser view of a :class:`stemdask.live_session.LiveSession`: a Bokeh server on 127.0.0.1.

:func:`serve` starts it in a daemon thread (``stemdask live … --view``). The page shows the
live images — riCOM phase (rad), the virtual detectors (electrons) and the COM components
(px) — each with a colour bar and a scale bar (Å), the frames/s and positions done, and
controls for the riCOM kernel size, the band-pass (Å⁻¹) and the rotation (deg) / flip; a
change re-renders riCOM from the kept COM of every position so far
(:meth:`LiveSession.retune`). Images refresh every ``interval_ms``; the colour scale follows
the positions measured so far (0.5–99.5 percentiles).

Needs the ``live`` extra (``pip install stemdask[live]``: bokeh ≥ 3.4). Model names for
scripts and tests: ``status`` (the counter), ``kernel_size``, ``band_pass``, ``rotation``,
``flip``, and ``<image>_source`` / ``<image>_figure`` per image.
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading

import numpy as np

from .errors import MissingExtra


class ViewServer:
    """The running view: ``url``; :meth:`stop` shuts the server down."""

    def __init__(self, session, port: int, interval_ms: int):
        self.session, self.port, self.interval_ms = session, int(port), int(interval_ms)
        self._ready = threading.Event()
        self._server = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="live-view")
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise OSError(f"live view: cannot serve on 127.0.0.1:{self.port} ({self._error})") from self._error

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _run(self) -> None:
        from bokeh.application import Application
        from bokeh.application.handlers.function import FunctionHandler
        from bokeh.server.server import Server

        asyncio.set_event_loop(asyncio.new_event_loop())
        try:
            self._server = Server({"/": Application(FunctionHandler(self._document))}, port=self.port,
                                  address="127.0.0.1",
                                  allow_websocket_origin=[f"127.0.0.1:{self.port}", f"localhost:{self.port}"])
            self._server.start()
            self.port = self._server.port
        except BaseException as e:  # reported by the constructor
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self._server.io_loop.start()

    def stop(self) -> None:
        if self._server is not None:
            loop = self._server.io_loop
            loop.add_callback(self._server.stop)
            loop.add_callback(loop.stop)
            self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the page
    def _document(self, doc) -> None:
        from bokeh.layouts import column, gridplot, row
        from bokeh.models import (
            Checkbox,
            ColorBar,
            ColumnDataSource,
            Div,
            LinearColorMapper,
            Metric,
            RangeSlider,
            ScaleBar,
            Slider,
        )
        from bokeh.plotting import figure

        session = self.session
        (ny, nx), (sy, sx) = session.scan_shape, session.calibration.scan_step_a
        snap = self._snapshot()
        units = {"phase": "rad", "ssb_phase": "rad", "com_y": "px", "com_x": "px"}
        names = [n for n in ("phase", "ssb_phase", *session.detectors, "com_y", "com_x") if n in snap]
        figures, parts = [], {}
        for name in names:
            mapper = LinearColorMapper(palette="Viridis256" if name.endswith("phase") else "Greys256")
            source = ColumnDataSource({"image": [np.nan_to_num(snap[name])]}, name=f"{name}_source")
            fig = figure(title=self._title(name), width=330, height=int(330 * ny * sy / (nx * sx)) + 40,
                         x_range=(0, nx * sx), y_range=(ny * sy, 0), match_aspect=True, name=f"{name}_figure",
                         x_axis_label="scan x (Å)", y_axis_label="scan y (Å)", toolbar_location=None)
            fig.image(image="image", x=0, y=0, dw=nx * sx, dh=ny * sy, source=source, color_mapper=mapper,
                      origin="bottom_left")  # row 0 at scan y = 0, the top of the reversed axis
            fig.add_layout(ColorBar(color_mapper=mapper, title=units.get(name, "electrons"), width=10), "right")
            fig.add_layout(ScaleBar(range=fig.x_range, unit="Å", dimensional=Metric(base_unit="Å"),
                                    location="bottom_left", bar_length=0.25))
            figures.append(fig)
            parts[name] = (source, mapper, fig)
        status = Div(text=self._status(), name="status")
        nyquist = 0.5 / max(sy, sx)
        kernel = Slider(title="riCOM kernel size (scan px)", start=3, end=max(5, 2 * (min(ny, nx) // 2) + 1),
                        step=2, value=session.kernel_size, name="kernel_size")
        band = RangeSlider(title="band-pass (Å⁻¹)", start=0.0, end=nyquist, step=nyquist / 200,
                           value=(session.kmin or 0.0, session.kmax or nyquist), name="band_pass")
        rotation = Slider(title="rotation (deg)", start=-180, end=180, step=0.5,
                          value=session.calibration.rotation_deg, name="rotation")
        flip = Checkbox(label="flip", active=session.calibration.flip, name="flip")

        def retune(attr, old, new):
            lo, hi = band.value
            session.retune(
                kernel_size=int(kernel.value),
                kmin=lo if lo > 0 else None,
                kmax=hi if hi < nyquist else None,
                rotation_deg=float(rotation.value),
                flip=bool(flip.active),
            )
            refresh()

        for widget in (kernel, band, rotation):
            widget.on_change("value_throttled", retune)
        flip.on_change("active", retune)

        def refresh():
            snap = self._snapshot()
            done = session.positions_done
            for name, (source, mapper, fig) in parts.items():
                image = snap[name]
                seen = image.reshape(-1)[:done] if done else image.reshape(-1)
                seen = seen[np.isfinite(seen)]
                if seen.size:
                    lo, hi = np.percentile(seen, [0.5, 99.5])
                    mapper.update(low=float(lo), high=float(hi if hi > lo else lo + 1e-12))
                source.data = {"image": [np.nan_to_num(image)]}
                fig.title.text = self._title(name)
            status.text = self._status()

        controls = column(status, kernel, band, rotation, flip, width=320)
        doc.add_root(row(controls, gridplot(figures, ncols=3)))
        doc.title = "stemdask live"
        doc.add_periodic_callback(refresh, self.interval_ms)

    def _snapshot(self) -> dict:
        """The session's images; with SSB asked for, its phase (NaN until the scan completes)."""
        snap = self.session.snapshot()
        if self.session.live_ssb is not None and "ssb_phase" not in snap:
            snap["ssb_phase"] = np.full(self.session.scan_shape, np.nan)
        return snap

    def _title(self, name: str) -> str:
        if name == "phase":
            return f"riCOM phase, n = {self.session.kernel_size}"
        if name == "ssb_phase":
            s = self.session
            return (
                f"SSB phase, C10 = {s.aberrations.C10:g} Å"
                if s.ssb_phase is not None
                else "SSB phase (when the scan completes)"
            )
        return {"com_y": "COM k_y", "com_x": "COM k_x"}.get(name, f"virtual {name}")

    def _status(self) -> str:
        s = self.session
        return f"<b>{s.positions_done:,}</b> / {s.n_positions:,} positions · <b>{s.frames_per_second:,.0f}</b> frames/s"


def serve(session, port: int = 5006, interval_ms: int = 250) -> ViewServer:
    """Serve the view of ``session`` on ``http://127.0.0.1:port/`` (port 0: any free one) in a thread."""
    if importlib.util.find_spec("bokeh") is None:
        raise MissingExtra("the live view needs bokeh: pip install 'stemdask[live]'")
    return ViewServer(session, port, interval_ms)
