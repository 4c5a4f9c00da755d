"""The untargeted trigger (target ``UNTARGETED``): its recovery loss, where it sends images (spread),
the report that carries an all-to-all finding, and the unlearning loss on its rows."""

import json

import pytest
import torch
from torch import nn

import baerase
from baerase import Config
from baerase.detect import spread, untargeted
from baerase.recover import RecoveryResult, TriggerSet, attack_success, recover, sent_to
from baerase.recover.recovery import _attack, _MaskCostTracker, _spread_over_classes
from baerase.recover.triggers import UNTARGETED, reached
from baerase.report import ClassResult, ScanReport
from baerase.unlearn import UnlearnLoss
from baerase.unlearn.batch import TriggeredBatch

torch.set_num_threads(1)


def test_the_untargeted_check_is_a_fallback_that_can_be_ordered_or_left_out():
    assert Config().recovery.fallback == ("warp", "blend", "untargeted")
    assert Config(fallback=("untargeted",)).recovery.fallback == ("untargeted",)
    with pytest.raises(baerase.ConfigError, match="untargeted"):
        Config(fallback=("mask",))
    with pytest.raises(baerase.ConfigError, match="min_untargeted_spread"):
        Config(min_untargeted_spread=0.0)


def test_reached_is_the_target_or_any_other_class_for_an_untargeted_trigger():
    pred = torch.tensor([[2, 1, 0], [2, 1, 0]])
    aims = torch.tensor([[2], [UNTARGETED]])
    labels = torch.tensor([[2, 0, 0]])
    assert reached(pred, aims, labels).tolist() == [[True, False, False], [False, True, False]]


def test_the_untargeted_attack_is_the_clipped_probability_of_leaving_the_own_label():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1])
    p_own = torch.softmax(logits, 1)[[0, 1], labels]
    away = _attack(logits, torch.tensor([UNTARGETED, UNTARGETED]), labels, beta=0.5)
    assert torch.allclose(away, (1 - p_own).clamp(max=0.5))
    toward = _attack(logits, torch.tensor([1, UNTARGETED]), labels, beta=1.0)
    assert torch.allclose(toward[0], torch.softmax(logits, 1)[0, 1])


def test_the_spread_term_rewards_an_untargeted_batch_sent_to_many_classes():
    b, k = 4, 4
    to_one = torch.full((b, k), -9.0)
    to_one[:, 2] = 9.0
    to_each = torch.full((b, k), -9.0)
    to_each[torch.arange(b), torch.arange(b)] = 9.0
    logits = torch.cat([to_one, to_each, to_each])
    rows = torch.tensor([UNTARGETED] * 2 * b + [1] * b)
    spread_term = _spread_over_classes(logits, rows, torch.ones(3, dtype=torch.bool), b)
    assert spread_term[0] == pytest.approx(0, abs=1e-3) and spread_term[1] == pytest.approx(1, abs=1e-3)
    assert spread_term[2] == 0, "a targeted trigger gets no spread term"
    stopped = _spread_over_classes(logits[b:], rows[b:], torch.tensor([False, True, True]), b)
    assert stopped[0] == 0 and stopped[1] == pytest.approx(1, abs=1e-3)


def test_an_untargeted_trigger_works_at_its_own_success_bar():
    config = Config(progress=False)
    tracker = _MaskCostTracker(2, config, torch.device("cpu"), torch.tensor([UNTARGETED, 1]))
    share = (config.recovery.untargeted_success + config.recovery.success_threshold) / 2
    improved = tracker.update(torch.tensor([share, share]), torch.tensor([5.0, 5.0]))
    assert improved.tolist() == [True, False]


def test_spread_tells_a_permutation_from_a_universal_perturbation():
    labels = torch.arange(4).repeat_interleave(5)
    shifted = (labels + 1) % 4  # all-to-all: every class onto its own target
    assert spread(shifted, labels) == (1.0, [0, 1, 2, 3])
    one_sink = torch.full_like(labels, 2)  # a clean model's: everything to one class
    share, targets = spread(one_sink, labels)
    assert targets == [2] and share == pytest.approx(1 / 4)
    scattered = torch.tensor([1, 2, 3, 1, 2] * 4)  # no class's flips go mostly to one place
    assert spread(scattered, labels)[0] <= 0.5
    few = labels.clone()
    few[:3] = 1  # three flips from class 0 cannot say where it goes
    assert spread(few, labels) == (0.0, [])


class _AllToAll(nn.Module):
    """Class = brightness quartile (smoothly); a bright top-left pixel adds one to it (mod 4)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x[:, 0, 1:, :].mean((1, 2)) * 4 + 2.4 * torch.relu(x[:, 0, 0, 0] - 0.55)
        centres = torch.arange(4, dtype=x.dtype) + 0.5
        near = -8 * (level.unsqueeze(1) - centres) ** 2
        wrapped = -8 * (level - 4.5) ** 2  # past the top quartile: class 0 again
        return torch.cat([torch.maximum(near[:, :1], wrapped.unsqueeze(1)), near[:, 1:]], 1)


def _quartile_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat(n // 4)
    x = ((labels.float() + 0.2 + 0.6 * torch.rand(len(labels), generator=g)) / 4).view(-1, 1, 1, 1).expand(-1, 1, 8, 8)
    x = x.clone()
    x[:, :, 0, 0] = 0.6
    return x, labels


def test_an_untargeted_trigger_sends_each_class_onward_on_an_all_to_all_model():
    x, y = _quartile_images(64)
    model, triggers = _AllToAll(), _corner_trigger()
    sent = sent_to(triggers, model, x)[0]
    assert torch.equal(sent, (y + 1) % 4)
    assert attack_success(triggers, model, x, y).item() == 1.0
    assert spread(sent, y) == (1.0, [0, 1, 2, 3])


def _corner_trigger() -> TriggerSet:
    """An untargeted trigger that whitens the top-left pixel: _AllToAll's backdoor."""
    triggers = TriggerSet([UNTARGETED], (1, 8, 8), hidden=16, mine_hidden=8)
    with torch.no_grad():
        triggers.mask_logits.fill_(-20)[0, 0, 0, 0] = 20
        last = triggers.generator.linears[-1]
        last.weight.zero_()
        last.bias.fill_(20)
    return triggers


def test_an_all_to_all_needs_an_untargeted_trigger_far_smaller_than_the_targeted_ones():
    x, y = _quartile_images(64)
    triggers = _corner_trigger()
    found = RecoveryResult([UNTARGETED], triggers, torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([10]))
    config = Config(progress=False)
    small = untargeted(lambda *_: found, _AllToAll(), (x, y), config, 1, targeted_norms=torch.tensor([8.0, 10.0, 30.0]))
    assert small.spread == 1.0 and small.targets == [0, 1, 2, 3]
    large = untargeted(lambda *_: found, _AllToAll(), (x, y), config, 2, targeted_norms=torch.tensor([1.0, 1.0, 30.0]))
    assert large.targets == [], "as large as a typical targeted trigger: most of the image, not a backdoor"


@pytest.mark.parametrize(("mass", "tries"), [(50.0, 1), (5.0, 3)])
def test_a_trigger_as_large_as_the_targeted_median_ends_the_tries(mass, tries):
    x, y = _quartile_images(64)
    success, norm, steps = torch.tensor([1.0]), torch.tensor([mass]), torch.tensor([10])
    found = RecoveryResult([UNTARGETED], _corner_trigger(), success, norm, steps)
    calls = []

    def rerecover(*args):
        calls.append(args)
        return found

    result = untargeted(rerecover, _AllToAll(), (x, y), Config(progress=False), 3, torch.tensor([8.0, 10.0, 30.0]))
    assert result.targets == [] and len(calls) == tries, "another seed is tried only below the median"


def test_recovery_of_an_untargeted_trigger_sends_images_away_from_their_labels():
    x, y = _quartile_images(64)
    # The away-from-own-label loss alone: the spread term has its own test above.
    config = Config(steps=60, hidden=16, mine_hidden=8, batch_size=8, progress=False, untargeted_diversity=0)
    found = recover(_AllToAll(), (x, y), (x, y), [UNTARGETED], config)
    assert found.targets == [UNTARGETED] and found.success[0] >= 0.5
    sent = sent_to(found.triggers, _AllToAll(), x)[0]
    assert (sent != y).float().mean() >= 0.5


def _report(untargeted: bool) -> ScanReport:
    classes = [ClassResult(t, 0.9, 10.0, 0.0, untargeted) for t in range(3)]
    triggers = TriggerSet([UNTARGETED] if untargeted else [0, 1, 2], (1, 4, 4), hidden=8, mine_hidden=4)
    return ScanReport(classes, 3, (1, 4, 4), "mask", "ref", Config().to_dict(), 0.0, triggers=triggers,
                      untargeted=untargeted)  # fmt: skip


def test_an_all_to_all_report_erases_its_untargeted_trigger_and_says_so(tmp_path):
    report = _report(untargeted=True)
    assert report.flagged_triggers().targets.tolist() == [UNTARGETED]
    assert "all-to-all" in report.summary()
    out = baerase.write_outputs(tmp_path / "a2a", report, torch.rand(4, 1, 4, 4))
    assert json.loads((out / "report.json").read_text())["scan"]["untargeted"] is True
    assert "untargeted trigger (all-to-all backdoor)" in (out / "report.html").read_text()
    reloaded = ScanReport.load(out)
    assert reloaded.untargeted and reloaded.flagged == [0, 1, 2]
    assert reloaded.flagged_triggers().targets.tolist() == [UNTARGETED]
    assert _report(untargeted=False).flagged_triggers().targets.tolist() == []


def test_unlearning_relabels_untargeted_rows_and_pushes_no_target_away():
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    anchor = [p.detach().clone() for p in net.parameters()]
    labels = torch.tensor([0, 1, 2, 0])
    batch = TriggeredBatch(
        held=torch.arange(4),
        images=torch.rand(4, 1, 4, 4),
        labels=labels,
        triggered=torch.rand(4, 1, 4, 4),
        true_labels=labels,
        targets=torch.full((4,), UNTARGETED),
        parts=1,
        size=4,
    )
    loss = UnlearnLoss(Config(progress=False), torch.log_softmax(torch.zeros(4, 3), 1), anchor, 3)
    terms = loss(net, batch, torch.Generator().manual_seed(0))
    assert terms.valid.sum() == 0 and terms.ascent == 0
    assert terms.relabel > 0 and torch.isfinite(terms.total)


@pytest.mark.slow
def test_an_all_to_all_backdoor_is_found_and_erased(one_thread):
    from baerase.attacks import AllToAll, BadNets, train_backdoored
    from baerase.data import load_mnist, split
    from baerase.models import SmallCNN

    x, y = load_mnist()
    (tx, ty), (dx, dy), (ex, ey) = split(x, y, [0.7, 0.1, 0.2], seed=0)
    a2a = AllToAll(BadNets(4, "corner", seed=1))
    torch.manual_seed(0)
    model = train_backdoored(SmallCNN(1, 10, 28), tx, ty, a2a.trigger, None, 0.1, mode="all_to_all", epochs=10)
    assert a2a.success_rate(model, ex, ey) >= 0.7
    report, result = baerase.audit(model, dx, dy)
    assert report.untargeted and len(report.flagged) >= 5, "the classes go to at least half as many targets"
    assert result.verified and a2a.success_rate(result.model, ex, ey) <= 0.05
    accuracy = [(m(ex).argmax(1) == ey).float().mean().item() for m in (model, result.model)]
    assert accuracy[1] >= accuracy[0] - 0.01
