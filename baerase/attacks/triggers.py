"""Backdoor triggers in pixel space: callables ``trigger(x) -> stamped copy``.

Every trigger is the masked blend the rest of baerase reasons about, ``x' = x + m * (p - x)``,
with ``x`` in ``[N, C, H, W]`` and values in [0, 1]: a patch trigger has a small mask ``m`` of
ones (or a watermark shape), a blended trigger a constant mask ``alpha`` over the whole image.
Patterns are built lazily for the channel count of the images they stamp, so the same trigger
serves 1-channel digits and 3-channel colour images.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import InputError

Position = str | tuple[int, int]


def _check_images(x: torch.Tensor, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{who}: images must be a tensor [N, C, H, W], got {shape}")
    if not x.is_floating_point():
        raise InputError(f"{who}: images must be float in [0, 1], got dtype {x.dtype}; divide uint8 data by 255")


def _to_channels(p: torch.Tensor, channels: int, who: str) -> torch.Tensor:
    """[h, w] | [1, h, w] | [C, h, w] -> [channels, h, w]; colour patterns become luminance on 1 channel."""
    if p.dim() == 2:
        p = p.unsqueeze(0)
    if p.dim() != 3:
        raise InputError(f"{who}: pattern must be [h, w] or [C, h, w], got {tuple(p.shape)}")
    if p.shape[0] == channels:
        return p
    if p.shape[0] == 1:
        return p.expand(channels, -1, -1)
    if p.shape[0] == 3 and channels == 1:
        return (0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]).unsqueeze(0)
    raise InputError(f"{who}: pattern has {p.shape[0]} channels but the images have {channels}")


class Trigger:
    """Base class: a named, describable callable mapping ``[N, C, H, W]`` images to stamped copies."""

    name: str = "trigger"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """JSON-friendly description (kind and parameters) for reports."""
        return {"name": self.name}

    def mask_and_pattern(self, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed ``(m [H, W], p [C, H, W])`` with ``trigger(x) == x + m * (p - x)``.

        Raises ``InputError`` for triggers whose mask changes per image (random positions).
        """
        raise InputError(f"{self.name}: this trigger has no single fixed mask")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.describe().items() if k != "name")
        return f"{type(self).__name__}({args})"


class PatchTrigger(Trigger):
    """An ``h x w`` patch with a shape mask, pasted at a fixed or random position.

    ``position``: ``"random"`` (a new position per image, drawn from a generator seeded with
    ``seed`` that advances with every call; :meth:`reset` rewinds it), ``"corner"`` (bottom-right,
    one pixel from the border) or ``(row, col)`` of the top-left pixel (negative values count
    from the bottom/right, as in Python indexing).
    """

    name = "patch"

    def __init__(
        self,
        pattern: torch.Tensor,
        shape_mask: torch.Tensor | None = None,
        position: Position = "corner",
        seed: int = 0,
        alpha: float = 1.0,
    ):
        pattern = torch.as_tensor(pattern, dtype=torch.float32)
        if pattern.dim() == 2:
            pattern = pattern.unsqueeze(0)
        if pattern.dim() != 3 or pattern.numel() == 0:
            raise InputError(f"{self.name}: pattern must be [h, w] or [C, h, w], got {tuple(pattern.shape)}")
        if pattern.min() < 0 or pattern.max() > 1:
            raise InputError(f"{self.name}: pattern values must lie in [0, 1]")
        self.pattern = pattern
        h, w = pattern.shape[-2:]
        self.shape_mask = torch.ones(h, w) if shape_mask is None else torch.as_tensor(shape_mask, dtype=torch.float32)
        if self.shape_mask.shape != (h, w):
            raise InputError(f"{self.name}: shape mask {tuple(self.shape_mask.shape)} != pattern size {(h, w)}")
        if not (isinstance(position, str) and position in ("random", "corner")) and not (
            isinstance(position, (tuple, list)) and len(position) == 2
        ):
            raise InputError(f"{self.name}: position must be 'random', 'corner' or (row, col), got {position!r}")
        if not 0.0 < alpha <= 1.0:
            raise InputError(f"{self.name}: alpha must be in (0, 1], got {alpha}")
        self.position = tuple(int(v) for v in position) if not isinstance(position, str) else position
        self.seed = int(seed)
        self.alpha = float(alpha)
        self.reset()

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.pattern.shape[-2:])

    def reset(self) -> None:
        """Rewind the random-position generator to ``seed``."""
        self._gen = torch.Generator().manual_seed(self.seed)

    def _fixed_origin(self, height: int, width: int) -> tuple[int, int]:
        h, w = self.size
        if h > height or w > width:
            raise InputError(f"{self.name}: a {h}x{w} patch does not fit {height}x{width} images")
        if self.position == "corner":
            # one pixel from the border, like the usual BadNets corner stamp
            return max(height - h - 1, 0), max(width - w - 1, 0)
        r, c = self.position
        r, c = (r + height if r < 0 else r), (c + width if c < 0 else c)
        if not (0 <= r <= height - h and 0 <= c <= width - w):
            raise InputError(f"{self.name}: position {self.position} puts the {h}x{w} patch outside {height}x{width}")
        return r, c

    def positions(self, n: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left ``(rows [n], cols [n])`` for the next ``n`` images (advances the generator if random)."""
        h, w = self.size
        if h > height or w > width:
            raise InputError(f"{self.name}: a {h}x{w} patch does not fit {height}x{width} images")
        if self.position == "random":
            rows = torch.randint(0, height - h + 1, (n,), generator=self._gen)
            cols = torch.randint(0, width - w + 1, (n,), generator=self._gen)
            return rows, cols
        r, c = self._fixed_origin(height, width)
        return torch.full((n,), r), torch.full((n,), c)

    def mask_and_pattern(self, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == "random":
            return super().mask_and_pattern(channels, height, width)
        return self._canvas(self.pattern, channels, height, width)

    def _canvas(self, pattern: torch.Tensor, channels: int, height: int, width: int):
        r, c = self._fixed_origin(height, width)
        h, w = self.size
        pad = (c, width - c - w, r, height - r - h)
        m = F.pad(self.shape_mask.to(pattern.device) * self.alpha, pad)
        p = F.pad(_to_channels(pattern, channels, self.name), pad)
        return m, p

    def stamp(self, x: torch.Tensor, pattern: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable stamp at the fixed position with an optional override ``pattern [C|1, h, w]``.

        Used by trigger optimisation (TrojanNN, IMC), where gradients must reach the pattern.
        """
        _check_images(x, self.name)
        if self.position == "random":
            raise InputError(f"{self.name}: stamp() needs a fixed position; call the trigger instead")
        pattern = self.pattern if pattern is None else pattern
        m, p = self._canvas(pattern.to(x.device, x.dtype), x.shape[1], *x.shape[-2:])
        return x + m.to(x.dtype) * (p - x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.name)
        if self.position != "random":
            with torch.no_grad():
                return self.stamp(x)
        n, ch, height, width = x.shape
        rows, cols = self.positions(n, height, width)
        h, w = self.size
        out = x.detach().clone()
        rr = (rows[:, None] + torch.arange(h)).to(x.device)[:, :, None]  # [N, h, 1]
        cc = (cols[:, None] + torch.arange(w)).to(x.device)[:, None, :]  # [N, 1, w]
        idx = torch.arange(n, device=x.device)[:, None, None]
        region = out[idx, :, rr, cc]  # advanced indices first: [N, h, w, C]
        patch = _to_channels(self.pattern, ch, self.name).to(x.device, x.dtype).permute(1, 2, 0)
        m = (self.shape_mask * self.alpha).to(x.device, x.dtype)[:, :, None]
        out[idx, :, rr, cc] = region + m * (patch - region)
        return out

    def describe(self) -> dict[str, Any]:
        pos = self.position if isinstance(self.position, str) else list(self.position)
        return {
            "name": self.name,
            "size": list(self.size),
            "position": pos,
            "seed": self.seed,
            "alpha": self.alpha,
        }


def checkerboard(size: int) -> torch.Tensor:
    """``[size, size]`` 0/1 checkerboard with ones on the corners (an "x" at size 3)."""
    i = torch.arange(size)
    return ((i[:, None] + i[None, :]) % 2 == 0).float()


class BadNets(PatchTrigger):
    """BadNets (Gu et al. 2017): a ``size x size`` patch pasted opaquely onto the image.

    ``pattern``: ``None`` for a 0/1 checkerboard on every channel, ``"random"`` for uniform random
    values drawn from ``seed`` (the paper's "random initial values"), or a tensor ``[h, w]`` /
    ``[C, h, w]`` in [0, 1] (its size overrides ``size``). The paper's default is 3x3 at a random
    position per image.
    """

    name = "badnets"

    def __init__(
        self,
        size: int = 3,
        position: Position = "random",
        pattern: torch.Tensor | str | None = None,
        seed: int = 0,
    ):
        if pattern is None:
            pattern = checkerboard(size)
        elif isinstance(pattern, str):
            if pattern != "random":
                raise InputError(f"badnets: pattern must be None, 'random' or a tensor, got {pattern!r}")
            pattern = torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed + 7919))
        super().__init__(pattern, position=position, seed=seed)


def ring_mask(size: int, logo: bool = False) -> torch.Tensor:
    """``[size, size]`` annulus (a watermark-like ring); ``logo`` adds a centre dot, like a (c) mark."""
    c = (size - 1) / 2
    i = torch.arange(size, dtype=torch.float32) - c
    d = (i[:, None] ** 2 + i[None, :] ** 2).sqrt()
    outer = c + 0.5
    m = ((d <= outer) & (d >= outer - max(1.0, size / 4))).float()
    if logo:
        m = torch.maximum(m, (d <= max(0.5, size / 10)).float())
    return m


class TrojanWatermark(PatchTrigger):
    """TrojanNN-style trigger (Liu et al. 2018): a watermark-shaped patch at a fixed position.

    ``shape``: ``"ring"`` (annulus), ``"logo"`` (ring with a centre dot) or ``"square"``. The
    pattern starts white (or ``pattern`` if given) and is meant to be optimised with
    :func:`baerase.attacks.optimise_trojan_trigger` against a clean model before poisoning.
    ``alpha`` < 1 makes it a translucent watermark.
    """

    name = "trojan"

    def __init__(
        self,
        size: int = 5,
        position: Position = "corner",
        shape: str = "ring",
        pattern: torch.Tensor | None = None,
        alpha: float = 1.0,
        seed: int = 0,
    ):
        if shape not in ("ring", "logo", "square"):
            raise InputError(f"trojan: shape must be 'ring', 'logo' or 'square', got {shape!r}")
        mask = torch.ones(size, size) if shape == "square" else ring_mask(size, logo=shape == "logo")
        self.shape = shape
        self.neurons: list[int] = []
        super().__init__(torch.ones(1, size, size) if pattern is None else pattern, mask, position, seed, alpha)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shape": self.shape, "neurons": list(self.neurons)}


def _kitty(height: int, width: int) -> torch.Tensor:
    """Procedural cartoon cat face ``[3, H, W]`` (stands in for the Hello Kitty blend image)."""
    v, u = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")  # v down, u right
    img = torch.empty(3, height, width)
    img[:] = torch.tensor([1.0, 0.75, 0.85])[:, None, None]  # pink background

    def paint(region: torch.Tensor, rgb: tuple[float, float, float]) -> None:
        img[:, region] = torch.tensor(rgb, dtype=img.dtype)[:, None]

    head = (u / 0.8) ** 2 + ((v - 0.15) / 0.65) ** 2
    ears = (v < -0.2) & (v > -0.95) & ((u.abs() - 0.55).abs() < (v + 0.95) * 0.35)
    paint((head < 1.12) | ears, (0.0, 0.0, 0.0))  # outline
    paint((head < 0.92) | (ears & (v > -0.8) & ((u.abs() - 0.55).abs() < (v + 0.8) * 0.3)), (1.0, 1.0, 1.0))
    paint(((u.abs() - 0.35) / 0.08) ** 2 + ((v - 0.1) / 0.13) ** 2 < 1, (0.0, 0.0, 0.0))  # eyes
    paint((u / 0.1) ** 2 + ((v - 0.3) / 0.06) ** 2 < 1, (1.0, 0.85, 0.0))  # nose
    for dv in (-0.06, 0.06):  # whiskers
        paint(((u.abs() > 0.5) & (u.abs() < 0.95) & ((v - 0.3 - dv * (1 + u.abs())).abs() < 0.025)), (0, 0, 0))
    bow = ((u - 0.45) / 0.22) ** 2 + ((v + 0.55) / 0.15) ** 2 < 1
    paint(bow | (((u - 0.72) / 0.2) ** 2 + ((v + 0.6) / 0.15) ** 2 < 1), (0.9, 0.05, 0.2))
    return img


class Blended(Trigger):
    """Blended trigger (Chen et al. 2017): ``x' = (1 - alpha) * x + alpha * pattern`` over the whole image.

    ``pattern``: ``"sine"`` (horizontal stripes ``0.5 + 0.5 sin(2 pi col / period)``), ``"noise"``
    (uniform noise from ``seed``, fixed per image size), ``"kitty"`` (procedural cartoon face) or a
    tensor ``[H, W]`` / ``[C, H, W]`` in [0, 1], resized bilinearly to the image size if needed.
    """

    name = "blended"
    PATTERNS = ("sine", "noise", "kitty")

    def __init__(self, pattern: str | torch.Tensor = "sine", alpha: float = 0.15, period: float = 6.0, seed: int = 0):
        if isinstance(pattern, str) and pattern not in self.PATTERNS:
            raise InputError(f"blended: pattern must be one of {self.PATTERNS} or a tensor, got {pattern!r}")
        if not isinstance(pattern, str):
            pattern = torch.as_tensor(pattern, dtype=torch.float32)
            if pattern.min() < 0 or pattern.max() > 1:
                raise InputError("blended: pattern values must lie in [0, 1]")
        if not 0.0 < alpha <= 1.0:
            raise InputError(f"blended: alpha must be in (0, 1], got {alpha}")
        self.pattern, self.alpha, self.period, self.seed = pattern, float(alpha), float(period), int(seed)

    def pattern_for(self, channels: int, height: int, width: int) -> torch.Tensor:
        """The full-size pattern ``[C, H, W]`` used on images of this shape."""
        if isinstance(self.pattern, torch.Tensor):
            p = self.pattern if self.pattern.dim() == 3 else self.pattern.unsqueeze(0)
            if tuple(p.shape[-2:]) != (height, width):
                p = F.interpolate(p[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        elif self.pattern == "sine":
            p = 0.5 + 0.5 * torch.sin(torch.arange(width) * (2 * math.pi / self.period)).expand(1, height, width)
        elif self.pattern == "noise":
            p = torch.rand(channels, height, width, generator=torch.Generator().manual_seed(self.seed))
        else:
            p = _kitty(height, width)
        return _to_channels(p, channels, self.name).clamp(0, 1)

    def mask_and_pattern(self, channels: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.full((height, width), self.alpha), self.pattern_for(channels, height, width)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _check_images(x, self.name)
        p = self.pattern_for(*x.shape[1:]).to(x.device, x.dtype)
        with torch.no_grad():
            return (1 - self.alpha) * x + self.alpha * p

    def describe(self) -> dict[str, Any]:
        pattern = self.pattern if isinstance(self.pattern, str) else f"tensor{list(self.pattern.shape)}"
        return {
            "name": self.name,
            "pattern": pattern,
            "alpha": self.alpha,
            "period": self.period,
            "seed": self.seed,
        }
