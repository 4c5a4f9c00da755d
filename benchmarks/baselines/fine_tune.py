"""Fine-tuning on the defender's clean data: the simplest baseline every backdoor paper reports."""

from __future__ import annotations

import torch
from torch import nn

from baerase.attacks.train import Normalize

from .common import finish, prepare, train_epochs


def fine_tune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    normalize: Normalize = None,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` fine-tuned with SGD on clean ``x [N, C, H, W]``, ``y [N]``; eval mode."""
    out = prepare(model, x, y, "fine_tune")
    train_epochs(out, x, y, normalize=normalize, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return finish(out)
