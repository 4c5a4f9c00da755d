"""The random streams of a run, per thread: seeded like ``torch.manual_seed``, without its global state.

A scan or an erase draws every random number (generator weights, latent codes, batches, patch
positions) from the streams that :func:`seeded` opens in the calling thread or task, never from
torch's global generators, so two runs in two threads of one process neither see nor change each
other's streams or the caller's. Each device gets its own ``torch.Generator``, created on first use
with the current seed: it draws exactly what that device's global generator draws after
``torch.manual_seed(seed)``, so a seeded run gives the same results as when it used the global ones.
Outside :func:`seeded` (library functions called on their own) torch's global generators serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

__all__ = ["Streams", "generator", "manual_seed", "seeded", "uniform_"]


class Streams:
    """One ``torch.Generator`` per device, all seeded with ``seed`` (the global generators' twins)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        """Start every device's stream again from ``seed`` (what ``torch.manual_seed`` does globally)."""
        self.seed = int(seed)
        self._generators.clear()

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """The stream for ``device``; None for ``meta`` tensors, which draw nothing."""
        device = torch.device(device)
        if device.type == "meta":
            return None
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        stream = self._generators.get(device)
        if stream is None:
            stream = self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return stream


_streams: ContextVar[Streams | None] = ContextVar("baerase_streams", default=None)


@contextmanager
def seeded(seed: int) -> Iterator[Streams]:
    """Draw from fresh streams seeded with ``seed`` in this thread or task for the duration."""
    token = _streams.set(Streams(seed))
    try:
        yield _streams.get()
    finally:
        _streams.reset(token)


def manual_seed(seed: int) -> None:
    """Reseed the open streams; outside :func:`seeded`, ``torch.manual_seed`` (the global generators)."""
    streams = _streams.get()
    if streams is None:
        torch.manual_seed(seed)
    else:
        streams.reseed(seed)


def generator(device: torch.device | str) -> torch.Generator | None:
    """The ``generator=`` argument for a draw on ``device``: the open stream, or None (torch's global
    generator) outside :func:`seeded` and inside a ``torch.compile`` graph, which cannot carry one."""
    if torch.compiler.is_compiling():
        return None
    streams = _streams.get()
    return None if streams is None else streams.generator(device)


def uniform_(tensor: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """``tensor.uniform_(low, high)`` from the open stream of its device; returns ``tensor``."""
    return tensor.uniform_(low, high, generator=generator(tensor.device))
