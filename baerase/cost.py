"""What an audit spent: images passed through the suspect model, and seconds, per phase.

Every call of the suspect model (or of a copy being repaired) goes through ``forward``, which
charges the images to the phase open in this thread or task. The count does not drift with the
machine's load, so speed work is measured in it.
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


_current: ContextVar[PhaseCost | None] = ContextVar("baerase_cost_phase", default=None)


@contextmanager
def phase(cost: Cost, name: str) -> Iterator[PhaseCost]:
    """Charge the suspect model's images, and the seconds spent, to ``cost.phases[name]``."""
    record = cost.phases.setdefault(name, PhaseCost())
    token = _current.set(record)
    start = time.perf_counter()
    try:
        yield record
    finally:
        record.seconds += time.perf_counter() - start
        _current.reset(token)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, charged to the open phase: backward too when autograd will run through it."""
    record = _current.get()
    if record is not None:
        record.forward += len(x)
        if torch.is_grad_enabled() and (x.requires_grad or _trains(model)):
            record.backward += len(x)
    return model(x)


def _trains(model) -> bool:
    parameters = getattr(model, "parameters", None)
    return parameters is not None and any(p.requires_grad for p in parameters())
