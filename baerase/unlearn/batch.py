"""The triggered batch builder: each step's clean images and their triggered copies.

Recovery finds the few pixels that suffice; a whole-image (blend) trigger works through the rest, and a
patch through its other pixels. So every other step moves the triggers and grows them by a pixel of random
black or white, a position-bound trigger is also grown in place in its own colour every fourth step, and
with ``universal_eps`` > 0 each target also gets a universal perturbation in that L-inf ball (any colour within
``patch_reach`` pixels of a position-bound trigger, where the rest of a fixed patch lies), which takes one
signed-gradient step toward its target per step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config, Unlearning
from ..ops.reference import normalize_images
from ..recover import TriggerSet, attack_success
from .guard import logits_of


@dataclass
class TriggeredBatch:
    """One step's inputs. ``triggered`` rows run over the recovered triggers, then (``parts`` 2) over
    the universal perturbations; within a part, target by target, image by image."""

    held: torch.Tensor  # indices into the fit split: the batch, then clean images of the targets
    images: torch.Tensor  # the fit images at ``held``, in [0, 1]
    labels: torch.Tensor  # their labels
    triggered: torch.Tensor  # normalised triggered inputs [parts * K * B, C, H, W]
    true_labels: torch.Tensor  # [parts * K * B]: the clean label of each triggered row
    targets: torch.Tensor  # [parts * K * B]: the class each triggered row is unlearned from
    parts: int
    size: int  # the batch's own images, the first of ``held``


def _toward_targets(
    universal: torch.Tensor, nll: torch.Tensor, valid: torch.Tensor, radius: torch.Tensor
) -> torch.Tensor:
    """One signed-gradient step of the universal perturbations [K, C, H, W] that lowers their
    targets' cross-entropy ``nll`` (on the rows ``valid`` marks), kept within ``radius`` [K, 1, H, W]."""
    (grad,) = torch.autograd.grad((nll * valid).sum(), universal, retain_graph=True)
    return torch.minimum(torch.maximum(universal - radius / 4 * grad.sign(), -radius), radius).detach()


def _clamped(x: torch.Tensor) -> torch.Tensor:
    """x clamped to [0, 1] with the gradient of x itself: a perturbation that a clamp pins at black or
    white (a black background) would get no gradient to leave it."""
    return x + (x.clamp(0, 1) - x).detach()


def _radius(triggers: TriggerSet, in_place: torch.Tensor, eps: float, shape, reach: int) -> torch.Tensor:
    """L-inf radius [K, 1, H, W] of each class's universal perturbation: ``eps``, and any colour within
    ``reach`` pixels of a position-bound trigger, where the rest of the attacker's fixed patch lies."""
    radius = torch.full((len(triggers), 1, *shape[-2:]), eps, device=triggers.targets.device)
    if triggers.family != "mask" or not in_place.any() or reach == 0:
        return radius
    mask = torch.sigmoid(triggers.mask_logits.detach())
    core = (mask >= 0.5 * mask.amax((1, 2, 3), keepdim=True)).float()
    near = F.max_pool2d(core, 2 * reach + 1, 1, reach) > 0
    return torch.where(near & in_place.view(-1, 1, 1, 1), torch.ones_like(radius), radius)


# Enough to tell a share of 0.01-0.04 (fixed patches) from 0.15-0.36 (random-position BadNets).
_POSITION_IMAGES = 128


@torch.no_grad()
def _position_bound(
    triggers: TriggerSet,
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    mean,
    std,
    moved_share: float = Unlearning.moved_share,
) -> torch.Tensor:
    """Classes [K] whose recovered trigger works only where recovery found it: moved by thirds of
    the image, it flips under ``moved_share`` as many images. Such a trigger is the attacker's
    fixed one or a part of it, so unlearning also grows it in place; a trigger the attacker places
    anywhere keeps working when moved, and grown in place it would only cost clean accuracy.
    Counted on the images the model gets right: an untargeted trigger gets no credit for its errors."""
    if triggers.family != "mask" or len(labels) < 2:
        return torch.zeros(len(triggers), dtype=torch.bool, device=triggers.targets.device)
    images, labels = images[:_POSITION_IMAGES], labels[:_POSITION_IMAGES]
    right = logits_of(model, images, mean, std).argmax(1) == labels
    if right.sum() >= 2:
        images, labels = images[right], labels[right]
    in_place = attack_success(triggers, model, images, labels, mean, std)
    h, w = images.shape[-2:]
    shifts = [(h * i // 3, w * j // 3) for i in range(3) for j in range(3) if i or j]
    moved = torch.stack([attack_success(triggers, model, images, labels, mean, std, shift=s) for s in shifts])
    return moved.mean(0) < moved_share * in_place


class TriggeredBatches:
    """Builds each step's :class:`TriggeredBatch` from the fit split and holds the universal perturbations."""

    def __init__(
        self,
        triggers: TriggerSet,
        model: nn.Module,
        fit: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        config: Config,
        mean=None,
        std=None,
    ) -> None:
        """model: the copy being repaired, whose recovered triggers are tested for position on ``val``."""
        settings = config.unlearning
        self.triggers, self.mean, self.std = triggers, mean, std
        self.x_fit, self.y_fit = fit
        self.batch_size = config.unlearning.unlearn_batch_size
        self.in_place = _position_bound(triggers, model, *val, mean, std, settings.moved_share)
        # Every trigger is a mask that keeps working when moved: a patch placed anywhere, not a blend.
        self.move_anywhere = triggers.family == "mask" and not bool(self.in_place.any())
        # The ascent lowers each target's logit on every input: its clean images in every batch hold it in place.
        self.target_pool = torch.nonzero(torch.isin(self.y_fit, triggers.targets.to(self.y_fit.device))).flatten()
        self.eps = config.unlearning.universal_eps
        self.radius = _radius(triggers, self.in_place, self.eps, self.x_fit.shape, settings.patch_reach)
        self.reached = bool((self.radius > self.eps).any())
        self.universal = torch.zeros(len(triggers), *self.x_fit.shape[1:], device=self.x_fit.device)
        self.parts = 2 if self.eps > 0 else 1  # the recovered triggers' rows, then the universal perturbations'

    def epoch(self, generator: torch.Generator) -> Iterator[torch.Tensor]:
        """The fit split in a fresh random order, as index batches of at least two images."""
        order = torch.randperm(len(self.y_fit), generator=generator).to(self.x_fit.device)
        yield from (batch for batch in order.split(self.batch_size) if len(batch) >= 2)

    def build(self, batch: torch.Tensor, step: int, generator: torch.Generator) -> TriggeredBatch:
        """The inputs of optimisation step ``step`` for the fit images at ``batch``."""
        x, y = self.x_fit[batch], self.y_fit[batch]
        triggered = self._stamped(x, step, generator)
        held = batch
        if len(self.target_pool):
            extra = torch.randint(len(self.target_pool), (max(1, len(batch) // 2),), generator=generator)
            held = torch.cat([batch, self.target_pool[extra.to(self.target_pool.device)]])
        if self.eps > 0:
            self.universal.requires_grad_(True)
            perturbed = _clamped(x.unsqueeze(0) + self.universal.unsqueeze(1)).flatten(0, 1)
            triggered = torch.cat([triggered, normalize_images(perturbed, self.mean, self.std)])
        k = len(self.triggers)
        return TriggeredBatch(
            held=held,
            images=self.x_fit[held],
            labels=self.y_fit[held],
            triggered=triggered,
            true_labels=y.repeat(k * self.parts),
            targets=self.triggers.targets.repeat_interleave(len(y)).repeat(self.parts),
            parts=self.parts,
            size=len(batch),
        )

    @torch.no_grad()
    def _stamped(self, x: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
        """Fresh recovered triggers on x [B, C, H, W], normalised [K * B, C, H, W]: every other step moved
        to a random place and grown by a pixel; every fourth, position-bound ones grown in place."""
        shift = None
        if step % 2 == 1:
            h, w = x.shape[-2:]
            shift = (int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator)))
        _, g = self.triggers.sample(len(x))
        stamped = self.triggers.stamp(x, g, self.mean, self.std, shift=shift, spread=int(shift is not None))
        if step % 4 == 2 and self.in_place.any():  # a fixed trigger, larger than the part recovered
            grown = self.triggers.stamp(x, g, self.mean, self.std, spread=1, paint=True)
            stamped = torch.where(self.in_place.view(-1, 1, 1, 1, 1), grown, stamped)
        return stamped.flatten(0, 1)

    def update_universal(self, nll: torch.Tensor, valid: torch.Tensor) -> None:
        """Step the universal perturbations toward their targets, from the triggered rows' target
        cross-entropy ``nll`` and ``valid`` mask (before the loss's backward: it reuses the graph)."""
        if self.eps > 0:
            half = len(nll) // 2
            self.universal = _toward_targets(self.universal, nll[half:], valid[half:], self.radius)
