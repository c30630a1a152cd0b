# %% [markdown]
# # 2 · SSB ptychography: interactive aberration tuning
#
# Single-sideband (SSB) ptychography recovers the phase from the bright-field disk of
# every diffraction pattern. Its graph — densify, FFT over the scan, the scan-frequency
# cube G(k, Q) — is built once and kept; a *refocus* with other aberrations only reruns the
# trotter sums over G, never the FFT. That makes aberration tuning interactive.
#
# This example simulates a scan recorded out of focus (C10 ≠ 0), shows the blurred SSB
# phase for the nominal C10 = 0, finds the defocus with a criterion that needs no truth
# (Σ phase², largest when the trotter phases line up), refocuses, and builds the notebook
# widget (aberration sliders, |G| trotters, live phase).
#
# Convention: Krivanek notation in Å; C10 < 0 is underfocus (abTEM's `defocus` = −C10).

# %%
import numpy as np

import stemdask
from stemdask.methods.ssb import ssb
from stemdask.optics import Aberrations
from stemdask.simulate import SimulationParams, load_truth, simulate

from _common import output_dir, pearson, pick, plt, save

out = output_dir("02_ssb_aberration_tuning")
C10_TRUE = -120.0  # Å, underfocus: the microscope's actual defocus, unknown to SSB

# %% [markdown]
# ## A defocused scan
# The simulator's probe carries C10 = −120 Å; the stored calibration (energy, scan step,
# detector sampling, BF centre, semi-angle) is exact, the aberrations are not stored.

# %%
params = SimulationParams(
    scan_shape=pick(small=(32, 32), full=(64, 64)),
    detector=pick(small=32, full=48),
    dose=2000.0,
    max_phase=0.3,
    aberrations=Aberrations(C10=C10_TRUE),
    seed=2,
)
store = simulate(out / "defocused.zarr", params, overwrite=True, progress=False)
truth = load_truth(store.path)
ds = stemdask.open(store.path)
print(ds)

# %% [markdown]
# ## SSB with the nominal aberrations (C10 = 0)
# `ds.densify()` crops the BF disk into dense (scan_y, scan_x, k_y, k_x) chunks of scan rows;
# `ssb(...)` builds the graph lazily and returns an `SSBResult`; `keep()` computes G once
# (in memory here, on a cluster's workers or a Zarr scratch store when it is large).

# %%
result = ssb(ds.densify(), ds.calibration).keep()
print("G:", result.G.shape, result.G.dtype, "— scan frequencies (q_y, q_x) × BF pixels")
nominal = result.phase.compute()
r_nominal = pearson(nominal, truth)
print(f"C10 = 0: correlation with the true phase r = {r_nominal:.2f}")

# %% [markdown]
# ## Focus sweep without the truth
# `sweep` stacks refocused phases over one coefficient; `power` = Σ phase² peaks where the
# aberrations match (wrong ones misalign the trotter phases, which then cancel).

# %%
c10_values = np.arange(-300.0, 101.0, 10.0)
sweep = result.sweep(c10_values, field="C10").compute()
best = float(sweep.power.idxmax())
print(f"focus criterion peaks at C10 = {best:g} Å (simulated: {C10_TRUE:g} Å)")
assert abs(best - C10_TRUE) <= 20.0

# %% [markdown]
# ## Refocus
# One pass of trotter sums over the kept G.

# %%
refocused = result.refocus(C10=best).compute()
r_refocused = pearson(refocused, truth)
print(f"C10 = {best:g} Å: r = {r_refocused:.2f} (was {r_nominal:.2f} at C10 = 0)")
assert r_refocused > 0.75 and r_refocused > r_nominal + 0.4

# %%
fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), layout="constrained")
sweep.power.plot(ax=axes[0], marker=".")
axes[0].axvline(C10_TRUE, color="k", ls="--", label="simulated")
axes[0].legend()
axes[0].set_xlabel("C10 (Å)")
axes[0].set_title("focus criterion Σ phase²")
for ax, image, title in [(axes[1], nominal, f"SSB, C10 = 0 (r = {r_nominal:.2f})"),
                         (axes[2], refocused, f"SSB, C10 = {best:g} Å (r = {r_refocused:.2f})")]:
    image.plot.imshow(ax=ax, cmap="magma", yincrease=False)
    ax.set_title(title)
ax = axes[3]
sy, sx = ds.calibration.scan_step_a
im = ax.imshow(truth, cmap="magma", extent=(0, truth.shape[1] * sx, truth.shape[0] * sy, 0))
fig.colorbar(im, ax=ax, label="phase (rad)")
ax.set_xlabel("scan x (Å)")
ax.set_title("true phase")
save(fig, out, "focus_sweep")

# %% [markdown]
# ## What the aberrations do to G
# At a scan frequency Q (here the object's strongest one), G(k, Q) on the detector is
# non-zero on the two trotters, where the BF disk overlaps its copies shifted by ±Q.
# Defocus shows as a phase curvature across each trotter; SSB removes it by multiplying
# with the conjugate of the known phase.
# `g_at(q_y, q_x)` computes one plane of G (Å⁻¹).

# %%
# the strongest object frequency SSB transfers (0 < |Q| < 2α/λ), from the refocused phase
spectrum = np.abs(np.fft.rfft2(refocused.values))
q_norm = np.hypot(result.q_y[:, None], result.q_x[None, :])
spectrum[(q_norm == 0) | (q_norm >= 2 * result.k0)] = 0
iy, ix = np.unravel_index(np.argmax(spectrum), spectrum.shape)
q_y, q_x = float(result.q_y[iy]), float(result.q_x[ix])
g = result.g_at(q_y, q_x)
fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), layout="constrained")
extent = (result.k_x_mrad[0], result.k_x_mrad[-1], result.k_y_mrad[-1], result.k_y_mrad[0])
for ax, values, title, cmap in [(axes[0], np.abs(g), "|G(k, Q)|", "magma"),
                                (axes[1], np.angle(g), "arg G(k, Q) (rad)", "twilight")]:
    im = ax.imshow(values, cmap=cmap, extent=extent)
    ax.set_xlabel("k_x (mrad)")
    ax.set_ylabel("k_y (mrad)")
    ax.set_title(f"{title}\nQ = ({q_y:.2f}, {q_x:.2f}) Å⁻¹")
    fig.colorbar(im, ax=ax)
save(fig, out, "trotters")

# %% [markdown]
# ## The widget
# In a notebook, `ssb_widget(result)` shows aberration sliders, |G| at nine scan
# frequencies and the SSB phase, recomputed from the kept G at every slider change. It
# builds without a display (figures rendered to PNG), so the script builds it too when
# ipywidgets is installed, and checks that moving the C10 slider refocuses.

# %%
try:
    import ipywidgets  # noqa: F401
except ImportError:
    widget = None
    print("ipywidgets not installed: skipping the widget")
else:
    from stemdask.widgets import ssb_widget

    widget = ssb_widget(result)
    widget.sliders["C10"].value = best
    np.testing.assert_array_equal(widget.phase, refocused.values)
    print("widget built; C10 slider at", widget.aberrations().C10, "Å")
widget
