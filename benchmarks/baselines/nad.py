"""Neural Attention Distillation (Li et al. 2021): a teacher fine-tuned on clean data has weaker
backdoor attention; distilling its attention maps into the student erases the backdoor more
thoroughly than fine-tuning alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baerase.attacks.train import Normalize

from .common import feature_layers, finish, prepare, train_epochs
from .fine_tune import fine_tune


def attention_map(a: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD's attention of a feature map ``[N, C, H, W]``: mean_c |a|^p, flattened, L2-normalised -> [N, H*W]."""
    return F.normalize(a.abs().pow(p).mean(1).flatten(1), dim=1)


def nad(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    normalize: Normalize = None,
    layers: list[str] | None = None,
    beta: float = 5000.0,
    p: float = 2.0,
    teacher_epochs: int = 10,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A copy of ``model`` distilled from its own fine-tuned teacher.

    Student loss: ``CE + beta * sum_l mean (A_s^l - A_t^l)^2`` over ``layers`` (direct children's
    names; default: the last three with 4-D outputs, like NAD's three ResNet groups), where ``A``
    is :func:`attention_map`; ``beta`` 5000 as in NAD's public code.
    """
    student = prepare(model, x, y, "nad")
    teacher = fine_tune(
        model, x, y, normalize=normalize, epochs=teacher_epochs, lr=lr, batch_size=batch_size, seed=seed + 1
    )
    names = layers or feature_layers(student, x, normalize)[-3:]
    maps: dict[str, dict[str, torch.Tensor]] = {"s": {}, "t": {}}
    handles = []
    for key, net in (("s", student), ("t", teacher)):
        for n in names:
            handles.append(
                getattr(net, n).register_forward_hook(lambda m, a, out, key=key, n=n: maps[key].__setitem__(n, out))
            )

    def loss_fn(net: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        logits = net(xb)
        with torch.no_grad():
            teacher(xb)
        at = sum((attention_map(maps["s"][n], p) - attention_map(maps["t"][n], p)).pow(2).mean() for n in names)
        return F.cross_entropy(logits, yb) + beta * at

    teacher.eval()
    try:
        train_epochs(
            student,
            x,
            y,
            normalize=normalize,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            loss_fn=loss_fn,
        )
    finally:
        for h in handles:
            h.remove()
    return finish(student)
