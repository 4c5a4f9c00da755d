"""The warp trigger family: stamping, saving, recovery through the one driver, and the lift test."""

import pytest
import torch
from torch import nn

import baerase
from baerase import cost
from baerase.errors import ConfigError
from baerase.recover import WarpSet, attack_success, families, recover, warp


class ShiftDetector(nn.Module):
    """Class 1 when the image's brightness centroid lies over 1.5 pixels right of the centre, else class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.shape[-1]
        cols = torch.arange(w, dtype=x.dtype) - (w - 1) / 2
        columns = x.sum((1, 2))
        centroid = (columns * cols).sum(1) / columns.sum(1).clamp(min=1e-6)
        right = 4 * (centroid - 1.5)
        return torch.stack((torch.zeros_like(right), right), 1)


def blobs(n: int, side: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(side).float(), torch.arange(side).float(), indexing="ij")
    centre = (side - 1) / 2 + torch.rand(n, 2, generator=g) * 2 - 1
    d2 = (ys - centre[:, 0, None, None]) ** 2 + (xs - centre[:, 1, None, None]) ** 2
    return torch.exp(-d2 / 4).unsqueeze(1), torch.zeros(n, dtype=torch.long)


def with_points(points: torch.Tensor, side: int = 12) -> WarpSet:
    warps = WarpSet(list(range(len(points))), (1, side, side), max_shift=3.0)
    with torch.no_grad():
        warps.flow_logits.copy_(torch.atanh(points / 3.0))
    return warps


def test_a_zero_warp_is_the_identity_and_a_constant_one_shifts():
    x, _ = blobs(3)
    shift = torch.zeros(2, 2, 4, 4)
    shift[1, 0] = 1.0  # sample one pixel to the right: the content moves left
    warps = with_points(shift)
    _, g = warps.sample(len(x))
    out = warps.stamp(x, g)
    assert out.shape == (2, 3, 1, 12, 12)
    assert torch.allclose(out[0], x, atol=1e-5)
    assert torch.allclose(out[1][..., :-1], x[..., 1:], atol=1e-5)
    assert torch.allclose(warps.norms(), torch.tensor([0.0, 1.0]), atol=1e-5)


def test_unlearning_grows_the_warps_and_turns_about_half_of_them():
    points = torch.zeros(1, 2, 4, 4)
    points[0, 0] = 0.2  # a constant 0.2 px shift right
    with baerase.rng.seeded(0):
        spread = warp._spread(with_points(points).sample(2000)[1])[0]
    size = torch.linalg.vector_norm(spread, dim=(1, 2, 3)) / torch.linalg.vector_norm(points)
    along = torch.nn.functional.cosine_similarity(spread.flatten(1), points.flatten(1), dim=1)
    assert size.min() >= 1 - 1e-5 and size.max() <= 8 + 1e-5 and size.std() > 1
    kept = along > 1 - 1e-5
    assert 0.45 < kept.float().mean() < 0.55  # the rest point in random directions
    assert along[~kept].abs().mean() < 0.5


class BlurSink(nn.Module):
    """Class by brightness (0: dark, 1: bright); with ``sink``, class 2 for an image whose fine checkerboard
    a warp has smoothed away."""

    def __init__(self, sink: bool) -> None:
        super().__init__()
        self.sink = sink

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bright = x.mean((1, 2, 3)) - 0.5
        smooth = (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)) < 0.1
        blurred = 10.0 * (smooth & self.sink).float()
        return torch.stack((-10 * bright, 10 * bright, blurred), 1)


def test_random_warps_are_drawn_to_a_class_the_model_gives_any_warp():
    checker = (torch.arange(12).view(1, 12) + torch.arange(12).view(12, 1)) % 2 * 0.3
    x = torch.cat([0.2 + checker.expand(16, 1, 12, 12), 0.5 + checker.expand(16, 1, 12, 12)])
    y = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    warps = with_points(torch.full((1, 2, 4, 4), 0.7))
    with baerase.rng.seeded(0):
        drawn = warp.pull(warps, BlurSink(sink=True), x, y, 3, draws=4)[0]
        plain = warp.pull(warps, BlurSink(sink=False), x, y, 3, draws=4)[0]
    assert drawn[2] > 0.8 and drawn[:2].max() < 0.05
    assert plain.max() < 0.05


def test_warps_are_selected_stacked_and_rebuilt_from_their_state():
    warps = with_points(torch.rand(3, 2, 4, 4) - 0.5)
    picked = warps.select([2, 0])
    assert picked.targets.tolist() == [2, 0]
    assert torch.equal(picked.flow_logits, warps.flow_logits[[2, 0]])
    joined = families.concat([picked, warps.select([1])])
    assert joined.targets.tolist() == [2, 0, 1]
    rebuilt = families.from_state(warps.meta, warps.state_dict())
    assert isinstance(rebuilt, WarpSet) and torch.equal(rebuilt.flow_logits, warps.flow_logits)


def test_recovery_finds_the_warp_a_model_answers_and_counts_its_images():
    fit, val = blobs(64, seed=1), blobs(64, seed=2)
    config = baerase.Config(family="warp", steps=60, batch_size=8, warp_lr=0.1)
    spent = cost.Cost()
    with cost.phase(spent, "recovery"):
        result = recover(ShiftDetector(), fit, val, [0, 1], config)
    assert result.success[1] >= 0.5  # the smallest warp that flipped 90% of a batch, on unseen images
    assert 0.5 <= result.norms[1] < 3.0  # about the 1.5 pixels the detector asks for, where the blobs are
    assert result.norms[0] == 3.0  # no image can prove a warp for class 0: it is out of reach
    assert spent.forward >= 60 * 8  # every stamped image went through cost.forward
    gain = warp.lift(
        result.triggers.select([1]), result.success[1:], lambda w: attack_success(w, ShiftDetector(), *val)
    )
    assert gain.item() >= 0.5  # a coherent shift; random warps of its size are not


@pytest.mark.parametrize(("share", "class_0_steps"), [(0.25, 20), (0.0, 60)])
def test_recovery_gives_up_a_class_no_warp_moves_after_a_third_of_the_steps(share, class_0_steps):
    fit, val = blobs(64, seed=1), blobs(64, seed=2)
    config = baerase.Config(family="warp", steps=60, batch_size=8, warp_lr=0.1, give_up_share=share)
    result = recover(ShiftDetector(), fit, val, [0, 1], config)
    assert result.steps.tolist() == [class_0_steps, 60]  # class 1 flips early and runs to the end
    assert result.norms[0] == 3.0 and result.norms[1] < 3.0


class CentroidClasses(nn.Module):
    """Class 0, unless the brightness centroid moves ``right`` pixels right (class 1), or ``far`` pixels
    left, down or up (classes 2-4)."""

    def __init__(self, right: float, far: float) -> None:
        super().__init__()
        self.right, self.far = right, far

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mass = x.sum(1).clamp(min=0)
        total = mass.sum((1, 2)).clamp(min=1e-6)
        cx = (mass.sum(1) * (torch.arange(w, dtype=x.dtype) - (w - 1) / 2)).sum(1) / total
        cy = (mass.sum(2) * (torch.arange(h, dtype=x.dtype) - (h - 1) / 2)).sum(1) / total
        moved = torch.stack((cx - self.right, -cx - self.far, cy - self.far, -cy - self.far), 1)
        return torch.cat((torch.zeros_like(cx).unsqueeze(1), 4 * moved), 1)


@pytest.mark.parametrize(("right", "flagged"), [(1.2, [1]), (2.2, [])])
def test_a_median_out_of_reach_is_measured_with_a_wider_reach(right, flagged):
    # At the 3 px reach the classes 6 px away are censored at 3, where no warp of 1-3 px is 3x below the
    # median; with a reach of a quarter of the side they are measured (about 4.5 px): 1.2 px is, 2.2 px is not.
    g = torch.Generator().manual_seed(3)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    centre = 15.5 + torch.rand(128, 2, generator=g) * 2 - 1
    x = torch.exp(-((ys - centre[:, 0, None, None]) ** 2 + (xs - centre[:, 1, None, None]) ** 2) / 100).unsqueeze(1)
    config = baerase.Config(family="warp", fallback=(), progress=False)
    report = baerase.scan(CentroidClasses(right, far=6.0), x, torch.zeros(128, dtype=torch.long), config=config)
    norms = [c.trigger_norm for c in report.classes]
    assert norms[1] < 3.0 and all(3.0 < n < 8.0 for n in norms[2:])
    assert report.flagged == flagged


def test_fallback_names_only_other_families():
    with pytest.raises(ConfigError, match="fallback"):
        baerase.Config(fallback=("mask",))
    assert baerase.Config(fallback=()).recovery.fallback == ()


@pytest.mark.slow
def test_a_wanet_backdoor_is_flagged_by_the_warp_fallback_and_erased(tmp_path):
    from baerase.attacks import WaNet, attack_success_rate, clean_accuracy, train_wanet
    from baerase.data import load_mnist, split
    from baerase.models import SmallCNN

    x, y = load_mnist()
    (tx, ty), (px, py) = split(x, y, [0.7, 0.3], seed=0)  # the effectiveness grid's MNIST cell
    trigger = WaNet(k=4, strength=1.0, seed=1)
    model = train_wanet(SmallCNN(1, 10, 28), tx, ty, trigger, 0, rate=0.1, epochs=15)
    report, result = baerase.audit(model, px[:500], py[:500])
    assert report.family == "warp" and report.flagged == [0]  # the mask family finds no small mask
    xt, yt = px[500:], py[500:]
    assert attack_success_rate(result.model, xt, yt, trigger, 0) <= 0.01
    assert clean_accuracy(result.model, xt, yt) >= clean_accuracy(model, xt, yt) - 0.01
    out = baerase.write_outputs(tmp_path / "audit", report, px[:500], result)
    assert (out / "report.html").exists() and (out / "triggers" / "class_0_displacement.png").exists()
    loaded = baerase.ScanReport.load(out)
    assert loaded.family == "warp" and torch.equal(loaded.triggers.flow_logits, report.triggers.flow_logits.cpu())


@pytest.mark.parametrize("knob", [{"min_warp_pull": 1.5}, {"warp_pull_ratio": 0.5}, {"min_warp_shrink": 0.9}])
def test_the_warp_sink_settings_are_checked(knob):
    with pytest.raises(ConfigError, match=next(iter(knob))):
        baerase.Config(**knob)
