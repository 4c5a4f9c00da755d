"""Recovered trigger distributions for a set of candidate target classes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops, rng
from .generator import StatisticsNetwork, TriggerGenerator

# The target of an untargeted trigger: it sends each image to any class but its own (an all-to-all backdoor).
UNTARGETED = -1


def reached(pred: torch.Tensor, aim: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether triggered images' predictions ``pred`` are what their triggers aim at (broadcast with
    ``aim`` and the clean ``labels``): the target, or for ``UNTARGETED`` any class but the image's own."""
    return torch.where(aim == UNTARGETED, pred != labels, pred == aim)


class Stacked(nn.Module):
    """A trigger family's per-class state, stacked along dim 0 of every tensor: what selecting,
    stacking and rebuilding from a saved (meta, state_dict) need, for every family."""

    meta: dict
    targets: torch.Tensor

    def __init__(self, targets: list[int], meta: dict) -> None:
        """meta: what rebuilds the set (``image_shape``, ``family`` and the family's own settings)."""
        super().__init__()
        self.meta = meta
        self.register_buffer("targets", torch.as_tensor(list(targets), dtype=torch.long))

    @property
    def family(self) -> str:
        return self.meta["family"]

    def __len__(self) -> int:
        return len(self.targets)

    @classmethod
    def _like(cls, targets: list[int], meta: dict):
        return cls(targets, tuple(meta["image_shape"]), **_kwargs(meta))

    def select(self, index: list[int] | torch.Tensor):
        """A new set of this family holding only the classes at positions ``index``."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.targets.device)
        picked = self._like(self.targets[index].tolist(), self.meta)
        picked.load_state_dict({k: v[index].clone() for k, v in self.state_dict().items()})
        return picked.to(self.targets.device)

    @classmethod
    def concat(cls, parts: list):
        """Stack several sets of this family (same shapes) into one."""
        first = parts[0]
        joined = cls._like([t for part in parts for t in part.targets.tolist()], first.meta)
        states = [part.state_dict() for part in parts]
        joined.load_state_dict({k: torch.cat([s[k] for s in states]) for k in states[0]})
        return joined.to(first.targets.device)

    @classmethod
    def from_state(cls, meta: dict, state: dict[str, torch.Tensor]):
        """Rebuild a set saved as (meta, state_dict)."""
        rebuilt = cls._like(state["targets"].tolist(), meta)
        rebuilt.load_state_dict(state)
        return rebuilt


class TriggerSet(Stacked):
    """One trigger distribution per candidate target class, stacked along dim 0.

    ``mask`` family: x' = x + m * (p - x) with a learned mask m [1, H, W] per class and patterns p
    drawn from the class's generator around a learned mean pattern. ``patch`` family (the paper's):
    a generated h x w patch pasted at a random position of each image.
    """

    def __init__(
        self,
        targets: list[int],
        image_shape: tuple[int, int, int],
        *,
        family: str = "mask",
        patch_size: int = 3,
        latent_dim: int = 64,
        hidden: int = 256,
        mine_hidden: int = 128,
        mask_init: float = 0.5,
    ) -> None:
        meta = {
            "image_shape": list(image_shape),
            "family": family,
            "patch_size": patch_size,
            "latent_dim": latent_dim,
            "hidden": hidden,
            "mine_hidden": mine_hidden,
        }
        super().__init__(targets, meta)
        channels, height, width = image_shape
        k = len(targets)
        out = channels * height * width if family == "mask" else channels * patch_size * patch_size
        self.generator = TriggerGenerator(k, latent_dim, hidden, out)
        self.stats = StatisticsNetwork(k, latent_dim, out, mine_hidden)
        self.register_buffer("moving_avg", torch.full((k,), float("nan")))
        if family == "mask":
            # Start from a faint mask over the whole image: it grows where a class needs it until the
            # trigger works, then the mass penalty shrinks it to what the class really needs.
            self.mask_logits = nn.Parameter(torch.full((k, 1, height, width), math.log(mask_init / (1 - mask_init))))
            # The mean pattern's logits, learned at their own rate: through the generator alone a fixed
            # coloured patch is learned so slowly that its mask stays spread over the image.
            self.pattern_logits = nn.Parameter(torch.zeros(k, out))

    @classmethod
    def from_state(cls, meta: dict, state: dict[str, torch.Tensor]):
        if meta.get("family") == "mask" and "pattern_logits" not in state:  # saved before the mean pattern: it was 0
            state = {**state, "pattern_logits": torch.zeros(len(state["targets"]), math.prod(meta["image_shape"]))}
        return super().from_state(meta, state)

    def sample(self, n: int, noise_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n latent codes per class and their triggers: (z [K, n, latent], g [K, n, D])."""
        device = self.targets.device
        z = torch.rand(len(self), n, self.meta["latent_dim"], device=device, generator=rng.generator(device))
        g = self.generator(z, self.pattern_logits if self.family == "mask" else None)
        if noise_std > 0:
            noise = torch.randn(g.shape, device=device, dtype=g.dtype, generator=rng.generator(device))
            g = (g + noise_std * noise).clamp(0, 1)
        return z, g

    def stamp(
        self,
        x: torch.Tensor,
        g: torch.Tensor,
        mean=None,
        std=None,
        shift: tuple[int, int] | None = None,
        spread: int = 0,
        paint: bool = False,
    ) -> torch.Tensor:
        """Apply each class's triggers g [K, B, D] to x [B, C, H, W] -> normalised [K, B, C, H, W].

        ``shift`` (rows, cols) moves a mask-family trigger cyclically and ``spread`` grows its
        mask by that many pixels on each side, so that unlearning also covers a trigger the
        attacker may place anywhere, of which recovery found only the few pixels that suffice.
        The grown pixels' colours are unknown: each sample draws black or white per pixel and
        channel, which covers the rest of an attacker's pattern (a 3x3 "x" of which recovery found
        a diagonal pair), or with ``paint`` they take the trigger's own colour (a solid patch grows
        into a larger solid patch).
        """
        k, b = g.shape[:2]
        c, h, w = x.shape[1:]
        if self.family == "mask":
            mask, pattern = self.mask_logits, g.view(k, b, c, h, w)
            if shift is not None:
                mask, pattern = mask.roll(shift, (-2, -1)), pattern.roll(shift, (-2, -1))
            if spread:
                mask, pattern = _grow(mask, pattern, spread, paint)
            return ops.trigger_apply(x, mask, pattern, mean, std)
        p = self.meta["patch_size"]
        rows = torch.randint(0, h - p + 1, (k, b), device=x.device, generator=rng.generator(x.device))
        cols = torch.randint(0, w - p + 1, (k, b), device=x.device, generator=rng.generator(x.device))
        return ops.patch_apply(x, g.view(k, b, c, p, p), rows, cols, mean, std)

    def norms(self) -> torch.Tensor:
        """Trigger mass per class [K]: L1 norm of the mask, or the patch area."""
        if self.family == "mask":
            return torch.sigmoid(self.mask_logits).sum((1, 2, 3))
        p = self.meta["patch_size"]
        return torch.full((len(self),), float(p * p), device=self.targets.device)


def _grow(
    mask_logits: torch.Tensor, pattern: torch.Tensor, spread: int, paint: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow masks [K, 1|C, H, W] by ``spread`` pixels on each side. The new pixels of patterns
    [K, B, C, H, W] take the mask-weighted mean colour of the trigger around them (``paint``) or a
    random black or white (the untrained pattern under an empty mask is a dim grey that covers
    no attacker's pixels)."""
    mask = torch.sigmoid(mask_logits)
    size = 2 * spread + 1
    grown = torch.logit(F.max_pool2d(mask, size, 1, spread).clamp(1e-6, 1 - 1e-6))
    weight = mask.unsqueeze(1)
    if paint:
        flat, flat_weight = pattern.flatten(0, 1), weight.expand(-1, pattern.shape[1], -1, -1, -1).flatten(0, 1)
        near = (
            F.avg_pool2d(flat_weight * flat, size, 1, spread)
            / F.avg_pool2d(flat_weight, size, 1, spread).clamp(min=1e-6)
        ).view_as(pattern)
    else:
        device = pattern.device
        near = torch.rand(pattern.shape, device=device, dtype=pattern.dtype, generator=rng.generator(device)).round()
    return grown, weight * pattern + (1 - weight) * near


def _kwargs(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "image_shape"}
