"""The public entry points: ``scan`` (recover + detect), ``erase`` (unlearn + verify), ``audit``."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import torch
from torch import nn

from . import budget, cost, distributed
from .config import UNTARGETED_CHECK, Config
from .detect import Verdict, detect, independent, is_backdoor, score_values, untargeted
from .errors import InputError
from .progress import progress
from .recover import RecoveryResult, Screened, attack_success, blend, frozen, recover, recover_all, warp
from .recover.checkpoint import ChunkStore
from .recover.screen import planned_steps
from .report import EraseResult, ScanReport, sha256_model, sha256_tensors
from .unlearn.guard import logits_of
from .unlearn.rounds import erase_rounds, unlearned_copy
from .validate import Inputs, check_config, prepare

Normalize = tuple[Any, Any] | None


def scan(
    model: nn.Module,
    images: torch.Tensor | Any,
    labels: torch.Tensor | None = None,
    *,
    normalize: Normalize = None,
    config: Config | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> ScanReport:
    """Recover a trigger distribution for every candidate class and flag the backdoored ones.

    Args:
        model: classifier mapping [N, C, H, W] -> logits [N, K]; it is not modified.
        images: clean float images [N, C, H, W] in [0, 1] (or a Dataset / DataLoader, labels None).
        labels: int64 [N] in [0, K).
        normalize: optional per-channel (mean, std) applied before the model is called.
        config: ``baerase.Config``; defaults to ``Config()`` (``Config.paper()`` for the paper).
        checkpoint: directory for per-chunk checkpoints (overrides ``config.run.checkpoint_dir``); a
            scan killed mid-way and started again with the same directory resumes from it.
    Returns:
        ScanReport with ``flagged`` (sorted list of backdoored classes), ``classes`` (per-class
        evidence), ``cost`` (model images and seconds per phase) and ``to_json()``. Under
        ``torchrun`` every rank returns the same verdict; the triggers are gathered on rank 0 only.
        When ``config.run.max_seconds`` or ``max_model_images`` runs out, ``cut_short`` says so and
        the report holds the classes recovered so far, none flagged: no verdict.
    """
    start = time.perf_counter()
    config = budget.check_budget(check_config(config))
    if checkpoint is not None:
        config = config.replace(checkpoint_dir=os.fspath(checkpoint))
    with cost.budget(config.run.max_seconds, config.run.max_model_images):
        inputs = prepare(
            model, images, labels, normalize, config, config.detection.val_fraction, keep=config.detection.eval_samples
        )
        targets = _targets(inputs)
        distributed.check_ranks(model, inputs.images, inputs.labels, inputs.device)
        spent = cost.Cost()
        with inputs.running() as backends, frozen(model):
            inputs, screened, verdict, reason = _judge_families(inputs, targets, spent)
    report = ScanReport.of_scan(inputs, screened, verdict, spent, backends, time.perf_counter() - start)
    report.cut_short = reason
    return report


def erase(
    model: nn.Module,
    images: torch.Tensor | Any,
    labels: torch.Tensor | None,
    report: ScanReport,
    *,
    normalize: Normalize = None,
    config: Config | None = None,
) -> EraseResult:
    """Unlearn every flagged class of ``report`` from a copy of ``model``, then verify by re-scan.

    The clean accuracy on a held-out split (``config.unlearning.guard_fraction`` of the clean
    data) never drops by more than ``config.unlearning.max_accuracy_drop``. Returns EraseResult
    with the repaired ``model`` (the input model is never modified), ``history``, ``verified``,
    the re-scan ``evidence`` and ``cost``. When no unlearning step within that bound weakens the
    recovered triggers, ``model`` is a copy of the input, ``changed`` is False and a warning says so.
    When the budget (``config.run.max_seconds``, ``max_model_images``) runs out, or ``report`` was
    itself cut short, ``cut_short`` says so and ``model`` is the best checkpoint the guard kept so far
    (or the input's copy), not verified.
    """
    start = time.perf_counter()
    if not isinstance(report, ScanReport):
        raise InputError(f"report must be the ScanReport returned by baerase.scan, got {type(report).__name__}")
    config = budget.check_budget(check_config(config))
    if report.family != config.recovery.family:  # verification re-recovers triggers of the report's family
        config = config.replace(family=report.family)
    with cost.budget(config.run.max_seconds, config.run.max_model_images):
        inputs = prepare(model, images, labels, normalize, config, config.unlearning.guard_fraction)
        if report.num_classes != inputs.num_classes:
            raise InputError(
                f"the report is for a {report.num_classes}-class model but this model has {inputs.num_classes}"
            )
        if report.flagged and report.triggers is None:
            raise InputError(
                "the report carries no recovered triggers; load it with ScanReport.load(dir) from a scan output"
            )
        verifying: list[nn.Module] = []  # each repaired model verified: the last is the guard's best so far
        rerecover_on = budget.recording(lambda m, desc: _rerecover(inputs, m, desc), verifying)
        # erase_rounds is called from here: its warnings point at the caller of erase.
        with inputs.running(), cost.collected() as spent:
            try:
                if report.flagged and report.cut_short is None:
                    result = erase_rounds(inputs, report, rerecover_on)
                else:
                    result = budget.nothing_erased(inputs, report)
            except cost.BudgetSpent as cut:
                result = budget.cut_erase(inputs, report, verifying, cut.reason, spent)
    result.seconds = time.perf_counter() - start
    return result


def audit(
    model: nn.Module,
    images: torch.Tensor | Any,
    labels: torch.Tensor | None = None,
    *,
    normalize: Normalize = None,
    config: Config | None = None,
) -> tuple[ScanReport, EraseResult]:
    """``scan`` then ``erase``: returns (report, result). Both share one budget (``max_seconds``,
    ``max_model_images``); a scan cut short is not erased."""
    config = budget.check_budget(check_config(config))
    with cost.budget(config.run.max_seconds, config.run.max_model_images):
        report = scan(model, images, labels, normalize=normalize, config=config)
        return report, erase(model, images, labels, report, normalize=normalize, config=config)


def _rerecover(inputs: Inputs, model: nn.Module, desc: str):
    """A re-recovery of some classes of ``model`` (confirmation, verification), with a progress bar."""
    cfg = inputs.config

    def run(targets: list[int], seed_offset: int, steps: int | None, enough=None) -> RecoveryResult:
        label = desc if seed_offset == 0 else f"{desc} ({seed_offset}/{cfg.detection.confirmations})"
        with progress(len(targets) * (steps or cfg.recovery.steps), label, cfg.run.progress) as bar:
            return recover(
                model,
                inputs.fit,
                inputs.held_out,
                targets,
                cfg,
                inputs.mean,
                inputs.std,
                seed_offset=seed_offset,
                steps=steps,
                on_step=bar.update,
                enough=enough,
            )

    return run


def _targets(inputs: Inputs) -> list[int]:
    k, classes = inputs.num_classes, inputs.config.recovery.classes
    if classes is None:
        return list(range(k))
    targets = sorted({int(c) for c in classes})
    if not targets or targets[0] < 0 or targets[-1] >= k:
        raise InputError(f"config.recovery.classes must be class indices in [0, {k}), got {list(classes)}")
    return targets


def _store(inputs: Inputs, targets: list[int], stage: str) -> ChunkStore | None:
    """The checkpoint store of one stage of a resumable scan, named by everything its chunks depend on."""
    cfg = inputs.config
    if cfg.run.checkpoint_dir is None:
        return None
    settings = cfg.to_dict()
    # Settings that change no result: a scan cut short resumes under a larger budget.
    ignored = ("progress", "checkpoint_dir", "threads", "max_seconds", "max_model_images")
    settings["run"] = {k: v for k, v in settings["run"].items() if k not in ignored}
    fingerprint = {
        "config": settings,
        "model_sha256": sha256_model(inputs.model),
        "data_sha256": sha256_tensors(inputs.images, inputs.labels),
        "targets": targets,
        "device": inputs.device.type,
    }
    folder = cfg.run.checkpoint_dir if stage == "full" else os.path.join(cfg.run.checkpoint_dir, stage)
    return ChunkStore(folder, fingerprint)


# A scan's answer: the inputs whose config names the verdict's family, every class's recovery, the
# verdict, and why it was cut short (None: it ran to the end).
Judged = tuple[Inputs, Screened, Verdict, str | None]


def _judge_families(inputs: Inputs, targets: list[int], spent: cost.Cost) -> Judged:
    """``_judge`` with the configured family and, when the mask family flags nothing, each of
    ``config.recovery.fallback`` in turn: the first that flags (or runs out of budget) gives the
    answer; otherwise the mask family's evidence stands."""
    first = (inputs, *_judge_family(inputs, targets, spent))
    if inputs.config.recovery.family != "mask" or first[2].flagged.any() or first[3] is not None:
        return first
    for name in inputs.config.recovery.fallback:
        if name == UNTARGETED_CHECK:
            answer = _untargeted_fallback(first, spent)
        else:
            answer = _family_fallback(name, first, targets, spent)
        if answer is not None:
            return answer
    return first


def _family_fallback(family: str, first: Judged, targets: list[int], spent: cost.Cost) -> Judged | None:
    """The answer of ``family``'s recovery when it flags a class, or when it is cut short; None when it
    flags nothing."""
    inputs, screened, verdict, _ = first
    other = dataclasses.replace(inputs, config=inputs.config.replace(family=family))
    found, found_verdict, reason = _judge_family(other, targets, spent)
    if reason is not None:  # cut short before this family could answer: no verdict
        return inputs, screened, verdict, reason
    return (other, found, found_verdict, None) if found_verdict.flagged.any() else None


def _judge_family(inputs: Inputs, targets: list[int], spent: cost.Cost) -> tuple[Screened, Verdict, str | None]:
    """``_judge``, and what the warp and blend families add: a flagged warp must be specific
    (``_specific_warps``), a median out of the warps' reach is measured with a wider one
    (``_beyond_reach``), and a warp under the shrink rule that random warps are drawn to is flagged too
    (``_warp_sinks``); a flagged blend must cause its success (``_caused_blends``) and, on colour images, not
    make images look like its class (``_unnatural_blends``). Of several
    flags, each must stand without the strongest (``_independent``)."""
    screened, verdict, reason = _judge(inputs, targets, spent)
    family = inputs.config.recovery.family
    if reason is None and family == "blend":
        with cost.phase(spent, "confirmation"):
            verdict = _unnatural_blends(inputs, screened, _caused_blends(inputs, screened, verdict))
    elif reason is None and family == "warp" and not verdict.flagged.any():
        screened, verdict, reason = _beyond_reach(inputs, screened, verdict, spent)
        if reason is None and not verdict.flagged.any():
            with cost.phase(spent, "confirmation"):
                verdict = _warp_sinks(inputs, screened, verdict)
    elif reason is None and family == "warp":
        with cost.phase(spent, "confirmation"):
            verdict = _specific_warps(inputs, screened, verdict)
    if reason is not None:
        return screened, verdict, reason
    return _independent(inputs, screened, verdict, spent)


def _untargeted_fallback(first: Judged, spent: cost.Cost) -> Judged | None:
    """``first`` with an all-to-all backdoor's targets and untargeted trigger when an untargeted trigger
    maps the classes apart (``detect.untargeted``), or cut short; else None."""
    inputs, screened, verdict, _ = first
    tries = inputs.config.detection.confirmations + 1
    try:
        with cost.phase(spent, "recovery"):
            rerecover = _rerecover(inputs, inputs.model, "baerase untargeted")
            norms, (mean, std) = screened.recovery.norms, (inputs.mean, inputs.std)
            found = untargeted(rerecover, inputs.model, inputs.held_out, inputs.config, tries, norms, mean, std)
    except cost.BudgetSpent as cut:
        return inputs, screened, verdict, cut.reason
    targets = [t for t in found.targets if t in screened.recovery.targets]
    if not targets:
        return None
    flagged = torch.zeros_like(verdict.flagged)
    flagged[screened.recovery.rows(targets)] = True
    return inputs, screened, dataclasses.replace(verdict, flagged=flagged, untargeted=found.recovery.triggers), None


def _keeping(screened: Screened, verdict: Verdict, passes) -> Verdict:
    """``verdict`` keeping the flagged classes whose recovered triggers pass: ``passes(triggers, rows)`` gives
    one bool per flagged row. Under torchrun only rank 0 holds the triggers: it decides for all."""
    flagged, keep = torch.nonzero(verdict.flagged).flatten(), verdict.flagged.clone()
    if len(flagged) and screened.recovery.triggers is not None:
        keep[flagged] = passes(screened.recovery.triggers.select(flagged), flagged).cpu()
    return dataclasses.replace(verdict, flagged=distributed.from_rank0(keep))


def _specific_warps(inputs: Inputs, screened: Screened, verdict: Verdict) -> Verdict:
    """``verdict`` keeping only the warps that reach their class far more often than random smooth
    warps of their size (``detection.min_warp_lift``): a backdoor answers one warp, a class that is
    merely easy to reach answers any."""
    x, y = inputs.held_out

    def specific(warps, flagged: torch.Tensor) -> torch.Tensor:
        own = screened.recovery.success[flagged].to(x.device)
        gain = warp.lift(warps, own, lambda w: attack_success(w, inputs.model, x, y, inputs.mean, inputs.std))
        return gain >= inputs.config.detection.min_warp_lift

    return _keeping(screened, verdict, specific)


def _warp_sinks(inputs: Inputs, screened: Screened, verdict: Verdict) -> Verdict:
    """``verdict`` flagging the warps ``detection.min_warp_shrink`` times below the median that are sinks: random
    smooth warps of their size send ``min_warp_pull`` of the other classes' images to them, ``warp_pull_ratio``
    times as many as to any other class (``warp.pull``), and that are specific (``_specific_warps``)."""
    r, d = screened.recovery, inputs.config.detection
    values = score_values(r.norms, r.success, "low")
    reference = values if screened.reference is None else values[screened.reference]
    suspects = is_backdoor(
        verdict.index, values, r.success, d.anomaly_threshold, d.min_attack_success, "low", d.min_warp_shrink, reference
    )
    if screened.recovered is not None:
        suspects &= screened.recovered
    if not suspects.any():
        return verdict
    x, y = inputs.held_out

    def sinks(warps, _) -> torch.Tensor:
        predict = functools.partial(logits_of, inputs.model)  # the stamped images come normalised
        share = warp.pull(warps, predict, x, y, inputs.num_classes, inputs.mean, inputs.std)
        at = warps.targets.to(share.device).unsqueeze(1)
        own, rival = share.gather(1, at).squeeze(1), share.scatter(1, at, 0.0).amax(1)
        return (own >= d.min_warp_pull) & (own >= d.warp_pull_ratio * rival)

    pulled = _keeping(screened, dataclasses.replace(verdict, flagged=suspects), sinks)
    return _specific_warps(inputs, screened, pulled) if pulled.flagged.any() else verdict


def _caused_blends(inputs: Inputs, screened: Screened, verdict: Verdict) -> Verdict:
    """``verdict`` keeping only the blends that flip ``detection.min_attack_success`` more of the held-out
    images than the clean images reach their class unblended: a model that already sends most images
    to one class (an untrained one) shows a tiny blend there that changes nothing."""
    x, y = inputs.held_out

    def caused(blends, flagged: torch.Tensor) -> torch.Tensor:
        already = attack_success(blend.unblended(blends), inputs.model, x, y, inputs.mean, inputs.std).cpu()
        return screened.recovery.success[flagged] - already >= inputs.config.detection.min_attack_success

    return _keeping(screened, verdict, caused)


def _unnatural_blends(inputs: Inputs, screened: Screened, verdict: Verdict) -> Verdict:
    """``verdict`` keeping, on colour images, only the blends that make images look like their class by
    colour less often than chance (one in the classes present): a blend toward grey reaches a greyish
    clean class because it greys the images, a colour filter's target because the model learnt the filter."""
    if inputs.images.shape[1] == 1:
        return verdict
    chance = 1 / len(torch.unique(inputs.fit[1]))
    return _keeping(
        screened, verdict, lambda blends, _: blend.natural_share(blends, inputs.fit, inputs.held_out) < chance
    )


def _beyond_reach(
    inputs: Inputs, screened: Screened, verdict: Verdict, spent: cost.Cost
) -> tuple[Screened, Verdict, str | None]:
    """Warps reach at most ``warp_max_shift`` pixels. When most reference classes lie beyond that, the
    median is the reach itself, and a warp that works just inside it cannot show its shrink: those
    reference classes are measured again with a quarter of the image side as reach, and the warps
    judged again."""
    cfg, r = inputs.config, screened.recovery
    reach, wide = cfg.recovery.warp_max_shift, min(inputs.fit[0].shape[-2:]) / 4
    rows = torch.ones_like(r.norms, dtype=torch.bool) if screened.reference is None else screened.reference
    beyond = (r.norms >= reach) & rows
    if wide <= reach or 2 * int(beyond.sum()) < int(rows.sum()):
        return screened, verdict, None  # the median was measured
    try:
        with cost.phase(spent, "confirmation"):
            suspects = _unproven_warps(inputs, screened, verdict, wide)
        if not suspects.any():
            return screened, verdict, None
        with cost.phase(spent, "recovery"):
            classes = [t for t, b in zip(r.targets, beyond.tolist(), strict=True) if b]
            wider = dataclasses.replace(inputs, config=cfg.replace(warp_max_shift=wide))
            again = _rerecover(wider, inputs.model, "baerase recovery (wider warps)")(classes, 0, None)
        norms, success, at = r.norms.clone(), r.success.clone(), r.rows(classes)
        norms[at], success[at] = again.norms, again.success
        screened = dataclasses.replace(screened, recovery=dataclasses.replace(r, norms=norms, success=success))
        verdict = _confirmed(inputs, screened, spent)
    except cost.BudgetSpent as cut:
        return screened, verdict, cut.reason
    return screened, dataclasses.replace(verdict, flagged=verdict.flagged & suspects), None


def _unproven_warps(inputs: Inputs, screened: Screened, verdict: Verdict, wide: float) -> torch.Tensor:
    """The classes [K] an out-of-reach median keeps from being flagged: outliers whose warps work, are
    specific (``_specific_warps``) and small enough to show the shrink against a median of ``wide``."""
    r, d = screened.recovery, inputs.config.detection
    reach = inputs.config.recovery.warp_max_shift
    size = r.norms * d.min_trigger_shrink
    suspects = (verdict.index > d.anomaly_threshold) & (r.success >= d.min_attack_success)
    suspects &= (size > reach) & (size <= wide)
    if screened.recovered is not None:
        suspects &= screened.recovered
    if not suspects.any():
        return suspects
    return _specific_warps(inputs, screened, dataclasses.replace(verdict, flagged=suspects)).flagged


def _independent(
    inputs: Inputs, screened: Screened, verdict: Verdict, spent: cost.Cost
) -> tuple[Screened, Verdict, str | None]:
    """``detect.independent``: of several flagged targets, the strongest is unlearned from a copy of the
    model for ``detection.independence_steps`` steps, and the others and the reference classes are recovered
    again on it."""
    r, steps, tested = screened.recovery, inputs.config.detection.independence_steps, verdict

    def rerecover_without(target: int):
        probe = r.triggers.select(r.rows([target]))
        unlearned = unlearned_copy(inputs, probe, steps, f"baerase independence (unlearn {target})")
        return _rerecover(inputs, unlearned, "baerase independence")

    try:
        if r.triggers is not None:  # under torchrun only rank 0 holds them: it decides for all
            with cost.phase(spent, "confirmation"):
                tested = independent(verdict, r, inputs.config, rerecover_without, screened.reference)
    except cost.BudgetSpent as cut:
        verdict, suspects = budget.no_verdict(screened, inputs.config)
        return screened, verdict, cut.reason + (f"; unconfirmed suspects: classes {suspects}" if suspects else "")
    flagged, lost_with = distributed.from_rank0((tested.flagged, tested.lost_with))
    return screened, dataclasses.replace(verdict, flagged=flagged, lost_with=lost_with), None


def _confirmed(inputs: Inputs, screened: Screened, spent: cost.Cost) -> Verdict:
    """The verdict on ``screened``: its anomalies, each kept only if seeded re-recoveries find it again."""
    with cost.phase(spent, "confirmation"):
        rerecover = _rerecover(inputs, inputs.model, "baerase confirm")
        return detect(screened.recovery, rerecover, inputs.config, screened.reference, screened.recovered)


def _stage(config: Config, stage: str) -> str:
    """A recovery stage's checkpoint name: a fallback family's chunks are kept apart from the mask family's."""
    family = config.recovery.family
    return stage if family == "mask" else f"{family}-{stage}"


def _judge(inputs: Inputs, targets: list[int], spent: cost.Cost) -> tuple[Screened, Verdict, str | None]:
    """Recovery, then confirmation, charged to ``spent``: (every class's recovery, the verdict, None),
    or when the budget runs out (the classes recovered so far, nothing flagged, why)."""
    config, model, finished, screened = inputs.config, inputs.model, budget.Finished(), None
    try:
        with (
            cost.phase(spent, "recovery"),
            progress(
                planned_steps(config, len(targets)), f"baerase recovery ({config.recovery.family})", config.run.progress
            ) as bar,
        ):
            screened = recover_all(
                model,
                inputs.fit,
                inputs.held_out,
                targets,
                config,
                inputs.mean,
                inputs.std,
                on_step=bar.update,
                store_for=lambda stage: finished.wrap(stage, _store(inputs, targets, _stage(config, stage))),
            )
        return screened, _confirmed(inputs, screened, spent), None
    except cost.BudgetSpent as cut:
        screened = finished.screened(inputs) if screened is None else screened
        verdict, suspects = budget.no_verdict(screened, config)
        return screened, verdict, cut.reason + (f"; unconfirmed suspects: classes {suspects}" if suspects else "")
