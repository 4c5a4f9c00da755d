"""A scan's step compiles as one graph: every baerase op has a fake kernel torch.compile traces through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from baerase import ops
from baerase.recover import TriggerSet


@pytest.mark.parametrize("family", ["mask", "patch"])
def test_a_recovery_step_compiles_without_graph_breaks(family):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    triggers = TriggerSet([0, 3], (1, 8, 8), family=family, latent_dim=8, hidden=16, mine_hidden=8)
    x = torch.rand(6, 1, 8, 8)
    rows = triggers.targets.repeat_interleave(len(x))

    def step(images: torch.Tensor) -> torch.Tensor:
        _, g = triggers.sample(len(images))
        logits = model(triggers.stamp(images, g).flatten(0, 1))
        hinge, _ = ops.trigger_loss(logits, rows, 0.5)
        return hinge.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    compiled(x).backward()
    assert all(p.grad is not None for p in triggers.generator.parameters())
