"""Method "dpc": the phase by regularised gradient descent on the COM field (Pelz et al. 2022;
kernel: :func:`stemdask.kernels.dpc.dpc_phase`), on the whole field in one task."""

from __future__ import annotations

import xarray as xr

from ..events import EventDataset
from ..kernels.dpc import check_dpc_options, dpc_phase
from ..optics import Calibration
from . import PositiveFloat, PositiveInt
from .com import ComReference, phase_dataset, scan_frame_com, whole_field


def dpc(com: xr.Dataset, calibration: Calibration, *, iterations: int = 100, step: float = 0.5,
        lambda1: float = 0.0, lambda2: float = 0.0, tol: float = 1e-4, pad: float = 0.25) -> xr.Dataset:
    """Lazy DPC ``phase`` (rad) of a detector-frame COM Dataset (``EventDataset.com()``);
    the options as in :func:`run` (λ1 in Å⁻², λ2 in Å²)."""
    check_dpc_options(iterations, step, lambda1, lambda2, tol, pad)
    gy, gx = scan_frame_com(com, calibration)
    params = {"iterations": int(iterations), "step": step, "lambda1_inv_a2": lambda1,
              "lambda2_a2": lambda2, "tol": tol, "pad": pad}
    data = whole_field(dpc_phase, gy, gx, step_a=calibration.scan_step_a, iterations=int(iterations), step=step,
                       lambda1=lambda1, lambda2=lambda2, tol=tol, pad=pad)
    name = f"DPC phase (≤{int(iterations)} steps of μ {step:g}, λ1 {lambda1:g} Å⁻², λ2 {lambda2:g} Å²)"
    return phase_dataset(data, gy, "dpc", name, params)


def run(ds: EventDataset, *, com_reference: ComReference = "mean", dpc_iterations: PositiveInt = 100,
        dpc_step: PositiveFloat = 0.5, dpc_lambda1: float = 0.0, dpc_lambda2: float = 0.0,
        dpc_tol: float = 1e-4, dpc_pad: float = 0.25) -> xr.Dataset:
    """DPC phase (rad) by regularised gradient descent (Pelz et al. 2022): variable phase.

    Parameters
    ----------
    com_reference
        as for :func:`stemdask.methods.com.run`; mean here: a constant COM is no phase contrast
    dpc_iterations
        maximum number of gradient steps
    dpc_step
        gradient step μ (dimensionless; 1 with no regularisation and no padding is one exact
        Fourier integration)
    dpc_lambda1
        low-frequency regularisation λ1, Å⁻² (damps spatial frequencies below √λ1)
    dpc_lambda2
        high-frequency regularisation λ2, Å² (damps spatial frequencies above λ2^(−1/2))
    dpc_tol
        stop when the relative update falls below this (dimensionless)
    dpc_pad
        zero padding on each side, as a fraction of the scan side
    """
    return dpc(ds.com(reference=com_reference, units="px"), ds.calibration, iterations=dpc_iterations,
               step=dpc_step, lambda1=dpc_lambda1, lambda2=dpc_lambda2, tol=dpc_tol, pad=dpc_pad)
