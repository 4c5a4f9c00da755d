"""The public entry points: ``scan`` (recover + detect), ``erase`` (unlearn + verify), ``audit``."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
from torch import nn

from . import cost, distributed
from .config import Config
from .detect import Verdict, detect
from .errors import ConfigError, InputError
from .progress import progress
from .recover import RecoveryResult, Screened, TriggerSet, attack_success, frozen, recover, recover_all
from .recover.checkpoint import ChunkStore
from .recover.screen import planned_steps
from .report import EraseResult, ScanReport, sha256_model, sha256_tensors
from .unlearn.guard import clean_accuracy
from .unlearn.rounds import erase_rounds, frozen_copy, nothing_to_erase
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
    config = _check_budget(check_config(config))
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
            screened, verdict, reason = _judge(inputs, targets, spent)
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
    config = _check_budget(check_config(config))
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
        verifying: list[nn.Module] = []
        # erase_rounds is called from here: its warnings point at the caller of erase.
        with inputs.running(), cost.collected() as spent:
            try:
                result = (
                    erase_rounds(inputs, report, _recording(inputs, verifying))
                    if report.flagged and report.cut_short is None
                    else _nothing_erased(inputs, report)
                )
            except cost.BudgetSpent as cut:
                result = _cut_erase(inputs, report, verifying, cut.reason, spent)
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
    config = _check_budget(check_config(config))
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


def _check_budget(config: Config) -> Config:
    """``config``, refused when it sets a budget under torchrun: one rank stopping alone would leave the
    others waiting for it."""
    run = config.run
    if (run.max_seconds is not None or run.max_model_images is not None) and distributed.enabled():
        raise ConfigError("max_seconds and max_model_images are not supported under torchrun; unset them")
    return config


def _judge(inputs: Inputs, targets: list[int], spent: cost.Cost) -> tuple[Screened, Verdict, str | None]:
    """Recovery, then confirmation, charged to ``spent``: (every class's recovery, the verdict, None),
    or when the budget runs out (the classes recovered so far, nothing flagged, why)."""
    config, model, finished, screened = inputs.config, inputs.model, _Finished(), None
    try:
        with (
            cost.phase(spent, "recovery"),
            progress(planned_steps(config, len(targets)), "baerase recovery", config.run.progress) as bar,
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
                store_for=lambda stage: finished.wrap(stage, _store(inputs, targets, stage)),
            )
        with cost.phase(spent, "confirmation"):
            rerecover = _rerecover(inputs, model, "baerase confirm")
            verdict = detect(screened.recovery, rerecover, config, screened.reference, screened.recovered)
        return screened, verdict, None
    except cost.BudgetSpent as cut:
        screened = finished.screened(inputs) if screened is None else screened
        verdict, suspects = _no_verdict(screened, config)
        return screened, verdict, cut.reason + (f"; unconfirmed suspects: classes {suspects}" if suspects else "")


def _no_verdict(screened: Screened, config: Config) -> tuple[Verdict, list[int]]:
    """The anomaly indices of a scan cut short, with nothing flagged, and the classes that were
    suspects before any confirmation."""
    recovery = screened.recovery
    if not recovery.targets:
        empty = torch.zeros(0)
        return Verdict(empty, empty.bool(), empty), []
    first = detect(recovery, None, config.replace(confirmations=0), screened.reference, screened.recovered)
    suspects = [recovery.targets[i] for i in torch.nonzero(first.flagged).flatten().tolist()]
    return Verdict(first.index, torch.zeros_like(first.flagged), torch.full_like(first.index, float("nan"))), suspects


class _Finished:
    """The chunks a scan's full recoveries finished (computed or loaded from its checkpoint store),
    kept so that a scan whose budget runs out still reports them."""

    def __init__(self) -> None:
        self.chunks: list[tuple[TriggerSet, torch.Tensor]] = []
        self.store: ChunkStore | None = None

    def wrap(self, stage: str, store: ChunkStore | None):
        """The store recovery uses for ``stage``: the pre-screen's (its short recoveries judge nothing)
        as it is, the full recoveries' through this record."""
        if stage == "screen":
            return store
        self.store = store
        return self

    def load(self, targets: list[int]) -> tuple[TriggerSet, torch.Tensor] | None:
        saved = self.store.load(targets) if self.store is not None else None
        if saved is not None:
            self.chunks.append(saved)
        return saved

    def save(self, triggers: TriggerSet, success: torch.Tensor) -> None:
        self.chunks.append((triggers, success))
        if self.store is not None:
            self.store.save(triggers, success)

    def screened(self, inputs: Inputs) -> Screened:
        """The finished classes as a scan's recovery, in class order."""
        chunks = sorted(self.chunks, key=lambda chunk: int(chunk[0].targets[0]))
        if not chunks:
            empty = torch.zeros(0)
            return Screened(RecoveryResult([], None, empty, empty, empty.long()), None, None)
        triggers = TriggerSet.concat([t.to(inputs.device) for t, _ in chunks])
        success = torch.cat([s.detach().float().cpu() for _, s in chunks])
        steps = torch.full((len(triggers),), inputs.config.recovery.steps, dtype=torch.long)
        recovery = RecoveryResult(triggers.targets.tolist(), triggers, success, triggers.norms().detach().cpu(), steps)
        return Screened(recovery, None, None)


def _nothing_erased(inputs: Inputs, report: ScanReport) -> EraseResult:
    """The result of erasing a report that flags nothing: clean, or (cut short) no verdict to act on."""
    result = nothing_to_erase(inputs)
    if report.cut_short is not None:
        result.verified, result.changed = False, False
        result.cut_short = f"the scan was cut short: {report.cut_short}"
    return result


def _recording(inputs: Inputs, verifying: list[nn.Module]):
    """The re-recovery of a repaired model (see ``erase_rounds``), noting each model it verifies: the
    last is the best checkpoint kept so far, should the budget run out."""

    def rerecover_on(model: nn.Module, desc: str):
        verifying.append(model)
        return _rerecover(inputs, model, desc)

    return rerecover_on


def _cut_erase(
    inputs: Inputs, report: ScanReport, verifying: list[nn.Module], reason: str, spent: cost.Cost
) -> EraseResult:
    """The result of an erase whose budget ran out: the last repaired model its guard kept (the
    input's copy before any), unverified, measured on the held-out split as erase measures."""
    original = inputs.model
    repaired = frozen_copy(verifying[-1] if verifying else original)
    flagged = report.triggers.targets.tolist()
    triggers = report.triggers.to(inputs.device).select([flagged.index(t) for t in report.flagged])
    x, y = inputs.held_out

    def trigger_success(model: nn.Module) -> float:
        return attack_success(triggers, model, x, y, inputs.mean, inputs.std).max().item()

    return EraseResult(
        model=repaired,
        history=[],
        erased=report.flagged,
        verified=False,
        evidence=[],
        accuracy_before=clean_accuracy(original, x, y, inputs.mean, inputs.std),
        accuracy_after=clean_accuracy(repaired, x, y, inputs.mean, inputs.std),
        trigger_asr_before=trigger_success(original),
        trigger_asr_after=trigger_success(repaired),
        rounds=len(verifying),
        seconds=0.0,
        num_classes=inputs.num_classes,
        changed=sha256_model(repaired) != sha256_model(original),
        cost=spent,
        cut_short=reason,
    )
