"""The live view in a real headless browser (Selenium + Chromium) during a Merlin socket replay."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("bokeh")
webdriver = pytest.importorskip("selenium.webdriver")

from stemdask.live_session import LiveSession  # noqa: E402
from stemdask.live_sources import MerlinSocket  # noqa: E402
from stemdask.live_view import serve  # noqa: E402
from stemdask.optics import Calibration  # noqa: E402
from stemdask.testing.merlin import MerlinReplayServer, acquisition_header, encode_frames  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def _browser():
    binary = next(
        (b for b in (shutil.which("chromium"), shutil.which("chromium-browser"), shutil.which("google-chrome")) if b),
        None,
    )
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(
            f"no headless browser: chromium {'found' if binary else 'missing'}, chromedriver "
            f"{'found' if driver else 'missing'} (CI installs them: apt-get install chromium chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait(condition, timeout=30.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


JS_STATUS = (
    "const d = window.Bokeh && Bokeh.documents[0];"
    "const m = d && d.get_model_by_name('status'); return m ? m.text : null;"
)


def _image_sum(browser, name):
    return browser.execute_script(
        "const m = Bokeh.documents[0].get_model_by_name(arguments[0]);"
        "let s = 0; for (const v of m.data.image[0]) s += Math.abs(v); return s;",
        f"{name}_source",
    )


@pytest.mark.slow
def test_view_shows_the_replay_and_its_kernel_can_change_and_ssb_at_the_end(tmp_path):
    scan, det = (40, 40), 32
    cal = Calibration(scan_step_a=0.3, detector_pixel_mrad=1.0, bf_center=(16.0, 16.0), bf_radius=6.0)
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:det, :det]
    shift = rng.normal(scale=1.5, size=(scan[0] * scan[1], 2))
    frames = np.stack([rng.poisson(3.0 * (np.hypot(yy - 16 - dy, xx - 16 - dx) < 6)) for dy, dx in shift])
    session = LiveSession(scan, (det, det), cal, kernel_size=11, methods=("ricom", "virtual", "com", "ssb"))
    browser = _browser()
    view = serve(session, port=0, interval_ms=100)
    try:
        with (
            MerlinReplayServer(
                encode_frames(np.minimum(frames, 63), 6), hdr=acquisition_header(1600, 6), rate=300
            ) as server,
            MerlinSocket(server.url, batch_frames=10) as src,
        ):
            feed = threading.Thread(target=session.run, args=(src,), daemon=True)
            feed.start()
            browser.get(view.url)
            status = lambda: browser.execute_script(JS_STATUS)  # noqa: E731
            first = _wait(lambda: (t := status()) and "/ 1,600 positions" in t and t)
            done0 = int(first.split("</b>")[0].split("<b>")[1].replace(",", ""))
            assert done0 < 1600 and _image_sum(browser, "ssb_phase") == 0  # NaN (shown as 0) until the scan completes
            _wait(lambda: session.positions_done > 300)
            before = _image_sum(browser, "phase")
            browser.execute_script(
                "const k = Bokeh.documents[0].get_model_by_name('kernel_size');k.value = 21; k.value_throttled = 21;"
            )
            _wait(lambda: session.kernel_size == 21)
            title = _wait(
                lambda: (
                    (
                        t := browser.execute_script(
                            "return Bokeh.documents[0].get_model_by_name('phase_figure').title.text"
                        )
                    )
                    and "n = 21" in t
                    and t
                )
            )
            assert "n = 21" in title
            after = _wait(lambda: (s := _image_sum(browser, "phase")) != before and s)
            assert after != before
            later = _wait(
                lambda: (t := status()) and int(t.split("</b>")[0].split("<b>")[1].replace(",", "")) > done0 and t
            )
            assert "frames/s" in later
            ARTIFACTS.mkdir(exist_ok=True)
            for path in (tmp_path / "live_view.png", ARTIFACTS / "live_view.png"):
                browser.save_screenshot(str(path))
            assert (tmp_path / "live_view.png").stat().st_size > 10_000
            feed.join(timeout=60)
            _wait(
                lambda: (
                    "C10 = 0 Å"
                    in browser.execute_script(
                        "return Bokeh.documents[0].get_model_by_name('ssb_phase_figure').title.text"
                    )
                )
            )
            assert _wait(lambda: _image_sum(browser, "ssb_phase")) > 0
        assert session.done and session.kernel_size == 21
    finally:
        browser.quit()
        view.stop()
