"""The unlearning loss, returned as its named terms (see the package docstring for the formula)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import Config, Unlearning
from ..cost import forward
from ..ops.reference import normalize_images
from ..recover import UNTARGETED
from .batch import TriggeredBatch

# A finite log(0): the KL's 0 * (log 0 - x) must be 0, not NaN.
_LOG_ZERO = -100.0


def _mixed_copies(
    x: torch.Tensor, generator: torch.Generator, shift_share: float = Unlearning.copy_shift
) -> torch.Tensor:
    """Each image of x [N, C, H, W] mixed with another at a random share, the batch then moved
    (cyclically) by up to ``shift_share`` of each side: inputs near the clean data, not on it."""
    partner = torch.randperm(len(x), generator=generator).to(x.device)
    share = torch.rand(len(x), 1, 1, 1, generator=generator).to(x.device)
    shift = [
        int(torch.randint(-int(n * shift_share), int(n * shift_share) + 1, (1,), generator=generator))
        for n in x.shape[-2:]
    ]
    return (share * x + (1 - share) * x[partner]).roll(shift, (-2, -1))


def _kl(logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    return F.kl_div(logp, reference_logp, log_target=True, reduction="batchmean")


def without_classes(logp: torch.Tensor, classes: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probabilities [N, K] with the share of ``classes`` removed on the ``rows`` [N] marked (None: all)."""
    if not len(classes):
        return logp
    cleared = logp.index_fill(1, classes, -math.inf).log_softmax(1).clamp(min=_LOG_ZERO)
    return cleared if rows is None else torch.where(rows.unsqueeze(1), cleared, logp)


def _copy_anchor(
    model: nn.Module,
    reference: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    generator: torch.Generator,
    mean,
    std,
    shift_share: float = Unlearning.copy_shift,
) -> torch.Tensor:
    """KL(reference || model) on mixed copies of clean ``images`` of classes other than the ``targets``,
    without the targets' share: the original's pull toward a target there is the backdoor, not the
    clean function (near a target's own images the two overlap, so no copy is made of them)."""
    copies = normalize_images(_mixed_copies(images, generator, shift_share), mean, std)
    with torch.no_grad():
        reference_logp = without_classes(F.log_softmax(forward(reference, copies), 1), targets)
    return _kl(F.log_softmax(forward(model, copies), 1), reference_logp)


@dataclass
class LossTerms:
    """The loss of one step and its parts (unweighted; ``total`` weighs them)."""

    clean: torch.Tensor  # CE + KL to the original on the clean images held
    copy_anchor: torch.Tensor | None  # KL to the original on mixed copies (None: none made this step)
    ascent: torch.Tensor  # target CE of the triggered rows, clipped at the cap (subtracted)
    relabel: torch.Tensor  # CE of the triggered rows toward their true labels
    drift: torch.Tensor  # ||theta - theta_0||_1
    total: torch.Tensor
    target_nll: torch.Tensor = field(repr=False)  # per triggered row: what the universal perturbations lower
    valid: torch.Tensor = field(repr=False)  # per triggered row: 1 where its true label is not the target

    def floats(self) -> dict[str, float | None]:
        """The terms' values for a history row (``loss_<term>``; None for a non-finite value)."""
        terms = {
            "clean": self.clean,
            "copy_anchor": self.copy_anchor,
            "ascent": self.ascent,
            "relabel": self.relabel,
            "drift": self.drift,
            "total": self.total,
        }
        values = {name: 0.0 if t is None else float(t.detach()) for name, t in terms.items()}
        return {f"loss_{name}": v if math.isfinite(v) else None for name, v in values.items()}


class UnlearnLoss:
    """The loss of a step, given the model and a :class:`TriggeredBatch`.

    fit_logp: the original's log-probabilities on the fit split; anchor: the starting parameters;
    copies_from: the original model, to anchor mixed copies of the clean images too, or None;
    away_from_targets: copies only of the batch's images of other classes, without the targets' share.
    """

    def __init__(
        self,
        config: Config,
        fit_logp: torch.Tensor,
        anchor: list[torch.Tensor],
        num_classes: int | None,
        copies_from: nn.Module | None = None,
        mean=None,
        std=None,
        away_from_targets: bool = True,
    ) -> None:
        self.config, self.fit_logp, self.anchor = config, fit_logp, anchor
        self.copies_from, self.mean, self.std = copies_from, mean, std
        self.away_from_targets = away_from_targets
        self.settings = config.unlearning
        # Once the target's probability on triggered inputs is below 1 / (2K) the ascent stops pushing:
        # the unbounded ascent that wrecks clean accuracy at the paper's settings cannot happen.
        self.cap = math.log(2 * (num_classes or 2))

    def _copied(self, batch: TriggeredBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the images to copy, the classes whose share their answers lose)."""
        if not self.away_from_targets:
            return batch.images, batch.targets[:0]  # a scarce set: copies of every image, as they are
        cleared = batch.targets[batch.targets >= 0].unique()  # an untargeted trigger has no class of its own
        return batch.images[: batch.size][~torch.isin(batch.labels[: batch.size], cleared)], cleared

    def __call__(self, model: nn.Module, batch: TriggeredBatch, generator: torch.Generator) -> LossTerms:
        cfg, held = self.config, len(batch.held)
        logits = forward(model, torch.cat([normalize_images(batch.images, self.mean, self.std), batch.triggered]))
        clean_logp = F.log_softmax(logits[:held], 1)
        clean = F.nll_loss(clean_logp, batch.labels) + _kl(clean_logp, self.fit_logp[batch.held])
        clean_part, copy_anchor = clean, None
        if self.copies_from is not None:
            images, cleared = self._copied(batch)
            if len(images) >= 2:
                copy_anchor = _copy_anchor(
                    model, self.copies_from, images, cleared, generator, self.mean, self.std, self.settings.copy_shift
                )
                clean_part = clean + self.settings.copy_weight * copy_anchor
        triggered_logits = logits[held:]
        untargeted = batch.targets == UNTARGETED
        _, nll = ops.trigger_loss(triggered_logits, torch.where(untargeted, batch.true_labels, batch.targets), 1.0)
        # An untargeted row has no target to push away from: relabelling alone unlearns it.
        valid = ((batch.true_labels != batch.targets) & ~untargeted).float()
        # Each part is its own mean: the perturbations add to the triggers' unlearning, not dilute it.
        ascent = (
            (nll.clamp(max=self.cap) * valid).view(batch.parts, -1).sum(1)
            / valid.view(batch.parts, -1).sum(1).clamp(min=1)
        ).sum()
        relabel = F.cross_entropy(triggered_logits, batch.true_labels, reduction="none").view(batch.parts, -1)
        relabel = relabel.mean(1).sum()
        drift = sum((p - a).abs().sum() for p, a in zip(model.parameters(), self.anchor, strict=True))
        total = (
            cfg.unlearning.alpha_u * clean_part
            - cfg.unlearning.ascent_weight * ascent
            + cfg.unlearning.relabel_weight * relabel
            + cfg.unlearning.weight_l1 * drift
        )
        return LossTerms(
            clean=clean,
            copy_anchor=copy_anchor,
            ascent=ascent,
            relabel=relabel,
            drift=drift,
            total=total,
            target_nll=nll,
            valid=valid,
        )
