"""Turn loaded arrays into the one layout baerase uses: float32 [N,C,H,W] in [0,1], int64 [N]."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from baerase.errors import InputError

_MAX_CHANNELS = 4  # grey, RGB or RGBA; anything wider is not an image layout we can guess


def _channels_first(x: np.ndarray, source: str) -> np.ndarray:
    """Return x as [N,C,H,W], accepting [N,H,W], [N,C,H,W] or [N,H,W,C]."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise InputError(
            f"{source}: images must have 3 or 4 dimensions ([N,H,W], [N,C,H,W] or [N,H,W,C]), "
            f"got shape {tuple(x.shape)}"
        )
    # Grey or RGB (1 or 3) is the strongest hint, then RGBA (4); a [N,3,3,3] array is ambiguous and
    # taken as channels-first, torch's convention.
    for counts in ((1, 3), tuple(range(1, _MAX_CHANNELS + 1))):
        if x.shape[1] in counts:
            return x
        if x.shape[3] in counts:
            return x.transpose(0, 3, 1, 2)
    raise InputError(
        f"{source}: cannot find the channel axis in images of shape {tuple(x.shape)}; "
        f"expected [N,C,H,W] or [N,H,W,C] with C <= {_MAX_CHANNELS}"
    )


def images_to_float(x: np.ndarray, source: str) -> np.ndarray:
    """Images of any accepted dtype/layout -> contiguous float32 [N,C,H,W] in [0,1]."""
    x = np.asarray(x)
    if x.dtype == np.bool_ or x.dtype.kind not in "uif":
        raise InputError(f"{source}: images have dtype {x.dtype}; expected uint8 (0-255) or float (0-1)")
    if x.size == 0 or x.shape[0] == 0:
        raise InputError(f"{source}: no images (shape {tuple(x.shape)})")
    x = _channels_first(x, source)
    if 0 in x.shape:
        raise InputError(f"{source}: images have an empty dimension (shape {tuple(x.shape)})")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)
    xf = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(xf).all():
        raise InputError(f"{source}: images contain NaN or inf")
    lo, hi = float(xf.min()), float(xf.max())
    if lo < 0.0:
        raise InputError(
            f"{source}: image values go below 0 (min {lo:.4g}); the images look normalised - "
            "give raw pixels (uint8 0-255 or float 0-1) and pass the mean/std as `normalize`"
        )
    if hi <= 1.0:
        return xf
    if hi <= 255.0:
        # Integer or float pixels on the 0-255 scale are common enough to accept, but say so.
        if x.dtype.kind == "f":
            warnings.warn(
                f"{source}: float images range up to {hi:.4g}; treating them as 0-255 and dividing by 255", stacklevel=2
            )
        return xf / np.float32(255.0)
    raise InputError(f"{source}: image values go up to {hi:.4g}; expected 0-1 (float) or 0-255 (uint8)")


def labels_to_int(y: np.ndarray, n: int, source: str) -> np.ndarray:
    """Labels -> int64 [N] of non-negative class indices."""
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.reshape(-1)
    if y.ndim != 1:
        raise InputError(f"{source}: labels must be a 1-D array of class indices, got shape {tuple(y.shape)}")
    if y.dtype == np.bool_ or y.dtype.kind not in "uif":
        raise InputError(f"{source}: labels have dtype {y.dtype}; expected integers")
    if y.shape[0] != n:
        raise InputError(f"{source}: {n} images but {y.shape[0]} labels")
    if n == 0:
        raise InputError(f"{source}: no labels")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or not (y == np.round(y)).all():
            raise InputError(f"{source}: labels are floats that are not whole numbers (or NaN)")
        if np.abs(y).max() > 2**31:
            raise InputError(f"{source}: labels out of range (max {y.max():.4g})")
    if y.min() < 0:
        raise InputError(f"{source}: labels must be >= 0, found {int(y.min())}")
    if y.dtype == np.uint64 and y.max() > np.iinfo(np.int64).max:
        raise InputError(f"{source}: labels out of range (max {y.max()})")
    return np.ascontiguousarray(y, dtype=np.int64)


def standardise(x: np.ndarray, y: np.ndarray, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate and convert an (images, labels) pair to (float32 [N,C,H,W] in [0,1], int64 [N]) tensors."""
    xf = images_to_float(x, source)
    yi = labels_to_int(y, xf.shape[0], source)
    return torch.from_numpy(xf), torch.from_numpy(yi)
