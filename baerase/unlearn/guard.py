"""The guard: scores checkpoints on held-out data and keeps the best one within the allowed accuracy loss."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import Config
from ..cost import forward
from ..ops.reference import normalize_images
from ..recover import TriggerSet, attack_success

if TYPE_CHECKING:
    from .loop import StepBudget

_TOLERANCE = 1e-6  # accuracies are float32 shares of whole images; compare them with this slack


def allowed_drop(config: Config, val_size: int) -> float:
    """Validation-accuracy loss the guard tolerates: ``max_accuracy_drop``, but never less than one
    validation image, which a split of a few dozen images cannot resolve (the guard would then
    refuse every checkpoint). The share of clean images broken bounds the drop on top of it."""
    return max(config.unlearning.max_accuracy_drop, 1.0 / max(val_size, 1))


def logits_of(model: nn.Module, images: torch.Tensor, mean=None, std=None, batch_size: int = 256) -> torch.Tensor:
    """The model's logits [N, K] for images [N, C, H, W] in [0, 1], normalised with mean/std first."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        out.append(forward(model, normalize_images(x, mean, std)))
    return torch.cat(out)


@torch.no_grad()
def clean_accuracy(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean=None, std=None, batch_size: int = 256
) -> float:
    """Share of images [N, C, H, W] classified as their label (normalised with mean/std first)."""
    if len(labels) == 0:
        return 0.0
    return (logits_of(model, images, mean, std, batch_size).argmax(1) == labels).float().mean().item()


@torch.no_grad()
def _set_between(model: nn.Module, start: list[torch.Tensor], end: list[torch.Tensor], share: float) -> None:
    """Set the model's parameters to ``start + share * (end - start)``."""
    for p, a, b in zip(model.parameters(), start, end, strict=True):
        p.copy_(b if share == 1 else torch.lerp(a, b, share))


class Guard:
    """Scores ``model`` (the copy being repaired, in place) on held-out data every few steps and
    keeps the best checkpoint within the bounds: validation accuracy at least ``floor`` and at most
    ``max_accuracy_drop`` of the images the original got right broken. A checkpoint outside them
    gives way to the nearest point within them on its segment back to ``start`` (weights fine-tuned
    from one start connect linearly). Trigger success is judged on the validation images the model
    gets right."""

    def __init__(
        self,
        model: nn.Module,
        triggers: TriggerSet,
        fit: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        config: Config,
        mean: torch.Tensor | None,
        std: torch.Tensor | None,
        *,
        reference_logp: torch.Tensor,
        start: list[torch.Tensor],
        accuracy_floor: float | None = None,
    ) -> None:
        """reference_logp: the original model's log-probabilities on the fit, then the val images;
        start: the round's starting parameters; accuracy_floor: None for the first score's minus the
        allowed drop."""
        self.model, self.triggers, self.config = model, triggers, config
        self.settings = config.unlearning
        self.mean, self.std = mean, std
        self.x_val, self.y_val = val
        self.fit_size = len(fit[1])
        self.x_all, self.y_all = torch.cat([fit[0], val[0]]), torch.cat([fit[1], val[1]])
        self.right_before = reference_logp.argmax(1) == self.y_all  # the images no checkpoint may break
        self.start = start
        self.first = self.score(0)
        self.allowance = allowed_drop(config, len(self.y_val))
        self.floor = self.first["clean_accuracy"] - self.allowance if accuracy_floor is None else accuracy_floor
        self.best, self.best_state = self.first, copy.deepcopy(model.state_dict())
        self.erased_evals = 0

    @torch.no_grad()
    def score(self, step: int, triggers: bool = True) -> dict:
        """The model now: validation accuracy, share of the original's right answers broken and
        (``triggers``) the recovered triggers' success."""
        wrong_now = logits_of(self.model, self.x_all, self.mean, self.std).argmax(1) != self.y_all
        right_val = ~wrong_now[self.fit_size :]
        row = {
            "step": step,
            "clean_accuracy": right_val.float().mean().item(),
            "broken": (self.right_before & wrong_now).float().mean().item(),
        }
        return dict(row, trigger_asr=self._trigger_success(right_val)) if triggers else row

    def _trigger_success(self, right_val: torch.Tensor) -> float:
        # A clean image the model already sends to the target proves nothing about the trigger.
        judged = right_val if right_val.sum() >= 2 else torch.ones_like(right_val)
        success = attack_success(self.triggers, self.model, self.x_val[judged], self.y_val[judged], self.mean, self.std)
        return success.max().item()

    def within(self, row: dict, slack: float = 0.0) -> bool:
        """Inside the guard's bounds, widened by ``slack`` further allowed drops."""
        return (
            row["clean_accuracy"] >= self.floor - slack * self.allowance - _TOLERANCE
            and row["broken"] <= (1 + slack) * self.config.unlearning.max_accuracy_drop + _TOLERANCE
        )

    def share_within(self, step: int) -> tuple[dict, dict] | None:
        """The point nearest the checkpoint, on its segment back to ``start``, that is within the
        bounds (``settings.bisections`` halvings): (its score row, with ``share``, its state), or None.
        The model is left at the checkpoint."""
        end = [p.detach().clone() for p in self.model.parameters()]
        low, high, found = 0.0, 1.0, None
        for _ in range(self.settings.bisections):
            share = (low + high) / 2
            _set_between(self.model, self.start, end, share)
            row = dict(self.score(step, triggers=False), share=share)  # the triggers only matter at the point kept
            if self.within(row):
                low, found = share, row
            else:
                high = share
        if found is not None:
            _set_between(self.model, self.start, end, low)
            right_val = logits_of(self.model, self.x_val, self.mean, self.std).argmax(1) == self.y_val
            found = (dict(found, trigger_asr=self._trigger_success(right_val)), copy.deepcopy(self.model.state_dict()))
        _set_between(self.model, self.start, end, 1.0)
        return found

    def accept(self, row: dict) -> tuple[list[dict], bool]:
        """Judge the checkpoint scored in ``row``: keep it (or the point found part-way back) if it
        is the best so far, and count it if it is erased. Returns the history rows (``row``, then any
        point part-way back) and whether to back off: the checkpoint is far outside the bounds."""
        candidate, state = row, None  # state None: the checkpoint itself
        if not self.within(row) and (found := self.share_within(row["step"])) is not None:
            candidate, state = found
        allowed = self.within(candidate)
        erased = allowed and candidate["trigger_asr"] <= self.config.unlearning.asr_stop
        if erased and self.best["trigger_asr"] <= self.config.unlearning.asr_stop:
            # Among erased points prefer the one unlearned for longer (the margin: the real trigger lags
            # the recovered one): a later checkpoint, unless less of its update is kept.
            keep = _unlearned(candidate) >= _unlearned(self.best)
        else:
            keep = erased or (allowed and _stronger(candidate, self.best))
        if keep:
            self.best = candidate
            self.best_state = copy.deepcopy(self.model.state_dict()) if state is None else state
        self.erased_evals += erased
        # A few images outside is validation noise; far outside, the lr is too large. Half the step
        # or more within: it only overshoots, keep the lr (halving it left MNIST sine-blend at 1.6% ASR, not 0.2%).
        overshoots = candidate.get("share", 0.0) >= 0.5
        back_off = not overshoots and not self.within(row, self.settings.backtrack_slack)
        return [row] if candidate is row else [row, candidate], back_off

    def finished(self, step: int, budget: StepBudget) -> bool:
        """Erased for the margin and unlearned for the budget's least steps, or at its most."""
        return step >= budget.most or (self.erased_evals > self.settings.margin_evals and step >= budget.least)


def _unlearned(row: dict) -> float:
    """How far a scored point has unlearned: its step times the share of the update kept."""
    return row["step"] * row.get("share", 1.0)


def _stronger(row: dict, than: dict) -> bool:
    """Lower trigger success, then higher accuracy."""
    return (row["trigger_asr"], -row["clean_accuracy"]) < (than["trigger_asr"], -than["clean_accuracy"])
