"""Baseline defenses: copies not in-place edits, the shared signature, and each method's key step."""

import pytest
import torch
from helpers import assert_same_state, snapshot
from torch import nn

from baerase.attacks import attack_success_rate
from benchmarks import baselines as B

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(B.DEFENSES))
def test_defense_returns_a_copy_and_leaves_input_alone(backdoored, name):
    model, (x, y) = backdoored.model, backdoored.clean
    before = snapshot(model)
    kwargs = {"steps": 20} if name == "neural_cleanse" else {}
    if name == "nad":
        kwargs["teacher_epochs"] = 1
    out = B.DEFENSES[name](model, x[:64], y[:64], epochs=1, **kwargs)
    assert out is not model and not out.training
    assert_same_state(before, model)
    assert out(x[:5]).shape == (5, 8)


def test_fine_tune_reduces_attack_success(backdoored):
    model, trig, target = backdoored.model, backdoored.trigger, backdoored.target
    x, y = backdoored.clean
    asr = attack_success_rate(model, x, y, trig, target)
    tuned = B.fine_tune(model, x, y, epochs=3, lr=0.05)
    assert asr > 0.5
    assert attack_success_rate(tuned, x, y, trig, target) <= asr


def test_fine_prune_masks_the_most_dormant_channels(backdoored):
    model, (x, y) = backdoored.model, backdoored.clean
    assert B.feature_layers(model, x) == ["c1", "c2"]
    out = B.fine_prune(model, x, y, epochs=0, max_drop=1.0, max_ratio=0.5)
    keep = out.c2[1].keep.flatten()
    assert out.pruned_channels == 16 and int((keep == 0).sum()) == 16
    assert isinstance(out.c2, nn.Sequential)


def test_attention_map_is_unit_norm_per_image():
    a = torch.randn(3, 5, 4, 4)
    at = B.attention_map(a)
    assert at.shape == (3, 16)
    assert torch.allclose(at.norm(dim=1), torch.ones(3))
    assert torch.allclose(B.attention_map(2 * a), at, atol=1e-6)  # scale-free: only where the net attends


class _Planted(nn.Module):
    """Classes by nearest mean colour (moving it takes a large mask) plus a hand-made backdoor: a
    bright 2x2 bottom-right corner forces class 2."""

    def __init__(self):
        super().__init__()
        self.protos = nn.Parameter(0.1 + 0.6 * torch.rand(6, 3, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):
        corner = x[:, :, -2:, -2:].mean((1, 2, 3))
        bonus = 40 * (corner - 0.5)
        logits = -20 * (x.mean((2, 3))[:, None] - self.protos[None]).pow(2).sum(2)
        return logits + bonus[:, None] * nn.functional.one_hot(torch.tensor(2), 6).float()


def test_reverse_engineer_flags_the_planted_class_and_unlearning_keeps_labels():
    torch.manual_seed(0)
    model = _Planted().eval()
    with torch.no_grad():
        x = (model.protos[torch.arange(120) % 6][:, :, None, None] + 0.05 * torch.randn(120, 3, 8, 8)).clamp(0, 1)
    y = model(x).argmax(1)
    report = B.reverse_engineer(model, x, y, steps=100, seed=0)
    assert report.norms.argmin().item() == 2
    assert report.flagged == [2]
    assert report.masks.shape == (6, 8, 8) and report.patterns.shape == (6, 3, 8, 8)
    stamped = report.stamp(x[:4], 2)
    assert (model(stamped).argmax(1) == 2).all()
