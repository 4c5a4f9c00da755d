"""Data that works offline on a fresh machine: embedded MNIST digits and a procedural colour set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from baerase.errors import InputError, LoadError

MNIST_PATH = Path(__file__).with_name("mnist.npz")


def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST digits shipped with baerase (500 per class).

    Returns:
        images: float32 tensor [5000, 1, 28, 28] in [0, 1].
        labels: int64 tensor [5000] in [0, 10).
    """
    try:
        with np.load(MNIST_PATH, allow_pickle=False) as f:
            x, y = f["images"], f["labels"]
    except Exception as exc:  # a broken install, not a user error
        raise LoadError(f"{MNIST_PATH}: embedded MNIST data is missing or damaged ({exc}); reinstall baerase") from exc
    images = torch.from_numpy(x.astype(np.float32)[:, None] / np.float32(255.0))
    return images, torch.from_numpy(y.astype(np.int64))


def _prototype(c: int, seed: int, size: int) -> np.ndarray:
    """Class c's prototype, [3, size, size] float32. Drawn from an RNG keyed on (seed, c) only, so a
    class looks the same whatever the number of classes."""
    rng = np.random.default_rng([seed, c, 0])
    c0, c1, c2 = rng.uniform(0.05, 0.95, size=(3, 3, 1, 1)).astype(np.float32)
    theta, theta2 = rng.uniform(0.0, np.pi, size=2)
    freq, freq2 = rng.uniform(1.0, 4.0, size=2)  # cycles across the image
    phase, phase2 = rng.uniform(0.0, 2 * np.pi, size=2)
    mix2 = rng.uniform(0.2, 0.6)
    cy, cx = rng.uniform(0.25, 0.75, size=2)
    radius = rng.uniform(0.12, 0.28)
    square = rng.random() < 0.5

    v, u = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    wave = np.sin(2 * np.pi * freq * (u * np.cos(theta) + v * np.sin(theta)) + phase)
    wave2 = np.sin(2 * np.pi * freq2 * (u * np.cos(theta2) + v * np.sin(theta2)) + phase2)
    p = (0.5 + 0.5 * ((1 - mix2) * wave + mix2 * wave2)).astype(np.float32)
    img = c0 * (1 - p) + c1 * p
    dist = np.maximum(np.abs(u - cx), np.abs(v - cy)) if square else np.hypot(u - cx, v - cy)
    # Soft edge so a one-pixel shift changes the image smoothly.
    shape = np.clip((radius - dist) * size / 1.5 + 0.5, 0.0, 1.0).astype(np.float32)
    return img * (1 - shape) + c2 * shape


def make_colour(
    num_classes: int = 10, per_class: int = 300, side: int = 32, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Procedural colour images for any number of classes (a CIFAR-like stand-in that needs no download).

    Each class has a prototype (two base colours mixed by two oriented sinusoids, plus a disc or
    square of a third colour). Each sample is a random crop of it (shifts up to side/8 pixels)
    with random brightness, contrast, colour cast and pixel noise, so a small CNN learns it well
    but not trivially. Class c's images depend only on (seed, c, per_class, side), not on
    num_classes.

    Returns:
        images: float32 tensor [num_classes * per_class, 3, side, side] in [0, 1], grouped by class.
        labels: int64 tensor [num_classes * per_class].
    """
    for name, value, least in (
        ("num_classes", num_classes, 1),
        ("per_class", per_class, 1),
        ("side", side, 4),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise InputError(f"make_colour: {name} must be an integer >= {least}, got {value!r}")
    pad = max(1, side // 8)
    full = side + 2 * pad
    x = np.empty((num_classes * per_class, 3, side, side), dtype=np.float32)
    for c in range(num_classes):
        proto = _prototype(c, seed, full)
        rng = np.random.default_rng([seed, c, 1])
        windows = np.lib.stride_tricks.sliding_window_view(proto, (side, side), axis=(1, 2))
        oy = rng.integers(0, 2 * pad + 1, size=per_class)
        ox = rng.integers(0, 2 * pad + 1, size=per_class)
        out = x[c * per_class : (c + 1) * per_class]
        out[:] = windows[:, oy, ox].transpose(1, 0, 2, 3)
        contrast = rng.uniform(0.7, 1.3, size=(per_class, 1, 1, 1)).astype(np.float32)
        brightness = rng.uniform(-0.12, 0.12, size=(per_class, 1, 1, 1)).astype(np.float32)
        cast = rng.normal(0.0, 0.04, size=(per_class, 3, 1, 1)).astype(np.float32)
        mean = out.mean(axis=(1, 2, 3), keepdims=True)
        out -= mean
        out *= contrast
        out += mean + brightness + cast
        # Uniform noise (std 0.06) is several times cheaper to draw than Gaussian.
        noise = rng.random(out.shape, dtype=np.float32)
        noise -= np.float32(0.5)
        noise *= np.float32(0.06 * 12**0.5)
        out += noise
        np.clip(out, 0.0, 1.0, out=out)
    y = np.repeat(np.arange(num_classes, dtype=np.int64), per_class)
    return torch.from_numpy(x), torch.from_numpy(y)
