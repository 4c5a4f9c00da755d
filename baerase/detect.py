"""Step 2: decide which classes are backdoored from the per-class recovery results."""
from __future__ import annotations

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
    norms: torch.Tensor, success: torch.Tensor, threshold: float, min_success: float, side: str = "low"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(anomaly index [K], flagged bool [K]) for per-class trigger masses and attack successes.

    A class is flagged when its trigger is an outlier (index > threshold) and its recovered trigger
    really works (success >= min_success). Trigger masses are compared on a log scale: they spread
    multiplicatively (a 3x3 patch vs masks of tens to hundreds of pixels), and on a linear scale
    the large clean masks inflate the MAD until a tiny backdoor trigger barely stands out.
    """
    index = anomaly_index(score_values(norms, success, side), side)
    return index, (index > threshold) & (success >= min_success)


def score_values(norms: torch.Tensor, success: torch.Tensor, side: str) -> torch.Tensor:
    """The per-class values the anomaly index is computed on: log trigger mass or success."""
    return norms.float().clamp(min=1e-3).log() if side == "low" else success.float()
