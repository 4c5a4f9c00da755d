"""Step 2: decide which classes are backdoored from the per-class recovery results.

A class is flagged when its trigger is an anomaly among the classes' triggers (flag), and stays
flagged only if independently seeded re-recoveries find it again (confirm). Beside the strongest
flagged class, a class stays flagged only if it is found again once that class is unlearned
(independent). After an erase, the same judgement on a fresh recovery tells whether a backdoor is
still there (verify).

When no class is flagged, an untargeted trigger (sending each image to any class but its own, and
spreading its batch over the classes) tells an all-to-all backdoor apart: it is small and maps the
classes onto distinct targets, where on a clean model it must cover much of the image to spread, and
still sends most classes nowhere consistent (``untargeted``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .config import Config
from .recover import UNTARGETED, RecoveryResult, TriggerSet, reference_sample, sent_to

# Re-recovers ``targets`` with the RNG shifted by ``seed_offset``, for ``steps`` steps (None: the
# config's); the classes that ``enough`` marks answered (given their smallest working masses) stop early.
Rerecover = Callable[..., RecoveryResult]

_MAD_TO_STD = 1.4826  # makes the median absolute deviation a consistent estimate of a normal std


def anomaly_index(values: torch.Tensor, side: str = "low", reference: torch.Tensor | None = None) -> torch.Tensor:
    """Median-absolute-deviation anomaly index of each value (Neural Cleanse's rule).

    values: [K]. ``side="low"`` scores how far *below* the median a value lies (small triggers are
    suspicious), ``"high"`` how far above; values on the other side score 0. The median and MAD
    come from ``reference`` when given (e.g. the clean classes of an earlier scan), else from
    ``values`` themselves.
    """
    values = values.float()
    reference = values if reference is None else reference.float()
    median = reference.median()
    mad = (reference - median).abs().median() * _MAD_TO_STD
    # A perfectly uniform set of values has MAD 0; measure deviation against a tiny floor instead.
    scale = torch.clamp(mad, min=1e-6 * max(median.abs().item(), 1e-12))
    deviation = (median - values) if side == "low" else (values - median)
    return torch.clamp(deviation / scale, min=0)


def flag_classes(
    norms: torch.Tensor,
    success: torch.Tensor,
    threshold: float,
    min_success: float,
    side: str = "low",
    min_shrink: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly index [K], flagged bool [K]) for per-class trigger masses and attack successes.

    A class is flagged when its trigger is an outlier (index > threshold), its recovered trigger
    really works (success >= min_success) and, on the ``low`` side, its mass is at least
    ``min_shrink`` times below the median. Trigger masses are compared on a log scale: they spread
    multiplicatively (a 3x3 patch vs masks of tens to hundreds of pixels), and on a linear scale
    the large clean masks inflate the MAD until a tiny backdoor trigger barely stands out.
    """
    values = score_values(norms, success, side)
    index = anomaly_index(values, side)
    return index, is_backdoor(index, values, success, threshold, min_success, side, min_shrink)


def is_backdoor(
    index: torch.Tensor,
    values: torch.Tensor,
    success: torch.Tensor,
    threshold: float,
    min_success: float,
    side: str,
    min_shrink: float,
    reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The flagging rule (bool [K]) on anomaly indices and score values (``reference``: the clean
    classes' values, else ``values`` themselves, give the median the shrink is measured from)."""
    found = (index > threshold) & (success >= min_success)
    if side == "low":
        median = (values if reference is None else reference).float().median()
        found &= (median - values.float()) >= math.log(min_shrink)  # log masses: a factor
    return found


def score_values(norms: torch.Tensor, success: torch.Tensor, side: str) -> torch.Tensor:
    """The per-class values the anomaly index is computed on: log trigger mass or success."""
    return norms.float().clamp(min=1e-3).log() if side == "low" else success.float()


def side_of(family: str) -> str:
    """Which side of the median is suspicious: small masks and warps, or (patch family) high success."""
    return "high" if family == "patch" else "low"


@dataclass(frozen=True)
class Verdict:
    """Per-class anomaly index [K], flags [K] and the smallest index a confirmation found [K]
    (NaN where a class was not re-checked)."""

    index: torch.Tensor
    flagged: torch.Tensor
    confirmation: torch.Tensor
    untargeted: TriggerSet | None = None  # an all-to-all backdoor's trigger; then ``flagged`` marks its targets
    lost_with: torch.Tensor | None = None  # [K]: the stronger class a flag was lost with (``independent``), else -1


def min_shrink(config: Config) -> float:
    """How many times below the reference median a flagged class's trigger must be: a blend answers
    its own, stricter bar (``detection.min_blend_shrink``)."""
    d = config.detection
    return d.min_blend_shrink if config.recovery.family == "blend" else d.min_trigger_shrink


def judge(
    recovery: RecoveryResult, reference: torch.Tensor, config: Config, min_shrink: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly index [k], found [k]) of freshly recovered classes against ``reference`` values."""
    values = score_values(recovery.norms, recovery.success, side_of(config.recovery.family))
    return _against(values, recovery.success, reference, config, min_shrink)


def _against(
    values: torch.Tensor, success: torch.Tensor, reference: torch.Tensor, config: Config, min_shrink: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly index [k], found [k]) of classes with score ``values`` and ``success`` against ``reference`` values."""
    side = side_of(config.recovery.family)
    index = anomaly_index(values, side, reference=reference)
    found = is_backdoor(
        index,
        values,
        success,
        config.detection.anomaly_threshold,
        config.detection.min_attack_success,
        side,
        min_shrink,
        reference,
    )
    return index, found


def detect(
    recovery: RecoveryResult,
    rerecover: Rerecover,
    config: Config,
    reference: torch.Tensor | None = None,
    eligible: torch.Tensor | None = None,
) -> Verdict:
    """Flag the anomalous classes of ``recovery``, then keep only those that each of
    ``config.detection.confirmations`` independently seeded re-recoveries finds again.

    ``reference``: bool [K], the classes whose values give the median and spread (None: all);
    ``eligible``: bool [K], the classes that may be flagged (None: all; pre-screened-out ones may not).
    """
    side, d = side_of(config.recovery.family), config.detection
    values = score_values(recovery.norms, recovery.success, side)
    rows = torch.ones_like(values, dtype=torch.bool) if reference is None else reference
    eligible = torch.ones_like(rows) if eligible is None else eligible
    index = anomaly_index(values, side, reference=values[rows])
    flagged = (
        is_backdoor(
            index,
            values,
            recovery.success,
            d.anomaly_threshold,
            d.min_attack_success,
            side,
            min_shrink(config),
            values[rows],
        )
        & eligible
    )
    confirmation = torch.full_like(index, float("nan"))  # fmin ignores the NaN of "not re-checked"
    if not flagged.any() or (rows & ~flagged).sum() < 2:
        return Verdict(index, _near_the_strongest(flagged, values, side, d.max_flag_ratio), confirmation)
    # One lucky small mask is not evidence: judged against the reference classes that were not flagged.
    reference = values[rows & ~flagged]
    for offset in range(1, config.detection.confirmations + 1):
        suspects = torch.nonzero(flagged).flatten()
        if len(suspects) == 0:
            break
        suspected = [recovery.targets[i] for i in suspects.tolist()]
        _, found_index, found = _recovered_again(rerecover, suspected, offset, reference, config, min_shrink(config))
        confirmation[suspects] = torch.fmin(confirmation[suspects], found_index)
        flagged[suspects] = found
    return Verdict(index, _near_the_strongest(flagged, values, side, d.max_flag_ratio), confirmation)


def independent(
    verdict: Verdict,
    recovery: RecoveryResult,
    config: Config,
    rerecover_without: Callable[[int], Rerecover],
    reference: torch.Tensor | None = None,
) -> Verdict:
    """``verdict`` keeping, beside its strongest flagged class, only the classes found again on a copy
    of the model with that class unlearned (``rerecover_without(target)`` re-recovers on it): a second
    backdoor answers its own trigger, an easy class reached through the first backdoor is lost with it.
    Their original masses must also stand out against the reference classes recovered on that copy: a
    backdoor can be a sink that keeps the other classes out of reach, and the median it leaves is no scale.

    ``reference``: bool [K], the classes whose values give the median and spread (None: all).
    """
    flagged = torch.nonzero(verdict.flagged).flatten()
    if config.detection.independence_steps == 0 or verdict.untargeted is not None or len(flagged) < 2:
        return verdict
    side = side_of(config.recovery.family)
    values = score_values(recovery.norms, recovery.success, side)
    rows = torch.ones_like(verdict.flagged) if reference is None else reference
    unflagged = torch.nonzero(rows & ~verdict.flagged).flatten()
    if len(unflagged) < 2:
        return verdict
    ranked = values[flagged] if side == "low" else -values[flagged]
    strongest = flagged[ranked.argmin()]
    others = flagged[flagged != strongest]
    rerecover = rerecover_without(recovery.targets[strongest])
    natural = _reference_again(rerecover, [recovery.targets[i] for i in unflagged.tolist()], config, side)
    keep, lost_with = verdict.flagged.clone(), torch.full(verdict.flagged.shape, -1, dtype=torch.long)
    other_targets = [recovery.targets[i] for i in others.tolist()]
    shrink = min_shrink(config)
    found_again = _recovered_again(rerecover, other_targets, 0, values[unflagged], config, shrink)[2]
    stands_out = _against(values[others], recovery.success[others], natural, config, shrink)[1]
    keep[others] = found_again & stands_out
    lost_with[others[~keep[others]]] = recovery.targets[strongest]
    return dataclasses.replace(verdict, flagged=keep, lost_with=lost_with)


def _reference_again(rerecover: Rerecover, targets: list[int], config: Config, side: str) -> torch.Tensor:
    """The values of (a sample of ``recovery.reference_sample``) unflagged ``targets`` recovered again."""
    again = rerecover(reference_sample(targets, config), 0, None)
    return score_values(again.norms, again.success, side)


def _near_the_strongest(flagged: torch.Tensor, values: torch.Tensor, side: str, max_ratio: float) -> torch.Tensor:
    """``flagged`` without the classes whose trigger is over ``max_ratio`` times the smallest flagged one's
    (log masses ``values``): a second backdoor's trigger recovers at the first's scale, so a class reached
    far less cheaply than the backdoor beside it is an easy clean class."""
    if side != "low" or flagged.sum() < 2:
        return flagged
    return flagged & (values - values[flagged].min() <= math.log(max_ratio))


def verify(
    targets: list[int],
    reference: torch.Tensor,
    rerecover: Rerecover,
    config: Config,
    steps: int | None = None,
    unflagged: Sequence[int] = (),
) -> tuple[RecoveryResult, list[dict], torch.Tensor]:
    """Recover ``targets`` afresh on a repaired model and judge each against ``reference``.

    An unlearned class's boundary stays easier to reach than the clean classes', so its trigger
    must also shrink ``config.detection.verify_shrink`` times below their median to count as still there.
    A backdoor can keep the other classes out of reach, and then the scan's median is the recovery's limit,
    not their scale: a class found again is judged again against the ``unflagged`` classes recovered on the
    repaired model when they are reached more cheaply. Returns (recovery, per-class evidence,
    still-backdoored bool [len(targets)]).
    """
    shrink = max(min_shrink(config), config.detection.verify_shrink)
    again, index, found = _recovered_again(rerecover, targets, 0, reference, config, shrink, steps)
    if side_of(config.recovery.family) == "low" and found.any() and len(unflagged) >= 2:
        measured = _reference_again(rerecover, list(unflagged), config, "low")
        if measured.median() < reference.median():  # log masses
            again, index, found = _recovered_again(rerecover, targets, 0, measured, config, shrink, steps)
    evidence = [
        {
            "target": t,
            "attack_success": float(s),
            "trigger_norm": float(n),
            "anomaly_index": float(a),
            "backdoor_found": bool(f),
        }
        for t, s, n, a, f in zip(
            targets, again.success.tolist(), again.norms.tolist(), index.tolist(), found.tolist(), strict=True
        )
    ]
    return again, evidence, found


def _recovered_again(
    rerecover: Rerecover,
    targets: list[int],
    seed_offset: int,
    reference: torch.Tensor,
    config: Config,
    min_shrink: float,
    steps: int | None = None,
) -> tuple[RecoveryResult, torch.Tensor, torch.Tensor]:
    """Re-recover ``targets`` (each stops once its mask is an outlier) and judge them against ``reference``:
    (the recovery, anomaly index [k], found [k])."""
    again = rerecover(targets, seed_offset, steps, _found_by_mass(reference, config, min_shrink))
    return (again, *judge(again, reference, config, min_shrink))


def _found_by_mass(
    reference: torch.Tensor, config: Config, min_shrink: float
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """For a recovery in progress: the classes whose smallest working mask [k] already makes them
    an outlier against ``reference`` (their held-out success is checked after). Small-is-suspicious families only."""
    if side_of(config.recovery.family) != "low":
        return None

    def found(masses: torch.Tensor) -> torch.Tensor:
        values = score_values(masses.cpu(), torch.ones_like(masses.cpu()), "low")
        index = anomaly_index(values, "low", reference=reference)
        return is_backdoor(
            index,
            values,
            torch.ones_like(values),
            config.detection.anomaly_threshold,
            0.0,
            "low",
            min_shrink,
            reference,
        ) & torch.isfinite(masses.cpu())

    return found


# A class counts toward an untargeted trigger's spread once this many of its held-out images flip: fewer
# cannot say where it goes.
_MIN_FLIPPED = 4


def spread(sent: torch.Tensor, labels: torch.Tensor) -> tuple[float, list[int]]:
    """(spread, targets) of an untargeted trigger from where it sends held-out images (``sent`` [N],
    clean ``labels`` [N]). A class whose flipped images (at least ``_MIN_FLIPPED``) mostly go to one
    class gives a target; the spread is the number of distinct targets over the number of classes.
    An all-to-all backdoor's trigger maps each class onto its own target (spread near 1); a clean
    model's sends nearly all to one class, or, varying, a few classes consistently."""
    flipped, where = sent != labels, set()
    classes = labels.unique().tolist()
    for c in classes:
        to = sent[flipped & (labels == c)]
        if len(to) >= _MIN_FLIPPED:
            counts = torch.bincount(to)
            if 2 * counts.max() >= len(to):
                where.add(int(counts.argmax()))
    if len(classes) < 2:
        return 0.0, []
    return len(where) / len(classes), sorted(where)


@dataclass(frozen=True)
class Untargeted:
    """An untargeted trigger's evidence: its (first seed's) recovery, its spread, and the targets of
    the all-to-all backdoor it shows ([] when it shows none)."""

    recovery: RecoveryResult
    spread: float
    targets: list[int]


def untargeted(
    rerecover: Rerecover,
    model: nn.Module,
    held_out: tuple[torch.Tensor, torch.Tensor],
    config: Config,
    tries: int,
    targeted_norms: torch.Tensor,
    mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> Untargeted:
    """Recover untargeted triggers of ``model`` with up to ``tries`` seeds: an all-to-all backdoor when
    one works, maps the ``held_out`` (images, labels) classes apart, and is ``min_trigger_shrink`` times
    below the median of ``targeted_norms`` (the scan's per-class triggers: a clean model's spreading
    trigger covers much of the image). Its targets: the classes it reaches. A trigger at or above that
    median ends the tries: a clean model's, which no other seed shrinks threefold."""
    (x, y), d, first = held_out, config.detection, None
    reference_mass = float(targeted_norms.float().median())
    for offset in range(tries):
        again = rerecover([UNTARGETED], offset, config.recovery.untargeted_steps, None)
        share, targets = spread(sent_to(again.triggers, model, x, mean, std)[0], y)
        found, mass = Untargeted(again, share, targets), float(again.norms[0])
        first = first or dataclasses.replace(found, targets=[])
        works = float(again.success[0]) >= d.min_attack_success and mass * d.min_trigger_shrink <= reference_mass
        if works and share >= d.min_untargeted_spread:
            return found
        if mass >= reference_mass:
            break
    return first
