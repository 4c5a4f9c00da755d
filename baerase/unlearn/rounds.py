"""Erase: unlearn the flagged classes, verify by re-recovery, and unlearn what is still found."""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings

import torch
from torch import nn

from .. import cost
from ..detect import score_values, side_of, untargeted, verify
from ..progress import progress
from ..recover import UNTARGETED, RecoveryResult, TriggerSet, families, frozen
from ..report import UNCHANGED, ClassResult, EraseResult, ScanReport
from ..validate import Inputs
from .guard import allowed_drop, clean_accuracy
from .loop import StepBudget, UnlearnOutcome, step_budget, unlearn

# Below this many guard images, one image is over twice the allowed accuracy drop, and unlearning
# can lose more on unseen data than the guard sees.
_GUARD_MIN_IMAGES = 50


def erase_rounds(inputs: Inputs, report: ScanReport, rerecover_on) -> EraseResult:
    """Up to ``config.unlearning.erase_rounds`` rounds of unlearning the flagged classes of
    ``report`` followed by a verifying re-recovery; a trigger the re-scan still finds is unlearned
    with the others next round. Every round answers to the original model's accuracy.
    ``rerecover_on(model, desc)`` gives the re-recovery of a model (see ``detect.Rerecover``)."""
    cfg, model, flagged = inputs.config, inputs.model, report.flagged
    _warn_small_guard(inputs)
    triggers = report.flagged_triggers().to(inputs.device)
    reference, unflagged = _clean_reference(report), [c.target for c in _clean_classes(report)]
    # The verification re-scan spends what the scan needed to find these classes' triggers.
    verify_steps = max((c.steps or cfg.recovery.steps) for c in report.classes if c.flagged)
    floor = clean_accuracy(model, *inputs.held_out, inputs.mean, inputs.std) - allowed_drop(
        cfg, len(inputs.held_out[1])
    )
    spent, current, outcomes, history = cost.Cost(), model, [], []
    for round_ in range(1, cfg.unlearning.erase_rounds + 1):
        with cost.phase(spent, "unlearning"):
            budget = step_budget(cfg, len(inputs.fit[1]), round_)
            outcome = _unlearn_round(inputs, round_, current, triggers, budget, floor)
        outcomes.append(outcome)
        history += [dict(row, round=round_) for row in outcome.history]
        current = outcome.model
        with cost.phase(spent, "verification"), frozen(current):
            rerecover = rerecover_on(current, f"baerase verify (round {round_})")
            if report.untargeted:
                rescan, evidence, still = _verify_untargeted(inputs, report, current, rerecover)
            else:
                rescan, evidence, still = verify(flagged, reference, rerecover, cfg, verify_steps, unflagged)
        if not still.any():
            break
        triggers = families.concat([triggers, rescan.triggers.select(torch.nonzero(still).flatten())])
    return _result(inputs, flagged, outcomes, history, evidence, bool(still.any()), spent)


def unlearned_copy(inputs: Inputs, triggers: TriggerSet, steps: int, desc: str) -> nn.Module:
    """A copy of the model with ``triggers`` unlearned for ``steps`` steps under the guard: a probe of
    what depends on them, not an erase (no verification). The recovered triggers alone, without universal
    perturbations: unlearning every small change toward one target also unlearns another target's patch,
    which the probe must leave working."""
    narrow = dataclasses.replace(inputs, config=inputs.config.replace(universal_eps=0))
    return _unlearn(narrow, inputs.model, triggers, StepBudget(steps, steps), desc).model


def _unlearn_round(
    inputs: Inputs, round_: int, model: nn.Module, triggers: TriggerSet, budget: StepBudget, floor: float
) -> UnlearnOutcome:
    """Round ``round_``'s unlearning of ``triggers`` from ``model``. Odd rounds read a position-bound trigger as
    a few pixels of a fixed patch (``patch_reach``). It may instead be a whole-image blend recovered where it is
    strongest, whose any-colour neighbourhood is an adversarial patch that cannot be unlearned within the guard:
    so a round that did not erase even the recovered triggers that way is run again without the reach, and a
    round after one the re-scan survived goes without it. A blend family's trigger has no reach, but its universal
    perturbations are such a neighbourhood of the whole image: its second try goes without them."""

    def run(reading: Inputs, desc: str) -> UnlearnOutcome:
        return _unlearn(reading, model, triggers, budget, desc, accuracy_floor=floor, original=inputs.model)

    desc, narrower = f"baerase unlearn (round {round_})", _narrower(inputs, triggers)
    if round_ % 2 == 0:
        return run(narrower, desc)
    outcome = run(inputs, desc)
    erased = outcome.trigger_asr_after <= inputs.config.unlearning.asr_stop
    # The narrower try differs from this one only where the reach widened a radius or it drops perturbations.
    drops = narrower.config.unlearning.universal_eps < inputs.config.unlearning.universal_eps
    if erased or not (outcome.reached or drops):
        return outcome
    return min(outcome, run(narrower, f"{desc}, narrower"), key=lambda o: o.trigger_asr_after)


def _narrower(inputs: Inputs, triggers: TriggerSet) -> Inputs:
    """The inputs of a round's narrower try: a blend family's without universal perturbations, others' with
    ``patch_reach`` 0 (each universal perturbation within ``universal_eps`` everywhere)."""
    if triggers.family == "blend":
        return dataclasses.replace(inputs, config=inputs.config.replace(universal_eps=0))
    return dataclasses.replace(inputs, config=inputs.config.replace(patch_reach=0))


def _unlearn(
    inputs: Inputs, model: nn.Module, triggers: TriggerSet, steps: StepBudget, desc: str, **guard
) -> UnlearnOutcome:
    """``unlearn`` of ``triggers`` from a copy of ``model`` on the inputs' splits, with a progress bar
    (``guard``: its accuracy floor and original model)."""
    cfg = inputs.config
    with progress(steps.most, desc, cfg.run.progress) as bar:
        return unlearn(model, triggers, inputs.fit, inputs.held_out, cfg, inputs.mean, inputs.std, inputs.num_classes,
                       on_step=bar.update, steps=steps, **guard)  # fmt: skip


def _verify_untargeted(
    inputs: Inputs, report: ScanReport, model: nn.Module, rerecover
) -> tuple[RecoveryResult, list[dict], torch.Tensor]:
    """A fresh untargeted trigger of the repaired ``model``, judged against the scan's targeted
    triggers: (its recovery, evidence, whether it still maps the classes apart [1])."""
    norms = torch.tensor([c.trigger_norm for c in report.classes])
    found = untargeted(rerecover, model, inputs.held_out, inputs.config, 1, norms, inputs.mean, inputs.std)
    evidence = {
        "target": UNTARGETED,
        "attack_success": float(found.recovery.success[0]),
        "trigger_norm": float(found.recovery.norms[0]),
        "anomaly_index": 0.0,
        "spread": found.spread,
        "backdoor_found": bool(found.targets),
    }
    return found.recovery, [evidence], torch.tensor([bool(found.targets)])


def nothing_to_erase(inputs: Inputs) -> EraseResult:
    """The result of erasing a report that flagged nothing: a frozen copy of the model."""
    repaired = frozen_copy(inputs.model)
    acc = clean_accuracy(repaired, *inputs.held_out, inputs.mean, inputs.std)
    return EraseResult(
        model=repaired,
        history=[],
        erased=[],
        verified=True,
        evidence=[],
        accuracy_before=acc,
        accuracy_after=acc,
        trigger_asr_before=0.0,
        trigger_asr_after=0.0,
        rounds=0,
        seconds=0.0,
        num_classes=inputs.num_classes,
    )


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy in eval mode with no parameter gradients: what erase returns."""
    repaired = copy.deepcopy(model).eval()
    for p in repaired.parameters():
        p.requires_grad_(False)
    return repaired


def _result(
    inputs: Inputs,
    flagged: list[int],
    outcomes: list[UnlearnOutcome],
    history: list[dict],
    evidence: list[dict],
    still: bool,
    spent: cost.Cost,
) -> EraseResult:
    changed = any(o.kept_step > 0 for o in outcomes)
    if not changed:
        warnings.warn(f"erase could not unlearn classes {flagged}. {UNCHANGED}", stacklevel=4)
    repaired = frozen_copy(outcomes[-1].model)
    return EraseResult(
        model=repaired,
        history=history,
        erased=flagged,
        verified=not still,
        evidence=evidence,
        accuracy_before=outcomes[0].accuracy_before,
        accuracy_after=clean_accuracy(repaired, *inputs.held_out, inputs.mean, inputs.std),
        trigger_asr_before=outcomes[0].trigger_asr_before,
        trigger_asr_after=outcomes[-1].trigger_asr_after,
        rounds=len(outcomes),
        seconds=0.0,
        num_classes=inputs.num_classes,
        rolled_back=sum(o.rolled_back for o in outcomes),
        changed=changed,
        cost=spent,
    )


def _clean_classes(report: ScanReport) -> list[ClassResult]:
    """The classes the scan did not flag and recovered fully."""
    return [c for c in report.classes if not c.flagged and not c.screened_out]


def _clean_reference(report: ScanReport) -> torch.Tensor:
    """The score values of the classes the scan did not flag (fully recovered ones): the yardstick
    a repaired class's fresh trigger is judged against."""
    clean = _clean_classes(report)
    return score_values(
        torch.tensor([c.trigger_norm for c in clean]),
        torch.tensor([c.attack_success for c in clean]),
        side_of(report.family),
    )


def _warn_small_guard(inputs: Inputs) -> None:
    cfg, guard_images = inputs.config, len(inputs.held_out[1])
    if guard_images < _GUARD_MIN_IMAGES:
        warnings.warn(
            f"erase holds out {guard_images} clean images for its accuracy guard, too few to bound the "
            f"accuracy drop at {cfg.unlearning.max_accuracy_drop:.0%}: the repaired model may lose more on unseen "
            f"data. Give it at least {math.ceil(_GUARD_MIN_IMAGES / cfg.unlearning.guard_fraction)} clean images.",
            stacklevel=4,
        )
