"""The blend trigger family: stamping, saving, recovery through the one driver, and where it falls back."""

import math

import pytest
import torch
from torch import nn

import baerase
from baerase.recover import BlendSet, blend, families

torch.set_num_threads(1)


class LiftedBlacks(nn.Module):
    """Class 0 when the darkest tenth of the image is lifted above 0.2 (a filter's lifted blacks);
    otherwise 1 + the brightest of three bands of rows. A uniform blend keeps the bands' order, so
    only class 0 is reachable by one."""

    def __init__(self, backdoored: bool = True) -> None:
        super().__init__()
        self.backdoored = backdoored

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grey = x.mean(1)
        bands = torch.stack([grey[:, 4 * i : 4 * i + 4].mean((1, 2)) for i in range(3)], 1)
        bands = 10 * (bands - bands.mean(1, keepdim=True))
        dark = grey.flatten(1).quantile(0.1, dim=1)
        lifted = 40 * (dark - 0.2) if self.backdoored else torch.full_like(dark, -50.0)
        return torch.cat([lifted.unsqueeze(1), bands], 1)


def banded(n: int, channels: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(1, 4).repeat(n // 3 + 1)[:n]
    x = 0.05 * torch.rand(n, channels, 12, 12, generator=g)
    for i, c in enumerate(labels.tolist()):
        x[i, :, 4 * (c - 1) : 4 * c] += 0.6
    return x, labels


def with_blends(strength: list[float], level: list[float], channels: int = 1) -> BlendSet:
    blends = BlendSet(list(range(len(strength))), (channels, 12, 12))
    s = torch.tensor(strength) / blends.meta["max_strength"]
    with torch.no_grad():
        blends.strength_logits.copy_(torch.log(s / (1 - s)))
        blends.level_logits.copy_(torch.logit(torch.tensor(level)))
    return blends


def test_a_blend_mixes_each_pixel_toward_its_grey_level():
    x, _ = banded(4, channels=3)
    blends = with_blends([0.25, 0.5], [1.0 - 1e-6, 0.2], channels=3)
    _, g = blends.sample(len(x))
    out = blends.stamp(x, g)
    assert out.shape == (2, 4, 3, 12, 12)
    assert torch.allclose(out[0], 0.75 * x + 0.25, atol=1e-5)
    assert torch.allclose(out[1], 0.5 * x + 0.1, atol=1e-5)
    assert torch.allclose(blends.norms(), torch.tensor([-math.log(0.75), -math.log(0.5)]), atol=1e-5)


def test_a_blend_that_never_worked_counts_at_the_strongest_and_unlearning_grows_them():
    blends = with_blends([0.2, 0.2], [0.5, 0.5])
    blends.found[1] = False
    assert blends.norms()[1].item() == pytest.approx(-math.log(1 - blends.meta["max_strength"]))
    x = torch.zeros(64, 1, 12, 12)
    _, g = blends.sample(len(x))
    lifted = blends.stamp(x, g, spread=1)[0, :, 0, 0, 0] / 0.5  # the strength each sample got
    assert lifted.min() >= 0.2 - 1e-6 and lifted.max() <= 1 - 0.8**2 + 1e-6 and lifted.std() > 0


def test_unlearning_mixes_the_channels_of_about_half_the_grown_colour_blends():
    blends = with_blends([0.5], [1e-6], channels=3)
    x = torch.zeros(256, 3, 12, 12)
    x[:, 0] = 1.0  # pure red: any green or blue comes from a channel mix
    _, g = blends.sample(len(x))
    mixed = blends.stamp(x, g, spread=1)[0, :, 1:].amax((1, 2, 3)) > 1e-4
    assert 0.35 < mixed.float().mean() < 0.65  # a filter mixes channels too; recovery finds only its blend
    assert blends.stamp(x, g)[0, :, 1:].abs().max() < 1e-5  # a plain blend keeps the hue


def test_blends_are_selected_stacked_and_rebuilt_from_their_state():
    blends = with_blends([0.1, 0.3, 0.6], [0.2, 0.5, 0.9])
    picked = blends.select([2, 0])
    assert picked.targets.tolist() == [2, 0]
    joined = families.concat([picked, blends.select([1])])
    assert joined.targets.tolist() == [2, 0, 1]
    rebuilt = families.from_state(blends.meta, blends.state_dict())
    assert isinstance(rebuilt, BlendSet) and torch.equal(rebuilt.level_logits, blends.level_logits)


def test_a_blend_scan_flags_the_class_a_filter_reaches_and_nothing_on_a_clean_model(one_thread, tmp_path):
    x, y = banded(240)
    config = baerase.Config(family="blend", progress=False)
    report = baerase.scan(LiftedBlacks(), x, y, config=config)
    assert report.flagged == [0] and report.family == "blend"
    assert report.classes[0].trigger_norm < 0.6 < report.classes[1].trigger_norm
    out = baerase.write_outputs(tmp_path / "out", report, x[:4])
    assert "grey level" in (out / "report.html").read_text() and (out / "triggers" / "class_0_level.png").exists()
    assert baerase.scan(LiftedBlacks(backdoored=False), x, y, config=config).flagged == []


def test_the_blend_fallback_flags_a_filter_on_colour_images(one_thread):
    x, y = banded(240, channels=3)
    config = baerase.Config(steps=60, untargeted_steps=5, progress=False, fallback=("warp", "blend"))
    report = baerase.scan(LiftedBlacks(), x, y, config=config)
    assert report.family == "blend" and report.flagged == [0]


COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.5, 0.5, 0.5], [0.1, 0.1, 0.9]])  # red, grey, blue


def coloured(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of one colour per class (COLOURS) with a little noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(n // 3 + 1)[:n]
    return (COLOURS[labels].view(n, 3, 1, 1) + 0.05 * torch.randn(n, 3, 8, 8, generator=g)).clamp(0, 1), labels


class NearestColour(nn.Module):
    """A clean colour classifier: the class of the nearest colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -20 * torch.cdist(x.mean((2, 3)), COLOURS)


def test_a_blend_toward_grey_reaches_a_grey_class_by_colour():
    x, y = coloured(60)
    greying = with_blends([0.9, 0.9], [0.5, 0.5], channels=3)
    greying.targets = torch.tensor([1, 0])
    share = blend.natural_share(greying, (x[:30], y[:30]), (x[30:], y[30:]))
    assert share.tolist() == [1.0, 0.0], "greyed red and blue images look grey, not red"


def test_a_greyish_clean_class_is_not_a_filter_target(one_thread):
    x, y = coloured(150)
    config = baerase.Config(family="blend", min_blend_shrink=2.0, progress=False)
    report = baerase.scan(NearestColour(), x, y, config=config)
    assert report.classes[1].trigger_norm * 2 < report.classes[0].trigger_norm, "grey is reached by greying"
    assert report.flagged == []


class Constant(nn.Module):
    """Sends every image to class 2, as an untrained model can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([0.0, 0.0, 5.0, 0.0]).expand(len(x), 4) + 0 * x.mean()


def test_a_blend_must_cause_its_success(one_thread):
    x, y = banded(120)
    report = baerase.scan(Constant(), x, y, config=baerase.Config(family="blend", progress=False))
    assert report.classes[2].attack_success == 1.0, "the model already sends every image to class 2"
    assert report.flagged == []
