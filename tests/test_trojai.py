"""``baerase trojai``: TrojAI's model layout in, one probability that the model is poisoned out.

The test builds two model folders in TrojAI's layout (``model.pt`` and ``clean-example-data/`` of
``class_<label>_example_<n>.png``) from 12x12 MNIST models: one with a BadNets backdoor saved as a
full pickle, one clean saved as a state dict.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_fleet import MNIST_ARCH, mnist12, train_mnist

from baerase import Config, cli
from baerase.report import ClassResult, ScanReport
from baerase.trojai import CLIP, UNDECIDED, load_examples, poisoned_probability

PER_CLASS = 25


def write_examples(folder, images: torch.Tensor, labels: torch.Tensor) -> None:
    """``class_<label>_example_<n>.png``, PER_CLASS images of each class, as TrojAI names them."""
    folder.mkdir(parents=True)
    for label in range(10):
        picked = images[labels == label][:PER_CLASS]
        for n, image in enumerate(picked):
            pixels = (image[0].numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"class_{label}_example_{n}.png")


@pytest.fixture(scope="module")
def trojai_round(tmp_path_factory):
    """Two TrojAI model folders: id-00000000 poisoned (full pickle), id-00000001 clean (state dict)."""
    train, (x, y), _ = mnist12()
    root = tmp_path_factory.mktemp("trojai_round")
    poisoned, clean = root / "id-00000000", root / "id-00000001"
    for folder in (poisoned, clean):
        write_examples(folder / "clean-example-data", x, y)
    torch.save(train_mnist(train, 4, 1), poisoned / "model.pt")
    torch.save(train_mnist(train, None, 0).state_dict(), clean / "model.pt")
    return poisoned, clean


def run_trojai(capsys, folder, tmp_path, *more) -> tuple[int, float, str]:
    result = tmp_path / f"{folder.name}.txt"
    argv = [
        "trojai",
        "--model_filepath",
        folder / "model.pt",
        "--result_filepath",
        result,
        "--scratch_dirpath",
        tmp_path / f"scratch-{folder.name}",
        "--examples_dirpath",
        folder / "clean-example-data",
        "--quiet",
        *more,
    ]
    code = cli.main([str(a) for a in argv])
    return code, float(result.read_text()), capsys.readouterr().err


def test_poisoned_model_gets_the_higher_probability(trojai_round, tmp_path, capsys):
    poisoned, clean = trojai_round
    code, p_poisoned, err = run_trojai(capsys, poisoned, tmp_path, "--trust-pickle")
    assert code == 0, err
    arch = ["--arch", "small_cnn", *(f"--arch-arg={k}={v}" for k, v in MNIST_ARCH.items())]
    code, p_clean, err = run_trojai(capsys, clean, tmp_path, *arch)
    assert code == 0, err
    assert p_poisoned > 0.5 > p_clean, (p_poisoned, p_clean)
    report = json.loads((tmp_path / f"scratch-{poisoned.name}" / "baerase-scan" / "report.json").read_text())
    assert report["scan"]["flagged"] == [4] and "erase" not in report


def test_unscannable_model_writes_one_half_and_exits_non_zero(trojai_round, tmp_path, capsys):
    poisoned, _ = trojai_round
    code, p, err = run_trojai(capsys, poisoned, tmp_path)  # a full pickle without the opt-in
    assert (code, p) == (2, UNDECIDED)
    assert err.startswith("baerase: error:") and "trust-pickle" in err and len(err.strip().splitlines()) == 1
    broken = tmp_path / "broken"
    (broken / "clean-example-data").mkdir(parents=True)
    (broken / "model.pt").write_bytes(b"\x80\x02 truncated pickle")
    code, p, err = run_trojai(capsys, broken, tmp_path, "--trust-pickle")
    assert (code, p) == (2, UNDECIDED) and "model.pt" in err


def test_labels_come_from_a_json_file_sidecars_or_file_names(tmp_path):
    pixels = np.zeros((6, 6, 3), np.uint8)
    for name in ("a.png", "b.png", "class_2_example_0.png", "c.png"):
        Image.fromarray(pixels).save(tmp_path / name)
    (tmp_path / "labels.json").write_text(json.dumps({"a.png": 3, "b": 1}))
    (tmp_path / "c.json").write_text("0")
    images, labels = load_examples(tmp_path)
    assert images.shape == (4, 3, 6, 6) and labels.tolist() == [3, 1, 0, 2]  # a, b, c, class_2 (sorted names)
    Image.fromarray(pixels).save(tmp_path / "unlabelled.png")
    with pytest.raises(cli.InputError, match=r"unlabelled\.png: no label"):
        load_examples(tmp_path)


def scan_report(indices: list[float], flagged: set[int]) -> ScanReport:
    classes = [ClassResult(k, 0.9, 10.0, a, k in flagged) for k, a in enumerate(indices)]
    return ScanReport(classes, len(classes), (1, 8, 8), "mask", "ref", Config().to_dict(), 0.0)


def test_probability_is_monotone_in_the_evidence_and_above_half_only_when_flagged():
    clean = [poisoned_probability(scan_report([a, 0.0, 0.0], set())) for a in (0.0, 1.0, 1.9, 5.0)]
    assert clean == sorted(clean) and clean[0] < 0.15 and clean[-1] == 0.5  # unconfirmed outliers: undecided
    flagged = [poisoned_probability(scan_report([a, 0.0, 0.0], {0})) for a in (2.5, 4.0, 12.0)]
    assert 0.5 < flagged[0] < flagged[1] < flagged[2] == CLIP[1]
