"""Step 2: decide which classes are backdoored from the per-class recovery results."""
from __future__ import annotations

import math

import torch

_MAD_TO_STD = 1.4826  # makes the median absolute deviation a consistent estimate of a normal std


def anomaly_index(values: torch.Tensor, side: str = "low", reference: torch.Tensor | None = None) -> torch.Tensor:
    """Median-absolute-deviation anomaly index of each value (Neural Cleanse's rule).

    values: [K]. ``side="low"`` scores how far *below* the median a value lies (small triggers are
    suspicious), ``"high"`` how far above; values on the other side score 0. The median and MAD
    come from ``reference`` when given (e.g. the clean classes of an earlier scan), else from
    ``values`` themselves.
    """
    values = values.float()
    reference = values if reference is None else reference.float()
    median = reference.median()
    mad = (reference - median).abs().median() * _MAD_TO_STD
    # A perfectly uniform set of values has MAD 0; measure deviation against a tiny floor instead.
    scale = torch.clamp(mad, min=1e-6 * max(median.abs().item(), 1e-12))
    deviation = (median - values) if side == "low" else (values - median)
    return torch.clamp(deviation / scale, min=0)


def flag_classes(
    norms: torch.Tensor, success: torch.Tensor, threshold: float, min_success: float, side: str = "low",
    min_shrink: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly index [K], flagged bool [K]) for per-class trigger masses and attack successes.

    A class is flagged when its trigger is an outlier (index > threshold), its recovered trigger
    really works (success >= min_success) and, on the ``low`` side, its mass is at least
    ``min_shrink`` times below the median. Trigger masses are compared on a log scale: they spread
    multiplicatively (a 3x3 patch vs masks of tens to hundreds of pixels), and on a linear scale
    the large clean masks inflate the MAD until a tiny backdoor trigger barely stands out.
    """
    values = score_values(norms, success, side)
    index = anomaly_index(values, side)
    return index, is_backdoor(index, values, success, threshold, min_success, side, min_shrink)


def is_backdoor(
    index: torch.Tensor, values: torch.Tensor, success: torch.Tensor, threshold: float, min_success: float,
    side: str, min_shrink: float, reference: torch.Tensor | None = None,
) -> torch.Tensor:
    """The flagging rule (bool [K]) on anomaly indices and score values (``reference``: the clean
    classes' values, else ``values`` themselves, give the median the shrink is measured from)."""
    found = (index > threshold) & (success >= min_success)
    if side == "low":
        median = (values if reference is None else reference).float().median()
        found &= (median - values.float()) >= math.log(min_shrink)  # log masses: a factor
    return found


def score_values(norms: torch.Tensor, success: torch.Tensor, side: str) -> torch.Tensor:
    """The per-class values the anomaly index is computed on: log trigger mass or success."""
    return norms.float().clamp(min=1e-3).log() if side == "low" else success.float()
