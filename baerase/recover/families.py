"""The trigger families and what builds each: one place that knows them all."""

from __future__ import annotations

import torch

from .blend import BlendSet
from .triggers import TriggerSet
from .warp import WarpSet

Triggers = TriggerSet | WarpSet | BlendSet
_SETS = {"warp": WarpSet, "blend": BlendSet}


def from_state(meta: dict, state: dict[str, torch.Tensor]) -> Triggers:
    """Rebuild a saved trigger set of any family from (meta, state_dict)."""
    return _SETS.get(meta.get("family"), TriggerSet).from_state(meta, state)


def concat(parts: list[Triggers]) -> Triggers:
    """Stack trigger sets of one family."""
    return type(parts[0]).concat(parts)
