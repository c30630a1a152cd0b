"""The SSB notebook widget builds without a display and refocuses on slider changes."""

from __future__ import annotations

import numpy as np
import pytest

from stemdask.methods.ssb import ssb

from helpers import as_dense, simulated

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")


def test_widget_builds_and_sliders_refocus():
    from stemdask.widgets import SLIDERS, ssb_widget

    counts, _, cal = simulated(-60.0, scan=(16, 16), detector=16, dose=1e4)
    result = ssb(as_dense(counts, cal), cal)
    w = ssb_widget(result)
    assert result.kept
    assert set(w.sliders) == set(SLIDERS) and len(w.frequencies) == 9
    assert w.g_image.value[:4] == b"\x89PNG" and w.phase_image.value[:4] == b"\x89PNG"
    np.testing.assert_array_equal(w.phase, result.refocus().values)
    before = w.phase_image.value
    w.sliders["C10"].value = -60.0
    w.sliders["C30"].value = 2e4
    assert w.aberrations().C10 == -60.0 and w.aberrations().C30 == 2e4
    np.testing.assert_array_equal(w.phase, result.refocus(C10=-60.0, C30=2e4).values)
    assert w.phase_image.value != before
    w.quantitative.value = True
    np.testing.assert_array_equal(w.phase, result.refocus(C10=-60.0, C30=2e4, quantitative=True).values)
    assert "application/vnd.jupyter.widget-view+json" in w._repr_mimebundle_()
