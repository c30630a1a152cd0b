"""A user's detector mask (``stemdask calibrate --mask FILE``): which pixels to exclude.

``.npy`` (NumPy) or ``.tif``/``.tiff`` (read with Pillow, which matplotlib already needs),
holding bool or 0/1 values of the detector's shape ``(det_y, det_x)``; True / 1 = exclude the
pixel (hot, dead, a beam stop's shadow …). Anything else — another shape, other values, an
unreadable file — is a :class:`~stemdask.io.common.SourceError` whose message starts with
the file's path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import SourceError

SUFFIXES = (".npy", ".tif", ".tiff")


def load_mask(path, detector_shape) -> np.ndarray:
    """The mask in ``path`` as a bool array of ``detector_shape`` (True = excluded pixel)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SourceError(f"{path}: a mask must be a .npy or .tif/.tiff file of 0/1 or bool values")
    if not path.is_file():
        raise SourceError(f"{path}: no such mask file")
    try:
        if suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as im:
                data = np.array(im)
    except Exception as e:  # noqa: BLE001 - numpy / Pillow raise many kinds for a malformed file
        raise SourceError(f"{path}: not a readable mask ({type(e).__name__}: {e})") from None
    data = np.asarray(data)
    shape = tuple(int(n) for n in detector_shape)
    if data.shape != shape:
        raise SourceError(f"{path}: the mask has shape {data.shape}, the detector is {shape[0]}×{shape[1]}")
    if data.dtype == bool:
        return data.copy()
    if data.dtype.kind not in "uif":
        raise SourceError(f"{path}: the mask must hold bool or 0/1 values, not {data.dtype}")
    values = np.unique(data)
    if not np.isin(values, (0, 1)).all():
        shown = ", ".join(f"{v:g}" for v in values[~np.isin(values, (0, 1))][:5])
        raise SourceError(f"{path}: the mask must hold only 0 and 1 (1 = exclude the pixel); found {shown}")
    return data.astype(bool)
