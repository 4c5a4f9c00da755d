"""The large-scale benchmark's pieces, at a tiny size on CPU (the benchmark itself runs for minutes)."""

from types import SimpleNamespace

import pytest
import torch

import baerase
from baerase.models import build
from benchmarks import bench_large as B

TINY = B.Size("tiny", width=4, side=32, classes=40, images=80, knobs={"channels_last": True})

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions stall on thread hand-offs on busy cores


def test_reduced_resnet50_scan_and_row(tmp_path, monkeypatch):
    dev = torch.device("cpu")
    model = B.build_large(TINY, dev)
    x, y = B.clean_data(TINY, dev)
    assert x.shape == (80, 3, 32, 32) and x.min() >= 0 and x.max() <= 1 and y.max() == 39
    # 40 classes: above prescreen_above (32), so the pre-screen path runs too.
    config = baerase.Config(steps=5, prescreen_steps=2, progress=False, **TINY.knobs)
    report = baerase.scan(model, x, y, config=config)
    assert report.num_classes == 40 and len(report.classes) == 40
    assert report.cost.forward > 0 and report.cost.per_class(40) > 0 and report.seconds > 0
    assert set(report.cost.phases) == {"recovery", "confirmation"}

    monkeypatch.setattr(B, "RESULTS_FILE", tmp_path / "large.md")
    bench = SimpleNamespace(extra_info={})
    B.record(bench, report, "large tiny", dev, TINY.knobs, TINY.describe(), target=7)
    assert bench.extra_info["images_per_class"] > 0 and "recovery" in bench.extra_info["phases"]
    lines = (tmp_path / "large.md").read_text().splitlines()
    assert lines[-1].startswith("| ") and "large tiny" in lines[-1] and "(target 7)" in lines[-1]
    assert lines[-1].count("|") == lines[-3].count("|")  # the row has the header's columns


def test_size_selection_and_skip_estimate():
    assert B.large_size(torch.device("cuda")) is B.FULL and B.large_size(torch.device("cpu")) is B.REDUCED
    # 1,000 kept patch generators are small; 1,000 mask generators at 16 px fit a CPU host.
    assert B.trigger_state_bytes(B.FULL, "patch") < 2**30
    assert B.trigger_state_bytes(B.REDUCED, "mask") < 4 * 2**30


def test_resnet50_full_size_parameters():
    model = build("resnet50", num_classes=1000, width=64)
    count = sum(p.numel() for p in model.parameters())
    assert count == 25_557_032  # torchvision's resnet50
    assert isinstance(model, B.ResNet50)
