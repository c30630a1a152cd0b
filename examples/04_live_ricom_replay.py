# %% [markdown]
# # 4 · Live riCOM: replaying a store as if it were being acquired
#
# riCOM is local: each probe position adds its COM, weighted by a kernel n positions wide,
# into the image around it. `LiveRiCOM` does this incrementally as positions arrive, in scan
# order, keeping only a ring buffer of n image rows — memory independent of the scan
# length. Rows that no later position can reach are final and written to `out`.
#
# This example replays an event store through `LiveRiCOM` in a background thread, takes
# snapshots while it runs, watches it with `LiveView`, and checks that the final image
# equals batch riCOM of the same data.

# %%
import threading
import time

import numpy as np

import stemdask
from stemdask.live_ricom import LiveRiCOM, LiveView, replay_store
from stemdask.methods.ricom import ricom
from stemdask.simulate import SimulationParams, load_truth, simulate

from _common import output_dir, pearson, pick, plt, save

out = output_dir("04_live_ricom_replay")
KERNEL = dict(kernel_size=pick(small=11, full=31), kmin=0.1, kmax=1.5)  # kmin, kmax in Å⁻¹

# %% [markdown]
# ## The "acquisition"
# A simulated store whose detector is rotated by 90° and mirrored relative to the scan: the
# calibration stored with it says so, and live riCOM maps every COM into the scan frame
# with it. Row blocks of two scan rows stand for the detector's read-out packets.

# %%
params = SimulationParams(
    scan_shape=pick(small=(32, 40), full=(96, 128)),
    detector=pick(small=24, full=32),
    dose=1000.0,
    rotation_quarter_turns=1,
    flip=True,
    seed=4,
)
store = simulate(out / "acquisition.zarr", params, rows_per_block=2, overwrite=True, progress=False)
print(store.calibration)

# %% [markdown]
# ## Batch riCOM, for reference
# The same kernel and band-pass on the lazy COM of the whole dataset.

# %%
ds = stemdask.open(store.path)
batch = ricom(ds.com(), ds.calibration, **KERNEL).phase.compute()

# %% [markdown]
# ## Replay in a background thread, with a live view
# `run_in_background(replay_store, store)` calls `replay_store(store, live=live)` in a
# daemon thread: one row block per update. `LiveView.follow` redraws the latest snapshot
# until the thread ends (in a notebook the figure updates in place).

# %%
live = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KERNEL)
thread = live.run_in_background(replay_store, store)
view = LiveView(live)
view.follow(thread, interval=0.05)
print(f"{live.positions_done} of {live.n_positions} positions, {live.rows_final} rows final")
save(view.fig, out, "live_view")
plt.close(view.fig)  # in a notebook the view has shown itself already

# %% [markdown]
# The live image is batch riCOM (same kernel, same zero padding beyond the scan), and with
# the rotation and flip applied it shows the simulated phase.

# %%
final = live.result()
error = float(np.abs(final.values - batch.values).max() / np.abs(batch.values).max())
print(f"live vs batch: max |difference| = {error:.1e} of the image's range")
assert live.done and error < 1e-6
r = pearson(final, load_truth(store.path))
print(f"correlation with the true phase: r = {r:.2f}")
assert r > 0.7

# %% [markdown]
# ## Snapshots during a paced acquisition
# A real detector delivers data at its own pace. Here a feed pushes one row block every
# few milliseconds while the main thread takes snapshots (`snapshot()` is safe from any
# thread). A row marked final never changes again: each snapshot's final rows already are
# the finished image's.


# %%
def paced_replay(store, live, seconds_per_block):
    """Push the store's row blocks into ``live`` at a detector's pace."""
    for block in store.iter_blocks():
        live.push_events(block.indices, block.counts)
        time.sleep(seconds_per_block)


paced = LiveRiCOM(store.scan_shape, store.detector_shape, store.calibration, **KERNEL)
feeder = threading.Thread(target=paced_replay, args=(store, paced, 0.04), daemon=True)
feeder.start()
snapshots = []
while feeder.is_alive():
    time.sleep(0.1)
    snapshots.append((paced.rows_final, paced.positions_done, paced.snapshot()))
feeder.join()
image = paced.snapshot()
np.testing.assert_array_equal(image, live.snapshot())
partial = [s for s in snapshots if s[1] < paced.n_positions]
print(f"{len(partial)} snapshots taken while the acquisition ran")
assert len(partial) >= 2
for rows_final, _, snap in snapshots:
    np.testing.assert_array_equal(snap[:rows_final], image[:rows_final])

# %%
shown = [partial[i] for i in np.linspace(0, len(partial) - 1, min(4, len(partial))).astype(int)]
fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3.4 * (len(shown) + 1), 3.2), layout="constrained")
lo, hi = np.percentile(image, [0.5, 99.5])
for ax, (rows_final, done, snap) in zip(axes, shown):
    ax.imshow(snap, cmap="gray", vmin=lo, vmax=hi)
    ax.axhline(rows_final - 0.5, color="tab:orange", lw=1)
    ax.set_title(f"{done} positions\n{rows_final} rows final", fontsize=9)
    ax.set_axis_off()
axes[-1].imshow(image, cmap="gray", vmin=lo, vmax=hi)
axes[-1].set_title("finished", fontsize=9)
axes[-1].set_axis_off()
save(fig, out, "snapshots")
