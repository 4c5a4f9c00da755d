"""The warp trigger family: one smooth displacement field per candidate class.

A backdoor keyed to a geometric transformation (WaNet's fixed warp) has no small mask to find, but
it does have a small warp: the target class is reached by moving pixels a fraction of a pixel,
where every clean class needs several. The field is ``grid x grid`` control points, bicubically
upsampled to the image and applied with ``grid_sample``; its mass is the mean displacement in
pixels, the statistic detection compares across classes as it compares mask masses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import rng
from ..ops.reference import normalize_images
from .triggers import Stacked

# Unlearning scales a recovered warp by up to this factor: recovery finds the smallest warp that works,
# which can be a quarter of the attacker's.
_MAX_GROWTH = 8.0
# Unlearning turns this share of the grown warps in a random direction: a warp backdoor also answers smooth
# warps pointing elsewhere, and the one recovered can be nearly orthogonal to the attacker's.
_TURNED_SHARE = 0.5


class WarpSet(Stacked):
    """One warp per candidate class, stacked along dim 0. Displacements are ``max_shift * tanh``
    of learned control points, in pixels. A warp is deterministic: a backdoor trained against
    WaNet's noise mode answers only its own warp, so a jittered copy of a sub-pixel warp proves nothing."""

    def __init__(
        self,
        targets: list[int],
        image_shape: tuple[int, int, int],
        *,
        family: str = "warp",
        grid: int = 4,
        max_shift: float = 3.0,
    ) -> None:
        super().__init__(
            targets, {"image_shape": list(image_shape), "family": family, "grid": grid, "max_shift": max_shift}
        )
        self.flow_logits = nn.Parameter(torch.zeros(len(targets), 2, grid, grid))
        # Whether a warp within max_shift ever worked: one that never did is at least that large.
        self.register_buffer("found", torch.ones(len(targets), dtype=torch.bool))

    def control_points(self) -> torch.Tensor:
        """Displacements at the control points, in pixels [K, 2, grid, grid] (x then y)."""
        return self.meta["max_shift"] * torch.tanh(self.flow_logits)

    def sample(self, n: int, noise_std: float = 0.0) -> tuple[None, torch.Tensor]:
        """n copies of each class's warp, as the mask family's samples: (None, control points
        [K, n, 2, grid, grid]). ``noise_std`` is the mask family's pattern noise; a warp has none."""
        return None, self.control_points().unsqueeze(1).expand(-1, n, -1, -1, -1)

    def stamp(self, x: torch.Tensor, g: torch.Tensor, mean=None, std=None, spread: int = 0, **_) -> torch.Tensor:
        """Warp x [B, C, H, W] by each class's control points g [K, B, 2, grid, grid] -> normalised
        [K, B, C, H, W]. A warp has no position (the mask family's ``shift`` does not apply); with
        ``spread`` the warps are spread (``_spread``) over those unlearning must also cover."""
        k, b = g.shape[:2]
        if spread:
            g = _spread(g)
        h, w = x.shape[-2:]
        field = F.interpolate(g.flatten(0, 1), size=(h, w), mode="bicubic", align_corners=True)
        scale = torch.tensor([2 / max(w - 1, 1), 2 / max(h - 1, 1)], device=x.device).view(1, 2, 1, 1)
        sample_at = _identity(h, w, x.device) + (field * scale).permute(0, 2, 3, 1)
        warped = F.grid_sample(
            x.repeat(k, 1, 1, 1), sample_at, mode="bilinear", padding_mode="border", align_corners=True
        )
        return normalize_images(warped, mean, std).view(k, b, *x.shape[1:])

    def displacement(self) -> torch.Tensor:
        """How far each pixel moves, per class [K, H, W], in pixels."""
        h, w = self.meta["image_shape"][1:]
        return F.interpolate(self.control_points(), size=(h, w), mode="bicubic", align_corners=True).norm(dim=1)

    def size(self) -> torch.Tensor:
        """Mean displacement per class [K], in pixels, differentiable."""
        return self.displacement().mean((1, 2))

    def norms(self) -> torch.Tensor:
        """Mean displacement per class [K], in pixels; ``max_shift`` for a class no warp reached."""
        limit = torch.full_like(self.found, self.meta["max_shift"], dtype=torch.float32)
        return torch.where(self.found, self.size(), limit)


def lift(warps: WarpSet, own: torch.Tensor, success_of, draws: int = 4) -> torch.Tensor:
    """How much more often each class's warp reaches its class (``own`` [K], its held-out success, as
    recovery scored it) than random smooth warps of the same mean displacement do [K]: a class that any
    small warp reaches (a blurred or bent digit) has no backdoor. ``success_of(warps) -> [K]`` scores a
    WarpSet on the same held-out images."""
    chance = torch.zeros_like(own)
    for _ in range(draws):
        chance += success_of(_random_like(warps)) / draws
    return own - chance


def pull(warps: WarpSet, predict, images, labels, num_classes: int, mean=None, std=None, draws: int = 16):
    """How often random smooth warps of each class's mean displacement send images of other classes to
    each class [K, num_classes]: a warp backdoor's target draws them (the model answers smooth warps in many
    directions), a clean class no more than its neighbours. ``predict(normalised [N, C, H, W]) -> logits``;
    images [N, C, H, W] in [0, 1], labels [N]."""
    classes = torch.arange(num_classes, device=labels.device)
    others = (labels.unsqueeze(1) != classes).float()  # [N, num_classes]
    share = torch.zeros(len(warps), num_classes, device=labels.device)
    for _ in range(draws):
        random = _random_like(warps)
        stamped = random.stamp(images, random.sample(len(labels))[1], mean, std)
        sent = F.one_hot(predict(stamped.flatten(0, 1)).argmax(1), num_classes).view(len(warps), len(labels), -1)
        share += (sent * others).sum(1) / others.sum(0).clamp(min=1) / draws
    return share


def _random_like(warps: WarpSet) -> WarpSet:
    """Random smooth warps with each class's mean displacement."""
    device, limit = warps.targets.device, warps.meta["max_shift"]
    points = torch.randn(warps.flow_logits.shape, device=device, generator=rng.generator(device))
    random = WarpSet._like(warps.targets.tolist(), warps.meta).to(device)
    with torch.no_grad():
        random.flow_logits.copy_(torch.atanh((points / points.abs().amax()).clamp(-0.999, 0.999)))
        for _ in range(3):  # tanh bends the scale a little: a few rescalings settle it
            ratio = (warps.norms() / random.displacement().mean((1, 2)).clamp(min=1e-6)).view(-1, 1, 1, 1)
            scaled = (random.control_points() * ratio / limit).clamp(-0.999, 0.999)
            random.flow_logits.copy_(torch.atanh(scaled))
    return random


def new_warps(targets: list[int], images: torch.Tensor, config, device: torch.device) -> WarpSet:
    r = config.recovery
    return WarpSet(targets, tuple(images.shape[1:]), grid=r.warp_grid, max_shift=r.warp_max_shift).to(device)


def _spread(g: torch.Tensor) -> torch.Tensor:
    """Control points g [K, B, 2, grid, grid], each sample's warp scaled by a random factor in [1, 8),
    log-uniform, and ``_TURNED_SHARE`` of them turned in a random direction of the same size: recovery finds
    the smallest warp that works, and the attacker's larger one can point elsewhere."""
    gen, shape = rng.generator(g.device), (*g.shape[:2], 1, 1, 1)
    g = g * _MAX_GROWTH ** torch.rand(shape, device=g.device, generator=gen)
    turned = torch.rand(shape, device=g.device, generator=gen) < _TURNED_SHARE
    direction = torch.randn(g.shape, device=g.device, generator=gen)
    size = torch.linalg.vector_norm(g, dim=(2, 3, 4), keepdim=True)
    return torch.where(turned, direction * size / torch.linalg.vector_norm(direction, dim=(2, 3, 4), keepdim=True), g)


def _identity(h: int, w: int, device: torch.device) -> torch.Tensor:
    """``grid_sample``'s identity sampling grid [1, H, W, 2] (x, y in [-1, 1])."""
    ys, xs = torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((grid_x, grid_y), -1).unsqueeze(0)
