"""Scale options of a scan: successive halving, chunk planning, channels-last input."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import baerase
from baerase.data import make_colour
from baerase.models.nets import SmallCNN
from baerase.recover.recovery import chunk_seed, plan_chunks

K, UNREACHABLE = 6, (3, 4, 5)

pytestmark = pytest.mark.usefixtures("one_thread")


class _Blocked(nn.Module):
    """A classifier that can never predict the classes in UNREACHABLE, whatever the input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = SmallCNN(3, K, 8)
        bias = torch.zeros(K)
        bias[list(UNREACHABLE)] = -1e4
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) + self.bias


def _scan(model, halving: bool, **changes):
    x, y = make_colour(K, 10, side=8)
    config = baerase.Config(steps=30, batch_size=8, eval_samples=32, progress=False, halving=halving, **changes)
    return baerase.scan(model.eval(), x, y, config=config)


def test_halving_stops_hopeless_classes_and_keeps_their_evidence(caplog):
    model = _Blocked()
    full = _scan(model, halving=False)
    with caplog.at_level(logging.INFO, logger="baerase"):
        halved = _scan(model, halving=True)
    stopped = [int(r.getMessage().split()[1]) for r in caplog.records if "stop early" in r.getMessage()]
    assert stopped and 1 <= stopped[0] <= len(UNREACHABLE)
    assert [c.target for c in halved.classes] == list(range(K))  # every class keeps its evidence
    assert halved.flagged == full.flagged
    # Only unreachable classes stop (the model runs on fewer rows, so the others match up to rounding,
    # which the discrete mask-cost schedule amplifies: compare verdicts, not digits).
    for a, b in zip(full.classes, halved.classes, strict=False):
        assert b.trigger_norm > 0
        if a.target in UNREACHABLE:
            assert a.attack_success == b.attack_success == 0.0


def test_halving_never_stops_a_working_class():
    from baerase.attacks.train import train_classifier

    torch.manual_seed(0)
    x, y = make_colour(K, 10, side=8)
    model = train_classifier(SmallCNN(3, K, 8), x, y, epochs=5, lr=3e-3, batch_size=16)
    full, halved = _scan(model, halving=False), _scan(model, halving=True)
    assert [c.trigger_norm for c in halved.classes] == [c.trigger_norm for c in full.classes]


def test_plan_chunks_covers_targets_and_splits_for_ranks():
    model = SmallCNN(3, K, 8).eval()
    images = torch.rand(4, 3, 8, 8)
    config = baerase.Config(progress=False)
    assert plan_chunks(model, images, list(range(K)), config) == [list(range(K))]
    assert plan_chunks(model, images, list(range(K)), config, parts=4) == [[0, 1], [2, 3], [4, 5]]
    assert plan_chunks(model, images, list(range(K)), config.replace(chunk_size=4)) == [[0, 1, 2, 3], [4, 5]]
    assert chunk_seed(7, [0, 1]) == 7 and chunk_seed(7, [2]) != chunk_seed(7, [3])


def test_channels_last_and_amp_forward_on_cpu():
    from baerase.recover.recovery import _forward_fn

    torch.manual_seed(0)
    model = SmallCNN(3, K, 8).eval()
    seen = []
    model.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    x = torch.rand(5, 3, 8, 8)
    config = baerase.Config(channels_last=True, amp=True)  # amp is CUDA-only: no effect on CPU
    out = _forward_fn(model, config, torch.device("cpu"))(x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
