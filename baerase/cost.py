"""What an audit spent: images passed through the suspect model, and seconds, per phase.

Every call of the suspect model (or of a copy being repaired) goes through ``forward``, which
charges the images to the phase open in this thread or task. The count does not drift with the
machine's load, so speed work is measured in it.

A :class:`Budget` (``Config(max_seconds=..., max_model_images=...)``) bounds what one audit may
spend: ``forward`` refuses the call that would go past it by raising :class:`BudgetSpent`, and
the entry points turn that into a report that says it was cut short. The unlearning loop polls
:func:`spent` between its steps instead, so that it ends at a checkpoint its guard has judged.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import nn

PHASES = ("recovery", "confirmation", "unlearning", "verification")


@dataclass
class PhaseCost:
    """Images through the suspect model (``forward``; ``backward``: of those, also back-propagated)."""

    forward: int = 0
    backward: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "seconds": round(self.seconds, 3)}


@dataclass
class Cost:
    """Per-phase cost of a scan or an erase, in the order the phases ran."""

    phases: dict[str, PhaseCost] = field(default_factory=dict)

    @property
    def forward(self) -> int:
        return sum(p.forward for p in self.phases.values())

    @property
    def backward(self) -> int:
        return sum(p.backward for p in self.phases.values())

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases.values())

    def per_class(self, num_classes: int) -> float:
        """Forward images per class of the model: comparable across class counts."""
        return self.forward / max(num_classes, 1)

    def merged(self, other: Cost) -> Cost:
        """The two records together (an audit: a scan's cost and its erase's)."""
        joined = Cost({name: PhaseCost(**vars(p)) for name, p in self.phases.items()})
        for name, p in other.phases.items():
            mine = joined.phases.setdefault(name, PhaseCost())
            mine.forward, mine.backward, mine.seconds = (
                mine.forward + p.forward,
                mine.backward + p.backward,
                mine.seconds + p.seconds,
            )
        return joined

    def to_dict(self) -> dict:
        phases = {name: p.to_dict() for name, p in self.phases.items()}
        return {"phases": phases, "forward": self.forward, "backward": self.backward, "seconds": round(self.seconds, 3)}

    @staticmethod
    def from_dict(data: dict | None) -> Cost:
        phases = (data or {}).get("phases", {})
        return Cost({name: PhaseCost(**p) for name, p in phases.items()})

    def table(self, num_classes: int) -> str:
        """A readable table: one row per phase and a total."""
        rows = ["| phase | model images | of which backward | per class | seconds |", "|---|---:|---:|---:|---:|"]
        for name, p in [*self.phases.items(), ("total", PhaseCost(self.forward, self.backward, self.seconds))]:
            rows.append(
                f"| {name} | {p.forward:,} | {p.backward:,} | {p.forward / max(num_classes, 1):,.0f} "
                f"| {p.seconds:.1f} |"
            )
        return "\n".join(rows)


class BudgetSpent(Exception):  # noqa: N818 (a signal that ends a run, not a failure)
    """Raised by :func:`forward` when the audit's budget cannot pay for the call; ``reason`` says
    which budget ran out, in which phase."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Phases that end themselves at a safe point when :func:`spent` says so, instead of being stopped by
# ``forward``: unlearning keeps the checkpoint its guard judged best.
POLLED = ("unlearning",)


@dataclass
class Budget:
    """Wall time and model images one audit may spend (None: unlimited), and what it has spent."""

    max_seconds: float | None = None
    max_images: int | None = None
    start: float = field(default_factory=time.perf_counter)
    images: int = 0
    reason: str | None = None  # set when it first runs out: which budget, in which phase

    def refuses(self, images: int, where: str | None) -> str | None:
        """Why ``images`` more model images cannot be spent now (None: they can)."""
        if self.reason is None:
            if self.max_images is not None and self.images + images > self.max_images:
                self.reason = f"model-image budget (max_model_images={self.max_images:,}) spent"
            elif self.max_seconds is not None and time.perf_counter() - self.start >= self.max_seconds:
                self.reason = f"time budget (max_seconds={self.max_seconds:g}) spent"
            if self.reason is not None and where is not None:
                self.reason += f" during {where}"
        return self.reason


_current: ContextVar[PhaseCost | None] = ContextVar("baerase_cost_phase", default=None)
_phase_name: ContextVar[str | None] = ContextVar("baerase_cost_phase_name", default=None)
_budget: ContextVar[Budget | None] = ContextVar("baerase_budget", default=None)
_collector: ContextVar[Cost | None] = ContextVar("baerase_cost_collector", default=None)


@contextmanager
def phase(cost: Cost, name: str) -> Iterator[PhaseCost]:
    """Charge the suspect model's images, and the seconds spent, to ``cost.phases[name]``."""
    record = cost.phases.setdefault(name, PhaseCost())
    collector = _collector.get()
    if collector is not None:
        collector.phases.setdefault(name, record)
    token, name_token = _current.set(record), _phase_name.set(name)
    start = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds += time.perf_counter() - start
        _current.reset(token)
        _phase_name.reset(name_token)


@contextmanager
def budget(max_seconds: float | None, max_images: int | None) -> Iterator[Budget]:
    """Bound the model images charged, and the seconds passed, in this thread or task for the
    duration. Inside an open budget (an audit's scan and erase) the open one is shared."""
    outer = _budget.get()
    if outer is not None:
        yield outer
        return
    token = _budget.set(Budget(max_seconds, max_images))
    try:
        yield _budget.get()
    finally:
        _budget.reset(token)


@contextmanager
def collected() -> Iterator[Cost]:
    """A record of every phase opened in the block: the cost of a run that was cut short."""
    token = _collector.set(Cost())
    try:
        yield _collector.get()
    finally:
        _collector.reset(token)


def spent() -> str | None:
    """Why the open budget allows no further model image (None: it does, or none is open)."""
    open_budget = _budget.get()
    return None if open_budget is None else open_budget.refuses(1, _phase_name.get())


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, charged to the open phase: backward too when autograd will run through it.
    Raises :class:`BudgetSpent`, before the call, when the open budget cannot pay for it."""
    record = _current.get()
    if record is not None:
        _charge_budget(len(x))
        record.forward += len(x)
        if torch.is_grad_enabled() and (x.requires_grad or _trains(model)):
            record.backward += len(x)
    return model(x)


def _charge_budget(images: int) -> None:
    open_budget = _budget.get()
    if open_budget is None:
        return
    name = _phase_name.get()
    reason = open_budget.refuses(images, name)
    if reason is not None and name not in POLLED:
        raise BudgetSpent(reason)
    open_budget.images += images


def _trains(model) -> bool:
    parameters = getattr(model, "parameters", None)
    return parameters is not None and any(p.requires_grad for p in parameters())
