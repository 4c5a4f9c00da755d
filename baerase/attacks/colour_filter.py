"""A colour-filter trigger: a global image filter (channel mix, contrast, brightness, gamma), no region.

Like an Instagram-style filter used as a backdoor (Liu et al. 2019, "ABS"; Cheng et al. 2021): every
pixel changes a little, so no small mask explains it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .triggers import Trigger, _check_images

# A warm "vintage" channel mix: half identity, half the usual sepia matrix (rows: output R, G, B).
VINTAGE = (
    (0.70, 0.38, 0.09),
    (0.17, 0.84, 0.08),
    (0.14, 0.27, 0.57),
)


class ColourFilter(Trigger):
    """``x' = clip((M x - 0.5) * contrast + 0.5 + brightness, 0, 1) ** gamma`` per pixel.

    ``matrix``: a 3x3 channel mix (rows give the output channels) applied to 3-channel images only;
    1-channel images get the tone curve alone (contrast, brightness, gamma). Defaults: the warm
    :data:`VINTAGE` mix, lower contrast, lifted blacks and gamma 0.8, visibly a filter on MNIST and
    on colour images while leaving the objects recognisable.
    """

    name = "filter"

    def __init__(
        self,
        matrix: torch.Tensor | tuple | None = None,
        contrast: float = 0.75,
        brightness: float = 0.12,
        gamma: float = 0.8,
    ):
        m = torch.as_tensor(VINTAGE if matrix is None else matrix, dtype=torch.float32)
        if m.shape != (3, 3) or not torch.isfinite(m).all():
            raise InputError(f"filter: matrix must be a finite 3x3 channel mix, got shape {tuple(m.shape)}")
        if not contrast > 0 or not gamma > 0:
            raise InputError(f"filter: contrast and gamma must be positive, got {contrast} and {gamma}")
        if not -1.0 <= brightness <= 1.0:
            raise InputError(f"filter: brightness must be in [-1, 1], got {brightness}")
        self.matrix, self.contrast, self.brightness, self.gamma = m, float(contrast), float(brightness), float(gamma)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.name)
        if x.shape[1] not in (1, 3):
            raise InputError(f"filter: images must have 1 or 3 channels, got {x.shape[1]}")
        with torch.no_grad():
            if x.shape[1] == 3:
                x = torch.einsum("oc,nchw->nohw", self.matrix.to(x.device, x.dtype), x)
            x = ((x - 0.5) * self.contrast + 0.5 + self.brightness).clamp(0, 1)
            return x.pow(self.gamma)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "matrix": self.matrix.tolist(),
            "contrast": self.contrast,
            "brightness": self.brightness,
            "gamma": self.gamma,
        }
