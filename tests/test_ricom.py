"""riCOM: kernel and its response (paper eq. 4, 7, 8–9), batch == brute force for any chunking,
numba kernels vs NumPy, and the phase of the simulator (sign, scale, rotation)."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from dask.array.utils import assert_eq
from hypothesis import given, settings
from hypothesis import strategies as st

from stemdask.kernels.ricom import (
    accumulator_zero,
    com_from_frames,
    correlate_zero_padded,
    line_integral_weight,
    ricom_kernel,
    ricom_transfer,
    scatter_com,
)
from stemdask.methods.ricom import ricom, ricom_dask
from stemdask.simulate import SimulationParams
from stemdask.testing import raise_if_dask_computes

from helpers import com_dataset, expected_com, pearson, probe_blurred, slope


def brute_force_ricom(com_y, com_x, kernel):
    """Σ_s k(s)·COM(p + s), COM zero outside: a literal sum over kernel offsets."""
    n = kernel.shape[-1]
    h = n // 2
    ny, nx = com_y.shape
    py, px = np.pad(com_y, h), np.pad(com_x, h)
    out = np.zeros((ny, nx))
    for i in range(n):
        for j in range(n):
            out += kernel[0, i, j] * py[i : i + ny, j : j + nx] + kernel[1, i, j] * px[i : i + ny, j : j + nx]
    return out


# ---------------------------------------------------------------------- the kernel
def test_kernel_is_eq4_with_centre_zero():
    ay, ax = 0.3, 0.5
    k = ricom_kernel(7, (ay, ax))
    assert k.shape == (2, 7, 7) and k[:, 3, 3].tolist() == [0.0, 0.0]
    for i in range(7):
        for j in range(7):
            if (i, j) == (3, 3):
                continue
            r = np.array([(i - 3) * ay, (j - 3) * ax])  # r − r_p (Å)
            assert np.allclose(k[:, i, j], ay * ax * (-r) / (r @ r))
    assert np.allclose(k, -k[:, ::-1, ::-1])  # odd


@pytest.mark.parametrize("n", [2, 1, 0, 4.0, 5.5, True])
def test_kernel_size_must_be_odd(n):
    with pytest.raises(ValueError, match="odd"):
        ricom_kernel(n)


def test_band_pass_with_everything_passed_is_the_plain_kernel():
    plain = ricom_kernel(15, (0.4, 0.25))
    assert np.allclose(ricom_kernel(15, (0.4, 0.25), kmin=0.0, kmax=np.inf, grid_shape=(40, 33)), plain, atol=1e-14)


def test_band_pass_is_the_eq9_mask_on_its_grid_in_inverse_angstrom():
    """On a grid the kernel's own size nothing is cropped: the filtered kernel's response is
    exactly the plain one times the mask kmin ≤ |q| ≤ kmax, q = fftfreq(n, step) in Å⁻¹."""
    n, step, kmin, kmax = 21, (0.4, 0.25), 0.3, 1.2
    plain = ricom_kernel(n, step)
    bp = ricom_kernel(n, step, kmin, kmax, grid_shape=(5, 5))  # grid is at least n × n
    q = np.hypot(*np.meshgrid(np.fft.fftfreq(n, step[0]), np.fft.fftfreq(n, step[1]), indexing="ij"))
    mask = (q >= kmin) & (q <= kmax)
    assert 0 < mask.sum() < mask.size
    assert np.allclose(ricom_transfer(bp, (n, n), step), ricom_transfer(plain, (n, n), step) * mask, atol=1e-12)
    assert np.allclose(bp, -bp[:, ::-1, ::-1], atol=1e-15)  # still odd: centred, no half-pixel shift


def test_band_pass_on_the_scan_grid_suppresses_out_of_band_frequencies():
    n, shape, kmin, kmax = 31, (96, 96), 0.15, 0.5
    plain = ricom_transfer(ricom_kernel(n), shape)
    bp = ricom_transfer(ricom_kernel(n, 1.0, kmin, kmax, grid_shape=shape), shape)
    q = np.hypot(*np.meshgrid(np.fft.fftfreq(96), np.fft.fftfreq(96), indexing="ij"))
    inside = (q > kmin + 0.05) & (q < kmax - 0.05)
    above = q > kmax + 0.1
    assert np.abs(bp[above]).mean() < 0.1 * np.abs(plain[above]).mean()
    assert np.abs(bp[inside] - plain[inside]).mean() < 0.25 * np.abs(plain[inside]).mean()
    with pytest.raises(ValueError, match="kmin"):
        ricom_kernel(n, 1.0, 0.5, 0.2)


@pytest.mark.parametrize("n,size", [(21, 256), (41, 500), (61, 500), (101, 500)])
def test_kernel_frequency_response_follows_eq7(n, size):
    """|F{k_x}| along k_x of the paper's kernel (ours / 2π in pixel units) against eq. 7.

    The 2-D square kernel is not a line integral: eq. 7 predicts where the response peaks
    and oscillates; its amplitude is 2(n+1)/(π(n−1)) of eq. 7's (the exact low-frequency
    limit: Σ s_x²/|s|² = (n² − 1)/2 against eq. 7's ((n − 1)/2)²/2 per unit frequency).
    """
    k = ricom_kernel(n) / (2 * np.pi)
    grid = np.zeros((size, size))
    grid[:n, :n] = k[1]
    response = np.abs(np.fft.fft2(np.roll(grid, (-(n // 2), -(n // 2)), axis=(0, 1)))[0])
    m = np.arange(1, size // 2)
    eq7 = line_integral_weight(m, n, size)
    assert pearson(response[m], eq7) > 0.97
    assert abs(int(m[np.argmax(response[m])]) - int(m[np.argmax(eq7)])) <= 1
    low = 2 * (n + 1) / (np.pi * (n - 1))
    assert response[1] / eq7[0] == pytest.approx(low, rel=0.01)


def test_transfer_is_what_ricom_does_to_a_periodic_phase():
    rng = np.random.default_rng(5)
    shape, step, n = (24, 20), (0.3, 0.45), 9
    phi = rng.normal(size=shape)
    qy = np.fft.fftfreq(shape[0], step[0])[:, None]
    qx = np.fft.fftfreq(shape[1], step[1])[None, :]
    f = np.fft.fft2(phi)
    com_y, com_x = np.fft.ifft2(1j * qy * f).real, np.fft.ifft2(1j * qx * f).real  # ∇φ/2π
    kernel = ricom_kernel(n, step)
    h = n // 2
    periodic = sum(kernel[0, i, j] * np.roll(com_y, (h - i, h - j), (0, 1))
                   + kernel[1, i, j] * np.roll(com_x, (h - i, h - j), (0, 1)) for i in range(n) for j in range(n))
    assert np.allclose(periodic, np.fft.ifft2(f * ricom_transfer(kernel, shape, step)).real, atol=1e-10)


# ---------------------------------------------------------------------- batch riCOM
@settings(max_examples=25, deadline=None)
@given(
    ny=st.integers(1, 40), nx=st.integers(1, 40), n=st.sampled_from([3, 5, 9, 21]),
    cy=st.integers(1, 40), cx=st.integers(1, 40), seed=st.integers(0, 2**31),
)
def test_batch_equals_brute_force_for_any_chunking(ny, nx, n, cy, cx, seed):
    rng = np.random.default_rng(seed)
    com_y, com_x = rng.normal(size=(2, ny, nx))
    kernel = ricom_kernel(n, (0.7, 1.3))
    ref = brute_force_ricom(com_y, com_x, kernel)
    got = ricom_dask(da.from_array(com_y, chunks=(cy, cx)), da.from_array(com_x, chunks=(cx, cy)), kernel)
    scale = np.abs(kernel).sum() * max(np.abs(com_y).max(), np.abs(com_x).max())  # bound on |riCOM|
    assert_eq(got, ref, rtol=0, atol=1e-6 * scale)  # also: dtype, shape and chunks as the graph says
    assert np.abs(correlate_zero_padded(com_y, com_x, kernel) - ref).max() <= 1e-6 * scale


def test_batch_with_the_default_kernel_equals_brute_force_across_row_blocks():
    rng = np.random.default_rng(2)
    com_y, com_x = rng.normal(size=(2, 100, 90))
    kernel = ricom_kernel(61, 0.2, kmin=0.1, kmax=1.5, grid_shape=(100, 90))
    ref = brute_force_ricom(com_y, com_x, kernel)
    for chunks in [(7, 90), (32, 45), (100, 90), (61, 13)]:
        got = ricom_dask(da.from_array(com_y, chunks=chunks), da.from_array(com_x, chunks=chunks), kernel)
        assert_eq(got, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


# ---------------------------------------------------------------------- numba kernels
@settings(max_examples=40, deadline=None)
@given(
    ny=st.integers(1, 12), nx=st.integers(1, 12), n=st.sampled_from([3, 5, 7, 15]),
    data=st.data(), seed=st.integers(0, 2**31),
)
def test_scatter_equals_brute_force(ny, nx, n, data, seed):
    rng = np.random.default_rng(seed)
    start = data.draw(st.integers(0, ny * nx - 1))
    m = data.draw(st.integers(0, ny * nx - start))
    slots = data.draw(st.integers(1, ny))  # the whole image, or a ring buffer of fewer rows
    com_y, com_x = rng.normal(size=(2, m))
    if m:
        com_y[rng.integers(m)] = np.nan  # a position without electrons
    kfy, kfx = rng.normal(size=(2, n, n))
    acc = rng.normal(size=(slots, nx))
    ref = acc.copy()
    h = n // 2
    for i in range(m):
        if np.isnan(com_y[i]):
            continue
        qy, qx = divmod(start + i, nx)
        for a in range(n):
            for b in range(n):
                py, px = qy + a - h, qx + b - h
                if 0 <= py < ny and 0 <= px < nx:
                    ref[py % slots, px] += kfy[a, b] * com_y[i] + kfx[a, b] * com_x[i]
    scatter_com(acc, ny, start, com_y, com_x, kfy, kfx)
    assert np.allclose(acc, ref, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9),
    dtype=st.sampled_from([np.uint8, np.uint16, np.uint32, np.int32, np.uint64, np.float32, np.float64]),
    seed=st.integers(0, 2**31),
)
def test_frame_com_equals_numpy(m, h, w, dtype, seed):
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 60000 if np.dtype(dtype).itemsize > 1 else 250, size=(m, h, w)).astype(dtype)
    frames[0] = 0  # an empty frame: NaN, as for events
    cy, cx = com_from_frames(frames, 1.5, -2.0, accumulator_zero(frames.dtype))
    f = frames.astype(np.float64)
    tot = f.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        ey = (f.sum(2) * np.arange(h)).sum(1) / tot - 1.5
        ex = (f.sum(1) * np.arange(w)).sum(1) / tot + 2.0
    assert np.isnan(cy[0]) and np.isnan(cx[0])
    assert np.allclose(cy[1:], ey[1:], rtol=1e-12, atol=1e-9) and np.allclose(cx[1:], ex[1:], rtol=1e-12, atol=1e-9)


# ---------------------------------------------------------------------- physics
RICOM_SIM = SimulationParams(scan_shape=(96, 96), detector=16, max_phase=0.3)


def test_ricom_recovers_the_kernel_filtered_phase():
    """Against the truth filtered by the kernel's exact response: r ≥ 0.9 on the whole scan
    (its zero-padded edges included); away from the edges it is that filtered, probe-blurred
    phase with slope 1 (rad)."""
    p, n = RICOM_SIM, 61
    cy, cx, truth = expected_com(p)
    cal = p.calibration()
    out = ricom(com_dataset(cy, cx, p, chunks=16), cal, kernel_size=n)
    assert isinstance(out.phase.data, da.Array) and out.phase.attrs["units"] == "rad"
    phase = out.phase.values
    transfer = ricom_transfer(ricom_kernel(n, cal.scan_step_a), p.scan_shape, cal.scan_step_a)
    filtered = np.fft.ifft2(np.fft.fft2(truth) * transfer).real
    assert pearson(phase, filtered) >= 0.9
    h = n // 2
    inner = (slice(h, -h), slice(h, -h))
    blurred = np.fft.ifft2(np.fft.fft2(probe_blurred(truth, p)) * transfer).real
    assert pearson(phase[inner], blurred[inner]) > 0.999
    assert slope(phase[inner], blurred[inner]) == pytest.approx(1.0, abs=0.02)
    assert pearson(phase[inner], truth[inner]) > 0.9  # sign: positive at atoms


def test_ricom_band_pass_matches_its_response_and_rotation_is_undone():
    n, kmin, kmax = 31, 0.1, 1.5
    p = RICOM_SIM
    q = SimulationParams(scan_shape=(96, 96), detector=16, max_phase=0.3, rotation_quarter_turns=3, flip=True)
    cal = q.calibration()
    cy, cx, truth = expected_com(q)
    phase = ricom(com_dataset(cy, cx, q), cal, kernel_size=n, kmin=kmin, kmax=kmax).phase.values
    kernel = ricom_kernel(n, cal.scan_step_a, kmin, kmax)  # what the method uses: a grid of 4 kernel widths
    transfer = ricom_transfer(kernel, q.scan_shape, cal.scan_step_a)
    blurred = np.fft.ifft2(np.fft.fft2(probe_blurred(truth, p)) * transfer).real
    inner = (slice(n // 2, -(n // 2)), slice(n // 2, -(n // 2)))
    assert pearson(phase[inner], blurred[inner]) > 0.999
    assert slope(phase[inner], blurred[inner]) == pytest.approx(1.0, abs=0.02)


def test_ricom_graph_is_lazy_and_stays_in_row_blocks():
    cy, cx, _ = expected_com(RICOM_SIM)
    com = com_dataset(cy, cx, RICOM_SIM, chunks=32)
    with raise_if_dask_computes():
        out = ricom(com, RICOM_SIM.calibration(), kernel_size=21)
    assert out.phase.data.chunks == ((84, 12), (96,))  # row blocks of ≥ 4 kernel widths, not one task
    with raise_if_dask_computes(max_computes=1) as counter:
        out.compute()
    assert counter.total_computes == 1
