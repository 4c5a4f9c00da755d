"""Helpers shared by the baseline defenses: copying, normalisation, feature-map discovery, training."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from baerase.attacks.train import Normalize, _check_data, _device, normalizer

DEFENSES: dict[str, Callable[..., nn.Module]] = {}


def prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, who: str) -> nn.Module:
    """A trainable deep copy of ``model`` after checking the data (the caller's model stays untouched)."""
    _check_data(x, y, who)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}")
    out = copy.deepcopy(model)
    for p in out.parameters():
        p.requires_grad_(True)
    return out


def device_and_normalizer(
    model: nn.Module, x: torch.Tensor, normalize: Normalize
) -> tuple[torch.device, Callable[[torch.Tensor], torch.Tensor]]:
    """The model's device and the ``normalize`` function for ``x``'s channels on it: what every defense
    moves batches to and feeds the model through."""
    device = _device(model)
    return device, normalizer(normalize, x.shape[1], device)


def finish(model: nn.Module) -> nn.Module:
    return model.eval()


def feature_layers(model: nn.Module, x: torch.Tensor, normalize: Normalize = None) -> list[str]:
    """Names of the model's direct children whose output is a 4-D feature map, in call order.

    Found by one probe forward, so any architecture whose stages are direct children works
    (SmallCNN: ``c1, c2``; ResNet18: ``conv1, bn1, layer1..layer4``).
    """
    order: list[str] = []
    handles = []
    for name, child in model.named_children():

        def hook(m, args, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and name not in order:
                order.append(name)

        handles.append(child.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device, norm = device_and_normalizer(model, x, normalize)
        with torch.no_grad():
            model(norm(x[:2].to(device)))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise ValueError("the model has no direct child producing a 4-D feature map; pass layer names")
    return order


def train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    normalize: Normalize,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """SGD (momentum 0.9, weight decay 5e-4) over (x, y), the setting the baseline papers fine-tune with."""
    device, norm = device_and_normalizer(model, x, normalize)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(y), generator=g).split(batch_size):
            xb, yb = x[i].to(device), y[i].to(device)
            if batch_transform is not None:
                xb, yb = batch_transform(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(norm(xb)), yb) if loss_fn is None else loss_fn(model, norm(xb), yb)
            loss.backward()
            opt.step()
    return model.eval()
