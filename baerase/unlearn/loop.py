"""The unlearning loop: triggered batches, the loss's step, the guard's evaluations."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .. import cost
from ..config import Config, Unlearning
from ..recover import TriggerSet
from .batch import TriggeredBatches
from .guard import Guard, logits_of
from .loss import UnlearnLoss, without_classes


@dataclass
class UnlearnOutcome:
    """The guarded model and the record of how it got there."""

    model: nn.Module
    history: list[dict] = field(default_factory=list)  # one row per guard evaluation
    accuracy_before: float = 0.0
    accuracy_after: float = 0.0
    trigger_asr_before: float = 0.0
    trigger_asr_after: float = 0.0
    steps: int = 0
    rolled_back: int = 0  # steps undone because they produced NaN/inf
    kept_step: int = 0  # the step of the checkpoint returned; 0: no step within the guard beat the start
    reached: bool = False  # a universal perturbation took any colour near a position-bound trigger (patch_reach)


@contextmanager
def _fixed(triggers: nn.Module) -> Iterator[None]:
    """No gradients into the triggers' parameters for the duration; the caller's flags are restored."""
    flags = [p.requires_grad for p in triggers.parameters()]
    for p in triggers.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(triggers.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def _trainable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with gradients on, in eval mode: BatchNorm statistics must not drift toward
    triggered inputs."""
    repaired = copy.deepcopy(model)
    repaired.eval()
    for p in repaired.parameters():
        p.requires_grad_(True)
    return repaired


@torch.no_grad()
def _answers(reference: nn.Module, fit: tuple, val: tuple, mean, std) -> torch.Tensor:
    """The original's log-probabilities on the fit, then the val images: soft targets that hold the clean
    function (a few hundred labels alone overfit), and the images it got right, which no checkpoint may break."""
    return F.log_softmax(logits_of(reference, torch.cat([fit[0], val[0]]), mean, std), 1)


def _leaked(
    logp: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor, ratio: float, floor: float
) -> torch.Tensor:
    """The targets [L] that draw over ``floor`` and over ``ratio`` times the share any unflagged class draws
    of the original's answers [N, K] (log-probabilities) on the images of other classes: a weakly learnt
    backdoor leaks there."""
    k = logp.shape[1]
    targets = targets[targets >= 0].to(logp.device)  # an untargeted trigger has no class of its own
    flagged = torch.zeros(k, dtype=torch.bool, device=logp.device)
    flagged[targets] = True
    if flagged.all() or not flagged.any():
        return targets[:0]
    others = labels.to(logp.device).unsqueeze(1) != torch.arange(k, device=logp.device)
    share = (logp.exp() * others).sum(0) / others.sum(0).clamp(min=1)
    leaks = (share[targets] > ratio * share[~flagged].max()) & (share[targets] > floor)
    return targets[leaks]


def _without(logp: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Log-probabilities [N, K] with the share of ``classes`` removed on the images of other classes."""
    return without_classes(logp, classes, ~torch.isin(labels.to(logp.device), classes))


class _Schedule:
    """SGD on the model with a linear warm-up, then a cosine decay to ``final_lr_share`` of the lr at the
    budget's most steps, each gradient clipped to a few times the round's median norm; a non-finite step
    is undone and halves the lr."""

    def __init__(self, model: nn.Module, lr: float, settings: Unlearning, most: int) -> None:
        self.model, self.base_lr, self.lr, self.settings, self.most = model, lr, lr, settings, most
        self.optimizer = self._sgd()
        self.rolled_back = 0
        self.grad_norms: list[float] = []  # the finite gradient norms of the round's steps

    def _sgd(self) -> torch.optim.SGD:
        """A fresh optimiser (no momentum carried over from steps that were undone)."""
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)

    def step(self, loss: torch.Tensor, step: int) -> None:
        """One update from ``loss`` at optimisation step ``step`` (0-based)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr * min(1.0, (step + 1) / self.settings.warmup_steps) * self._decay(step)
        snapshot = [p.detach().clone() for p in self.model.parameters()]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._clip_gradient()
        self.optimizer.step()
        if not torch.isfinite(loss) or not all(torch.isfinite(p).all() for p in self.model.parameters()):
            with torch.no_grad():
                for p, s in zip(self.model.parameters(), snapshot, strict=True):
                    p.copy_(s)
            self.lr /= 2
            self.optimizer = self._sgd()
            self.rolled_back += 1

    @torch.no_grad()
    def _clip_gradient(self) -> None:
        """Scale the gradient down to ``grad_clip_ratio`` times the median norm of the round's steps so far."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.settings.grad_clip_ratio == 0 or not grads:
            return
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if not math.isfinite(norm):
            return  # the step is undone anyway
        self.grad_norms.append(norm)
        cap = self.settings.grad_clip_ratio * sorted(self.grad_norms)[len(self.grad_norms) // 2]
        if norm > cap:
            for g in grads:
                g.mul_(cap / norm)

    def _decay(self, step: int) -> float:
        final = self.settings.final_lr_share
        return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(step, self.most) / self.most))

    def back_off(self, state: dict) -> float:
        """Return to the checkpoint ``state`` and halve the lr (never below its floor); the new lr."""
        self.model.load_state_dict(state)
        self.lr = max(self.lr / 2, self.base_lr * self.settings.min_lr_share)
        self.optimizer = self._sgd()
        return self.lr


def unlearn(
    model: nn.Module,
    triggers: TriggerSet,
    fit: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    config: Config,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    num_classes: int | None = None,
    accuracy_floor: float | None = None,
    original: nn.Module | None = None,
    on_step: Callable[[int], None] | None = None,
    steps: StepBudget | None = None,
) -> UnlearnOutcome:
    """Unlearn every class in ``triggers`` from a copy of ``model``; the input is never modified.

    fit, val: (images [N, C, H, W] in [0, 1], labels [N]) for the updates and for the guard.
    A checkpoint is only returned if its validation accuracy is at least ``accuracy_floor``
    (default: the starting accuracy minus ``config.unlearning.max_accuracy_drop``) and it breaks at most
    ``max_accuracy_drop`` of the clean images ``original`` (default ``model``) got right.
    ``on_step(n)`` is called after every n optimisation steps (progress); ``steps`` bounds them (None:
    a first round's ``step_budget``).
    """
    settings = config.unlearning
    repaired = _trainable_copy(model)
    with _fixed(triggers):
        anchor = [p.detach().clone() for p in repaired.parameters()]
        reference = model if original is None else original
        reference_logp = _answers(reference, fit, val, mean, std)
        guard = Guard(repaired, triggers, fit, val, config, mean, std, reference_logp=reference_logp, start=anchor,
                      accuracy_floor=accuracy_floor)  # fmt: skip
        # The soft targets must not hold a backdoor's leak into the original's clean answers.
        leaked = _leaked(reference_logp, guard.y_all, triggers.targets, settings.leak_ratio, settings.leak_floor)
        fit_logp = _without(reference_logp[: len(fit[1])], fit[1], leaked)
        batches = TriggeredBatches(triggers, repaired, fit, val, config, mean, std)
        scarce = len(fit[1]) < settings.scarce_per_class * reference_logp.shape[1]
        copies = settings.copy_weight > 0 and (scarce or batches.move_anywhere)
        loss_of = UnlearnLoss(config, fit_logp, anchor, num_classes, reference if copies else None, mean, std,
                              away_from_targets=not scarce)  # fmt: skip
        budget = step_budget(config, len(fit[1])) if steps is None else steps
        schedule = _Schedule(repaired, settings.unlearn_lr, settings, budget.most)
        generator = torch.Generator(device="cpu").manual_seed(config.run.seed)
        history, step = [guard.first], 0
        while not guard.finished(step, budget) and cost.spent() is None:
            for batch in batches.epoch(generator):
                terms = loss_of(repaired, batches.build(batch, step, generator), generator)
                batches.update_universal(terms.target_nll, terms.valid)
                schedule.step(terms.total, step)
                step += 1
                if cost.spent() is not None:  # the audit's budget ran out: return the guard's best so far
                    break
                if on_step is not None:
                    on_step(1)
                if step % settings.eval_every == 0 or step == budget.most:
                    history += _evaluate(guard, schedule, dict(guard.score(step), **terms.floats()))
                    if guard.finished(step, budget):
                        break
    return _outcome(repaired, guard, history, step, schedule.rolled_back, batches.reached)


@dataclass(frozen=True)
class StepBudget:
    """The optimisation steps of one unlearning round: at least ``least`` (once erased), at most ``most``."""

    least: int
    most: int


def step_budget(config: Config, fit_size: int, round_: int = 1) -> StepBudget:
    """Round ``round_``'s budget on ``fit_size`` images: a trigger the re-scan still finds gets
    ``round_growth`` times the previous round's steps, so an easy erase stays cheap."""
    u = config.unlearning
    scale = u.round_growth ** (round_ - 1)
    least = round(u.min_steps * scale)
    return StepBudget(least, max(round(u.unlearn_epochs * math.ceil(fit_size / u.unlearn_batch_size) * scale), least))


def _evaluate(guard: Guard, schedule: _Schedule, row: dict) -> list[dict]:
    """The guard's judgement of the checkpoint scored in ``row``; backs off when it is far outside."""
    rows, back_off = guard.accept(row)
    if back_off:
        row["backtracked_to_lr"] = schedule.back_off(guard.best_state)
    return rows


def _outcome(
    repaired: nn.Module, guard: Guard, history: list[dict], steps: int, rolled_back: int, reached: bool
) -> UnlearnOutcome:
    """The repaired model at the guard's best checkpoint, frozen, and the record."""
    repaired.load_state_dict(guard.best_state)
    for p in repaired.parameters():
        p.requires_grad_(False)
    first, best = guard.first, guard.best
    return UnlearnOutcome(
        model=repaired,
        history=history,
        accuracy_before=first["clean_accuracy"],
        accuracy_after=best["clean_accuracy"],
        trigger_asr_before=first["trigger_asr"],
        trigger_asr_after=best["trigger_asr"],
        steps=steps,
        rolled_back=rolled_back,
        kept_step=best["step"],
        reached=reached,
    )
