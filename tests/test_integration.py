"""End to end: a backdoored and a clean MNIST model through scan -> erase -> outputs."""
import json

import pytest
import torch

import baerase
from baerase.attacks import BadNets, attack_success_rate, clean_accuracy, train_backdoored, train_classifier
from baerase.data import load_mnist, split
from baerase.models import SmallCNN

FAST = baerase.Config(steps=150, batch_size=24, progress=False)


@pytest.fixture(scope="module")
def mnist():
    torch.manual_seed(0)
    images, labels = load_mnist()
    return split(images, labels, [0.5, 0.1, 0.2], seed=0)


@pytest.fixture(scope="module")
def backdoored(mnist):
    (x, y), _, _ = mnist
    trigger = BadNets(size=3, position="random", seed=1)
    model = train_backdoored(SmallCNN(1, 10, 28), x, y, trigger, target=3, rate=0.2, epochs=10, seed=0)
    return model, trigger


def test_scan_flags_target_and_erase_removes_backdoor(mnist, backdoored, tmp_path):
    (_, _), (xc, yc), (xt, yt) = mnist
    model, trigger = backdoored
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ca0, asr0 = clean_accuracy(model, xt, yt), attack_success_rate(model, xt, yt, trigger, 3)
    assert asr0 > 0.8

    report = baerase.scan(model, xc, yc, config=FAST)
    assert report.flagged == [3]
    assert json.loads(report.to_json())["flagged"] == [3]

    result = baerase.erase(model, xc, yc, report, config=FAST)
    ca1, asr1 = clean_accuracy(result.model, xt, yt), attack_success_rate(result.model, xt, yt, trigger, 3)
    assert asr1 <= 0.02, f"ASR {asr0:.3f} -> {asr1:.3f}"
    assert ca0 - ca1 <= 0.02, f"CA {ca0:.3f} -> {ca1:.3f}"
    assert result.verified and result.erased == [3] and result.history
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items()), "input model modified"

    out = baerase.write_outputs(tmp_path / "audit", report, xc, result)
    names = {p.name for p in out.iterdir()}
    assert {"report.json", "report.md", "model.safetensors", "triggers.safetensors", "triggers"} <= names
    document = json.loads((out / "report.json").read_text())
    assert document["scan"]["flagged"] == [3] and document["erase"]["verified"] is True
    reloaded = baerase.ScanReport.load(out)
    assert reloaded.flagged == [3] and len(reloaded.triggers) == 10


def test_clean_model_is_not_flagged(mnist):
    (x, y), (xc, yc), _ = mnist
    model = train_classifier(SmallCNN(1, 10, 28), x, y, epochs=4, seed=0)
    report = baerase.scan(model, xc, yc, config=FAST)
    assert report.flagged == []
    result = baerase.erase(model, xc, yc, report, config=FAST)
    assert result.erased == [] and result.verified
