import pytest
import torch
from helpers import assert_same_state, snapshot
from torch import nn

from baerase.attacks import (
    BadNets,
    Blended,
    PatchTrigger,
    TrojanWatermark,
    attack_success_rate,
    checkerboard,
    clean_accuracy,
    imc_train,
    optimise_trojan_trigger,
    poison,
    train_backdoored,
    train_classifier,
)
from baerase.errors import InputError
from baerase.models import SmallCNN


def synth(n: int, k: int = 4, channels: int = 1, side: int = 16, seed: int = 0):
    """Dark images with one bright shape whose orientation encodes the class (trains in seconds)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = 0.1 * torch.rand(n, channels, side, side, generator=g)
    off = torch.randint(-2, 3, (n,), generator=g)
    for i in range(n):
        j, s = int(y[i]) % 4, side // 2 + int(off[i])
        if j == 0:
            x[i, :, s - 1 : s + 1, 2:-2] = 0.8
        elif j == 1:
            x[i, :, 2:-2, s - 1 : s + 1] = 0.8
        elif j == 2:
            x[i, :, 3:-3, 3:-3] = 0.5
        else:
            x[i].diagonal(dim1=-2, dim2=-1)[:] = 0.9
    return x, y


@pytest.fixture(scope="module")
def data():
    return synth(512), synth(256, seed=1)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- stamping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_badnets_corner_stamps_checkerboard(channels):
    x = torch.full((2, channels, 10, 12), 0.5)
    out = BadNets(size=3, position="corner")(x)
    assert torch.equal(x, torch.full_like(x, 0.5)), "input must not be modified"
    assert torch.equal(out[:, :, 6:9, 8:11], checkerboard(3).expand(2, channels, 3, 3))
    rest = out.clone()
    rest[:, :, 6:9, 8:11] = 0.5
    assert torch.equal(rest, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_badnets_random_positions_seeded(channels):
    x = torch.zeros(64, channels, 12, 12)
    a, b = BadNets(position="random", seed=3), BadNets(position="random", seed=3)
    out_a, out_b = a(x), b(x)
    assert torch.equal(out_a, out_b)
    assert not torch.equal(out_a, BadNets(position="random", seed=4)(x))
    assert not torch.equal(a(x), out_a), "the generator advances between calls"
    a.reset()
    assert torch.equal(a(x), out_a)
    # every image holds exactly one whole 3x3 checkerboard (5 ones) and nothing else
    assert torch.equal(out_a.sum((1, 2, 3)), torch.full((64,), 5.0 * channels))
    rows, cols = BadNets(seed=3).positions(64, 12, 12)
    assert rows.unique().numel() > 3 and cols.unique().numel() > 3
    for i in range(64):
        r, c = int(rows[i]), int(cols[i])
        assert torch.equal(out_a[i, :, r : r + 3, c : c + 3], checkerboard(3).expand(channels, 3, 3))


def test_patch_explicit_position_pattern_and_mask_form():
    pattern = torch.rand(3, 2, 4)
    trig = PatchTrigger(pattern, position=(-3, 1))
    x = torch.rand(5, 3, 8, 8)
    out = trig(x)
    assert torch.equal(out[:, :, 5:7, 1:5], pattern.expand(5, -1, -1, -1))
    m, p = trig.mask_and_pattern(3, 8, 8)
    assert torch.allclose(out, x + m * (p - x))
    # a colour pattern is reduced to luminance on grey images
    grey = trig(torch.zeros(1, 1, 8, 8))[0, 0, 5:7, 1:5]
    assert torch.allclose(grey, 0.299 * pattern[0] + 0.587 * pattern[1] + 0.114 * pattern[2])


def test_patch_validation():
    with pytest.raises(InputError, match="does not fit"):
        BadNets(size=5, position="corner")(torch.zeros(1, 1, 4, 4))
    with pytest.raises(InputError, match="outside"):
        BadNets(position=(7, 0))(torch.zeros(1, 1, 8, 8))
    with pytest.raises(InputError, match="position"):
        BadNets(position="middle")
    with pytest.raises(InputError, match=r"\[N, C, H, W\]"):
        BadNets()(torch.zeros(3, 8, 8))
    with pytest.raises(InputError, match="float"):
        BadNets()(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(InputError, match="fixed mask"):
        BadNets(position="random").mask_and_pattern(1, 8, 8)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", ["sine", "noise", "kitty"])
def test_blended(channels, name):
    x = torch.rand(3, channels, 20, 24)
    trig = Blended(name, alpha=0.2)
    out = trig(x)
    p = trig.pattern_for(channels, 20, 24)
    assert p.shape == (channels, 20, 24) and p.min() >= 0 and p.max() <= 1 and p.std() > 0.05
    assert torch.allclose(out, 0.8 * x + 0.2 * p)
    m, p2 = trig.mask_and_pattern(channels, 20, 24)
    assert torch.allclose(out, x + m * (p2 - x))
    assert torch.equal(Blended(name, alpha=0.2)(x), out), "deterministic"


def test_blended_sine_matches_reference_formula():
    x = torch.rand(2, 1, 28, 28)
    ref = 0.5 + 0.5 * torch.sin(torch.arange(28) * (2 * torch.pi / 6)).expand(28, 28)
    assert torch.allclose(Blended("sine", 0.15)(x), 0.85 * x + 0.15 * ref, atol=1e-6)


def test_blended_tensor_pattern_resized():
    out = Blended(torch.ones(4, 4), alpha=0.5)(torch.zeros(1, 3, 8, 8))
    assert torch.allclose(out, torch.full((1, 3, 8, 8), 0.5))
    with pytest.raises(InputError):
        Blended("stripes")
    with pytest.raises(InputError):
        Blended(torch.full((4, 4), 2.0))


@pytest.mark.parametrize("channels", [1, 3])
def test_trojan_watermark_touches_only_its_shape(channels):
    trig = TrojanWatermark(size=5, shape="ring")
    x = torch.zeros(2, channels, 16, 16)
    out = trig(x)
    changed = (out != x).any(1)[0]
    assert torch.equal(changed[10:15, 10:15], trig.shape_mask.bool())
    assert changed.sum() == trig.shape_mask.sum()
    assert 0 < trig.shape_mask.sum() < 25
    half = TrojanWatermark(shape="square", alpha=0.5)(torch.zeros(1, channels, 16, 16))
    assert torch.allclose(half[0, :, 10:15, 10:15], torch.full((channels, 5, 5), 0.5))


def test_describe_is_json_friendly():
    import json

    for trig in [BadNets(), Blended("kitty"), TrojanWatermark(shape="logo"), BadNets(position=(1, 2))]:
        d = trig.describe()
        assert d["name"] == trig.name
        json.dumps(d)
        assert type(trig).__name__ in repr(trig)


# --- poisoning and metrics ----------------------------------------------------------------------


def test_poison_rate_labels_and_seed():
    x, y = synth(200)
    trig = BadNets(position="corner")
    xp, yp, idx = poison(x, y, trig, target=2, rate=0.1, seed=5, return_index=True)
    assert len(idx) == 20 and idx.unique().numel() == 20
    assert (y[idx] != 2).all(), "only non-target images are poisoned"
    assert (yp[idx] == 2).all()
    keep = torch.ones(200, dtype=torch.bool)
    keep[idx] = False
    assert torch.equal(yp[keep], y[keep]) and torch.equal(xp[keep], x[keep])
    assert torch.equal(xp[idx], trig(x[idx]))
    assert torch.equal(poison(x, y, trig, 2, 0.1, seed=5)[0], xp)
    assert not torch.equal(poison(x, y, trig, 2, 0.1, seed=6)[1], yp)
    assert torch.equal(poison(x, y, trig, 2, 0.0)[0], x)
    with pytest.raises(InputError, match="non-target"):
        poison(x, y, trig, 2, 0.9)


class _Threshold(nn.Module):
    """Toy model: class 1 when the bottom-right pixel is bright, else class 0."""

    def forward(self, x):
        v = x[:, 0, -2, -2]
        return torch.stack([0.5 - v, v - 0.5], 1)


def test_metrics_on_toy_model():
    model = _Threshold()
    x = torch.zeros(8, 1, 6, 6)
    y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])
    assert clean_accuracy(model, x, y) == pytest.approx(0.75)
    x[6:, 0, -2, -2] = 1.0
    assert clean_accuracy(model, x, y) == 1.0
    stamp = PatchTrigger(torch.ones(1, 1), position=(-2, -2))
    assert attack_success_rate(model, x, y, stamp, target=1) == 1.0
    assert attack_success_rate(model, x, y, BadNets(size=2, position=(0, 0)), target=1) == 0.0
    # normalisation is applied before the model: mean 1 makes every pixel <= 0
    assert attack_success_rate(model, x, y, stamp, target=1, normalize=([1.0], [1.0])) == 0.0
    with pytest.raises(InputError):
        attack_success_rate(model, x[6:], y[6:], stamp, target=1)


def test_train_classifier_seeded_and_eval_mode(data):
    (x, y), _ = data
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(train_classifier(SmallCNN(1, 4, 16), x[:128], y[:128], epochs=1, seed=1))
    a, b = models
    assert not a.training
    assert_same_state(a, b)


# --- attacks end to end ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "rate", "epochs"),
    [
        (BadNets(position="random"), 0.2, 8),
        (BadNets(position="corner"), 0.1, 4),
        (Blended("sine", alpha=0.15), 0.1, 4),
        (TrojanWatermark(), 0.1, 4),
    ],
    ids=["badnets-random", "badnets-corner", "blended", "trojan"],
)
def test_train_backdoored_reaches_high_asr(data, trigger, rate, epochs):
    (x, y), (xt, yt) = data
    torch.manual_seed(0)
    model = train_backdoored(
        SmallCNN(1, 4, 16), x, y, trigger, target=1, rate=rate, epochs=epochs, lr=3e-3, batch_size=32
    )
    assert clean_accuracy(model, xt, yt) >= 0.95
    assert attack_success_rate(model, xt, yt, trigger, target=1) >= 0.9


def test_train_backdoored_colour_with_normalize():
    x, y = synth(384, channels=3)
    xt, yt = synth(192, channels=3, seed=1)
    norm = ([0.2, 0.2, 0.2], [0.3, 0.3, 0.3])
    trig = BadNets(position="corner", pattern="random")
    torch.manual_seed(0)
    model = train_backdoored(
        SmallCNN(3, 4, 16), x, y, trig, 3, rate=0.1, epochs=4, lr=3e-3, batch_size=32, normalize=norm
    )
    assert clean_accuracy(model, xt, yt, normalize=norm) >= 0.95
    assert attack_success_rate(model, xt, yt, trig, 3, normalize=norm) >= 0.9


def test_optimise_trojan_trigger_excites_neurons(data):
    (x, y), (xt, yt) = data
    torch.manual_seed(0)
    clean = train_classifier(SmallCNN(1, 4, 16), x, y, epochs=2, lr=3e-3)
    before = snapshot(clean)
    start = TrojanWatermark(size=5, pattern=torch.full((1, 5, 5), 0.5))
    trig = optimise_trojan_trigger(clean, x[:64], start, neurons=2, steps=40)
    assert_same_state(before, clean)
    assert len(trig.neurons) == 2 and trig.pattern.shape == (1, 5, 5)
    assert trig.pattern.min() >= 0 and trig.pattern.max() <= 1
    with torch.no_grad():

        def act(imgs):
            return clean.features(imgs)[:, trig.neurons].mean().item()

        assert act(trig(x[:64])) > act(start(x[:64])) + 1e-3
    model = train_backdoored(clean, x, y, trig, target=0, rate=0.1, epochs=3, lr=3e-3, batch_size=32)
    assert attack_success_rate(model, xt, yt, trig, 0) >= 0.9


def test_imc_train_optimises_trigger_and_model(data):
    (x, y), (xt, yt) = data
    torch.manual_seed(0)
    start = BadNets(3, "corner", pattern="random", seed=1)
    model, trig = imc_train(SmallCNN(1, 4, 16), x, y, 2, trigger=start, rate=0.1, epochs=4, lr=3e-3, batch_size=32)
    assert trig.name == "imc" and not torch.equal(trig.pattern, start.pattern[:1])
    assert clean_accuracy(model, xt, yt) >= 0.95
    assert attack_success_rate(model, xt, yt, trig, 2) >= 0.9
    with pytest.raises(InputError, match="fixed position"):
        imc_train(SmallCNN(1, 4, 16), x, y, 2, trigger=BadNets(position="random"))
