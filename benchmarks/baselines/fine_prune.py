"""Fine-Pruning (Liu, Dolan-Gavitt, Garg 2018): backdoor neurons are dormant on clean inputs, so
pruning the last feature map's least active channels removes them; fine-tuning then recovers
the clean accuracy the pruning cost."""

from __future__ import annotations

import torch
from torch import nn

from baerase.attacks.train import Normalize, _device, clean_accuracy

from .common import device_and_normalizer, feature_layers, finish, prepare, train_epochs


class ChannelMask(nn.Module):
    """Zeroes pruned channels of a feature map; a buffer so it saves and deep-copies with the model."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.register_buffer("keep", keep.float().view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


@torch.no_grad()
def _mean_activation(model: nn.Module, layer: nn.Module, x: torch.Tensor, normalize: Normalize) -> torch.Tensor:
    store: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, a, out: store.append(out.clamp(min=0).mean((0, 2, 3))))
    device, norm = device_and_normalizer(model, x, normalize)
    try:
        for xb in x.split(256):
            model(norm(xb.to(device)))
    finally:
        handle.remove()
    return torch.stack(store).mean(0)


def fine_prune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    normalize: Normalize = None,
    layer: str | None = None,
    max_drop: float = 0.05,
    max_ratio: float = 0.9,
    epochs: int = 10,
    lr: float = 0.01,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """A pruned and fine-tuned copy of ``model``.

    Channels of ``layer`` (a direct child's name; default: the last one with a 4-D output) are
    pruned in increasing order of mean clean activation while the clean accuracy on ``x`` stays
    within ``max_drop`` of the unpruned model's and at most ``max_ratio`` of channels are gone;
    then the copy is fine-tuned like :func:`fine_tune`. The pruned layer is wrapped as
    ``nn.Sequential(layer, ChannelMask)``.
    """
    out = prepare(model, x, y, "fine_prune").eval()
    name = layer or feature_layers(out, x, normalize)[-1]
    target = getattr(out, name)
    order = _mean_activation(out, target, x, normalize).argsort()  # most dormant first
    mask = ChannelMask(torch.ones(len(order))).to(_device(out))
    setattr(out, name, nn.Sequential(target, mask))
    base = clean_accuracy(out, x, y, normalize)
    limit = int(max_ratio * len(order))
    step = max(1, len(order) // 32)  # coarse steps keep the accuracy checks cheap on wide layers
    pruned = 0
    while pruned < limit:
        nxt = min(pruned + step, limit)
        mask.keep.view(-1)[order[pruned:nxt]] = 0
        if clean_accuracy(out, x, y, normalize) < base - max_drop:
            mask.keep.view(-1)[order[pruned:nxt]] = 1  # the last step cost too much: undo it
            break
        pruned = nxt
    out.pruned_channels = pruned
    train_epochs(out, x, y, normalize=normalize, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
    return finish(out)
