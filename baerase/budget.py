"""What a run cut short by its budget (``max_seconds``, ``max_model_images``) reports: the classes a
scan finished with no verdict, or the last model an erase's guard kept, unverified."""

from __future__ import annotations

import torch
from torch import nn

from . import cost, distributed
from .config import Config
from .detect import Verdict, detect
from .errors import ConfigError
from .recover import RecoveryResult, Screened, TriggerSet, attack_success
from .recover.checkpoint import ChunkStore
from .report import EraseResult, ScanReport, sha256_model
from .unlearn.guard import clean_accuracy
from .unlearn.rounds import frozen_copy, nothing_to_erase
from .validate import Inputs


def check_budget(config: Config) -> Config:
    """``config``, refused when it sets a budget under torchrun: one rank stopping alone would leave the
    others waiting for it."""
    run = config.run
    if (run.max_seconds is not None or run.max_model_images is not None) and distributed.enabled():
        raise ConfigError("max_seconds and max_model_images are not supported under torchrun; unset them")
    return config


def no_verdict(screened: Screened, config: Config) -> tuple[Verdict, list[int]]:
    """The anomaly indices of a scan cut short, with nothing flagged, and the classes that were
    suspects before any confirmation."""
    recovery = screened.recovery
    if not recovery.targets:
        empty = torch.zeros(0)
        return Verdict(empty, empty.bool(), empty), []
    first = detect(recovery, None, config.replace(confirmations=0), screened.reference, screened.recovered)
    suspects = [recovery.targets[i] for i in torch.nonzero(first.flagged).flatten().tolist()]
    return Verdict(first.index, torch.zeros_like(first.flagged), torch.full_like(first.index, float("nan"))), suspects


class Finished:
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


def nothing_erased(inputs: Inputs, report: ScanReport) -> EraseResult:
    """The result of erasing a report that flags nothing: clean, or (cut short) no verdict to act on."""
    result = nothing_to_erase(inputs)
    if report.cut_short is not None:
        result.verified, result.changed = False, False
        result.cut_short = f"the scan was cut short: {report.cut_short}"
    return result


def recording(rerecover_on, verifying: list[nn.Module]):
    """``rerecover_on(model, desc)`` (see ``erase_rounds``), noting each model it verifies: the last is
    the best checkpoint kept so far, should the budget run out."""

    def noted(model: nn.Module, desc: str):
        verifying.append(model)
        return rerecover_on(model, desc)

    return noted


def cut_erase(
    inputs: Inputs, report: ScanReport, verifying: list[nn.Module], reason: str, spent: cost.Cost
) -> EraseResult:
    """The result of an erase whose budget ran out: the last repaired model its guard kept (the
    input's copy before any), unverified, measured on the held-out split as erase measures."""
    original = inputs.model
    repaired = frozen_copy(verifying[-1] if verifying else original)
    triggers = report.flagged_triggers().to(inputs.device)
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
