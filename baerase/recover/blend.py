"""The blend trigger family: one whole-image blend toward a grey level per candidate class.

A filter backdoor (lifted blacks and a lower contrast: the colour-filter attack on greyscale images)
changes every pixel a little, so no small mask or warp explains it, but a uniform blend
``x' = (1 - s) x + s v`` toward a grey level v reproduces it with a small strength s. Its size is the
attenuation ``-ln(1 - s)``, the contrast it removes on a log scale: a clean class is reached only
once most of the image is gone. The level is grey, not a colour: where classes differ by colour, a
tint toward a class's colour is content, not a filter. A greyish class is reached by greying images,
as a filter's target is: on colour images a blend must also not make images look like its class in
colour (``natural_share``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import rng
from ..ops.reference import normalize_images
from .triggers import Stacked

# Recovery starts every class at this strength: the adaptive cost only shrinks a blend once it works.
_START = 0.1
# Unlearning multiplies a recovered blend's attenuation by up to this factor: recovery finds the
# weakest blend that works, the attacker's filter can be stronger.
_MAX_GROWTH = 2.0
# Unlearning also mixes the colour channels of this share of the blended colour images: a colour filter is a
# channel mix as well as a blend, and recovery finds only the blend toward grey.
_TINTED_SHARE = 0.5


class BlendSet(Stacked):
    """One blend per candidate class, stacked along dim 0: strength ``max_strength * sigmoid`` and grey
    level ``sigmoid`` of learned logits. A blend is deterministic, as a filter is."""

    def __init__(
        self,
        targets: list[int],
        image_shape: tuple[int, int, int],
        *,
        family: str = "blend",
        max_strength: float = 0.95,
    ) -> None:
        super().__init__(targets, {"image_shape": list(image_shape), "family": family, "max_strength": max_strength})
        k = len(targets)
        self.strength_logits = nn.Parameter(torch.full((k,), math.log(_START / (max_strength - _START))))
        self.level_logits = nn.Parameter(torch.zeros(k))
        # Whether a blend up to max_strength ever worked: one that never did is at least that strong.
        self.register_buffer("found", torch.ones(k, dtype=torch.bool))

    def strength(self) -> torch.Tensor:
        """Blend strength per class [K], in [0, max_strength)."""
        return self.meta["max_strength"] * torch.sigmoid(self.strength_logits)

    def sample(self, n: int, noise_std: float = 0.0) -> tuple[None, torch.Tensor]:
        """n copies of each class's blend, as the mask family's samples: (None, [K, n, 2] holding the
        strength and the grey level). ``noise_std`` is the mask family's pattern noise; a blend has none."""
        blend = torch.stack([self.strength(), torch.sigmoid(self.level_logits)], 1)
        return None, blend.unsqueeze(1).expand(-1, n, -1)

    def stamp(self, x: torch.Tensor, g: torch.Tensor, mean=None, std=None, spread: int = 0, **_) -> torch.Tensor:
        """Blend x [B, C, H, W] by each class's (strength, level) g [K, B, 2] -> normalised
        [K, B, C, H, W]. With ``spread`` each sample's attenuation is multiplied by a random factor in
        [1, 2), and ``_TINTED_SHARE`` of colour samples get a random channel mix (``_tinted``): unlearning
        must also cover the attacker's stronger, coloured filter."""
        k, b = g.shape[:2]
        strength, level = g[..., 0].view(k, b, 1, 1, 1), g[..., 1].view(k, b, 1, 1, 1)
        x = x.unsqueeze(0).expand(k, -1, -1, -1, -1)
        if spread:
            gen = rng.generator(g.device)
            strength = 1 - (1 - strength) ** (_MAX_GROWTH ** torch.rand(k, b, 1, 1, 1, device=g.device, generator=gen))
            if x.shape[2] == 3:
                x = _tinted(x, strength, gen)
        blended = (1 - strength) * x + strength * level
        return normalize_images(blended.flatten(0, 1), mean, std).view(blended.shape)

    def size(self) -> torch.Tensor:
        """Attenuation per class [K]: ``-ln(1 - strength)``, differentiable."""
        return -torch.log1p(-self.strength())

    def norms(self) -> torch.Tensor:
        """Attenuation per class [K]; that of ``max_strength`` for a class no blend reached."""
        limit = torch.full_like(self.found, -math.log1p(-self.meta["max_strength"]), dtype=torch.float32)
        return torch.where(self.found, self.size(), limit)


def _tinted(x: torch.Tensor, strength: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x [K, B, 3, H, W] with ``_TINTED_SHARE`` of its samples' channels mixed: each output channel moves
    ``strength`` [K, B, 1, 1, 1] of the way to a random convex mix of the three."""
    k, b = x.shape[:2]
    weights = -torch.rand(k, b, 3, 3, device=x.device, generator=generator).log()  # Dirichlet(1, 1, 1) rows
    mix = torch.lerp(torch.eye(3, device=x.device), weights / weights.sum(-1, keepdim=True), strength.view(k, b, 1, 1))
    tinted = torch.rand(k, b, 1, 1, 1, device=x.device, generator=generator) < _TINTED_SHARE
    return torch.where(tinted, torch.einsum("kboc,kbchw->kbohw", mix, x), x)


@torch.no_grad()
def natural_share(
    blends: BlendSet, fit: tuple[torch.Tensor, torch.Tensor], held_out: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Per blend [k], the share of the held-out images (images in [0, 1], labels) of other classes whose
    blended mean colour lies nearest its class's mean colour among the ``fit`` images' classes: how
    often the blend makes an image look like its class by colour alone."""
    (x_fit, y_fit), (x, y) = fit, held_out
    classes = torch.unique(y_fit)
    centres = torch.stack([x_fit[y_fit == c].mean((0, 2, 3)) for c in classes])  # [classes, C]
    _, g = blends.sample(len(y))
    colours = blends.stamp(x, g.to(x.device)).mean((3, 4))  # [k, N, C]
    nearest = classes[torch.cdist(colours, centres.expand(len(blends), -1, -1)).argmin(2)]
    targets = blends.targets.view(-1, 1).to(y.device)
    other = y.view(1, -1) != targets
    return ((nearest == targets) & other).sum(1) / other.sum(1).clamp(min=1)


def unblended(blends: BlendSet) -> BlendSet:
    """``blends`` at strength 0: the clean images themselves, scored as the blends are."""
    none = blends.select(list(range(len(blends))))
    with torch.no_grad():
        none.strength_logits.fill_(-math.inf)
    return none


def new_blends(targets: list[int], images: torch.Tensor, config, device: torch.device) -> BlendSet:
    return BlendSet(targets, tuple(images.shape[1:]), max_strength=config.recovery.blend_max_strength).to(device)
