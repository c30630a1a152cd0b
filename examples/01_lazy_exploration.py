# %% [markdown]
# # 1 · Lazy exploration of an event store with xarray
#
# An event store holds, for every probe position, the list of detector pixels an electron
# hit. `stemdask.open` turns it into an `EventDataset`: every product — centre of mass
# (COM), virtual detector images, the position-averaged CBED (PACBED) — is an xarray
# object backed by a dask graph. Nothing is read from disk until you compute, products
# computed together share one read per row block, and selecting a region computes only the
# row blocks it touches.
#
# This example simulates a small store with a known phase, builds the products lazily,
# counts the row-block reads dask actually performs, plots, and writes the results to Zarr.
# Run it as a script or a notebook; `STEMDASK_EXAMPLE_SIZE=small` makes it tiny.

# %%
import dask
import numpy as np
import xarray as xr
from dask.callbacks import Callback

import stemdask
from stemdask.events import event_bytes_per_row
from stemdask.simulate import SimulationParams, load_truth, simulate

from _common import output_dir, pearson, pick, plt, save

out = output_dir("01_lazy_exploration")
print("output folder:", out)

# %% [markdown]
# ## A simulated store
# A periodic crystal-like phase object (heavy and light atom columns plus defects), 300 kV,
# 20 mrad probe, Poisson electron counts. Dask chunks are sized by bytes, not by how the store
# was written (about 64 MiB of events each by default, so this small store would be a single
# chunk): asking for chunks of 8 scan rows (`stemdask.chunk-bytes`) shows what a chunk is.

# %%
params = SimulationParams(
    scan_shape=pick(small=(32, 32), full=(96, 96)),
    detector=pick(small=32, full=48),
    dose=2000.0,
    max_phase=0.5,
    seed=1,
)
store = simulate(out / "simulated.zarr", params, rows_per_block=4, overwrite=True, progress=False)
truth = load_truth(store.path)  # the simulator's true phase at every probe position (rad)

dask.config.set({"stemdask.chunk-bytes": int(8.5 * event_bytes_per_row(store))})
ds = stemdask.open(store.path)
n_blocks = len(ds.row_chunks)
print(ds)
print(f"{n_blocks} row blocks of {ds.row_chunks[0]} scan rows")

# %% [markdown]
# ## Counting reads
# Every row block is read by one task named `events-…`. A dask callback that counts those
# tasks shows exactly when the store is touched. (Callbacks see dask's local schedulers,
# the default here; on a distributed cluster watch the dashboard's task stream instead.)


# %%
class ReadCounter(Callback):
    """Counts the row-block read tasks dask runs while active."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def _pretask(self, key, dsk, state):
        name = key[0] if isinstance(key, tuple) else key
        if str(name).startswith("events-"):
            self.reads += 1


# %% [markdown]
# ## Build the products — lazily
# COM in mrad relative to the calibrated bright-field (BF) centre, three annular virtual
# detectors (presets relative to the BF radius R: BF [0, R), ABF [R/2, R), ADF [1.2 R, ∞))
# and the PACBED. Building them reads nothing.

# %%
with ReadCounter() as counter:
    com = ds.com(units="mrad")
    virtual = ds.virtual_detectors({"bf": "bf", "abf": "abf", "adf": "adf"})
    pacbed = ds.pacbed()
print("reads while building the graph:", counter.reads)
assert counter.reads == 0
com

# %% [markdown]
# The data variables are dask arrays chunked by row blocks, with physical coordinates
# (scan in Å, detector angles in mrad) and units in their attributes.

# %%
print(com.com_x.data)
print("scan step:", float(com.scan_x[1] - com.scan_x[0]), com.scan_x.attrs["units"])
print("PACBED k_x:", pacbed.k_x.attrs["units"], "from", float(pacbed.k_x[0]), "to", float(pacbed.k_x[-1]))

# %% [markdown]
# ## Select a region, compute only it
# Selecting by physical coordinate (Å) keeps the result lazy; computing it reads only the
# row blocks that overlap the region.

# %%
y_max = float(com.scan_y[ds.scan_shape[0] // 4])
region = virtual.adf.sel(scan_y=slice(0.0, y_max))
with ReadCounter() as counter:
    region_values = region.compute()
rows = region.sizes["scan_y"]
print(f"region of {rows} rows (scan_y ≤ {y_max:.2f} Å): {counter.reads} of {n_blocks} row blocks read")
assert counter.reads == -(-rows // ds.row_chunks[0])  # ceil(rows / rows per block)
assert counter.reads < n_blocks

# %% [markdown]
# ## Compute everything in one pass
# `dask.compute` on several products merges their graphs: each row block is read once and
# feeds COM, the three virtual detectors and the PACBED.

# %%
with ReadCounter() as counter:
    com_v, virtual_v, pacbed_v = dask.compute(com, virtual, pacbed)
print(f"row blocks read for all products together: {counter.reads} (the store has {n_blocks})")
assert counter.reads == n_blocks

# %% [markdown]
# Physics checks against the simulation: no electron is lost (the PACBED sums every event);
# the COM points along +∇φ (the phase gradient, here detector frame = scan frame); the ADF
# image is bright on atom columns.

# %%
assert int(pacbed_v.sum()) == store.n_events  # the event total recorded in the store
step_y, step_x = ds.calibration.scan_step_a
grad_y, grad_x = np.gradient(truth, step_y, step_x)
r_com = pearson(com_v.com_y, grad_y), pearson(com_v.com_x, grad_x)
r_adf = pearson(virtual_v.adf, truth)
print(f"r(COM_y, ∂φ/∂y) = {r_com[0]:.2f}, r(COM_x, ∂φ/∂x) = {r_com[1]:.2f}, r(ADF, φ) = {r_adf:.2f}")
assert min(r_com) > 0.4 and r_adf > 0.3

# %% [markdown]
# ## Plot
# xarray plots with the physical coordinates and units. An in-focus phase object gives
# almost no bright-field contrast; the ADF image and the COM show the atom columns.

# %%
fig, axes = plt.subplots(2, 3, figsize=(12, 7.5), layout="constrained")
for ax, name in zip(axes[0], ["bf", "abf", "adf"]):
    virtual_v[name].plot.imshow(ax=ax, cmap="gray", yincrease=False)
    ax.set_title(f"virtual {name.upper()}")
for ax, name in zip(axes[1, :2], ["com_y", "com_x"]):
    com_v[name].plot.imshow(ax=ax, cmap="RdBu_r", yincrease=False)
    ax.set_title(f"{name} ({com_v[name].attrs['units']})")
np.log1p(pacbed_v).plot.imshow(ax=axes[1, 2], cmap="magma", yincrease=False,
                               cbar_kwargs={"label": "log(1 + electrons)"})
axes[1, 2].set_title("PACBED")
for ax in axes.ravel():
    ax.set_aspect("equal")
save(fig, out, "products")

# %% [markdown]
# ## Write to Zarr
# Merge the lazy products into one Dataset and write it: `to_zarr` computes the graph
# once — again one read per row block — and the result opens back with its coordinates
# and attributes.

# %%
result = xr.merge([com, virtual, pacbed.to_dataset()], combine_attrs="drop_conflicts")
with ReadCounter() as counter:
    result.to_zarr(out / "products.zarr", mode="w", consolidated=False)
print(f"to_zarr read {counter.reads} row blocks")
assert counter.reads == n_blocks

saved = xr.open_zarr(out / "products.zarr", consolidated=False)
xr.testing.assert_identical(saved.compute(), xr.merge([com_v, virtual_v, pacbed_v.to_dataset()],
                                                      combine_attrs="drop_conflicts"))
print(saved)
