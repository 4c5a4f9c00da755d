"""Backdoors with more than one target: several (trigger, target) pairs in one model, and all-to-all."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError
from .train import Normalize, all_to_all_success_rate, attack_success_rate
from .triggers import BadNets, Trigger, _check_images

TriggerFn = Callable[[torch.Tensor], torch.Tensor]


class Backdoors:
    """Several all-to-one backdoors in one model: ``triggers[i]`` sends any image to ``targets[i]``.

    Pass ``backdoors.triggers`` and ``backdoors.targets`` to :func:`baerase.attacks.train_backdoored`
    (or :func:`baerase.attacks.poison_multi`); :meth:`success_rates` scores each backdoor.
    """

    name = "multi"

    def __init__(self, triggers: Sequence[TriggerFn], targets: Sequence[int]):
        if len(triggers) < 1 or len(triggers) != len(targets):
            raise InputError(f"backdoors: need one target per trigger, got {len(triggers)} and {len(targets)}")
        if len(set(targets)) != len(targets):
            raise InputError(f"backdoors: targets must differ, got {list(targets)}")
        self.triggers, self.targets = list(triggers), [int(t) for t in targets]

    def reset(self) -> None:
        """Rewind every trigger that draws random positions."""
        for trig in self.triggers:
            if hasattr(trig, "reset"):
                trig.reset()

    def success_rates(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalize = None
    ) -> dict[int, float]:
        """``{target: ASR}``: each trigger's attack success rate on ``x [N, C, H, W]``, ``y [N]``."""
        self.reset()
        return {
            t: attack_success_rate(model, x, y, trig, t, normalize)
            for trig, t in zip(self.triggers, self.targets, strict=True)
        }

    def describe(self) -> dict[str, Any]:
        pairs = [{"target": t, **_describe(trig)} for trig, t in zip(self.triggers, self.targets, strict=True)]
        return {"name": self.name, "backdoors": pairs}

    def __repr__(self) -> str:
        return f"Backdoors(targets={self.targets}, triggers={self.triggers!r})"


def corner_backdoors(targets: Sequence[int] = (0, 5), size: int = 4, seed: int = 0) -> Backdoors:
    """Two (or four) patch backdoors in different corners with different patterns.

    The first is a checkerboard in the bottom-right corner; the others are random-valued patches
    (one seed each) in the top-left, top-right and bottom-left corners.
    """
    corners = ["corner", (1, 1), (1, -size - 1), (-size - 1, 1)]
    if not 1 <= len(targets) <= len(corners):
        raise InputError(f"corner_backdoors: 1 to {len(corners)} targets, got {len(targets)}")
    triggers = [BadNets(size, corners[0], seed=seed)]
    triggers += [BadNets(size, pos, pattern="random", seed=seed + i) for i, pos in enumerate(corners[1:], 1)]
    return Backdoors(triggers[: len(targets)], targets)


class AllToAll(Trigger):
    """An all-to-all backdoor: ``trigger`` sends an image of class ``y`` to ``(y + 1) mod num_classes``.

    Stamping is the wrapped trigger's; :meth:`success_rate` is the all-to-all ASR.
    """

    name = "all_to_all"

    def __init__(self, trigger: TriggerFn, num_classes: int | None = None):
        if not callable(trigger):
            raise InputError(f"all_to_all: trigger must be callable, got {type(trigger).__name__}")
        self.trigger, self.num_classes = trigger, num_classes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.name)
        return self.trigger(x)

    def reset(self) -> None:
        if hasattr(self.trigger, "reset"):
            self.trigger.reset()

    def success_rate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalize = None) -> float:
        """Share of ``x [N, C, H, W]`` classified as ``(y + 1) mod K`` once stamped."""
        self.reset()
        return all_to_all_success_rate(model, x, y, self.trigger, self.num_classes, normalize)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes, "trigger": _describe(self.trigger)}


def _describe(trigger: TriggerFn) -> dict[str, Any]:
    return trigger.describe() if hasattr(trigger, "describe") else {"name": type(trigger).__name__}
