"""End to end: scan -> erase -> outputs on a backdoored model, judged with the attacker's real trigger.

The default run audits the session's small colour model (``backdoored`` in conftest.py) once; the
MNIST audits of a backdoored and a clean model are ``slow`` (run them with ``-m slow``).
"""

import dataclasses
import json

import pytest
import torch
from helpers import assert_same_state, snapshot

import baerase
from baerase.attacks import (
    BadNets,
    attack_success_rate,
    clean_accuracy,
    corner_backdoors,
    train_backdoored,
    train_classifier,
)
from baerase.data import load_mnist, split
from baerase.models import SmallCNN

# Reduced for the small model: 200 recovery steps already find the 3x3 trigger about 5x smaller than
# the median class's (the flag needs 3x), and 100 unlearning steps erase it.
SMALL = baerase.Config(steps=200, batch_size=24, min_steps=100, progress=False)


@pytest.fixture(scope="module")
def audited(backdoored):
    """(snapshot of the model before, scan report, erase result): one audit shared by the tests below."""
    before, threads = snapshot(backdoored.model), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x, y = backdoored.clean
        report = baerase.scan(backdoored.model, x, y, config=SMALL)
        result = baerase.erase(backdoored.model, x, y, report, config=SMALL)
    finally:
        torch.set_num_threads(threads)
    return before, report, result


def test_scan_flags_only_the_backdoor_target(backdoored, audited):
    _, report, _ = audited
    assert report.flagged == [backdoored.target]
    assert json.loads(report.to_json())["flagged"] == [backdoored.target]
    target = report.classes[backdoored.target]
    others = sorted(c.trigger_norm for c in report.classes if not c.flagged)
    median = others[len(others) // 2]
    assert target.trigger_norm * SMALL.detection.min_trigger_shrink < median and target.attack_success >= 0.5
    assert target.confirmation_index is not None and target.confirmation_index > SMALL.detection.anomaly_threshold
    assert all(0 < c.steps <= SMALL.recovery.steps for c in report.classes)
    assert report.config["recovery"]["steps"] == SMALL.recovery.steps
    assert report.cost.phases["recovery"].forward > 0 and report.cost.phases["confirmation"].forward > 0


def test_erase_removes_the_real_trigger_and_keeps_clean_accuracy(backdoored, audited):
    before, _, result = audited
    (xt, yt), trigger, target = backdoored.test, backdoored.trigger, backdoored.target
    ca0, asr0 = clean_accuracy(backdoored.model, xt, yt), attack_success_rate(backdoored.model, xt, yt, trigger, target)
    ca1, asr1 = clean_accuracy(result.model, xt, yt), attack_success_rate(result.model, xt, yt, trigger, target)
    assert asr0 > 0.8
    assert asr1 <= 0.02, f"ASR {asr0:.3f} -> {asr1:.3f}"
    assert ca0 - ca1 <= 0.02, f"CA {ca0:.3f} -> {ca1:.3f}"
    assert result.verified and result.changed and result.erased == [target] and result.history
    assert result.cost.phases["unlearning"].backward > 0 and result.cost.phases["verification"].forward > 0
    assert_same_state(before, backdoored.model, "input model")
    assert not any(p.requires_grad for p in result.model.parameters()) and not result.model.training


def test_a_second_flag_not_found_again_without_the_target_is_dropped(backdoored, one_thread, monkeypatch):
    # Flag the hardest clean class beside the target: on the copy without the target it is no outlier.
    import baerase.api

    confirmed = baerase.api._confirmed

    def with_a_second_flag(inputs, screened, spent):
        verdict = confirmed(inputs, screened, spent)
        flagged = verdict.flagged.clone()
        flagged[screened.recovery.norms.argmax()] = True
        return dataclasses.replace(verdict, flagged=flagged)

    monkeypatch.setattr(baerase.api, "_confirmed", with_a_second_flag)
    x, y = backdoored.clean
    without = baerase.scan(backdoored.model, x, y, config=SMALL.replace(independence_steps=0))
    report = baerase.scan(backdoored.model, x, y, config=SMALL)
    assert len(without.flagged) == 2 and report.flagged == [backdoored.target]
    (second,) = set(without.flagged) - {backdoored.target}
    assert report.classes[second].lost_with == backdoored.target
    assert f"lost with class {backdoored.target}" in report.summary()
    probe = report.cost.phases["confirmation"].backward - without.cost.phases["confirmation"].backward
    assert probe >= SMALL.detection.independence_steps * SMALL.unlearning.unlearn_batch_size


def test_outputs_are_written_and_reload(backdoored, audited, tmp_path):
    _, report, result = audited
    out = baerase.write_outputs(tmp_path / "audit", report, backdoored.clean[0], result)
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "model.safetensors", "triggers.safetensors", "triggers"} <= names
    document = json.loads((out / "report.json").read_text())
    assert document["scan"]["flagged"] == [backdoored.target] and document["erase"]["verified"] is True
    assert document["scan"]["config"]["unlearning"]["min_steps"] == SMALL.unlearning.min_steps
    reloaded = baerase.ScanReport.load(out)
    assert reloaded.flagged == [backdoored.target] and len(reloaded.triggers) == 8


# ---- MNIST (slow) ------------------------------------------------------------------------------

FAST = baerase.Config(steps=150, batch_size=24, progress=False)


@pytest.fixture(scope="module")
def mnist():
    torch.manual_seed(0)
    images, labels = load_mnist()
    return split(images, labels, [0.5, 0.1, 0.2], seed=0)


@pytest.mark.slow
def test_mnist_scan_flags_target_and_erase_removes_backdoor(mnist, tmp_path):
    (x, y), (xc, yc), (xt, yt) = mnist
    trigger = BadNets(size=3, position="random", seed=1)
    model = train_backdoored(SmallCNN(1, 10, 28), x, y, trigger, target=3, rate=0.2, epochs=10, seed=0)
    before = snapshot(model)
    ca0, asr0 = clean_accuracy(model, xt, yt), attack_success_rate(model, xt, yt, trigger, 3)
    assert asr0 > 0.8

    report = baerase.scan(model, xc, yc, config=FAST)
    assert report.flagged == [3]

    result = baerase.erase(model, xc, yc, report, config=FAST)
    ca1, asr1 = clean_accuracy(result.model, xt, yt), attack_success_rate(result.model, xt, yt, trigger, 3)
    assert asr1 <= 0.02, f"ASR {asr0:.3f} -> {asr1:.3f}"
    assert ca0 - ca1 <= 0.02, f"CA {ca0:.3f} -> {ca1:.3f}"
    assert result.verified and result.erased == [3] and result.history
    assert_same_state(before, model, "input model")

    out = baerase.write_outputs(tmp_path / "audit", report, xc, result)
    reloaded = baerase.ScanReport.load(out)
    assert reloaded.flagged == [3] and len(reloaded.triggers) == 10


@pytest.mark.slow
def test_mnist_clean_model_is_not_flagged(mnist):
    (x, y), (xc, yc), _ = mnist
    model = train_classifier(SmallCNN(1, 10, 28), x, y, epochs=4, seed=0)
    report = baerase.scan(model, xc, yc, config=FAST)
    assert report.flagged == []
    result = baerase.erase(model, xc, yc, report, config=FAST)
    assert result.erased == [] and result.verified


@pytest.mark.slow
def test_mnist_two_backdoors_each_stand_without_the_other(mnist):
    # The independence test unlearns the strongest target from a copy and recovers the other again.
    (x, y), (xc, yc), (xt, yt) = mnist
    backdoors = corner_backdoors((0, 5), size=4, seed=1)
    model = train_backdoored(SmallCNN(1, 10, 28), x, y, backdoors.triggers, backdoors.targets, 0.1, epochs=10, seed=0)
    assert min(backdoors.success_rates(model, xt, yt).values()) > 0.8
    without = baerase.scan(model, xc, yc, config=baerase.Config(progress=False, independence_steps=0))
    report = baerase.scan(model, xc, yc, config=baerase.Config(progress=False))
    assert without.flagged == report.flagged == [0, 5]
    probe = report.cost.phases["confirmation"].backward - without.cost.phases["confirmation"].backward
    defaults = baerase.Config()
    assert probe >= defaults.detection.independence_steps * defaults.unlearning.unlearn_batch_size
