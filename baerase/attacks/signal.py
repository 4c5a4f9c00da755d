"""SIG (Barni et al. 2019): an additive sinusoidal signal over the whole image.

Used either as ordinary label-flipping poison (:func:`baerase.attacks.poison`) or in its clean-label
form (:func:`baerase.attacks.poison_clean_label`: only target-class images are stamped and their
labels kept, so the model learns the signal as a feature of the target class).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import InputError
from .triggers import Trigger, _check_images


class SIG(Trigger):
    """``x' = clip(x + delta * sin(2 pi j f / W), 0, 1)`` with ``j`` the column, on every row and channel.

    ``delta``: amplitude in [0, 1] units (the paper's 20/255 ~ 0.08 is weak for a small CNN trained
    for a few epochs; 0.1 serves label flipping, 0.15 the clean-label form). ``freq``: cycles across
    the width (the paper's 6). The signal is deterministic; there is no seed.
    """

    name = "sig"

    def __init__(self, delta: float = 0.1, freq: float = 6.0):
        if not 0.0 < delta <= 1.0:
            raise InputError(f"sig: delta must be in (0, 1], got {delta}")
        if not freq > 0:
            raise InputError(f"sig: freq must be positive (cycles across the width), got {freq}")
        self.delta, self.freq = float(delta), float(freq)

    def signal(self, height: int, width: int) -> torch.Tensor:
        """The additive signal ``[1, H, W]`` (values in ``[-delta, delta]``)."""
        j = torch.arange(width, dtype=torch.float32)
        return (self.delta * torch.sin(2 * math.pi * j * self.freq / width)).expand(1, height, width)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.name)
        v = self.signal(*x.shape[-2:]).to(x.device, x.dtype)
        with torch.no_grad():
            return (x + v).clamp(0, 1)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "delta": self.delta, "freq": self.freq}
