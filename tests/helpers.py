"""Helpers shared by the tests: the tiny model the fast scans run on, state comparison, and the
session's backdoored model (built by the ``backdoored`` fixture in conftest.py)."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch
from torch import nn


class TinyNet(nn.Module):
    """One conv on 8x8 images; small enough that a whole scan takes well under a second. Named by
    architecture strings as ``helpers:TinyNet`` (a user's own ``module:callable``)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def tiny_model(in_channels: int = 1, num_classes: int = 4, seed: int = 0) -> TinyNet:
    """The same TinyNet weights every time, without touching the caller's RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TinyNet(in_channels, num_classes)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's parameters and buffers, to check later that nothing changed them."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(expected: nn.Module | dict, actual: nn.Module | dict, what: str = "model") -> None:
    """Same tensor names and bit-identical values (modules or state dicts); names the first difference."""
    want = expected.state_dict() if isinstance(expected, nn.Module) else expected
    got = actual.state_dict() if isinstance(actual, nn.Module) else actual
    assert list(got) == list(want), f"{what}: tensors {list(got)} != {list(want)}"
    for name, value in want.items():
        assert torch.equal(got[name], value), f"{what}: {name} changed"


def colour_scan_script(k: int, steps: int, chunk_size: int, body: str) -> str:
    """Source of a standalone script that scans a seeded ``SmallCNN(3, k, 8)`` on ``make_colour(k, 12,
    side=8)`` with ``Config(steps, batch_size=8, eval_samples=32, chunk_size)``, one thread. ``body``
    (indented as it likes) then runs with ``model``, ``x``, ``y``, ``config`` and ``json``, ``os``,
    ``sys`` in scope; it calls ``baerase.scan`` itself (with a checkpoint, say)."""
    head = f"""
        import json, os, sys
        import torch
        torch.set_num_threads(1)
        import baerase
        from baerase.data import make_colour
        from baerase.models.nets import SmallCNN

        torch.manual_seed(0)
        model = SmallCNN(3, {k}, 8).eval()
        x, y = make_colour({k}, 12, side=8)
        config = baerase.Config(steps={steps}, batch_size=8, eval_samples=32, chunk_size={chunk_size}, progress=False)
        """
    return textwrap.dedent(head) + textwrap.dedent(body)


@dataclass(frozen=True)
class Backdoored:
    """A trained backdoored classifier with its trigger and data splits: (images, labels) each."""

    model: nn.Module
    trigger: object
    target: int
    train: tuple[torch.Tensor, torch.Tensor]
    clean: tuple[torch.Tensor, torch.Tensor]  # the defender's clean images
    test: tuple[torch.Tensor, torch.Tensor]
