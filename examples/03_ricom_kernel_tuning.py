# %% [markdown]
# # 3 · riCOM: kernel size, band-pass and the kernel's frequency response
#
# Real-time integrated centre of mass (riCOM, Yu et al. 2022) integrates the COM field with
# a small kernel `k(s) = a_y·a_x · (r_p − r) / |r_p − r|²` of full width n scan pixels
# instead of a global Fourier integration. It is local, so it runs live and on chunks; the
# price is a frequency response H(q) that suppresses spatial frequencies below about
# 1/(n·a). A band-pass `kmin ≤ |q| ≤ kmax` (Å⁻¹) can be folded into the kernel.
#
# This example computes the COM once, runs riCOM with several kernel sizes and a band-pass,
# and checks the images against the kernels' exact frequency response: for a thin object
# the COM is the phase gradient blurred by the probe intensity |P|², so riCOM should equal
# the true phase filtered by H(q)·FT|P|²(q).

# %%
import numpy as np

import stemdask
from stemdask.kernels.ricom import line_integral_weight, ricom_kernel, ricom_transfer
from stemdask.methods.ricom import ricom
from stemdask.simulate import SimulationParams, load_truth, probe_real_space, simulate

from _common import output_dir, pearson, pick, plt, save

out = output_dir("03_ricom_kernel_tuning")

# %% [markdown]
# ## Data and COM
# The COM (detector pixels from the calibrated BF centre) is computed once and kept in
# memory (`persist`), so every riCOM below reuses it instead of reading the events again.

# %%
params = SimulationParams(
    scan_shape=pick(small=(40, 40), full=(96, 96)),
    detector=pick(small=24, full=32),
    dose=5000.0,
    max_phase=0.5,
    seed=3,
)
store = simulate(out / "simulated.zarr", params, overwrite=True, progress=False)
truth = load_truth(store.path)
ds = stemdask.open(store.path)
cal = ds.calibration
step = cal.scan_step_a
com = ds.com().persist()
kernel_sizes = pick(small=[5, 11, 21], full=[5, 11, 21, 41, 61])
print(ds)
print("scan step (Å):", step, "— kernel sizes:", kernel_sizes)

# %% [markdown]
# ## Kernel size
# Larger kernels integrate further and keep more of the low spatial frequencies (the
# long-range background of the phase); smaller ones act as a high-pass filter.

# %%
images = {n: ricom(com, cal, kernel_size=n).phase.compute() for n in kernel_sizes}
for n, image in images.items():
    print(f"n = {n:2d}: r with the true phase = {pearson(image, truth):.3f}")

fig, axes = plt.subplots(1, len(images) + 1, figsize=(3.6 * (len(images) + 1), 3.4), layout="constrained")
for ax, (n, image) in zip(axes, images.items()):
    image.plot.imshow(ax=ax, cmap="magma", yincrease=False, add_colorbar=False)
    ax.set_title(f"riCOM n = {n} (r = {pearson(image, truth):.2f})")
axes[-1].imshow(truth, cmap="magma")
axes[-1].set_title("true phase")
save(fig, out, "kernel_sizes")

# %% [markdown]
# ## The frequency response predicts the image
# `ricom_transfer(kernel, shape, step)` is riCOM's exact transfer H(q) for a periodic phase
# (numpy FFT layout). The simulator's object is periodic over the scan and its probe is
# known, so the expected image is the truth filtered by H(q)·FT|P|²(q). riCOM pads the COM
# with zeros beyond the scan, so compare at least n/2 pixels away from the edges: the
# correlation should be close to 1 and the slope 1 (riCOM is in rad).

# %%
probe_intensity = np.abs(probe_real_space(params)) ** 2  # (M, M), centre at M/2, sums to 1
m = probe_intensity.shape[0]
offsets = np.arange(m) - m // 2
wrapped = np.zeros(truth.shape)  # |P|² wrapped onto the periodic scan grid
np.add.at(wrapped, (offsets[:, None] % truth.shape[0], offsets[None, :] % truth.shape[1]), probe_intensity)
probe_transfer = np.fft.fft2(wrapped).real


def expected_image(kernel):
    """The true phase filtered by the kernel's transfer and the probe blur."""
    return np.fft.ifft2(np.fft.fft2(truth) * ricom_transfer(kernel, truth.shape, step) * probe_transfer).real


def regression(image, reference, margin):
    """(correlation, slope) of ``image`` on ``reference`` more than ``margin`` pixels from the edges."""
    inner = (slice(margin, -margin), slice(margin, -margin))
    a, b = np.asarray(image)[inner], reference[inner]
    a, b = a - a.mean(), b - b.mean()
    return pearson(a, b), float((a * b).sum() / (b * b).sum())


for n, image in images.items():
    r, slope = regression(image, expected_image(ricom_kernel(n, step)), n // 2)
    print(f"n = {n:2d}: against truth ⊗ H·|P|²: r = {r:.3f}, slope = {slope:.3f}")
    assert r > 0.95 and abs(slope - 1) < 0.06

# %% [markdown]
# ### H(q) for each kernel size
# H(0) = 0 and H → 1 well above 1/(n·a): larger kernels reach lower frequencies. A square
# kernel rings along the scan axes (the cross in the 2-D map), so the curves are averages
# over rings of |q|; the probe blur FT|P|² multiplies every curve. The response falls again
# towards the Nyquist frequency 1/(2a): the kernel is sampled on the scan grid.

# %%
q = np.hypot(*np.meshgrid(np.fft.fftfreq(truth.shape[0], step[0]), np.fft.fftfreq(truth.shape[1], step[1]),
                          indexing="ij"))
dq = 1 / (max(truth.shape) * max(step))  # ring width: the scan's frequency spacing (Å⁻¹)
ring = np.rint(q / dq).astype(int)
ring_q = np.arange(1, int(0.5 / max(step) / dq) + 1) * dq  # rings up to Nyquist, without q = 0


def ring_average(values):
    """Mean of ``values`` (numpy FFT layout) over rings of |q|, at ``ring_q``."""
    sums = np.bincount(ring.ravel(), weights=values.ravel())
    return (sums / np.bincount(ring.ravel()))[1 : len(ring_q) + 1]


transfers = {n: ricom_transfer(ricom_kernel(n, step), truth.shape, step) for n in kernel_sizes}
lowest = [ring_average(transfers[n])[0] for n in kernel_sizes]  # the lowest non-zero ring
print("H at the lowest scan frequency:", ", ".join(f"n = {n}: {h:.3f}" for n, h in zip(kernel_sizes, lowest)))
assert all(np.diff(lowest) > 0)

# %% [markdown]
# ### The paper's line-integral estimate (eq. 7)
# Yu et al. estimate the weight of a kernel component at frequency index m of an N-pixel
# image as N/(2πm)·[1 − cos((n − 1)/2 · 2πm/N)]. The magnitude of the x component's
# Fourier transform (kernel in scan pixels, divided by 2π as in the paper) follows it.

# %%
big = kernel_sizes[-1]
size = truth.shape[1]
grid = np.zeros((size, size))
grid[:big, :big] = ricom_kernel(big)[1] / (2 * np.pi)  # unit step: frequencies in cycles/pixel
response = np.abs(np.fft.fft2(np.roll(grid, (-(big // 2), -(big // 2)), axis=(0, 1)))[0])
m_index = np.arange(1, size // 2)
eq7 = line_integral_weight(m_index, big, size)
print(f"n = {big}: r(kernel response, eq. 7) = {pearson(response[m_index], eq7):.3f}")
assert pearson(response[m_index], eq7) > 0.95

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), layout="constrained")
for n, h in transfers.items():
    axes[0].plot(ring_q, ring_average(h), label=f"n = {n}")
axes[0].plot(ring_q, ring_average(probe_transfer), "k--", label="FT|P|² (probe)")
axes[0].set_xlabel("|q| (Å⁻¹)")
axes[0].set_ylabel("transfer (ring average)")
axes[0].set_title("riCOM transfer H(q)")
axes[0].legend(fontsize=8)
q_max = float(np.abs(np.fft.fftfreq(truth.shape[1], step[1])).max())
im = axes[1].imshow(np.fft.fftshift(transfers[big]), cmap="viridis", extent=(-q_max, q_max, q_max, -q_max))
fig.colorbar(im, ax=axes[1])
axes[1].set_xlabel("q_x (Å⁻¹)")
axes[1].set_ylabel("q_y (Å⁻¹)")
axes[1].set_title(f"H(q), n = {big}")
axes[2].plot(m_index, response[m_index], ".-", label="|FT k_x| (this kernel)")
axes[2].plot(m_index, eq7, "--", label="paper eq. 7")
axes[2].set_xlabel("frequency index m (along x)")
axes[2].set_title(f"kernel weight, n = {big}, N = {size}")
axes[2].legend(fontsize=8)
save(fig, out, "frequency_response")

# %% [markdown]
# ## Band-pass (paper eq. 8–9)
# `kmin`, `kmax` (Å⁻¹) mask the kernel's spectrum on a grid the size of the scan and the
# kernel is cut back to n × n, so the hard cut-off becomes a slope. Here `kmax` removes the
# shot noise beyond the probe's information limit and `kmin` the slowest variations.

# %%
n = kernel_sizes[-1]
kmin, kmax = 0.2, 1.0
band_kernel = ricom_kernel(n, step, kmin, kmax, grid_shape=truth.shape)
band = ricom(com, cal, kernel_size=n, kmin=kmin, kmax=kmax).phase.compute()
r, slope = regression(band, expected_image(band_kernel), n // 2)
print(f"n = {n}, {kmin} ≤ |q| ≤ {kmax} Å⁻¹: against truth ⊗ H·|P|²: r = {r:.3f}, slope = {slope:.3f}")
assert r > 0.95 and abs(slope - 1) < 0.06

band_transfer = ricom_transfer(band_kernel, truth.shape, step)
above = q > 1.3 * kmax
print(f"mean H above 1.3·kmax: {band_transfer[above].mean():.3f} with the band-pass, "
      f"{transfers[n][above].mean():.3f} without")
assert abs(band_transfer[above].mean()) < 0.05 < transfers[n][above].mean()

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), layout="constrained")
for ax, image, title in [(axes[0], images[n], f"n = {n}"), (axes[1], band, f"n = {n}, {kmin}–{kmax} Å⁻¹")]:
    image.plot.imshow(ax=ax, cmap="magma", yincrease=False)
    ax.set_title(title)
axes[2].plot(ring_q, ring_average(transfers[n]), label="no band-pass")
axes[2].plot(ring_q, ring_average(band_transfer), label=f"kmin = {kmin}, kmax = {kmax}")
for k in (kmin, kmax):
    axes[2].axvline(k, color="gray", ls=":")
axes[2].set_xlabel("|q| (Å⁻¹)")
axes[2].set_title("H(q), ring average")
axes[2].legend(fontsize=8)
save(fig, out, "band_pass")
