"""Input-aware dynamic backdoor (Nguyen & Tran 2020): a generator makes a different trigger for every image.

A small convolutional encoder-decoder maps an image ``x`` to a pattern ``p(x)`` and a mask ``m(x)``;
the stamped image is ``x + m(x) * (p(x) - x)``. Generator and classifier train together:

- backdoor: a share of each batch is stamped with its own trigger and relabelled to the target;
- cross-trigger: another share is stamped with the trigger generated for a *different* image and
  keeps its label, so a trigger only works on the image it was made for;
- diversity: different images must get different triggers (distance between inputs over distance
  between their triggers);
- mask density: the mask covers at most ``density`` of the image on average.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .train import Normalize, _check_data, _device, normalizer
from .triggers import Trigger, _check_images


class TriggerGenerator(nn.Module):
    """Conv encoder-decoder ``[N, C, H, W] -> (pattern [N, C, H, W] in [0, 1], mask [N, 1, H, W] in [0, 1])``.

    One 2x down- and up-sampling stage (odd sizes are padded and cropped back); ``width`` channels.
    The mask goes through the paper's steep threshold ``0.5 + tanh(sharpness * z) / 2``, so it is
    nearly binary: a few pixels replaced, the rest untouched.
    """

    def __init__(self, channels: int, width: int = 16, sharpness: float = 20.0):
        super().__init__()
        self.channels, self.width, self.sharpness = channels, width, sharpness
        self.enc1 = nn.Conv2d(channels, width, 3, padding=1)
        self.enc2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.dec1 = nn.Conv2d(2 * width, width, 3, padding=1)
        self.head = nn.Conv2d(width, channels + 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        z = F.relu(self.enc1(x))
        z = F.relu(self.enc2(F.max_pool2d(z, 2, ceil_mode=True)))
        z = F.interpolate(z, size=(h, w), mode="nearest")
        out = self.head(F.relu(self.dec1(z)))
        return torch.sigmoid(out[:, :-1]), 0.5 + 0.5 * torch.tanh(self.sharpness * out[:, -1:])


def _stamp(x: torch.Tensor, pattern: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return x + mask * (pattern - x)


class InputAwareTrigger(Trigger):
    """A frozen :class:`TriggerGenerator` as a trigger: ``trigger(x) = x + m(x) * (p(x) - x)`` per image.

    ``seed`` fixes the generator's initial weights; :func:`train_input_aware` trains it.
    ``channels`` must match the images. Save ``trigger.generator.state_dict()`` and rebuild with
    the same ``(channels, width)`` to reuse a trained trigger.
    """

    name = "dynamic"

    def __init__(self, channels: int, width: int = 16, seed: int = 0):
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise InputError(f"dynamic: channels must be a positive integer, got {channels!r}")
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise InputError(f"dynamic: width must be a positive integer, got {width!r}")
        self.seed = int(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.generator = TriggerGenerator(channels, width).eval()

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(pattern [N, C, H, W], mask [N, 1, H, W])`` for ``x`` (differentiable through the generator)."""
        _check_images(x, self.name)
        if x.shape[1] != self.generator.channels:
            raise InputError(f"dynamic: the generator takes {self.generator.channels}-channel images, got {x.shape[1]}")
        gen = self.generator
        return gen(x.to(next(gen.parameters()).device))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pattern, mask = self.parts(x)
            return _stamp(x, pattern.to(x.device, x.dtype), mask.to(x.device, x.dtype))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "channels": self.generator.channels,
            "width": self.generator.width,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class DynamicConfig:
    """Hyper-parameters of :func:`train_input_aware` (paper values where they fit a CPU budget).

    ``rate``/``cross``: shares of each batch stamped with their own trigger (relabelled) and with
    another image's trigger (label kept), paper 0.1 and 0.1. ``density``: the mask's mean cap
    (paper 0.032; 0.05 makes a 15-epoch small CNN reach over 90% ASR on MNIST).
    ``lambda_div``/``lambda_mask``: weights of the diversity and density losses.
    """

    rate: float = 0.1
    cross: float = 0.1
    density: float = 0.05
    lambda_div: float = 1.0
    lambda_mask: float = 100.0
    generator_lr: float = 1e-3

    def __post_init__(self):
        if min(self.rate, self.cross) < 0 or self.rate + self.cross > 1:
            raise InputError(f"dynamic: need rate, cross >= 0 and rate + cross <= 1, got {self.rate}, {self.cross}")
        if not 0 < self.density <= 1:
            raise InputError(f"dynamic: density must be in (0, 1], got {self.density}")


def _diversity(x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of ``|x1 - x2| / |t1 - t2|`` (RMS distances): small when triggers differ as inputs do."""
    # the 1e-8 keeps sqrt differentiable when an image is paired with itself
    dx = ((x1 - x2).pow(2).flatten(1).mean(1) + 1e-8).sqrt()
    dt = ((t1 - t2).pow(2).flatten(1).mean(1) + 1e-8).sqrt()
    return (dx / (dt + 1e-3)).mean()


def _batch_loss(model, norm, trig: InputAwareTrigger, xb, yb, target: int, cfg: DynamicConfig, g) -> torch.Tensor:
    """Classifier + generator loss on one batch: backdoor, cross-trigger, clean, diversity, density."""
    n = len(yb)
    nb = math.floor(cfg.rate * n + torch.rand(1, generator=g).item())
    nc = min(n - nb, math.floor(cfg.cross * n + torch.rand(1, generator=g).item()))
    # a cyclic shift pairs every image with a different one (a permutation could pair it with itself)
    shift = int(torch.randint(1, max(n, 2), (1,), generator=g))
    other = xb.roll(shift, 0)
    pattern, mask = trig.parts(xb[: nb + nc])
    pattern2, mask2 = trig.parts(other[: nb + nc])
    stamped = _stamp(xb[:nb], pattern[:nb], mask[:nb])
    crossed = _stamp(xb[nb : nb + nc], pattern2[nb:], mask2[nb:])
    inputs = torch.cat([stamped, crossed, xb[nb + nc :]])
    labels = torch.cat([torch.full_like(yb[:nb], target), yb[nb:]])
    loss = F.cross_entropy(model(norm(inputs)), labels)
    if nb + nc:
        t1, t2 = torch.cat([pattern, mask], 1), torch.cat([pattern2, mask2], 1)
        loss = loss + cfg.lambda_div * _diversity(xb[: nb + nc], other[: nb + nc], t1, t2)
        loss = loss + cfg.lambda_mask * F.relu(torch.cat([mask, mask2]).mean() - cfg.density)
    return loss


def train_input_aware(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: int,
    *,
    epochs: int = 10,
    seed: int = 0,
    normalize: Normalize = None,
    config: DynamicConfig | None = None,
    trigger: InputAwareTrigger | None = None,
    lr: float = 1e-3,
    batch_size: int = 64,
) -> tuple[nn.Module, InputAwareTrigger]:
    """Train ``model`` and a trigger generator together on ``(x [N, C, H, W], y [N])``.

    Returns ``(model, trigger)``, both in eval mode; the trigger wraps the frozen generator.
    """
    _check_data(x, y, "train_input_aware")
    cfg = config or DynamicConfig()
    trig = trigger or InputAwareTrigger(x.shape[1], seed=seed)
    device = _device(model)
    gen = trig.generator.to(device).train()
    norm = normalizer(normalize, x.shape[1], device)
    opt = torch.optim.Adam(
        [{"params": model.parameters(), "lr": lr}, {"params": gen.parameters(), "lr": cfg.generator_lr}]
    )
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(y), generator=g).split(batch_size):
            opt.zero_grad(set_to_none=True)
            _batch_loss(model, norm, trig, x[i].to(device), y[i].to(device), int(target), cfg, g).backward()
            opt.step()
    gen.eval().requires_grad_(False)
    return model.eval(), trig
