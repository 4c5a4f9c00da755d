"""Splitting data sets and turning the containers users hold into (images, labels) tensors."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from baerase.data._validate import standardise
from baerase.errors import InputError

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def split(x: Array, y: Array, fractions: Sequence[float], seed: int = 0) -> list[tuple[Array, Array]]:
    """Split (x, y) into parts holding the given fractions of the samples, stratified by class.

    Each class is spread evenly over the parts (as far as its size allows), and part sizes are
    round(fraction * N) cumulatively. Fractions must be positive and sum to at most 1; any
    remainder is left out. Works on tensors or numpy arrays and returns the same type.

    Args:
        x: images [N, ...]; y: labels [N].
    Returns:
        One (x_part, y_part) per fraction, each shuffled.
    """
    n = len(x)
    if len(y) != n:
        raise InputError(f"split: {n} images but {len(y)} labels")
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or fr.size == 0 or not np.isfinite(fr).all() or (fr <= 0).any() or fr.sum() > 1 + 1e-9:
        raise InputError(f"split: fractions must be positive and sum to at most 1, got {list(fractions)}")
    labels = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    rng = np.random.default_rng(seed)
    # Place each class's samples at evenly spaced positions in [0, 1) with a random offset, then
    # sort: any contiguous run of the order holds every class in proportion.
    key = np.empty(n, dtype=np.float64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        key[idx] = (np.arange(len(idx)) + rng.random()) / len(idx)
    order = np.lexsort((rng.random(n), key))
    cuts = np.round(np.concatenate([[0.0], np.cumsum(fr)]) * n).astype(np.int64)
    cuts = np.minimum(cuts, n)
    parts = []
    for i, (a, b) in enumerate(itertools.pairwise(cuts)):
        if b <= a:
            raise InputError(f"split: part {i} (fraction {fr[i]:g}) of {n} samples would be empty")
        idx = order[a:b][rng.permutation(b - a)]
        parts.append((_take(x, idx), _take(y, idx)))
    return parts


def _take(a: Array, idx: np.ndarray) -> Array:
    if isinstance(a, torch.Tensor):
        return a[torch.from_numpy(idx).to(a.device)]
    return np.asarray(a)[idx]


def _to_numpy(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    try:
        return np.asarray(a)
    except (ValueError, TypeError) as exc:
        raise InputError(f"as_tensors: cannot convert {what} to an array ({exc})") from None


def as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn images and labels in any common container into tensors.

    Accepts an (images, labels) pair of tensors or numpy arrays, a torch ``Dataset`` whose items
    are (image, label), or a ``DataLoader`` yielding (images, labels) batches. Images may be
    channels-last and uint8 0-255; they are converted.

    Returns:
        images: float32 tensor [N, C, H, W] in [0, 1]; labels: int64 tensor [N].
    """
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, DataLoader):
        xs, ys = [], []
        for batch in data:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise InputError("as_tensors: the DataLoader must yield (images, labels) batches")
            xs.append(_to_numpy(batch[0], "a batch of images"))
            ys.append(_to_numpy(batch[1], "a batch of labels").reshape(-1))
        if not xs:
            raise InputError("as_tensors: the DataLoader is empty")
        try:
            x, y = np.concatenate(xs), np.concatenate(ys)
        except ValueError as exc:
            raise InputError(f"as_tensors: DataLoader batches do not stack ({exc})") from None
        return standardise(x, y, "DataLoader")
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return standardise(_to_numpy(data[0], "images"), _to_numpy(data[1], "labels"), "data")
    if isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError:
            raise InputError("as_tensors: the Dataset has no length; wrap it in a DataLoader") from None
        if n == 0:
            raise InputError("as_tensors: the Dataset is empty")
        items = [data[i] for i in range(n)]
        if not all(isinstance(it, (tuple, list)) and len(it) >= 2 for it in items):
            raise InputError("as_tensors: Dataset items must be (image, label) pairs")
        try:
            x = np.stack([_to_numpy(it[0], "an image") for it in items])
        except ValueError as exc:
            raise InputError(f"as_tensors: Dataset images differ in shape ({exc})") from None
        try:
            y = np.array([_to_numpy(it[1], "a label").reshape(()) for it in items])
        except ValueError:
            raise InputError("as_tensors: each Dataset label must be a single class index") from None
        return standardise(x, y, "Dataset")
    raise InputError(
        f"as_tensors: expected (images, labels), a torch Dataset or a DataLoader, got {type(data).__name__}"
    )
