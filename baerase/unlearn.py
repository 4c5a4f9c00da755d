"""Step 3 of BAERASE: erase the backdoor by unlearning the recovered triggers, under a guard.

Per batch (x, y) of clean data and fresh triggers x' drawn from each flagged class t:
    L = alpha_u * [CE(f(x), y) + KL(f_0(x) || f(x)) + w * KL(f_0(x~) || f(x~))] - min(CE(f(x'), t), cap)
        + r * CE(f(x'), y) + lambda * ||theta - theta_0||_1
where x~ are copies of the clean images, each mixed with another and moved a little. A few clean
images per class hold the original model's function only at those images; the copies hold it
between and around them. They are used (w > 0) only when the clean set is that scarce.
With ``universal_eps`` > 0, x' also runs over x + u_t: a universal perturbation per target in
the L-inf ball of that radius, which takes one signed-gradient step toward t per batch. Recovery
finds the few pixels that suffice; a whole-image (blend) trigger works through the rest, and a
patch through its other pixels: every other batch moves the triggers and grows them by a pixel of
random black or white, and a trigger that only works where it was found is also grown in place in
its own colour.
The ascent term is the paper's, clipped at ``cap = log(2K)``: once the target's probability on
triggered inputs is below 1 / (2K) it stops pushing, so the unbounded ascent that wrecks clean
accuracy at the paper's settings cannot happen. A guard scores the model on held-out data every
few steps, keeps the best checkpoint within the allowed accuracy loss (or, for one outside it,
the point nearest it on the way back to the round's start that is within) and stops once fresh
recovered triggers no longer work (judged on the validation images the model classifies
correctly). Clean images of the flagged classes join every batch: the ascent lowers their logits
everywhere, and they hold those classes in place. The relabel term (weight ``relabel_weight``;
0 in the paper preset) teaches the model that a triggered image keeps its true class, so the
ascent cannot just move it to another wrong class.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .config import Config
from .ops.reference import normalize_images
from .recover import TriggerSet, attack_success

_EVAL_EVERY = 10  # optimisation steps between guard evaluations
# Evaluations that must also pass after the recovered triggers first stop working: one clean
# evaluation on a small validation split does not prove the real trigger is gone.
_MARGIN_EVALS = 2
# A small clean set still gets enough steps to back off and retry at a lower lr, and an early
# erasure keeps unlearning this long: the real trigger lags the recovered ones (on the demo's
# Trojan-style model, unlearned without the universal perturbation, its ASR is 1.7% after 400 steps
# and 0.2-0.8% after 800, at the same accuracy).
_MIN_STEPS = 800
_MIN_LR_SHARE = 1 / 16  # backing off never takes the lr below this share of unlearn_lr: it would stall
_TOLERANCE = 1e-6  # accuracies are float32 shares of whole images; compare them with this slack
_WARMUP_STEPS = 20  # the lr ramps up linearly: full-lr first steps knock a trained model off course
# A recovered trigger that, moved elsewhere, flips under this share of the images it flips in place
# is position-bound (fixed-position patches: 0.01-0.04; random-position BadNets: 0.15-0.36).
_MOVED_SHARE = 0.1
_BACKTRACK_SLACK = 2.0  # back off only beyond this many further allowed drops outside the bounds
# A checkpoint outside the bounds may still have a good model part-way back to the round's start:
# weights fine-tuned from one start connect linearly, and part of a step that erases the trigger
# changes fewer clean predictions. The guard halves that segment this many times (shares to 1/8).
# On an MNIST sine-blend model whose every checkpoint broke 3% of the guard's images, erase returned
# the model unchanged (ASR 100%); with the search, ASR 0.2% at 0.1 points more test accuracy.
_BISECTIONS = 3
# Below this many clean images per class (in the fit split), unlearning also anchors the model on
# mixed copies of them, at weight w. Measured unlearning with 2 and 4 images per class, the test set
# lost 12.8 and 2.0 points of accuracy without the copies, 1.0 and 0.4 with them. At 25 per class the
# images hold accuracy alone, and the copies only cost time and hold part of the backdoor in place
# (a Trojan-style patch: 1.6% of triggered images still flipped instead of 0.6%).
_SCARCE_PER_CLASS = 8
# At weight 1 the copies hold more of the backdoor (random-position BadNets: 0.6-0.8% still flip
# instead of 0.2-0.4%); at 0.1 they keep the accuracy gains above.
_COPY_WEIGHT = 0.1
_COPY_SHIFT = 1 / 8  # copies move by up to this share of the image side


def _mixed_copies(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of x [N, C, H, W] mixed with another at a random share, the batch then moved
    (cyclically) by up to ``_COPY_SHIFT`` of each side: inputs near the clean data, not on it."""
    partner = torch.randperm(len(x), generator=generator).to(x.device)
    share = torch.rand(len(x), 1, 1, 1, generator=generator).to(x.device)
    shift = [int(torch.randint(-int(n * _COPY_SHIFT), int(n * _COPY_SHIFT) + 1, (1,), generator=generator))
             for n in x.shape[-2:]]
    return (share * x + (1 - share) * x[partner]).roll(shift, (-2, -1))


def _kl(logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    return F.kl_div(logp, reference_logp, log_target=True, reduction="batchmean")


def _copy_anchor(model: nn.Module, reference: nn.Module, images: torch.Tensor, generator: torch.Generator,
                 mean, std) -> torch.Tensor:
    """KL(reference || model) on mixed copies of the clean ``images``."""
    copies = normalize_images(_mixed_copies(images, generator), mean, std)
    with torch.no_grad():
        reference_logp = F.log_softmax(reference(copies), 1)
    return _kl(F.log_softmax(model(copies), 1), reference_logp)


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


def allowed_drop(config: Config, val_size: int) -> float:
    """Validation-accuracy loss the guard tolerates: ``max_accuracy_drop``, but never less than one
    validation image, which a split of a few dozen images cannot resolve (the guard would then
    refuse every checkpoint). The share of clean images broken bounds the drop on top of it."""
    return max(config.max_accuracy_drop, 1.0 / max(val_size, 1))


def _logits(model: nn.Module, images: torch.Tensor, mean=None, std=None, batch_size: int = 256) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        out.append(model(normalize_images(x, mean, std)))
    return torch.cat(out)


def _toward_targets(universal: torch.Tensor, nll: torch.Tensor, valid: torch.Tensor, eps: float) -> torch.Tensor:
    """One signed-gradient step of the universal perturbations [K, C, H, W] that lowers their
    targets' cross-entropy ``nll`` (on the rows ``valid`` marks), kept in the L-inf ball ``eps``."""
    (grad,) = torch.autograd.grad((nll * valid).sum(), universal, retain_graph=True)
    return (universal - eps / 4 * grad.sign()).clamp(-eps, eps).detach()


@torch.no_grad()
def _position_bound(triggers: TriggerSet, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    mean, std) -> torch.Tensor:
    """Classes [K] whose recovered trigger works only where recovery found it: moved by thirds of
    the image, it flips under ``_MOVED_SHARE`` as many images. Such a trigger is the attacker's
    fixed one or a part of it, so unlearning also grows it in place; a trigger the attacker places
    anywhere keeps working when moved, and grown in place it would only cost clean accuracy."""
    if triggers.family != "mask" or len(labels) < 2:
        return torch.zeros(len(triggers), dtype=torch.bool, device=triggers.targets.device)
    in_place = attack_success(triggers, model, images, labels, mean, std)
    h, w = images.shape[-2:]
    shifts = [(h * i // 3, w * j // 3) for i in range(3) for j in range(3) if i or j]
    moved = torch.stack([attack_success(triggers, model, images, labels, mean, std, shift=s) for s in shifts])
    return moved.mean(0) < _MOVED_SHARE * in_place


@torch.no_grad()
def _set_between(model: nn.Module, start: list[torch.Tensor], end: list[torch.Tensor], share: float) -> None:
    """Set the model's parameters to ``start + share * (end - start)``."""
    for p, a, b in zip(model.parameters(), start, end):
        p.copy_(b if share == 1 else torch.lerp(a, b, share))


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    """A fresh optimiser (no momentum carried over from steps that were undone)."""
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


@torch.no_grad()
def clean_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean=None, std=None,
                   batch_size: int = 256) -> float:
    """Share of images [N, C, H, W] classified as their label (normalised with mean/std first)."""
    if len(labels) == 0:
        return 0.0
    return (_logits(model, images, mean, std, batch_size).argmax(1) == labels).float().mean().item()


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
) -> UnlearnOutcome:
    """Unlearn every class in ``triggers`` from a copy of ``model``; the input is never modified.

    fit, val: (images [N, C, H, W] in [0, 1], labels [N]) for the updates and for the guard.
    A checkpoint is only returned if its validation accuracy is at least ``accuracy_floor``
    (default: the starting accuracy minus ``config.max_accuracy_drop``) and it breaks at most
    ``max_accuracy_drop`` of the clean images ``original`` (default ``model``) got right.
    """
    repaired = copy.deepcopy(model)
    # Eval mode while training: BatchNorm statistics must not drift toward triggered inputs.
    repaired.eval()
    for p in repaired.parameters():
        p.requires_grad_(True)
    for p in triggers.parameters():
        p.requires_grad_(False)
    anchor = [p.detach().clone() for p in repaired.parameters()]
    optimizer = _sgd(repaired, config.unlearn_lr)
    cap = math.log(2 * (num_classes or 2))

    x_fit, y_fit = fit
    x_val, y_val = val
    k = len(triggers)
    x_all, y_all = torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val])
    # The original model's answers: soft targets that keep the clean function in place (a few
    # hundred labels alone overfit), and the images it got right, which no checkpoint may break.
    reference = model if original is None else original
    with torch.no_grad():
        reference_logp = F.log_softmax(_logits(reference, x_all, mean, std), 1)
    fit_logp = reference_logp[: len(y_fit)]
    scarce = len(y_fit) < _SCARCE_PER_CLASS * reference_logp.shape[1]
    right_before = reference_logp.argmax(1) == y_all

    def score(step: int) -> dict:
        with torch.no_grad():
            wrong_now = _logits(repaired, x_all, mean, std).argmax(1) != y_all
        right_val = ~wrong_now[len(y_fit):]
        # Trigger success counts only images the model now gets right: a clean image it already
        # sends to the target proves nothing about the trigger, and would keep the rate above 0.
        judged = right_val if right_val.sum() >= 2 else torch.ones_like(right_val)
        success = attack_success(triggers, repaired, x_val[judged], y_val[judged], mean, std)
        return {
            "step": step,
            "clean_accuracy": right_val.float().mean().item(),
            "broken": (right_before & wrong_now).float().mean().item(),
            "trigger_asr": success.max().item(),
        }

    first = score(0)
    history = [first]
    allowance = allowed_drop(config, len(y_val))
    floor = first["clean_accuracy"] - allowance if accuracy_floor is None else accuracy_floor

    def within(row: dict, slack: float = 0.0) -> bool:
        """Inside the guard's bounds, widened by ``slack`` further allowed drops."""
        return (row["clean_accuracy"] >= floor - slack * allowance - _TOLERANCE
                and row["broken"] <= (1 + slack) * config.max_accuracy_drop + _TOLERANCE)

    def share_within(step: int) -> tuple[dict, dict] | None:
        """The point nearest the checkpoint, on its segment back to the round's start, that is
        within the bounds: (its score row, with ``share``, and its state), or None."""
        end = [p.detach().clone() for p in repaired.parameters()]
        low, high, found = 0.0, 1.0, None
        for _ in range(_BISECTIONS):
            share = (low + high) / 2
            _set_between(repaired, anchor, end, share)
            row = dict(score(step), share=share)
            if within(row):
                low, found = share, (row, copy.deepcopy(repaired.state_dict()))
            else:
                high = share
        _set_between(repaired, anchor, end, 1.0)
        return found

    best_state, best = copy.deepcopy(repaired.state_dict()), first
    steps_per_epoch = max(1, math.ceil(len(y_fit) / config.unlearn_batch_size))
    total = max(config.unlearn_epochs * steps_per_epoch, _MIN_STEPS)
    lr = config.unlearn_lr
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    rolled_back, step, erased_evals = 0, 0, 0

    def done() -> bool:  # erased for the margin, and unlearned for at least the minimum budget
        return step >= total or (erased_evals > _MARGIN_EVALS and step >= _MIN_STEPS)

    h, w = x_fit.shape[-2:]
    in_place = _position_bound(triggers, repaired, x_val, y_val, mean, std)
    # The ascent lowers each target's logit on every input: clean images of the targets themselves,
    # added to every batch, hold those classes in place.
    target_pool = torch.nonzero(torch.isin(y_fit, triggers.targets.to(y_fit.device))).flatten()
    eps = config.universal_eps
    universal = torch.zeros(k, *x_fit.shape[1:], device=x_fit.device)
    parts = 2 if eps > 0 else 1  # the recovered triggers' rows, then the universal perturbations'
    while not done():
        order = torch.randperm(len(y_fit), generator=generator).to(x_fit.device)
        for batch in order.split(config.unlearn_batch_size):
            x, y = x_fit[batch], y_fit[batch]
            if len(y) < 2:
                continue
            shift = None
            if step % 2 == 1:  # every other step: the trigger moved to a random place and grown by a pixel
                shift = (int(torch.randint(h, (1,), generator=generator)), int(torch.randint(w, (1,), generator=generator)))
            with torch.no_grad():
                _, g = triggers.sample(len(y))
                stamped = triggers.stamp(x, g, mean, std, shift=shift, spread=int(shift is not None))
                if step % 4 == 2 and in_place.any():  # a fixed trigger, larger than the part recovered
                    grown = triggers.stamp(x, g, mean, std, spread=1, paint=True)
                    stamped = torch.where(in_place.view(-1, 1, 1, 1, 1), grown, stamped)
                stamped = stamped.flatten(0, 1)
            held = batch
            if len(target_pool):
                extra = torch.randint(len(target_pool), (max(1, len(batch) // 2),), generator=generator)
                held = torch.cat([batch, target_pool[extra.to(target_pool.device)]])
            if eps > 0:
                universal.requires_grad_(True)
                perturbed = (x.unsqueeze(0) + universal.unsqueeze(1)).clamp(0, 1).flatten(0, 1)
                stamped = torch.cat([stamped, normalize_images(perturbed, mean, std)])
            logits = repaired(torch.cat([normalize_images(x_fit[held], mean, std), stamped]))
            clean_logp = F.log_softmax(logits[: len(held)], 1)
            clean_loss = F.nll_loss(clean_logp, y_fit[held]) + _kl(clean_logp, fit_logp[held])
            if scarce:
                clean_loss = clean_loss + _COPY_WEIGHT * _copy_anchor(repaired, reference, x_fit[held], generator,
                                                                      mean, std)
            stamped_logits = logits[len(held):]
            target_rows = triggers.targets.repeat_interleave(len(y)).repeat(parts)
            _, nll = ops.trigger_loss(stamped_logits, target_rows, 1.0)
            valid = (y.repeat(k * parts) != target_rows).float()
            if eps > 0:
                universal = _toward_targets(universal, nll[k * len(y):], valid[k * len(y):], eps)
            # Each part is its own mean: the perturbations add to the triggers' unlearning, not dilute it.
            ascent = ((nll.clamp(max=cap) * valid).view(parts, -1).sum(1)
                      / valid.view(parts, -1).sum(1).clamp(min=1)).sum()
            relabel = F.cross_entropy(stamped_logits, y.repeat(k * parts), reduction="none").view(parts, -1).mean(1).sum()
            drift = sum((p - a).abs().sum() for p, a in zip(repaired.parameters(), anchor))
            loss = config.alpha_u * clean_loss - ascent + config.relabel_weight * relabel + config.weight_l1 * drift

            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (step + 1) / _WARMUP_STEPS)
            snapshot = [p.detach().clone() for p in repaired.parameters()]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            if not torch.isfinite(loss) or not all(torch.isfinite(p).all() for p in repaired.parameters()):
                with torch.no_grad():
                    for p, s in zip(repaired.parameters(), snapshot):
                        p.copy_(s)
                lr /= 2
                optimizer = _sgd(repaired, lr)
                rolled_back += 1
            if step % _EVAL_EVERY == 0 or step == total:
                row = score(step)
                history.append(row)
                candidate, state = row, None  # state None: the checkpoint itself
                if not within(row) and (found := share_within(step)) is not None:
                    candidate, state = found
                    history.append(candidate)
                allowed = within(candidate)
                erased = allowed and candidate["trigger_asr"] <= config.asr_stop
                # Once erased, prefer the later checkpoint: it has unlearned for longer (the margin).
                if erased or allowed and (candidate["trigger_asr"], -candidate["clean_accuracy"]) < (
                    best["trigger_asr"], -best["clean_accuracy"]
                ):
                    best, best_state = candidate, copy.deepcopy(repaired.state_dict()) if state is None else state
                # A checkpoint a few images outside the bounds is only not kept: validation noise of
                # that size must not stall unlearning. Far outside, the lr is too large for this
                # model: go back to the best checkpoint and halve it. If half the step or more is
                # within the bounds, the step only overshoots: keep going at this lr (halving it
                # there too left an MNIST sine-blend model at 1.6% ASR instead of 0.2%).
                overshoots = candidate.get("share", 0.0) >= 0.5
                if not overshoots and not within(row, _BACKTRACK_SLACK):
                    repaired.load_state_dict(best_state)
                    lr = max(lr / 2, config.unlearn_lr * _MIN_LR_SHARE)
                    optimizer = _sgd(repaired, lr)
                    row["backtracked_to_lr"] = lr
                erased_evals += erased
                if done():
                    break
    repaired.load_state_dict(best_state)
    for p in repaired.parameters():
        p.requires_grad_(False)
    for p in triggers.parameters():
        p.requires_grad_(True)
    return UnlearnOutcome(
        model=repaired, history=history, accuracy_before=first["clean_accuracy"],
        accuracy_after=best["clean_accuracy"], trigger_asr_before=first["trigger_asr"],
        trigger_asr_after=best["trigger_asr"], steps=step, rolled_back=rolled_back, kept_step=best["step"],
    )
