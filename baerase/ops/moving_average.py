"""moving_average_: MINE's per-class E[exp T'] tracker, ``ma = (1 - rate) * ma + rate * value``.

Not a custom op: it updates K (at most a few hundred) numbers once per step, where one fused
torch expression already costs less than a kernel launch or a dispatcher round trip.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .reference import moving_average_ref


def moving_average_(
    ma: torch.Tensor, value: torch.Tensor, rate: float, active: torch.Tensor | None = None
) -> torch.Tensor:
    """In place ``ma = (1 - rate) * ma + rate * value`` per class; returns ``ma``.

    ma, value: [K] (or [K, ...]); rate: the paper's 0.001; active: bool [K], False freezes a class.
    """
    if ma.shape != value.shape:
        raise InputError(f"ma {list(ma.shape)} and value {list(value.shape)} must have the same shape")
    k = ma.shape[0] if ma.dim() else 1
    if active is not None and (active.dtype != torch.bool or active.shape != (k,)):
        raise InputError(f"active must be a bool tensor of shape [{k}], got {active.dtype} {list(active.shape)}")
    moving_average_ref(ma, value.detach(), float(rate), None if active is None else active.to(ma.device))
    return ma
