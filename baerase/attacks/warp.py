"""WaNet (Nguyen & Tran 2021): a fixed, smooth, nearly invisible warp of the whole image as the trigger.

The warp is a random ``k x k`` field of displacements, upsampled bicubically to the image size and
applied with ``F.grid_sample``. Training poisons on the fly (:class:`WarpPoisoning`): a share of each
batch is warped and relabelled, and ``cross_ratio`` times as many get the warp plus random per-pixel
jitter and keep their labels (the paper's noise mode), so the model learns this one warp, not
"any warp".
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .train import Normalize, train_classifier
from .triggers import Trigger, _check_images


class WaNet(Trigger):
    """A fixed warping field ``grid = identity + strength * noise / size`` sampled with ``F.grid_sample``.

    ``k``: control-grid size (paper 4); ``strength``: the paper's ``s`` (0.5 on 32x32 images, about a
    quarter of a pixel on average; small CNNs trained for a few epochs need 1-2); ``seed`` fixes the
    field. The field is built per image size, so one trigger serves any resolution.
    """

    name = "wanet"

    def __init__(self, k: int = 4, strength: float = 0.5, seed: int = 0, grid_rescale: float = 1.0):
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise InputError(f"wanet: k must be an integer >= 2 (control-grid size), got {k!r}")
        if not strength > 0:
            raise InputError(f"wanet: strength must be positive, got {strength}")
        if not 0.0 < grid_rescale <= 1.0:
            raise InputError(f"wanet: grid_rescale must be in (0, 1], got {grid_rescale}")
        self.k, self.strength, self.seed, self.grid_rescale = k, float(strength), int(seed), float(grid_rescale)
        g = torch.Generator().manual_seed(self.seed)
        ins = torch.rand(1, 2, k, k, generator=g) * 2 - 1
        self.control = ins / ins.abs().mean()  # [1, 2, k, k]: x (width) and y (height) displacements

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The sampling grid ``[1, H, W, 2]`` in ``[-1, 1]`` (last axis: x then y, as ``grid_sample`` wants)."""
        noise = F.interpolate(self.control, size=(height, width), mode="bicubic", align_corners=True)
        noise = noise.permute(0, 2, 3, 1) / torch.tensor([width, height], dtype=noise.dtype)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        identity = torch.stack((xs, ys), -1)[None]
        return ((identity + self.strength * noise) * self.grid_rescale).clamp(-1, 1)

    def warp(self, x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """``x [N, C, H, W]`` resampled at ``grid [1 | N, H, W, 2]``."""
        grid = grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, grid, align_corners=True).clamp(0, 1)

    def noisy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The warp plus uniform per-pixel jitter of up to one grid step (the paper's noise mode)."""
        _check_images(x, self.name)
        n, _, height, width = x.shape
        jitter = (torch.rand(n, height, width, 2, generator=generator) * 2 - 1) / torch.tensor([width, height])
        with torch.no_grad():
            return self.warp(x, (self.grid(height, width) + jitter).clamp(-1, 1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.name)
        with torch.no_grad():
            return self.warp(x, self.grid(*x.shape[-2:]))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "k": self.k,
            "strength": self.strength,
            "seed": self.seed,
            "grid_rescale": self.grid_rescale,
        }


class WarpPoisoning:
    """Batch transform ``(xb, yb) -> (xb', yb')`` for ``train_classifier(batch_transform=...)``.

    In each batch, about ``rate`` of the images are warped and relabelled ``target`` and
    ``cross_ratio * rate`` get a randomly jittered warp and keep their labels. Counts are rounded
    stochastically (from ``seed``) so small batches keep the expected shares.
    """

    def __init__(self, trigger: WaNet, target: int, rate: float = 0.1, cross_ratio: float = 2.0, seed: int = 0):
        if not isinstance(trigger, WaNet):
            raise InputError(f"WarpPoisoning: trigger must be a WaNet, got {type(trigger).__name__}")
        if min(rate, cross_ratio) < 0 or rate * (1 + cross_ratio) > 1.0:
            raise InputError(
                f"WarpPoisoning: need rate >= 0, cross_ratio >= 0, rate * (1 + cross_ratio) <= 1; "
                f"got {rate}, {cross_ratio}"
            )
        self.trigger, self.target, self.rate, self.cross_ratio = trigger, int(target), float(rate), float(cross_ratio)
        self.generator = torch.Generator().manual_seed(seed)

    def _count(self, share: float, n: int) -> int:
        return min(n, math.floor(share * n + torch.rand(1, generator=self.generator).item()))

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(yb)
        nb = self._count(self.rate, n)
        nc = min(n - nb, self._count(self.rate * self.cross_ratio, n))
        xb, yb = xb.clone(), yb.clone()
        if nb:
            xb[:nb] = self.trigger(xb[:nb])
            yb[:nb] = self.target
        if nc:
            xb[nb : nb + nc] = self.trigger.noisy(xb[nb : nb + nc], self.generator)
        return xb, yb


def train_wanet(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: WaNet,
    target: int,
    rate: float = 0.1,
    epochs: int = 10,
    seed: int = 0,
    normalize: Normalize = None,
    *,
    cross_ratio: float = 2.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    progress: bool = False,
) -> nn.Module:
    """Train ``model`` on ``(x [N, C, H, W], y [N])`` with WaNet poisoning on the fly; returns it in eval mode."""
    poisoning = WarpPoisoning(trigger, target, rate, cross_ratio, seed)
    return train_classifier(
        model,
        x,
        y,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        normalize=normalize,
        progress=progress,
        batch_transform=poisoning,
    )
