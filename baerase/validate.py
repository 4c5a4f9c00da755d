"""Input checks run once at the API boundary, so that bad input fails with a message that names
the problem instead of a traceback from deep inside torch."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import ops, rng
from .config import Config
from .data import as_tensors, split
from .errors import InputError
from .ops.reference import normalize_images
from .threads import using_threads

MIN_IMAGES = 20  # below this the fit/validation split leaves too little to score classes on


def check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model


def check_device(model: nn.Module, requested: str | torch.device | None) -> torch.device:
    """The device to run on: ``requested`` (config.run.device) or the model's own. The model is never
    moved, since that would modify the caller's object, so a mismatch is an error."""
    devices = list(dict.fromkeys(t.device for t in (*model.parameters(), *model.buffers())))
    if any(d.type == "meta" for d in devices):
        raise InputError(
            "the model's weights are on the 'meta' device (never materialised); load real weights first, "
            "e.g. model.load_state_dict(state, assign=True)"
        )
    own = devices[0] if devices else torch.device("cpu")
    if requested is None:
        return own
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as exc:
        raise InputError(
            f"config.run.device {requested!r} is not a torch device ({exc}); use e.g. 'cpu' or 'cuda:0'"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"config.run.device is {str(device)!r} but no CUDA device is available; use 'cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if devices and any(d != device for d in devices):
        raise InputError(
            f"the model is on {own} but config.run.device is {device}; move the model first "
            f"(model.to({str(device)!r})) or leave config.run.device unset to run on the model's device"
        )
    return device


def check_images(images: object) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"images must be a float tensor [N, C, H, W], got {type(images).__name__}")
    if images.dim() != 4:
        raise InputError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise InputError(f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 pixels by 255")
    if len(images) < MIN_IMAGES:
        raise InputError(f"need at least {MIN_IMAGES} clean images, got {len(images)}")
    if not torch.isfinite(images).all():
        raise InputError("images contain NaN or inf values")
    low, high = images.min().item(), images.max().item()
    if high > 1.0 + 1e-3 or low < -1e-3:
        hint = "divide by 255" if high > 2 else "pass pixels in [0, 1] and give normalize=(mean, std)"
        raise InputError(f"images must be pixels in [0, 1], got values in [{low:.3g}, {high:.3g}]; {hint}")
    # detach: recovery must never write gradients into the caller's tensor
    return images.detach().float()


def check_labels(labels: object, count: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise InputError(f"labels must be an int64 tensor [N], got {type(labels).__name__}")
    if labels.dim() != 1 or len(labels) != count:
        raise InputError(f"labels must have shape [{count}] (one per image), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"labels must be integers, got {labels.dtype}")
    if labels.min().item() < 0:
        raise InputError(f"labels must be >= 0, got {labels.min().item()}")
    return labels.detach().long()


def check_normalize(normalize: object, channels: int, device: torch.device) -> tuple:
    if normalize is None:
        return None, None
    try:
        mean, std = (torch.as_tensor(v, dtype=torch.float32, device=device).flatten() for v in normalize)
    except (TypeError, ValueError) as exc:
        raise InputError(f"normalize must be (mean, std) with one value per channel: {exc}") from None
    if mean.numel() == 1:
        mean, std = mean.expand(channels).clone(), std.expand(channels).clone() if std.numel() == 1 else std
    if mean.numel() != channels or std.numel() != channels:
        raise InputError(
            f"normalize needs {channels} means and stds (one per channel), got {mean.numel()} and {std.numel()}"
        )
    if not (std > 0).all():
        raise InputError("normalize std values must be > 0")
    return mean, std


@torch.no_grad()
def probe_classes(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std) -> int:
    """Run the model once on two images and two altered copies; return its number of classes K,
    checking the output."""
    # Scanning feeds the model altered images; one that gives NaN on them would only fail (or,
    # worse, score as harmless) deep inside recovery, so try a stamped-looking copy up front.
    x = images[:2]
    x = torch.cat([x, 0.75 * x + 0.25 * (1 - x.flip(-1))])
    x = normalize_images(x, mean, std)
    training = model.training
    model.eval()
    try:
        out = model(x)
    except Exception as exc:
        raise InputError(
            f"the model failed on images of shape {tuple(images.shape[1:])} (C, H, W): "
            f"{type(exc).__name__}: {exc}. Check the channel count and image size the model expects."
        ) from None
    finally:
        model.train(training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != len(x):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"the model must return logits [N, K] for N images, got {shape}")
    if out.shape[1] < 2:
        raise InputError(f"the model must have at least 2 classes, got {out.shape[1]} logits")
    clean = len(x) // 2
    if not torch.isfinite(out[:clean]).all():
        raise InputError("the model returned NaN or inf logits on clean images")
    if not torch.isfinite(out[clean:]).all():
        raise InputError(
            "the model returned NaN or inf logits on slightly altered clean images (as a trigger alters "
            "them), so triggers cannot be scored; check the model for numerical problems"
        )
    k = out.shape[1]
    if labels.max().item() >= k:
        raise InputError(f"labels go up to {labels.max().item()} but the model returns {k} logits (classes 0..{k - 1})")
    return k


@dataclass(frozen=True)
class Inputs:
    """Validated inputs of a scan or an erase, on the run's device.

    ``fit`` trains (recovery, unlearning); ``held_out`` judges (trigger success, the accuracy guard).
    """

    model: nn.Module
    config: Config
    device: torch.device
    images: torch.Tensor
    labels: torch.Tensor
    mean: torch.Tensor | None
    std: torch.Tensor | None
    num_classes: int
    fit: tuple[torch.Tensor, torch.Tensor]
    held_out: tuple[torch.Tensor, torch.Tensor]

    @contextmanager
    def running(self) -> Iterator[dict[str, str]]:
        """Seeded, with the requested backend and threads; yields the backend of each op that ran
        (filled as they run). The random streams (``baerase.rng``), the backend and the cost records
        belong to this thread or task alone; only a requested thread count changes torch's, which
        is process-wide (see ``baerase.threads.using_threads``)."""
        run = self.config.run
        with (
            rng.seeded(run.seed),
            ops.use_backend(run.backend),
            using_threads(run.threads),
            ops.record_backends() as used,
        ):
            yield used


def check_config(config: object) -> Config:
    """``config`` itself, or ``Config()`` for None; anything else is an error that names it."""
    if config is None:
        return Config()
    if not isinstance(config, Config):
        raise InputError(f"config must be a baerase.Config, got {type(config).__name__}")
    return config


def prepare(
    model, images, labels, normalize, config: Config | None, held_out: float, keep: int | None = None
) -> Inputs:
    """Check every input once and split the clean data: ``held_out`` of it (at most ``keep``
    images) judges, the rest trains. The split is stratified and seeded by ``config.run.seed``."""
    config = check_config(config)
    model = check_model(model)
    if labels is None:
        images, labels = as_tensors(images)
    images = check_images(images)
    labels = check_labels(labels, len(images))
    device = check_device(model, config.run.device)
    images, labels = images.to(device), labels.to(device)
    mean, std = check_normalize(normalize, images.shape[1], device)
    num_classes = probe_classes(model, images, labels, mean, std)
    (fx, fy), (vx, vy) = split(images, labels, [1 - held_out, held_out], seed=config.run.seed)
    return Inputs(model, config, device, images, labels, mean, std, num_classes, (fx, fy), (vx[:keep], vy[:keep]))
