"""O(C) reductions and densify: lazy xarray products of an :class:`~stemdask.events.EventDataset`.

Each product maps one pure kernel (:mod:`stemdask.kernels.events`) over the dataset's shared
per-block read; nothing is read until the result is computed. Conventions:

* Detector pixel (k_y, k_x) has its centre at coordinate (k_y, k_x) px. Angles are relative
  to the calibrated BF-disk centre ``calibration.bf_center`` (k = 0): ``k = (pixel − centre) ·
  detector_pixel_mrad`` (mrad). Everything is in the detector frame (no scan rotation).
* Annular detectors count events in pixels whose centre lies at ``inner ≤ r < outer`` from
  the BF centre. Presets, relative to the BF radius R: ``"bf"`` [0, R), ``"abf"`` [R/2, R),
  ``"adf"`` [1.2 R, ∞) (to the detector edge).
* Images count electrons (``units="electrons"``).
* **Detector mask** (``ds.mask``, from ``stemdask calibrate``: hot, dead pixels and a user's
  mask): events on masked pixels are excluded, and each masked pixel is *filled* with its
  expected share of the position's kept electrons, ``n_kept · fill[j]`` (``ds.fill``: the
  pixel's value in the PACBED interpolated from its neighbours, over the kept pixels' sum).
  So a masked pixel neither biases the COM (a dead pixel in the disk would pull it away) nor
  leaves a hole in virtual images, PACBED or dense patterns. Filled images are float64.
* **Descan** (``calibration.descan``): the BF-disk centre at position (iy, ix) is
  ``bf_center + descan_offsets(...)``; the COM reference, the annuli of virtual detectors
  and the densify crop (sub-pixel, :func:`stemdask.kernels.events.densify_shifted`) follow it
  per position. Arbitrary boolean virtual-detector masks stay fixed in the detector frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dask.array as da
import numpy as np
import xarray as xr

from .errors import InvalidParameter
from .kernels import events as kernels
from .optics import descan_offsets

#: Preset annuli (inner, outer) in units of the BF-disk radius.
PRESETS = {"bf": (0.0, 1.0), "abf": (0.5, 1.0), "adf": (1.2, math.inf)}


@dataclass(frozen=True)
class Annulus:
    """An annular virtual detector ``inner ≤ r < outer`` around the BF centre.

    ``units``: "mrad", "px" (detector pixels) or "bf" (multiples of the BF radius).
    """

    inner: float = 0.0
    outer: float = math.inf
    units: str = "mrad"

    def __post_init__(self):
        if self.units not in ("mrad", "px", "bf"):
            raise InvalidParameter(f"annulus units must be 'mrad', 'px' or 'bf', got {self.units!r}")
        if not (self.inner >= 0 and self.outer > self.inner) or math.isnan(self.outer):
            raise InvalidParameter(f"annulus needs 0 ≤ inner < outer, got inner={self.inner}, outer={self.outer}")

    def radii_px(self, ds) -> tuple[float, float]:
        cal = ds.calibration
        if self.units == "px":
            scale = 1.0
        elif self.units == "mrad":
            scale = 1.0 / cal.detector_pixel_mrad
        else:
            scale = _bf_radius(ds)
        return self.inner * scale, self.outer * scale


# ---------------------------------------------------------------------- geometry helpers
@dataclass(frozen=True)
class CropWindow:
    """The square detector window of dense patterns: ``n × n`` output pixels (``n = 2m + 1``),
    each ``bin × bin`` detector pixels, output pixel (0, 0) starting at detector pixel
    (``y0``, ``x0``) (may be negative: the window may pass the detector edge). ``center`` is
    the BF centre (detector px) the k coordinates are relative to."""

    y0: int
    x0: int
    bin: int
    n: int
    center: tuple[float, float]
    radius_px: float

    @classmethod
    def around(cls, center, radius_px: float, bin: int = 1) -> "CropWindow":
        """The window covering at least ``radius_px`` around ``center``: ``m = ceil((radius_px
        + 0.5) / bin − 0.5)``, its central output pixel the one whose centre is nearest."""
        b = int(bin)
        if b != bin or b < 1:
            raise InvalidParameter(f"bin must be a positive integer, got {bin!r}")
        if not (radius_px >= 0 and math.isfinite(radius_px)):
            raise InvalidParameter(f"radius_px must be ≥ 0 pixels, got {radius_px!r}")
        cy, cx = (float(v) for v in center)
        m = max(0, math.ceil((radius_px + 0.5) / b - 0.5))
        half = m * b + (b - 1) / 2
        return cls(math.floor(cy - half + 0.5), math.floor(cx - half + 0.5), b, 2 * m + 1, (cy, cx), float(radius_px))

    @classmethod
    def fitting(cls, center, radius_px: float, side: int) -> "CropWindow":
        """The window :meth:`around` ``center`` with the smallest bin whose side is ≤ ``side``
        output pixels (``side`` ≥ 1)."""
        if int(side) != side or side < 1:
            raise InvalidParameter(f"the crop side must be a positive whole number of pixels, got {side!r}")
        b = 1
        while (crop := cls.around(center, radius_px, b)).n > side:
            b += 1
        return crop

    def within(self, detector_shape) -> bool:
        """Whether the whole window lies on a ``detector_shape`` detector."""
        end = self.n * self.bin
        return (
            self.y0 >= 0 and self.x0 >= 0 and self.y0 + end <= detector_shape[0] and self.x0 + end <= detector_shape[1]
        )

    def coords(self, pixel_mrad: float) -> dict:
        """k_y, k_x (mrad): output pixel centres relative to the BF centre, detector frame."""
        centres = np.arange(self.n) * self.bin + (self.bin - 1) / 2
        what = "output pixel centre relative to the BF centre"
        return {
            "k_y": _k_coord("k_y", self.y0 + centres, self.center[0], pixel_mrad, what),
            "k_x": _k_coord("k_x", self.x0 + centres, self.center[1], pixel_mrad, what),
        }

    def attrs(self, pixel_mrad: float) -> dict:
        return {
            "units": "electrons",
            "long_name": "electron counts (cropped, binned)",
            "crop_origin_px": [self.y0, self.x0],
            "bin": self.bin,
            "radius_px": self.radius_px,
            "bf_center_px": list(self.center),
            "pixel_mrad": pixel_mrad * self.bin,
        }


def _dense_radius(ds, radius_px=None) -> float:
    """The densify crop's radius (px): ``radius_px``, else ``ceil(1.1·R) + 1`` (R the BF radius)."""
    return math.ceil(1.1 * _bf_radius(ds)) + 1 if radius_px is None else radius_px


def _bf_center(ds, center=None) -> tuple[float, float]:
    if center is not None:
        c = tuple(float(v) for v in center)
        if len(c) != 2 or not all(map(math.isfinite, c)):
            raise InvalidParameter(f"center must be (y, x) detector pixels, got {center!r}")
        return c
    if ds.calibration.bf_center is None:
        raise InvalidParameter(
            f"{ds.store.path}: no BF-disk centre calibrated; run `stemdask calibrate` "
            f"(stemdask.calibrate.calibrate_store) or pass center=(y, x)"
        )
    return ds.calibration.bf_center


def _bf_radius(ds) -> float:
    if ds.calibration.bf_radius is None:
        raise InvalidParameter(
            f"{ds.store.path}: no BF-disk radius calibrated; run `stemdask calibrate` or give radii explicitly"
        )
    return ds.calibration.bf_radius


def _k_coord(dim: str, pixel_centres: np.ndarray, origin: float, pixel_mrad: float, what: str) -> xr.Variable:
    return xr.Variable(
        dim,
        (pixel_centres - origin) * pixel_mrad,
        {"units": "mrad", "long_name": f"scattering angle {dim[-1]} ({what}, detector frame)"},
    )


def _det_coords(ds, origin) -> dict:
    dy, dx = ds.detector_shape
    p = ds.calibration.detector_pixel_mrad
    what = "relative to the BF centre"
    return {
        "k_y": _k_coord("k_y", np.arange(dy), origin[0], p, what),
        "k_x": _k_coord("k_x", np.arange(dx), origin[1], p, what),
    }


def _scan_dataarray(ds, data, name, attrs) -> xr.DataArray:
    return xr.DataArray(data, dims=("scan_y", "scan_x"), coords=ds.scan_coords(), name=name, attrs=attrs)


# ---------------------------------------------------------------------- per-block tasks
def _block_counts(block):
    return block.counts.astype(np.uint32, copy=False)


@dataclass(frozen=True)
class MaskTerms:
    """The detector mask as kernels take it: ``keep`` (D,) uint8, and for the masked pixels
    their linear indices ``fill_idx`` and fill weights ``fill_w`` (see the module docstring)."""

    keep: np.ndarray
    fill_idx: np.ndarray
    fill_w: np.ndarray

    @classmethod
    def of(cls, ds) -> "MaskTerms | None":
        return cls.from_arrays(ds.mask, ds.fill)

    @classmethod
    def from_arrays(cls, mask, fill) -> "MaskTerms | None":
        """From a bool (det_y, det_x) mask and its fill weights; None when nothing is masked."""
        if mask is None or not np.asarray(mask).any():
            return None
        flat = np.asarray(mask, dtype=bool).ravel()
        idx = np.flatnonzero(flat).astype(np.int64)
        return cls((~flat).astype(np.uint8), idx, np.asarray(fill, dtype=np.float64).ravel()[idx])

    @classmethod
    def none(cls, n_pixels: int) -> "MaskTerms":
        return cls(np.ones(n_pixels, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.float64))

    def mean_offset(self, det_x: int) -> tuple[float, float, float]:
        """(Σw, Σw·y, Σw·x): the fill's share of a pattern and its first moments (px)."""
        y, x = np.divmod(self.fill_idx, det_x)
        return float(self.fill_w.sum()), float(self.fill_w @ y), float(self.fill_w @ x)


def _offsets(block, scan_shape, descan):
    """(dy, dx) flattened: the descan offset (px) of every position of ``block``."""
    rows = np.arange(block.row_start, block.row_start + block.counts.shape[0])
    dy, dx = descan_offsets(descan, scan_shape, rows)
    return dy.ravel(), dx.ravel()


def _block_com(block, detector_shape, ref_y, ref_x, terms, scan_shape, descan):
    det_y, det_x = detector_shape
    keep = None if terms is None else terms.keep
    cy, cx = np.empty(block.counts.size), np.empty(block.counts.size)
    for p0, p1, entries, indices, weights in block.pieces():
        cy[p0:p1], cx[p0:p1] = kernels.center_of_mass(entries, indices, det_x, ref_y, ref_x, keep, weights,
                                                      n_pixels=det_y * det_x)
    if terms is not None:  # masked pixels filled: the mean of kept + expected filled electrons
        f0, fy, fx = terms.mean_offset(det_x)
        cy = (cy + ref_y + fy) / (1.0 + f0) - ref_y
        cx = (cx + ref_x + fx) / (1.0 + f0) - ref_x
    if descan is not None:  # the disk's move as this COM sees it (``com_response``, default 1)
        dy, dx = _offsets(block, scan_shape, descan)
        (k_yy, k_yx), (k_xy, k_xx) = descan.get("com_response", ((1.0, 0.0), (0.0, 1.0)))
        cy, cx = cy - (k_yy * dy + k_yx * dx), cx - (k_xy * dy + k_xx * dx)
    return np.stack([cy, cx], axis=-1).reshape(block.counts.shape + (2,))


def _block_masked(block, labels, table):
    out = np.empty((block.counts.size, table.shape[1]), np.uint32)
    for p0, p1, entries, indices, weights in block.pieces():
        out[p0:p1] = kernels.masked_counts(entries, indices, weights, labels, table)
    return out.reshape(block.counts.shape + (table.shape[1],))


def _block_annular(block, det_x, center, r2_lo, r2_hi, terms, scan_shape, descan):
    dy, dx = _offsets(block, scan_shape, descan)
    out = np.empty((block.counts.size, r2_lo.shape[0]), np.float64)
    for p0, p1, entries, indices, weights in block.pieces():
        out[p0:p1] = kernels.annular_counts(entries, indices, weights, det_x, center[0] + dy[p0:p1],
                                            center[1] + dx[p0:p1], r2_lo, r2_hi, terms.keep, terms.fill_idx,
                                            terms.fill_w)
    return out.reshape(block.counts.shape + (r2_lo.shape[0],))


def _block_histogram(block, n_pixels):
    total = np.zeros(n_pixels, np.uint64)
    for _, _, _, indices, weights in block.pieces():
        kernels.add_histogram(indices, weights, total)
    return total[None, :]


def _densified(parts, n, f, add):
    """Dense patterns (rows / f, nx // f, n, n) float32 of consecutive row ``parts`` (a chunk of
    whole f-row bins), scan binned f × f: ``add(part, out, target)`` adds each part's events
    into the flat output at the patterns ``target`` (:func:`~stemdask.kernels.events.scan_bin_targets`)."""
    nx = parts[0].counts.shape[1]
    shape = (sum(p.counts.shape[0] for p in parts) // f, nx // f, n, n)
    out = np.zeros((shape[0] * shape[1], n, n), np.float32)  # NumPy: huge pages, see kernels.densify
    for part in parts:
        add(part, out, kernels.scan_bin_targets(part.counts.shape[0], nx, f, part.row_start - parts[0].row_start))
    return out.reshape(shape)


def _block_densify(parts, lookup, n, f):
    def add(part, out, target):
        kernels.densify(part.entries.ravel(), part.indices, part.weights, lookup, out, target)

    return _densified(parts, n, f, add)


def _block_densify_shifted(parts, det_x, y0, x0, b, n, f, terms, scan_shape, descan):
    def add(part, out, target):
        dy, dx = _offsets(part, scan_shape, descan)
        kernels.densify_shifted(part.entries.ravel(), part.indices, part.weights, det_x, dy, dx, float(y0), float(x0),
                                b, terms.keep, terms.fill_idx, terms.fill_w, out, target)

    return _densified(parts, n, f, add)


def _correction_attrs(ds) -> dict:
    """What a product says about the mask and descan it honoured."""
    descan = ds.calibration.descan
    return {
        "masked_pixels": int(ds.mask.sum()) if ds.mask is not None else 0,
        "mask_handling": "excluded, filled from the PACBED" if ds.mask is not None and ds.mask.any() else "none",
        "descan": descan["model"] if descan else "off",
    }


# ---------------------------------------------------------------------- products
def counts(ds) -> xr.DataArray:
    """Electrons per position, (scan_y, scan_x) uint32."""
    data = ds.map_events(_block_counts, dtype=np.uint32, chunks=(ds.row_chunks, (ds.scan_shape[1],)), name="counts")
    return _scan_dataarray(ds, data, "counts", {"units": "electrons", "long_name": "electrons per position"})


def com(ds, reference="bf", units: str = "px", vacuum=None) -> xr.Dataset:
    """Centre of mass of each pattern, detector frame: Dataset {com_y, com_x} (float64).

    ``reference``: "bf" — the calibrated BF-disk centre (default); (y, x) — a detector
    pixel position; "mean" — the mean COM over the scan; "vacuum" — the mean COM over the
    scan region ``vacuum`` ((iy, ix) or (slice_y, slice_x) of scan indices).
    ``units``: "px" (detector pixels) or "mrad". Positions without events are NaN.
    Lazy: chunks (rows of the read chunks, nx).
    """
    if units not in ("px", "mrad"):
        raise InvalidParameter(f"COM units must be 'px' or 'mrad', got {units!r}")
    if isinstance(reference, str):
        if reference not in ("bf", "mean", "vacuum"):
            raise InvalidParameter(f"COM reference must be 'bf', 'mean', 'vacuum' or (y, x) pixels, got {reference!r}")
        if reference == "bf":
            ref = _bf_center(ds)
        else:
            ref = ds.calibration.bf_center or (0.0, 0.0)
    else:
        reference = tuple(float(v) for v in np.ravel(reference))
        ref = _bf_center(ds, reference)
    if (reference == "vacuum") != (vacuum is not None):
        raise InvalidParameter("pass vacuum=(iy, ix) or (slice_y, slice_x) exactly when reference='vacuum'")
    nx = ds.scan_shape[1]
    both = ds.map_events(
        _block_com,
        ds.detector_shape,
        float(ref[0]),
        float(ref[1]),
        MaskTerms.of(ds),
        ds.scan_shape,
        ds.calibration.descan,
        dtype=np.float64,
        chunks=(ds.row_chunks, (nx,), (2,)),
        new_axis=[2],
        name="com",
    )
    if reference == "mean":
        both = both - da.nanmean(both, axis=(0, 1))
    elif reference == "vacuum":
        region = both[tuple(_as_slice(v) for v in vacuum)]
        if region.shape[0] * region.shape[1] == 0:
            raise InvalidParameter(f"vacuum region {vacuum!r} selects no scan positions of {ds.scan_shape}")
        both = both - da.nanmean(region, axis=(0, 1))
    scale = ds.calibration.detector_pixel_mrad if units == "mrad" else 1.0
    if scale != 1.0:
        both = both * scale
    attrs = {
        "units": units,
        "frame": "detector",
        "reference": reference if isinstance(reference, str) else "pixel",
        "reference_px": [] if reference in ("mean", "vacuum") else [float(ref[0]), float(ref[1])],
        "vacuum": repr(vacuum) if vacuum is not None else "",
        **_correction_attrs(ds),
    }
    out = xr.Dataset(
        {
            "com_y": _scan_dataarray(
                ds, both[..., 0], "com_y", {**attrs, "long_name": "centre of mass k_y (detector frame)"}
            ),
            "com_x": _scan_dataarray(
                ds, both[..., 1], "com_x", {**attrs, "long_name": "centre of mass k_x (detector frame)"}
            ),
        },
        attrs={**{k: v for k, v in attrs.items() if k != "units"}, "method": "com"},
    )
    return out


def _as_slice(v):
    return v if isinstance(v, slice) else slice(int(v), int(v) + 1)


def detector_masks(ds, detectors: dict) -> tuple[np.ndarray, dict, list]:
    """Boolean masks (n, det_y, det_x) for ``detectors`` (annuli around the BF centre at the
    scan centre), the attrs describing each, and each one's radii (inner, outer) px — None
    for a boolean-mask detector."""
    if not detectors:
        raise InvalidParameter("no virtual detectors given")
    masks, described, radii = [], {}, []
    for name, spec in detectors.items():
        if isinstance(spec, str):
            if spec not in PRESETS:
                raise InvalidParameter(f"unknown virtual detector preset {spec!r} (known: {sorted(PRESETS)})")
            spec = Annulus(*PRESETS[spec], units="bf")
        if isinstance(spec, Annulus):
            inner, outer = spec.radii_px(ds)
            r = _radius_of(ds.detector_shape, _bf_center(ds))
            masks.append((r >= inner) & (r < outer))
            radii.append((inner, outer))
            p = ds.calibration.detector_pixel_mrad
            described[name] = {
                "detector": "annular",
                "inner_px": inner,
                "outer_px": outer,
                "inner_mrad": inner * p,
                "outer_mrad": outer * p,
                "bf_center_px": list(_bf_center(ds)),
            }
        else:
            m = np.asarray(spec)
            if m.shape != ds.detector_shape or m.dtype != bool:
                raise InvalidParameter(
                    f"virtual detector {name!r}: a mask must be a boolean array of the detector's shape "
                    f"{ds.detector_shape}, got {m.dtype} {m.shape}"
                )
            masks.append(m)
            radii.append(None)
            described[name] = {"detector": "mask", "mask_pixels": int(m.sum())}
    return np.stack(masks), described, radii


def mask_groups(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group detector pixels by the set of masks they belong to, for :func:`kernels.masked_counts`.

    ``masks`` (n ≤ 64, det_y, det_x) bool → (labels (D,) uint8/uint32, table (G, n) uint32).
    """
    n_det = masks.shape[0]
    if n_det > 64:
        raise InvalidParameter(f"at most 64 virtual detectors in one pass, got {n_det}")
    codes = np.zeros(masks[0].size, np.uint64)
    for d in range(n_det):
        codes |= masks[d].ravel().astype(np.uint64) << np.uint64(d)
    unique, labels = np.unique(codes, return_inverse=True)
    table = ((unique[:, None] >> np.arange(n_det, dtype=np.uint64)[None, :]) & np.uint64(1)).astype(np.uint32)
    return labels.reshape(-1).astype(np.uint8 if len(unique) <= 256 else np.uint32), table


def virtual_detectors(ds, detectors: dict) -> xr.Dataset:
    """Several virtual detector images in one pass: Dataset {name: (scan_y, scan_x)}.

    ``detectors`` maps a name to a preset ("bf", "abf", "adf"), an :class:`Annulus`, or a
    boolean mask of the detector's shape. Overlapping detectors are fine. Images are uint32
    electron counts; with a detector mask or descan (module docstring) they are float64:
    annuli follow each position's disk centre, masked pixels are filled.
    """
    masks, described, radii = detector_masks(ds, detectors)
    n_det = masks.shape[0]
    nx = ds.scan_shape[1]
    terms = MaskTerms.of(ds)
    descan = ds.calibration.descan
    chunks = (ds.row_chunks, (nx,), (n_det,))
    if terms is None and descan is None:
        labels, table = mask_groups(masks)
        stacked = ds.map_events(
            _block_masked, labels, table, dtype=np.uint32, chunks=chunks, new_axis=[2], name="virtual"
        )
        parts = [stacked[..., d] for d in range(n_det)]
    else:
        parts = _corrected_detectors(ds, masks, radii, terms or MaskTerms.none(masks[0].size), descan)
    data = {}
    for d, name in enumerate(detectors):
        attrs = {
            "units": "electrons",
            "long_name": detector_name(name, described[name]),
            **described[name],
            **_correction_attrs(ds),
        }
        data[name] = _scan_dataarray(ds, parts[d], name, attrs)
    return xr.Dataset(data, attrs={"method": "virtual"})


def detector_name(name: str, described: dict) -> str:
    """``virtual BF 0–20.2 mrad``: a detector's name with the angles it collects."""
    label = name.upper() if name in PRESETS else name
    if described["detector"] != "annular":
        return f"virtual {label} (mask of {described['mask_pixels']} px)"
    inner, outer = described["inner_mrad"], described["outer_mrad"]
    angles = f"≥ {inner:.3g} mrad" if math.isinf(outer) else f"{inner:.3g}–{outer:.3g} mrad"
    return f"virtual {label} {angles}"


def _corrected_detectors(ds, masks, radii, terms, descan) -> list:
    """Virtual images with descan-following annuli and masked pixels filled (float64)."""
    nx = ds.scan_shape[1]
    det_x = ds.detector_shape[1]
    parts = [None] * len(radii)
    annuli = [d for d, r in enumerate(radii) if r is not None]
    if annuli:
        r2_lo = np.array([radii[d][0] ** 2 for d in annuli], np.float64)
        r2_hi = np.array([radii[d][1] ** 2 for d in annuli], np.float64)
        got = ds.map_events(
            _block_annular,
            det_x,
            tuple(_bf_center(ds)),
            r2_lo,
            r2_hi,
            terms,
            ds.scan_shape,
            descan,
            dtype=np.float64,
            chunks=(ds.row_chunks, (nx,), (len(annuli),)),
            new_axis=[2],
            name="virtual-annular",
        )
        for j, d in enumerate(annuli):
            parts[d] = got[..., j]
    fixed = [d for d, r in enumerate(radii) if r is None]
    if fixed:  # detector-frame masks: kept pixels counted, masked ones filled from the kept total
        keep = terms.keep.astype(bool).reshape(masks[0].shape)
        stack = np.concatenate([masks[fixed] & keep, keep[None]])
        labels, table = mask_groups(stack)
        got = ds.map_events(
            _block_masked,
            labels,
            table,
            dtype=np.uint32,
            chunks=(ds.row_chunks, (nx,), (len(fixed) + 1,)),
            new_axis=[2],
            name="virtual-mask",
        )
        kept = got[..., -1].astype(np.float64)
        fill = np.zeros(masks[0].size)
        fill[terms.fill_idx] = terms.fill_w
        for j, d in enumerate(fixed):
            parts[d] = got[..., j].astype(np.float64) + kept * float(fill[masks[d].ravel()].sum())
    return parts


def virtual(ds, inner=0.0, outer=math.inf, units: str = "mrad", name: str = "image") -> xr.DataArray:
    """One annular virtual detector ``inner ≤ r < outer`` (``units``: mrad, px or bf)."""
    return virtual_detectors(ds, {name: Annulus(inner, outer, units)})[name]


def pacbed(ds) -> xr.DataArray:
    """Position-averaged CBED as a sum: electrons per detector pixel, (k_y, k_x) uint64.

    Coordinates are in mrad relative to the calibrated BF centre, or to pixel
    (det_y/2, det_x/2) when there is none yet (attr ``k_origin_px`` says which).
    """
    dy, dx = ds.detector_shape
    nb = len(ds.row_chunks)
    per_block = ds.map_events(_block_histogram, dy * dx, dtype=np.uint64, chunks=((1,) * nb, (dy * dx,)), name="pacbed")
    total = per_block.sum(axis=0, dtype=np.uint64).reshape(dy, dx)
    terms = MaskTerms.of(ds)
    if terms is not None:
        total = total.map_blocks(_fill_pattern, ds.mask, ds.fill, dtype=np.float64)
    origin = ds.calibration.bf_center or (dy / 2, dx / 2)
    return xr.DataArray(
        total,
        dims=("k_y", "k_x"),
        coords=_det_coords(ds, origin),
        name="pacbed",
        attrs={
            "units": "electrons",
            "long_name": "sum of all diffraction patterns",
            "k_origin_px": list(origin),
            "positions": ds.scan_shape[0] * ds.scan_shape[1],
            **_correction_attrs(ds),
        },
    )


def _fill_pattern(total, mask, fill):
    """A summed pattern with its masked pixels replaced by their fill share of the kept sum."""
    kept = float(total[~mask].sum())
    return np.where(mask, kept * fill, total.astype(np.float64))


def _radial(pattern, center, bin_px, n_bins, n_positions):
    r = _radius_of(pattern.shape, center)
    which = (r / bin_px).astype(np.int64).ravel()
    sums = np.bincount(which, weights=pattern.ravel().astype(np.float64), minlength=n_bins)[:n_bins]
    pixels = np.bincount(which, minlength=n_bins)[:n_bins]
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / pixels / n_positions


def _radius_of(shape, center) -> np.ndarray:
    return np.hypot(np.arange(shape[0])[:, None] - center[0], np.arange(shape[1])[None, :] - center[1])


def radial_profile(ds, bin_px: float = 1.0) -> xr.DataArray:
    """Position-averaged radial profile: mean electrons per pixel per position in rings
    ``[i·bin_px, (i+1)·bin_px)`` px around the BF centre; dim ``k`` (ring centre, mrad)."""
    if not (bin_px > 0 and math.isfinite(bin_px)):
        raise InvalidParameter(f"bin_px must be a positive number of pixels, got {bin_px!r}")
    center = _bf_center(ds)
    r_max = _radius_of(ds.detector_shape, center).max()
    n_bins = int(r_max // bin_px) + 1
    n_pos = ds.scan_shape[0] * ds.scan_shape[1]
    pat = pacbed(ds).data.rechunk(-1)
    prof = pat.map_blocks(
        _radial, center, float(bin_px), n_bins, n_pos, dtype=np.float64, chunks=((n_bins,),), drop_axis=1
    )
    k = (np.arange(n_bins) + 0.5) * bin_px
    coords = {
        "k": xr.Variable(
            "k",
            k * ds.calibration.detector_pixel_mrad,
            {"units": "mrad", "long_name": "scattering angle (ring centre)"},
        ),
        "k_px": xr.Variable("k", k, {"units": "px", "long_name": "ring centre radius"}),
    }
    return xr.DataArray(
        prof,
        dims=("k",),
        coords=coords,
        name="radial_profile",
        attrs={
            "units": "electrons / pixel / position",
            "bin_px": float(bin_px),
            "bf_center_px": list(center),
            "long_name": "position-averaged radial profile",
        },
    )


def densify(ds, radius_px=None, center=None, bin: int = 1) -> xr.DataArray:
    """Crop a square around the BF centre, bin it, and make dense patterns.

    Returns float32 (scan_y, scan_x, k_y, k_x) electron counts, dask chunks (rows, nx, full,
    full) with as many rows as keep a chunk within :func:`stemdask.events.chunk_target`; the
    crop is :meth:`CropWindow.around` the centre: ``radius_px`` defaults to ``ceil(1.1·R) + 1``
    (R the BF radius), ``center`` to the calibrated BF centre. Coordinates k_y, k_x (mrad) are
    the output pixel centres relative to the BF centre (k = 0); attrs give the crop origin
    (detector pixel of output pixel (0, 0)'s first sub-pixel) and the bin.
    """
    crop = CropWindow.around(_bf_center(ds, center), _dense_radius(ds, radius_px), bin)
    y0, x0, b, n = crop.y0, crop.x0, crop.bin, crop.n
    # a scan-binned dataset bins as it densifies: its source's events, each position's descan its own
    source, f = ds.unbinned()
    nx = source.scan_shape[1]
    terms, descan = MaskTerms.of(ds), ds.calibration.descan
    product = {"dtype": np.float32, "row_bytes": nx // f * n * n * 4 / f, "trailing": (n, n), "name": "densify",
               "scan_bin": f}
    if terms is None and descan is None:
        lookup = kernels.densify_lookup(*ds.detector_shape, y0, x0, b, n, n)
        data = source.map_event_rows(_block_densify, lookup, n, f, **product)
    else:
        data = source.map_event_rows(
            _block_densify_shifted,
            ds.detector_shape[1],
            y0,
            x0,
            b,
            n,
            f,
            terms or MaskTerms.none(ds.detector_shape[0] * ds.detector_shape[1]),
            source.scan_shape,
            descan,
            **product,
        )
    p = ds.calibration.detector_pixel_mrad
    coords = {**ds.scan_coords(), **crop.coords(p)}
    attrs = {**crop.attrs(p), **_correction_attrs(ds)}
    return xr.DataArray(data, dims=("scan_y", "scan_x", "k_y", "k_x"), coords=coords, name="dense", attrs=attrs)
