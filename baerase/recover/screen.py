"""Pre-screening for many classes: a short recovery of every class picks the few worth a full one."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import Config
from .recovery import RecoveryResult, recover


@dataclass(frozen=True)
class Screened:
    """A scan's recovery of every class; ``reference`` (bool [K]) marks the classes whose values
    judge the others and ``recovered`` (bool [K]) those fully recovered (both None: every class)."""

    recovery: RecoveryResult
    reference: torch.Tensor | None
    recovered: torch.Tensor | None


def recover_all(
    model: nn.Module,
    fit,
    val,
    targets: list[int],
    config: Config,
    mean=None,
    std=None,
    *,
    on_step: Callable[[int], None] | None = None,
    store_for=None,
) -> Screened:
    """The scan's recovery of ``targets``.

    Up to ``prescreen_above`` targets, every class gets the full recovery and all of them form the
    anomaly reference (None). Above it, every class first runs ``prescreen_steps`` steps on
    ``prescreen_batch`` images; the most easily reached (see ``kept``) and a seeded random sample
    of ``reference_sample`` others then get the full recovery, and that sample alone is the
    reference: its classes were chosen blind, so their median and spread are those of a typical
    class. ``store_for(stage)`` gives the checkpoint store of each stage (or None).
    """
    r = config.recovery
    store_for = store_for or (lambda stage: None)
    if len(targets) <= r.prescreen_above:
        full = recover(
            model, fit, val, targets, config, mean, std, on_step=on_step, store=store_for("full"), sharded=True
        )
        return Screened(full, None, None)
    quick = config.replace(batch_size=r.prescreen_batch)
    screening = recover(
        model,
        fit,
        None,
        targets,
        quick,
        mean,
        std,
        steps=r.prescreen_steps,
        on_step=on_step,
        store=store_for("screen"),
        sharded=True,
        keep_triggers=False,
    )
    keep, sample = pick(screening, config)
    focus = sorted(keep + sample)
    full = recover(model, fit, val, focus, config, mean, std, on_step=on_step, store=store_for("focus"), sharded=True)
    reference, recovered = torch.zeros(len(targets), dtype=torch.bool), torch.zeros(len(targets), dtype=torch.bool)
    reference[screening.rows(sample)] = True
    recovered[screening.rows(focus)] = True
    return Screened(screening.updated(full), reference, recovered)


def pick(screening: RecoveryResult, config: Config) -> tuple[list[int], list[int]]:
    """(the classes most easily reached, a random sample of the others) from a short recovery,
    ranked by the target probability its triggers reached (every mask starts alike, so the class
    the model is most easily pushed to ranks first)."""
    order = torch.argsort(-screening.success, stable=True).tolist()
    count = kept(config, len(order))
    keep, rest = [screening.targets[i] for i in order[:count]], [screening.targets[i] for i in order[count:]]
    return keep, reference_sample(rest, config)


def reference_sample(targets: list[int], config: Config) -> list[int]:
    """A seeded random sample of ``recovery.reference_sample`` of ``targets`` (all when fewer), sorted."""
    generator = torch.Generator().manual_seed(config.run.seed)
    chosen = torch.randperm(len(targets), generator=generator)[: config.recovery.reference_sample].tolist()
    return sorted(targets[i] for i in chosen)


def planned_steps(config: Config, k: int) -> int:
    """The most recovery steps a scan of ``k`` classes takes (classes that stop early take fewer)."""
    r = config.recovery
    if k <= r.prescreen_above:
        return k * r.steps
    return k * r.prescreen_steps + min(k, kept(config, k) + r.reference_sample) * r.steps


def kept(config: Config, k: int) -> int:
    """How many of ``k`` pre-screened classes get the full recovery."""
    r = config.recovery
    return min(k, max(r.prescreen_keep, math.ceil(r.prescreen_share * k)))
