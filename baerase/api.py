"""The public entry points: ``scan`` (recover + detect), ``erase`` (unlearn + verify), ``audit``."""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import cost, ops
from .config import Config
from .detect import Verdict, detect, score_values, side_of, verify
from .errors import InputError
from .recover import Recovery, Screened, TriggerSet, frozen, recover, recover_all
from .recover.checkpoint import ChunkStore
from .report import UNCHANGED, ClassResult, EraseResult, ScanReport, provenance, sha256_model, sha256_tensors
from .unlearn import allowed_drop, clean_accuracy, unlearn
from .threads import using_threads
from .validate import Inputs, prepare

Normalize = tuple[Any, Any] | None
# Below this many guard images, one image is over twice the allowed accuracy drop, and unlearning
# can lose more on unseen data than the guard sees.
_GUARD_MIN_IMAGES = 50
_STAMP_OP = {"mask": "trigger_apply", "patch": "patch_apply"}  # the op that stamps each trigger family


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
    """
    start = time.perf_counter()
    if checkpoint is not None:
        config = (config or Config()).replace(checkpoint_dir=os.fspath(checkpoint))
    cfg = config or Config()
    inputs = prepare(model, images, labels, normalize, cfg, cfg.detection.val_fraction, keep=cfg.detection.eval_samples)
    cfg = inputs.config
    targets = list(range(inputs.num_classes)) if cfg.recovery.classes is None else _check_targets(cfg.recovery.classes, inputs.num_classes)
    _check_ranks(inputs)
    spent = cost.Cost()
    with _running(inputs) as backends, frozen(model):
        with cost.phase(spent, "recovery"), _progress(_scan_steps(cfg, len(targets)), "baerase recovery", cfg) as bar:
            screened = recover_all(model, inputs.fit, inputs.held_out, targets, cfg, inputs.mean, inputs.std,
                                   on_step=bar.update, store_for=lambda stage: _store(inputs, targets, stage))
        with cost.phase(spent, "confirmation"):
            verdict = detect(screened.recovery, _rerecover(inputs, model, "baerase confirm"), cfg,
                             screened.reference, screened.recovered)
    return _scan_report(inputs, screened, verdict, spent, backends, time.perf_counter() - start)


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

    The clean accuracy on a held-out split (``config.unlearning.guard_fraction`` of the clean data) never
    drops by more than ``config.unlearning.max_accuracy_drop``. Returns EraseResult with the repaired
    ``model`` (the input model is never modified), ``history``, ``verified``, the re-scan
    ``evidence`` and ``cost``. When no unlearning step within that bound weakens the recovered
    triggers, ``model`` is a copy of the input, ``changed`` is False and a warning says so.
    """
    start = time.perf_counter()
    if not isinstance(report, ScanReport):
        raise InputError(f"report must be the ScanReport returned by baerase.scan, got {type(report).__name__}")
    cfg = config or Config()
    inputs = prepare(model, images, labels, normalize, cfg, cfg.unlearning.guard_fraction)
    if report.num_classes != inputs.num_classes:
        raise InputError(f"the report is for a {report.num_classes}-class model but this model has {inputs.num_classes}")
    if not report.flagged:
        repaired = _frozen_copy(model)
        acc = clean_accuracy(repaired, *inputs.held_out, inputs.mean, inputs.std)
        return EraseResult(model=repaired, history=[], erased=[], verified=True, evidence=[], accuracy_before=acc,
                           accuracy_after=acc, trigger_asr_before=0.0, trigger_asr_after=0.0, rounds=0,
                           seconds=time.perf_counter() - start, num_classes=inputs.num_classes)
    if report.triggers is None:
        raise InputError("the report carries no recovered triggers; load it with ScanReport.load(dir) from a scan output")
    _warn_small_guard(inputs)
    result = _unlearn_rounds(inputs, report)
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
    """``scan`` then ``erase``: returns (report, result)."""
    report = scan(model, images, labels, normalize=normalize, config=config)
    return report, erase(model, images, labels, report, normalize=normalize, config=config)


def _unlearn_rounds(inputs: Inputs, report: ScanReport) -> EraseResult:
    """Unlearn the flagged classes, re-recover them, and unlearn what the re-scan still finds,
    for up to ``config.unlearning.erase_rounds`` rounds; every round answers to the original model."""
    cfg, model, flagged = inputs.config, inputs.model, report.flagged
    positions = [report.triggers.targets.tolist().index(t) for t in flagged]
    triggers = report.triggers.to(inputs.device).select(positions)
    side = side_of(report.family)
    clean = [c for c in report.classes if not c.flagged]
    reference = score_values(torch.tensor([c.trigger_norm for c in clean]),
                             torch.tensor([c.attack_success for c in clean]), side)
    # The verification re-scan spends what the scan needed to find these classes' triggers.
    verify_steps = max((c.steps or cfg.recovery.steps) for c in report.classes if c.flagged)
    floor = clean_accuracy(model, *inputs.held_out, inputs.mean, inputs.std) - allowed_drop(cfg, len(inputs.held_out[1]))
    spent, current, history, outcomes = cost.Cost(), model, [], []
    with _running(inputs):
        for round_ in range(1, cfg.unlearning.erase_rounds + 1):
            with cost.phase(spent, "unlearning"), _progress(_unlearn_steps(inputs), f"baerase unlearn (round {round_})",
                                                           cfg) as bar:
                outcome = unlearn(current, triggers, inputs.fit, inputs.held_out, cfg, inputs.mean, inputs.std,
                                  inputs.num_classes, accuracy_floor=floor, original=model, on_step=bar.update)
            outcomes.append(outcome)
            history += [dict(row, round=round_) for row in outcome.history]
            current = outcome.model
            with cost.phase(spent, "verification"), frozen(current):
                rescan, evidence, still = verify(flagged, reference, _rerecover(inputs, current, f"baerase verify (round {round_})"),
                                                 cfg, steps=verify_steps)
            if not still.any():
                break
            # The re-scan found a trigger the last round missed: unlearn both next round.
            triggers = TriggerSet.concat([triggers, rescan.triggers.select(torch.nonzero(still).flatten())])
    changed = any(o.kept_step > 0 for o in outcomes)
    if not changed:
        warnings.warn(f"erase could not unlearn classes {flagged}. {UNCHANGED}", stacklevel=3)
    repaired = _frozen_copy(current)
    return EraseResult(
        model=repaired, history=history, erased=flagged, verified=not still.any(), evidence=evidence,
        accuracy_before=outcomes[0].accuracy_before,
        accuracy_after=clean_accuracy(repaired, *inputs.held_out, inputs.mean, inputs.std),
        trigger_asr_before=outcomes[0].trigger_asr_before, trigger_asr_after=outcome.trigger_asr_after,
        rounds=len(outcomes), seconds=0.0, num_classes=inputs.num_classes,
        rolled_back=sum(o.rolled_back for o in outcomes), changed=changed, cost=spent,
    )


def _unlearn_steps(inputs: Inputs) -> int:
    """The most optimisation steps one unlearning round can take (it stops early once erased)."""
    u = inputs.config.unlearning
    return max(u.unlearn_epochs * math.ceil(len(inputs.fit[1]) / u.unlearn_batch_size), u.min_steps)


def _rerecover(inputs: Inputs, model: nn.Module, desc: str):
    """A re-recovery of some classes of ``model`` (confirmation, verification), with a progress bar."""
    cfg = inputs.config

    def run(targets: list[int], seed_offset: int, steps: int | None, enough=None) -> Recovery:
        total = len(targets) * (steps or cfg.recovery.steps)
        label = desc if seed_offset == 0 else f"{desc} ({seed_offset}/{cfg.detection.confirmations})"
        with _progress(total, label, cfg) as bar:
            return recover(model, inputs.fit, inputs.held_out, targets, cfg, inputs.mean, inputs.std,
                           seed_offset=seed_offset, steps=steps, on_step=bar.update, enough=enough)

    return run


def _scan_steps(config: Config, k: int) -> int:
    """The most recovery steps a scan of ``k`` classes takes (classes that stop early take fewer)."""
    r = config.recovery
    if k <= r.prescreen_above:
        return k * r.steps
    return k * r.prescreen_steps + min(k, r.prescreen_keep + r.reference_sample) * r.steps


def _scan_report(inputs: Inputs, screened: Screened, verdict: Verdict, spent: cost.Cost, backends: dict,
                 seconds: float) -> ScanReport:
    cfg, recovery = inputs.config, screened.recovery
    recovered = [True] * len(recovery.targets) if screened.recovered is None else screened.recovered.tolist()
    columns = zip(recovery.targets, recovery.success.tolist(), recovery.norms.tolist(), verdict.index.tolist(),
                  verdict.flagged.tolist(), verdict.confirmation.tolist(), recovery.steps.tolist(), recovered)
    classes = [ClassResult(target=t, attack_success=float(s), trigger_norm=float(n), anomaly_index=float(a),
                           flagged=bool(f), confirmation_index=None if math.isnan(c) else float(c), steps=int(r),
                           screened_out=not full)
               for t, s, n, a, f, c, r, full in columns]
    return ScanReport(classes=classes, num_classes=inputs.num_classes, image_shape=tuple(inputs.images.shape[1:]),
                      family=cfg.recovery.family, backend=backends.get(_STAMP_OP[cfg.recovery.family], "ref"),
                      config=cfg.to_dict(),
                      seconds=seconds, provenance=provenance(inputs, backends), triggers=recovery.triggers,
                      cost=spent)


@contextmanager
def _running(inputs: Inputs) -> Iterator[dict[str, str]]:
    """Seeded, with the requested backend, without touching the caller's global RNG; yields the
    backend of each op (filled as they run)."""
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    run = inputs.config.run
    with torch.random.fork_rng(devices=devices), ops.use_backend(run.backend), using_threads(run.threads), \
            ops.record_backends() as used:
        torch.manual_seed(run.seed)
        yield used


@contextmanager
def _progress(total: int, desc: str, config: Config):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=not config.run.progress, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _store(inputs: Inputs, targets: list[int], stage: str) -> ChunkStore | None:
    """The checkpoint store of one stage of a resumable scan, named by everything its chunks depend on."""
    cfg = inputs.config
    if cfg.run.checkpoint_dir is None:
        return None
    run_only = ("progress", "checkpoint_dir")
    fingerprint = {"config": {k: v for k, v in cfg.to_dict().items() if k not in run_only},
                   "model_sha256": sha256_model(inputs.model), "data_sha256": sha256_tensors(inputs.images, inputs.labels),
                   "targets": targets, "device": inputs.device.type}
    folder = cfg.run.checkpoint_dir if stage == "full" else os.path.join(cfg.run.checkpoint_dir, stage)
    return ChunkStore(folder, fingerprint)


def _check_ranks(inputs: Inputs) -> None:
    """Under torchrun, every rank must scan the same model and data: their results are gathered."""
    from . import distributed

    if distributed.enabled():
        distributed.setup(inputs.device)
        distributed.check_same_inputs(f"{sha256_model(inputs.model)}:{sha256_tensors(inputs.images, inputs.labels)}")


def _check_targets(classes, k: int) -> list[int]:
    targets = sorted({int(c) for c in classes})
    if not targets or targets[0] < 0 or targets[-1] >= k:
        raise InputError(f"config.recovery.classes must be class indices in [0, {k}), got {list(classes)}")
    return targets


def _warn_small_guard(inputs: Inputs) -> None:
    cfg, guard_images = inputs.config, len(inputs.held_out[1])
    if guard_images < _GUARD_MIN_IMAGES:
        warnings.warn(
            f"erase holds out {guard_images} clean images for its accuracy guard, too few to bound the "
            f"accuracy drop at {cfg.unlearning.max_accuracy_drop:.0%}: the repaired model may lose more on unseen data. "
            f"Give it at least {math.ceil(_GUARD_MIN_IMAGES / cfg.unlearning.guard_fraction)} clean images.",
            stacklevel=3,
        )


def _frozen_copy(model: nn.Module) -> nn.Module:
    import copy

    repaired = copy.deepcopy(model).eval()
    for p in repaired.parameters():
        p.requires_grad_(False)
    return repaired
