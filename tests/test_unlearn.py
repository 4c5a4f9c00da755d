"""Unlearning's parts through their interfaces: the guard, the batch builder, the loss terms, the
unlearning settings (``config.unlearning``), and the triggers' gradient flags."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from baerase import Config, ConfigError
from baerase.config import Unlearning
from baerase.recover import TriggerSet
from baerase.unlearn import Guard, TriggeredBatches, UnlearnLoss, unlearn
from baerase.unlearn.batch import _clamped, _radius
from baerase.unlearn.loop import StepBudget, _leaked, _Schedule, _without, step_budget
from baerase.unlearn.loss import _copy_anchor

torch.set_num_threads(1)

K = 3
CFG = Config(steps=5, hidden=16, mine_hidden=8, unlearn_batch_size=4, progress=False)


def linear() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(16, K))


def triggers(targets=(1,)) -> TriggerSet:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return TriggerSet(list(targets), (1, 4, 4), hidden=16, mine_hidden=8)


def labelled(net: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and the labels ``net`` gives them (it starts 100% right)."""
    x = torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return x, net(x).argmax(1)


def guard(net: nn.Module, config: Config = CFG, **kw) -> Guard:
    fit, val = labelled(net, 12, 1), labelled(net, 20, 2)
    with torch.no_grad():
        logp = torch.log_softmax(net(torch.cat([fit[0], val[0]])), 1)
    start = [p.detach().clone() for p in net.parameters()]
    return Guard(net, triggers(), fit, val, config, None, None, reference_logp=logp, start=start, **kw)


def negate(net: nn.Module) -> None:
    """Every answer of the linear model turns around (its argmax becomes the argmin)."""
    with torch.no_grad():
        for p in net.parameters():
            p.neg_()


# ---- the guard ---------------------------------------------------------------------------------


def test_guard_scores_the_start_and_bounds_the_loss_by_the_allowance():
    g = guard(linear())
    assert g.first["step"] == 0 and g.first["clean_accuracy"] == 1.0 and g.first["broken"] == 0.0
    assert g.allowance == pytest.approx(1 / 20)  # one of 20 validation images: more than max_accuracy_drop
    assert g.floor == pytest.approx(1.0 - 1 / 20)
    row = {"clean_accuracy": g.floor, "broken": 0.0}
    assert g.within(row)
    assert not g.within(dict(row, clean_accuracy=g.floor - g.allowance / 2))
    assert g.within(dict(row, clean_accuracy=g.floor - g.allowance / 2), slack=1.0)
    assert not g.within(dict(row, broken=2 * CFG.unlearning.max_accuracy_drop))
    assert g.within(dict(row, broken=2 * CFG.unlearning.max_accuracy_drop), slack=1.0)
    assert guard(linear(), accuracy_floor=0.5).floor == 0.5


def test_guard_keeps_an_erased_checkpoint_within_the_bounds():
    net = linear()
    g = guard(net, CFG.replace(asr_stop=1.0))  # every checkpoint counts as erased
    with torch.no_grad():
        net[1].bias.add_(1e-3)  # a step that changes no answer
    row = g.score(10)
    rows, back_off = g.accept(row)
    assert rows == [row] and not back_off
    assert g.best is row and g.erased_evals == 1
    assert torch.equal(g.best_state["1.bias"], net[1].bias)
    assert not g.finished(10, StepBudget(CFG.unlearning.min_steps, 100))  # the margin is not reached yet
    for step in (20, 30):
        g.accept(g.score(step))
    assert not g.finished(30, StepBudget(CFG.unlearning.min_steps, 100))  # erased past the margin, but under min_steps
    assert g.finished(100, StepBudget(CFG.unlearning.min_steps, 100))
    short = guard(net, CFG.replace(asr_stop=1.0))
    for step in (10, 20):
        short.accept(short.score(step))
        assert not short.finished(step, StepBudget(30, 100))
    short.accept(short.score(30))
    assert short.finished(30, StepBudget(30, 100))


@pytest.mark.parametrize("bisections", [0, 1, 3])
def test_guard_bisects_back_toward_the_start_for_a_checkpoint_far_outside(bisections):
    net = linear()
    g = guard(net, CFG.replace(asr_stop=1.0, bisections=bisections))
    start = [p.detach().clone() for p in net.parameters()]
    negate(net)  # the segment back: (1 - 2 s) * theta_0, right for s < 1/2, wrong beyond
    end = [p.detach().clone() for p in net.parameters()]
    row = g.score(10)
    assert row["clean_accuracy"] == 0.0 and not g.within(row)
    rows, back_off = g.accept(row)
    assert back_off  # far outside, and no half-step or more within
    assert all(torch.equal(p, e) for p, e in zip(net.parameters(), end, strict=True))  # left at the checkpoint
    expected = {0: None, 1: None, 3: 0.375}[bisections]  # shares tried: 1/2 (all answers tie), 1/4, 3/8
    if expected is None:
        assert rows == [row] and g.best is g.first
    else:
        assert rows[0] is row and rows[1]["share"] == expected and g.best is rows[1]
        kept = [g.best_state[name] for name in ("1.weight", "1.bias")]
        assert all(torch.allclose(k, torch.lerp(a, b, expected)) for k, a, b in zip(kept, start, end, strict=True))


def test_guard_prefers_the_erased_point_that_keeps_more_of_its_unlearning():
    net = linear()
    g = guard(net, CFG.replace(asr_stop=1.0, bisections=3))  # every point within counts as erased
    with torch.no_grad():
        net[1].bias.add_(1e-3)
    whole = [p.detach().clone() for p in net.parameters()]
    early = g.score(20)
    g.accept(early)
    negate(net)
    rows, _ = g.accept(g.score(30))  # kept at 3/8 of its step only: 11.25 steps unlearned, not 20
    assert rows[1]["share"] == 0.375 and g.best is early
    with torch.no_grad():
        for p, w in zip(net.parameters(), whole, strict=True):
            p.copy_(w)
    later = g.score(40)
    g.accept(later)
    assert g.best is later


def test_guard_does_not_back_off_when_half_the_step_is_within():
    net = linear()
    g = guard(net, CFG.replace(asr_stop=1.0, bisections=1))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(-0.5)  # the segment back: (1 - 1.5 s) * theta_0, wrong at the end, right at s = 1/2
    row = g.score(10)
    rows, back_off = g.accept(row)
    assert not g.within(row) and len(rows) == 2 and rows[1]["share"] == 0.5 and not back_off


# ---- the batch builder -------------------------------------------------------------------------


@pytest.mark.parametrize(("eps", "parts"), [(0.0, 1), (0.1, 2)])
def test_batch_builder_shapes(eps, parts):
    net, t = linear(), triggers((1, 2))
    fit, val = labelled(net, 10, 1), labelled(net, 8, 2)
    batches = TriggeredBatches(t, net, fit, val, CFG.replace(universal_eps=eps))
    generator = torch.Generator().manual_seed(0)
    epoch = list(batches.epoch(generator))
    assert [len(b) for b in epoch] == [4, 4, 2]
    for step, batch in enumerate(epoch):
        inputs = batches.build(batch, step, generator)
        b = len(batch)
        held = b + b // 2 if bool(torch.isin(fit[1], t.targets).any()) else b
        assert inputs.parts == parts and len(inputs.held) == held and inputs.images.shape == (held, 1, 4, 4)
        assert torch.equal(inputs.labels, fit[1][inputs.held])
        assert inputs.triggered.shape == (parts * 2 * b, 1, 4, 4)
        assert inputs.targets.tolist() == ([1] * b + [2] * b) * parts
        assert torch.equal(inputs.true_labels, fit[1][batch].repeat(2 * parts))


def test_batch_builder_skips_a_lone_image_and_steps_the_universal_perturbation_inside_its_ball():
    net, t = linear(), triggers()
    fit, val = labelled(net, 9, 1), labelled(net, 8, 2)
    batches = TriggeredBatches(t, net, fit, val, CFG.replace(universal_eps=0.1))
    generator = torch.Generator().manual_seed(0)
    epoch = list(batches.epoch(generator))
    assert [len(b) for b in epoch] == [4, 4]  # 9 = 4 + 4 + 1: the lone image is skipped
    inputs = batches.build(epoch[0], 0, generator)
    nll = torch.nn.functional.cross_entropy(net(inputs.triggered), inputs.targets, reduction="none")
    batches.update_universal(nll, torch.ones_like(nll))
    assert batches.universal.abs().max().item() == pytest.approx(0.1 / 4) and not batches.universal.requires_grad


def test_a_position_bound_triggers_universal_perturbation_takes_any_colour_near_it():
    t = TriggerSet([1, 2], (1, 8, 8), hidden=16, mine_hidden=8)
    with torch.no_grad():
        t.mask_logits.fill_(-9.0)
        t.mask_logits[:, 0, 1, 1] = 9.0  # both triggers: one pixel at (1, 1)
    radius = _radius(t, torch.tensor([True, False]), 0.1, (8, 8), reach=2)
    near = torch.zeros(8, 8, dtype=torch.bool)
    near[:4, :4] = True  # within 2 pixels of (1, 1)
    assert torch.equal(radius[0, 0] == 1.0, near) and torch.all(radius[0, 0][~near] == 0.1)
    assert torch.all(radius[1] == 0.1)  # a trigger that works anywhere keeps the small ball
    assert torch.all(_radius(t, torch.tensor([True, False]), 0.1, (8, 8), reach=0) == 0.1)


def test_a_universal_perturbation_pinned_at_black_still_gets_a_gradient():
    u = torch.full((1, 4, 4), -0.1, requires_grad=True)  # pushed below a black background
    x = torch.zeros(2, 1, 4, 4)
    image = _clamped(x + u)
    assert torch.equal(image, (x + u).clamp(0, 1))
    (grad,) = torch.autograd.grad(-image.sum(), u)  # a loss that wants the pixels brighter
    assert torch.all(grad < 0)  # so a descent step brightens them; a plain clamp would give 0


def test_the_independence_probe_unlearns_the_recovered_triggers_alone(monkeypatch):
    from types import SimpleNamespace

    from baerase.unlearn import rounds
    from baerase.validate import Inputs

    probed = []

    def record(inputs, model, *rest):
        probed.append(inputs.config.unlearning.universal_eps)
        return SimpleNamespace(model=model)

    monkeypatch.setattr(rounds, "_unlearn", record)
    inputs = Inputs(nn.Identity(), CFG.replace(universal_eps=0.1), *([None] * 8))
    rounds.unlearned_copy(inputs, None, 10, "probe")
    assert probed == [0]  # every small change toward one target would unlearn another target's patch too
    assert inputs.config.unlearning.universal_eps == 0.1  # the erase keeps its universal perturbations


def _erase_tries(monkeypatch, rounds_, asr_first: float, make=None, **settings) -> tuple[list, list]:
    """The unlearning settings of each unlearning an erase of ``rounds_`` rounds runs, and the outcomes it keeps,
    when the re-scan always finds the trigger and unlearning with the patch reach and the universal perturbations
    leaves ``asr_first`` of the recovered triggers (0.02 without either). ``make``: the flagged triggers;
    ``settings``: the erase's other config settings."""
    from types import SimpleNamespace

    from baerase.unlearn import rounds
    from baerase.validate import Inputs

    make = make or triggers
    tried = []

    def record(inputs, model, *rest, **guard):
        settings = inputs.config.unlearning
        tried.append(settings)
        wide = settings.patch_reach > 0 and settings.universal_eps > 0
        reached = settings.patch_reach > 0 and make().family == "mask"
        return SimpleNamespace(model=model, history=[], reached=reached, trigger_asr_after=asr_first if wide else 0.02)

    monkeypatch.setattr(rounds, "_unlearn", record)
    monkeypatch.setattr(rounds, "clean_accuracy", lambda *args: 1.0)
    monkeypatch.setattr(rounds, "_clean_reference", lambda report: None)
    still_found = (SimpleNamespace(triggers=make()), [], torch.tensor([True]))
    monkeypatch.setattr(rounds, "verify", lambda *args, **kwargs: still_found)
    monkeypatch.setattr(rounds, "_result", lambda inputs, flagged, outcomes, *rest: outcomes)
    report = SimpleNamespace(flagged=[1], flagged_triggers=make, classes=[SimpleNamespace(flagged=True, steps=5)],
                             untargeted=False)  # fmt: skip
    held = labelled(linear(), 64, 0)
    inputs = Inputs(nn.Identity(), CFG.replace(patch_reach=2, erase_rounds=rounds_, **settings), torch.device("cpu"),
                    *([None] * 4), K, held, held)  # fmt: skip
    return tried, rounds.erase_rounds(inputs, report, lambda model, desc: None)


def _erase_reaches(monkeypatch, rounds_, asr_at_reach: float) -> tuple[list[int], list]:
    tried, kept = _erase_tries(monkeypatch, rounds_, asr_at_reach)
    return [settings.patch_reach for settings in tried], kept


def test_a_round_after_one_the_rescan_survived_unlearns_without_patch_reach(monkeypatch):
    reaches, _ = _erase_reaches(monkeypatch, 3, asr_at_reach=0.0)
    assert reaches == [2, 0, 2]  # a blend recovered as a few pixels survives the reach; the next round goes without


def test_a_round_that_cannot_erase_its_triggers_with_patch_reach_runs_again_without(monkeypatch):
    reaches, kept = _erase_reaches(monkeypatch, 1, asr_at_reach=0.5)
    assert reaches == [2, 0]  # a blend's any-colour neighbourhood is an adversarial patch the guard cannot unlearn
    assert [o.trigger_asr_after for o in kept] == [0.02]  # the better of the two
    reaches, kept = _erase_reaches(monkeypatch, 1, asr_at_reach=0.0)
    assert reaches == [2] and [o.trigger_asr_after for o in kept] == [0.0]  # erased with the reach: no second run


def test_a_blend_family_round_that_cannot_erase_its_blends_runs_again_without_universal_perturbations(monkeypatch):
    from baerase.recover import BlendSet

    def blends():
        return BlendSet([1], (1, 4, 4))

    tried, kept = _erase_tries(monkeypatch, 1, asr_first=0.5, make=blends)
    assert [s.universal_eps for s in tried] == [CFG.unlearning.universal_eps, 0]  # the whole image's neighbourhood
    assert [o.trigger_asr_after for o in kept] == [0.02]
    tried, _ = _erase_tries(monkeypatch, 1, asr_first=0.0, make=blends)
    assert len(tried) == 1  # erased with them: no second run
    tried, _ = _erase_tries(monkeypatch, 2, asr_first=0.0, make=blends)
    assert [s.universal_eps for s in tried] == [CFG.unlearning.universal_eps, 0]  # after a survived round: without
    tried, _ = _erase_tries(monkeypatch, 1, asr_first=0.5, make=blends, universal_eps=0)
    assert len(tried) == 1  # none to drop: a second try would repeat the first


# ---- the loss ----------------------------------------------------------------------------------


def test_copies_anchor_the_other_classes_without_the_targets_share():
    reference = linear()
    images = torch.rand(16, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    target = torch.tensor([1])
    blind = linear()
    with torch.no_grad():
        blind[1].bias[1] = -1e4  # the reference's answers with the target's share removed

    def anchor(model):
        return _copy_anchor(model, reference, images, target, torch.Generator().manual_seed(0), None, None).item()

    assert anchor(blind) == pytest.approx(0.0, abs=1e-6)
    assert anchor(reference) > 0.01


@pytest.mark.parametrize("copies", [False, True])
def test_loss_terms_add_up_to_the_total(copies):
    net, t = linear(), triggers((0,))  # the images are all of class 1: copies are made of them
    fit, val = labelled(net, 8, 1), labelled(net, 8, 2)
    config = CFG.replace(alpha_u=3.0, relabel_weight=0.5, weight_l1=0.1)
    batches = TriggeredBatches(t, net, fit, val, config)
    generator = torch.Generator().manual_seed(0)
    inputs = batches.build(next(batches.epoch(generator)), 0, generator)
    anchor = [p.detach().clone() + 0.01 for p in net.parameters()]
    with torch.no_grad():
        fit_logp = torch.log_softmax(net(fit[0]), 1)
    original = linear()
    negate(original)  # copies anchor to a model that answers otherwise: the term is not 0
    loss = UnlearnLoss(config, fit_logp, anchor, K, original if copies else None)
    terms = loss(net, inputs, generator)
    held = terms.clean + config.unlearning.copy_weight * terms.copy_anchor if copies else terms.clean
    expected = (
        config.unlearning.alpha_u * held
        - terms.ascent
        + config.unlearning.relabel_weight * terms.relabel
        + config.unlearning.weight_l1 * terms.drift
    )
    assert torch.allclose(terms.total, expected)
    assert (terms.copy_anchor is not None) == copies
    assert 0 <= terms.ascent <= inputs.parts * math.log(2 * K)  # each part's mean, clipped at the cap
    assert terms.drift.item() == pytest.approx(0.01 * sum(p.numel() for p in net.parameters()), rel=1e-4)
    assert terms.target_nll.shape == terms.valid.shape == (len(inputs.targets),)
    values = terms.floats()
    assert set(values) == {f"loss_{n}" for n in ("clean", "copy_anchor", "ascent", "relabel", "drift", "total")}
    assert values["loss_total"] == pytest.approx(terms.total.item()) and (values["loss_copy_anchor"] > 0) == copies
    terms.total = terms.total * math.nan
    assert terms.floats()["loss_total"] is None  # a non-finite step logs None, which JSON can hold


# ---- the loop ----------------------------------------------------------------------------------


def test_each_further_round_unlearns_round_growth_times_longer():
    config = CFG.replace(min_steps=100, unlearn_epochs=1, unlearn_batch_size=10, round_growth=2.0)
    assert [step_budget(config, 50, r) for r in (1, 2, 3)] == [
        StepBudget(100, 100),
        StepBudget(200, 200),
        StepBudget(400, 400),
    ]
    many = config.replace(unlearn_epochs=5, round_growth=1.5)  # 5 epochs of 50 batches: more than the least
    assert step_budget(many, 500, 2) == StepBudget(150, 375)
    short = Config.short_erase(min_steps=60).unlearning
    assert (short.min_steps, short.unlearn_batch_size, short.round_growth) == (60, 32, 2.0)
    with pytest.raises(ConfigError, match="round_growth"):
        config.replace(round_growth=0.5)


@pytest.mark.parametrize("ratio", [2.0, 0.0])
def test_a_gradient_spike_is_clipped_to_a_few_times_the_rounds_median_norm(ratio):
    net = nn.Linear(1, 1, bias=False)
    settings = dataclasses.replace(Unlearning(), grad_clip_ratio=ratio, warmup_steps=1)
    schedule = _Schedule(net, 1.0, settings, most=10)
    schedule.optimizer = torch.optim.SGD(net.parameters(), lr=1.0)  # no momentum: each step is the gradient
    moves = []
    for step, slope in enumerate([1.0, 1.0, 100.0]):  # d(slope * w)/dw = slope
        before = net.weight.item()
        schedule.step(slope * net.weight.sum(), step)
        moves.append(before - net.weight.item())
    assert moves == pytest.approx([1.0, 1.0, 2.0 if ratio else 100.0])


def _answers_with_target_share(target_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of 4 classes on two images of each: right at 0.8, and class 0 drawing
    ``target_share`` of every other class's images, where the other wrong classes draw 0.05-0.1."""
    labels = torch.arange(4).repeat_interleave(2)
    probs = torch.full((8, 4), 0.05)
    probs[torch.arange(8), (labels + 1) % 4] = 0.1
    probs[labels != 0, 0] = target_share
    probs[torch.arange(8), labels] = 0.8
    return (probs / probs.sum(1, keepdim=True)).log(), labels


def test_a_target_that_draws_far_more_of_other_classes_answers_than_any_clean_class_has_leaked():
    leaking, labels = _answers_with_target_share(0.5)
    assert _leaked(leaking, labels, torch.tensor([0]), 3.0, 0.01).tolist() == [0]
    assert _leaked(leaking, labels, torch.tensor([0]), float("inf"), 0.01).tolist() == []  # off
    assert _leaked(leaking, labels, torch.tensor([0]), 3.0, 0.5).tolist() == []  # under the floor
    assert _leaked(leaking, labels, torch.tensor([-1]), 3.0, 0.01).tolist() == []  # untargeted: no class of its own
    assert _leaked(leaking, labels, torch.arange(4), 3.0, 0.01).tolist() == []  # all flagged: nothing to compare
    plain, labels = _answers_with_target_share(0.1)  # as much as a clean class's most confused neighbour
    assert _leaked(plain, labels, torch.tensor([0]), 3.0, 0.01).tolist() == []


def test_the_soft_targets_drop_a_leaked_targets_share_on_other_classes_images():
    logp, labels = _answers_with_target_share(0.5)
    cleared = _without(logp, labels, torch.tensor([0]))
    assert torch.isfinite(cleared).all()
    assert torch.allclose(cleared.exp().sum(1), torch.ones(8))
    other = labels != 0
    assert cleared[other, 0].exp().max() < 1e-30
    kept = [1, 2, 3]  # the other classes keep their proportions
    assert torch.allclose(cleared[other][:, kept].softmax(1), logp[other][:, kept].softmax(1))
    assert torch.equal(cleared[~other], logp[~other])  # the target's own images keep their answers
    assert torch.equal(_without(logp, labels, torch.tensor([], dtype=torch.long)), logp)


def test_unlearn_logs_the_loss_terms_in_each_evaluation_row_and_restores_the_trigger_flags():
    net, t = linear(), triggers()
    t.mask_logits.requires_grad_(False)
    flags = [p.requires_grad for p in t.parameters()]
    fit, val = labelled(net, 12, 1), labelled(net, 12, 2)
    config = CFG.replace(unlearn_epochs=1, min_steps=20, eval_every=5)  # 3 steps, raised to min_steps
    outcome = unlearn(net, t, fit, val, config, num_classes=K)
    assert [row["step"] for row in outcome.history if "share" not in row] == [0, 5, 10, 15, 20]
    assert "loss_total" not in outcome.history[0]
    assert all("loss_ascent" in row for row in outcome.history[1:] if "share" not in row)
    assert all(row["loss_total"] is not None for row in outcome.history[1:] if "share" not in row)
    assert [p.requires_grad for p in t.parameters()] == flags
    assert not any(p.requires_grad for p in outcome.model.parameters())


class _Fails(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        if torch.is_grad_enabled():  # an unlearning step
            raise RuntimeError("boom")
        return self.net(x)


def test_unlearn_restores_the_callers_trigger_flags_after_an_exception():
    net, t = linear(), triggers()
    t.generator.requires_grad_(False)  # the caller's mixed flags
    flags = [p.requires_grad for p in t.parameters()]
    assert any(flags) and not all(flags)
    fit, val = labelled(net, 12, 1), labelled(net, 12, 2)
    with pytest.raises(RuntimeError, match="boom"):
        unlearn(_Fails(net), t, fit, val, CFG.replace(min_steps=10), num_classes=K)
    assert [p.requires_grad for p in t.parameters()] == flags


def test_settings_are_frozen_and_checked():
    settings = Config().unlearning
    assert isinstance(settings, Unlearning)
    assert settings == Unlearning()  # the group's own defaults (tuned in baerase/config.py, not pinned here)
    assert CFG.replace(min_steps=40).unlearning.min_steps == 40  # a flat knob reaches its group
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.min_steps = 1
    for bad in (
        {"eval_every": 0},
        {"warmup_steps": 0},
        {"copy_weight": -1.0},
        {"leak_ratio": 0.5},
        {"leak_floor": 2.0},
    ):
        with pytest.raises(ConfigError):
            Unlearning(**bad)
        with pytest.raises(ConfigError):
            CFG.replace(**bad)


def test_a_config_survives_its_json_round_trip():
    config = Config(classes=(1, 3), betas=(0.4, 0.9), min_steps=10, seed=2)
    assert Config.from_dict(json.loads(json.dumps(config.to_dict()))) == config
