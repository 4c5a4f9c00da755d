"""Poisoning, training and the two metrics every backdoor experiment reports."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

Normalize = tuple[Sequence[float] | torch.Tensor, Sequence[float] | torch.Tensor] | None


def normalizer(normalize: Normalize, channels: int, device=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``(mean, std)`` per channel -> a function ``[N, C, H, W] -> (x - mean) / std`` (identity for None)."""
    if normalize is None:
        return lambda x: x
    mean, std = (torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1) for v in normalize)
    if mean.numel() not in (1, channels) or std.numel() not in (1, channels):
        raise InputError(f"normalize: mean/std need 1 or {channels} values, got {mean.numel()} and {std.numel()}")
    if (std <= 0).any():
        raise InputError("normalize: std must be positive")
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return lambda x: (x - mean.to(x.device, x.dtype)) / std.to(x.device, x.dtype)


def _check_data(x: torch.Tensor, y: torch.Tensor, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise InputError(f"{who}: images must be a float tensor [N, C, H, W] in [0, 1]")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise InputError(f"{who}: labels must be a 1-D tensor with one label per image ({x.shape[0]})")
    if x.shape[0] == 0:
        raise InputError(f"{who}: no images given")


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def poison(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int,
    rate: float,
    seed: int = 0,
    *,
    return_index: bool = False,
):
    """All-to-one poisoning: stamp ``round(rate * N)`` images whose label != ``target`` and relabel them.

    x: ``[N, C, H, W]`` in [0, 1]; y: ``[N]`` int64. Returns new tensors ``(x', y')`` (the inputs
    are not modified), plus the poisoned indices ``[round(rate * N)]`` if ``return_index``.
    The images are chosen with a generator seeded by ``seed``.
    """
    _check_data(x, y, "poison")
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"poison: rate must be in [0, 1], got {rate}")
    candidates = torch.nonzero(y != target).flatten()
    count = round(rate * len(y))
    if count > len(candidates):
        raise InputError(f"poison: rate {rate} needs {count} non-target images but only {len(candidates)} exist")
    idx = _choose(candidates, count, seed)
    x, y = x.clone(), y.clone()
    if count:
        x[idx] = trigger(x[idx]).to(x.dtype)
        y[idx] = target
    return (x, y, idx) if return_index else (x, y)


def poison_clean_label(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int,
    rate: float = 1.0,
    seed: int = 0,
    *,
    return_index: bool = False,
):
    """Clean-label poisoning: stamp ``round(rate * n_target)`` images of class ``target``, labels kept.

    ``rate`` is the share of the *target class's* images stamped (the attack cannot touch others
    without changing labels). x: ``[N, C, H, W]`` in [0, 1]; y: ``[N]``. Returns new ``(x', y')``
    (``y' == y``), plus the stamped indices if ``return_index``.
    """
    _check_data(x, y, "poison_clean_label")
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"poison_clean_label: rate must be in [0, 1] (share of the target class), got {rate}")
    candidates = torch.nonzero(y == target).flatten()
    if not len(candidates):
        raise InputError(f"poison_clean_label: no image is labelled {target}; clean-label poisoning needs some")
    idx = _choose(candidates, round(rate * len(candidates)), seed)
    x = x.clone()
    if len(idx):
        x[idx] = trigger(x[idx]).to(x.dtype)
    return (x, y.clone(), idx) if return_index else (x, y.clone())


def poison_multi(
    x: torch.Tensor,
    y: torch.Tensor,
    triggers: Sequence[Callable[[torch.Tensor], torch.Tensor]],
    targets: Sequence[int],
    rate: float,
    seed: int = 0,
    *,
    return_index: bool = False,
):
    """Several all-to-one backdoors in one set: trigger ``i`` poisons ``round(rate * N)`` images toward ``targets[i]``.

    Each backdoor gets its own images (disjoint, none already of its target). Returns new
    ``(x', y')``, plus one index tensor per backdoor if ``return_index``.
    """
    _check_data(x, y, "poison_multi")
    triggers, targets = list(triggers), [int(t) for t in targets]
    if not triggers or len(triggers) != len(targets):
        raise InputError(f"poison_multi: need one target per trigger, got {len(triggers)} and {len(targets)}")
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"poison_multi: rate must be in [0, 1], got {rate}")
    free = torch.ones(len(y), dtype=torch.bool, device=y.device)
    x, y_out, chosen = x.clone(), y.clone(), []
    for i, (trig, target) in enumerate(zip(triggers, targets, strict=True)):
        candidates = torch.nonzero(free & (y != target)).flatten()
        count = round(rate * len(y))
        if count > len(candidates):
            raise InputError(f"poison_multi: backdoor {i} needs {count} free non-target images, {len(candidates)} left")
        idx = _choose(candidates, count, seed + i)
        free[idx] = False
        if count:
            x[idx] = trig(x[idx]).to(x.dtype)
            y_out[idx] = target
        chosen.append(idx)
    return (x, y_out, chosen) if return_index else (x, y_out)


def poison_all_to_all(
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    rate: float,
    seed: int = 0,
    num_classes: int | None = None,
    *,
    return_index: bool = False,
):
    """All-to-all poisoning: stamp ``round(rate * N)`` images and relabel each ``y -> (y + 1) mod K``.

    ``K`` is ``num_classes`` (default: the largest label + 1). Returns new ``(x', y')``, plus the
    poisoned indices if ``return_index``.
    """
    _check_data(x, y, "poison_all_to_all")
    if not 0.0 <= rate <= 1.0:
        raise InputError(f"poison_all_to_all: rate must be in [0, 1], got {rate}")
    k = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if k < 2 or int(y.max()) >= k:
        raise InputError(f"poison_all_to_all: need num_classes >= 2 above every label, got {k}")
    idx = _choose(torch.arange(len(y), device=y.device), round(rate * len(y)), seed)
    x, y = x.clone(), y.clone()
    if len(idx):
        x[idx] = trigger(x[idx]).to(x.dtype)
        y[idx] = (y[idx] + 1) % k
    return (x, y, idx) if return_index else (x, y)


def _choose(candidates: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """``count`` of ``candidates [M]`` drawn without replacement from a generator seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return candidates[torch.randperm(len(candidates), generator=g)[:count].to(candidates.device)]


POISON_MODES = ("all_to_one", "clean_label", "all_to_all")


def _poisoned(x, y, trigger, target, rate: float, seed: int, mode: str):
    """Dispatch of :func:`train_backdoored` to the poisoning its ``mode`` (and trigger type) names."""
    if mode not in POISON_MODES:
        raise InputError(f"train_backdoored: mode must be one of {POISON_MODES}, got {mode!r}")
    multi = isinstance(trigger, (list, tuple))
    if multi != isinstance(target, (list, tuple)):
        raise InputError("train_backdoored: pass a list of triggers with a list of targets (or one of each)")
    if multi and mode != "all_to_one":
        raise InputError(f"train_backdoored: several triggers need mode 'all_to_one', got {mode!r}")
    if multi:
        return poison_multi(x, y, trigger, target, rate, seed)
    if mode == "clean_label":
        return poison_clean_label(x, y, trigger, target, rate, seed)
    if mode == "all_to_all":
        return poison_all_to_all(x, y, trigger, rate, seed)
    return poison(x, y, trigger, target, rate, seed)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    normalize: Normalize = None,
    progress: bool = False,
    batch_transform: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> nn.Module:
    """Train ``model`` in place with Adam and cross-entropy; returns it in eval mode.

    x: ``[N, C, H, W]`` in [0, 1] (``normalize`` applied per batch before the model); y: ``[N]``.
    Shuffling uses a generator seeded by ``seed``. ``batch_transform(xb, yb) -> (xb, yb)`` lets a
    caller alter each batch (e.g. poison on the fly).
    """
    _check_data(x, y, "train_classifier")
    device = _device(model)
    norm = normalizer(normalize, x.shape[1], device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc="train", unit="epoch")
    for _ in epochs_iter:
        for i in torch.randperm(len(y), generator=g).split(batch_size):
            xb, yb = x[i].to(device), y[i].to(device)
            if batch_transform is not None:
                xb, yb = batch_transform(xb, yb)
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(norm(xb)), yb).backward()
            opt.step()
    return model.eval()


def train_backdoored(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor] | Sequence[Callable[[torch.Tensor], torch.Tensor]],
    target: int | Sequence[int] | None,
    rate: float = 0.1,
    epochs: int = 10,
    seed: int = 0,
    normalize: Normalize = None,
    *,
    lr: float = 1e-3,
    batch_size: int = 64,
    progress: bool = False,
    mode: str = "all_to_one",
) -> nn.Module:
    """Poison ``rate`` of ``(x [N, C, H, W], y [N])`` with ``trigger`` toward ``target`` and train on it.

    ``mode``: ``"all_to_one"`` (:func:`poison`; with a list of triggers and a list of targets,
    several backdoors via :func:`poison_multi`, ``rate`` each), ``"clean_label"``
    (:func:`poison_clean_label`: ``rate`` of the target class stamped, labels kept) or
    ``"all_to_all"`` (:func:`poison_all_to_all`; ``target`` is ignored). Returns ``model``
    (trained in place) in eval mode.
    """
    xp, yp = _poisoned(x, y, trigger, target, rate, seed, mode)
    return train_classifier(
        model,
        xp,
        yp,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        normalize=normalize,
        progress=progress,
    )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, normalize: Normalize = None, batch_size: int = 1024) -> torch.Tensor:
    """Predicted classes ``[N]`` (CPU int64) for ``x [N, C, H, W]``, batched, in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    device = _device(model)
    norm = normalizer(normalize, x.shape[1], device)
    was_training = model.training
    model.eval()
    try:
        return torch.cat([model(norm(xb.to(device))).argmax(1).cpu() for xb in x.split(batch_size)])
    finally:
        model.train(was_training)


def clean_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, normalize: Normalize = None, batch_size: int = 1024
) -> float:
    """Share of ``x [N, C, H, W]`` classified as its label ``y [N]``."""
    _check_data(x, y, "clean_accuracy")
    return (predict(model, x, normalize, batch_size) == y.cpu()).float().mean().item()


def attack_success_rate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    target: int,
    normalize: Normalize = None,
    batch_size: int = 1024,
) -> float:
    """Share of images with label != ``target`` classified as ``target`` once stamped with ``trigger``.

    x: ``[N, C, H, W]`` in [0, 1]; y: ``[N]``. Raises ``InputError`` if every label is ``target``.
    """
    _check_data(x, y, "attack_success_rate")
    keep = y != target
    if not keep.any():
        raise InputError("attack_success_rate: every image is already labelled as the target")
    xs = x[keep]
    with torch.no_grad():
        stamped = torch.cat([trigger(xb) for xb in xs.split(batch_size)])
    return (predict(model, stamped, normalize, batch_size) == target).float().mean().item()


def all_to_all_success_rate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int | None = None,
    normalize: Normalize = None,
    batch_size: int = 1024,
) -> float:
    """Share of ``x [N, C, H, W]`` classified as ``(y + 1) mod K`` once stamped (the all-to-all ASR).

    ``K`` defaults to the model's number of outputs.
    """
    _check_data(x, y, "all_to_all_success_rate")
    device, norm = _device(model), normalizer(normalize, x.shape[1], _device(model))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = torch.cat([model(norm(trigger(xb).to(device))).cpu() for xb in x.split(batch_size)])
    finally:
        model.train(was_training)
    k = logits.shape[1] if num_classes is None else int(num_classes)
    return (logits.argmax(1) == (y.cpu() + 1) % k).float().mean().item()
