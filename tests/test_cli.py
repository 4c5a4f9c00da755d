"""CLI reliability: inputs are never modified, outputs are not clobbered, and every bad file or
argument ends with exit status 2 and a one-line ``baerase: error:`` message, no traceback."""

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyNet

from baerase import Config, cli
from baerase.models import save_model

torch.set_num_threads(1)

ARCH = "helpers:TinyNet"  # a user's own ``module:callable`` architecture


@pytest.fixture(autouse=True)
def tiny_presets(monkeypatch):
    # The CLI has no flags for the network sizes; shrink the preset so a run costs well under a second.
    tiny = functools.partial(Config, hidden=16, mine_hidden=8, batch_size=8, eval_samples=32, unlearn_epochs=1)
    monkeypatch.setattr(cli, "PRESETS", {"fast": tiny, "paper": tiny, "short-erase": tiny})


@pytest.fixture
def files(tmp_path):
    torch.manual_seed(0)
    model = save_model(TinyNet(), tmp_path / "model.safetensors")
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, images=rng.random((40, 1, 8, 8), dtype=np.float32), labels=np.arange(40) % 4)
    return model, data


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def run_on_files(capsys, command, model, data, *more) -> tuple[int, str]:
    """``baerase COMMAND MODEL --arch helpers:TinyNet --data DATA MORE...``."""
    return run(capsys, command, model, "--arch", ARCH, "--data", data, *more)


def assert_one_line_error(code, err, *words):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("baerase: error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


def test_audit_never_modifies_the_model_file_and_records_hashes(files, tmp_path, capsys):
    model, data = files
    before = sha256(model), os.stat(model).st_mtime_ns
    code, err = run_on_files(
        capsys, "audit", model, data, "--out", tmp_path / "out", "--steps", 5, "--quiet", "--seed", 1
    )
    # An untrained model has no backdoor: nothing is flagged, the erase is trivially verified, exit 0.
    assert code == 0, err
    assert (sha256(model), os.stat(model).st_mtime_ns) == before
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["scan"]["flagged"] == [] and report["erase"]["verified"] is True
    prov = report["scan"]["provenance"]
    assert prov["model_file_sha256"] == before[0] and prov["data_file_sha256"] == sha256(data)
    assert prov["seed"] == 1 and prov["config"]["recovery"]["steps"] == 5
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_audit_exits_3_when_the_erase_is_not_verified(files, tmp_path, capsys, monkeypatch):
    import baerase.api

    real_erase = baerase.api.erase

    def unverified(*args, **kwargs):  # as when the re-scan still finds a backdoor after every round
        result = real_erase(*args, **kwargs)
        result.verified = False
        return result

    monkeypatch.setattr(baerase.api, "erase", unverified)
    model, data = files
    out = tmp_path / "out"
    code, err = run_on_files(capsys, "audit", model, data, "--out", out, "--steps", 5, "--quiet")
    assert code == 3, err
    assert json.loads((out / "report.json").read_text())["erase"]["verified"] is False
    assert (out / "model.safetensors").is_file()  # the (unverified) result is still written for inspection


def test_existing_out_needs_overwrite_and_is_checked_before_the_work(files, tmp_path, capsys, monkeypatch):
    model, data = files
    out = tmp_path / "out"
    args = ["scan", model, data, "--out", out, "--steps", 5, "--quiet"]
    assert run_on_files(capsys, *args)[0] == 0
    written = sha256(out / "report.json")
    with monkeypatch.context() as patch:
        patch.setattr("baerase.api.scan", lambda *a, **k: pytest.fail("scanned before checking --out"))
        assert_one_line_error(*run_on_files(capsys, *args), "already exists", "--overwrite")
    assert sha256(out / "report.json") == written
    assert run_on_files(capsys, *args, "--overwrite")[0] == 0


def test_out_holding_the_inputs_is_never_replaced(files, tmp_path, capsys):
    model, data = files
    (tmp_path / "report.json").write_text("{}")  # looks like an earlier output, yet holds the model
    code, err = run_on_files(capsys, "scan", model, data, "--out", tmp_path, "--overwrite", "--steps", 5, "--quiet")
    assert_one_line_error(code, err, "would replace the input")
    assert model.is_file() and data.is_file()


def test_pickled_model_needs_trust_pickle(files, tmp_path, capsys):
    _, data = files
    pickled = tmp_path / "full.pt"
    torch.save(TinyNet(), pickled)
    args = ["scan", pickled, "--data", data, "--steps", 5, "--quiet"]
    assert_one_line_error(*run(capsys, *args), "refusing to load", "arbitrary code", "--trust-pickle")
    code, err = run(capsys, *args, "--trust-pickle")
    assert code == 0, err


def _truncated(path: Path, keep: float) -> Path:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])
    return path


def _bad_model_files(tmp_path: Path, model: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    net = TinyNet()
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save(net, tmp_path / "full.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated, still shipped
        torch.jit.save(torch.jit.script(net), tmp_path / "ts.pt")
    safetensors_copy = tmp_path / "copy.safetensors"
    safetensors_copy.write_bytes(model.read_bytes())
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "random.bin").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "text.pt").write_text("not a model\n")
    (tmp_path / "folder").mkdir()
    header = tmp_path / "header.safetensors"
    header.write_bytes((10**6).to_bytes(8, "little") + b'{"a": 1}')
    return {
        "truncated safetensors": _truncated(safetensors_copy, 0.5),
        "safetensors header only": header,
        "truncated .pt state dict": _truncated(tmp_path / "sd.pt", 0.6),
        "truncated pickled model": _truncated(tmp_path / "full.pt", 0.6),
        "truncated TorchScript": _truncated(tmp_path / "ts.pt", 0.7),
        "empty file": tmp_path / "empty.bin",
        "random bytes": tmp_path / "random.bin",
        "text file": tmp_path / "text.pt",
        "a directory": tmp_path / "folder",
        "missing file": tmp_path / "missing.pt",
    }


BAD_MODEL_FILES = [
    "truncated safetensors",
    "safetensors header only",
    "truncated .pt state dict",
    "truncated pickled model",
    "truncated TorchScript",
    "empty file",
    "random bytes",
    "text file",
    "a directory",
    "missing file",
]


@pytest.mark.parametrize("case", BAD_MODEL_FILES)
def test_unreadable_or_truncated_model_file_exits_2_with_one_line(files, tmp_path, capsys, case):
    model, data = files
    folder = tmp_path / "bad"
    folder.mkdir()
    bad = _bad_model_files(folder, model)[case]
    before = sha256(bad) if bad.is_file() else None
    code, err = run_on_files(capsys, "scan", bad, data, "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(code, err, "baerase: error: ")
    assert not (tmp_path / "out").exists()
    assert (sha256(bad) if bad.is_file() else None) == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_model_file_without_read_permission(files, capsys):
    model, data = files
    model.chmod(0)
    try:
        assert_one_line_error(*run_on_files(capsys, "scan", model, data), "cannot read")
    finally:
        model.chmod(0o644)


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--normalize", "x"], "--normalize wants MEAN:STD"),
        (["--normalize", "0.5,0.5,0.5:0.2,0.2,0.2"], "normalize needs 1 means"),
        (["--classes", "a,b"], "--classes wants comma-separated"),
        (["--classes", "7"], "config.recovery.classes"),
        (["--arch-arg", "num_classes"], "--arch-arg wants KEY=VALUE"),
        (["--arch-arg", "num_classes=3"], "do not match"),
        (["--steps", "0"], "steps must be a positive integer"),
        (["--universal-eps", "-1"], "universal_eps must be in [0, 1]"),
        (["--arch", "no_such_module:Net"], "cannot import module"),
        (["--arch", "resnet9000"], "unknown architecture"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(files, capsys, flags, words):
    model, data = files
    argv = ["scan", model, "--arch", ARCH, "--data", data, "--steps", 5, "--quiet", *flags]
    if "--arch" in flags:
        argv = ["scan", model, "--data", data, "--quiet", *flags]
    assert_one_line_error(*run(capsys, *argv), words)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("nan", "NaN"),
        ("1000", "expected 0-1"),
        ("few", "need at least 20"),
        ("labels", "labels go up to"),
    ],
)
def test_bad_data_files_exit_2_with_one_line(files, tmp_path, capsys, case, words):
    model, _ = files
    images = np.random.default_rng(0).random((40, 1, 8, 8), dtype=np.float32)
    labels = np.arange(40) % 4
    if case == "nan":
        images[0, 0, 0, 0] = np.nan
    elif case == "1000":
        images *= 1000
    elif case == "few":
        images, labels = images[:5], labels[:5]
    else:
        labels = labels + 4
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=images, labels=labels)
    assert_one_line_error(*run_on_files(capsys, "scan", model, bad, "--quiet"), words)


def test_0_255_float_data_is_rescaled_with_a_warning(files, capsys):
    model, data = files
    with np.load(data) as arrays:
        np.savez(data, images=arrays["images"] * 255, labels=arrays["labels"])
    with pytest.warns(UserWarning, match="dividing by 255"):
        code, err = run_on_files(capsys, "scan", model, data, "--steps", 5, "--quiet")
    assert code == 0, err
