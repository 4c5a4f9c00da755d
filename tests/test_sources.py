"""Model sources: torchvision and timm architectures, timm models from the Hugging Face hub (a hub
cache and a local folder built by the tests; nothing is downloaded), and the library's own
normalisation as the default."""

import functools
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from baerase import Config, cli
from baerase.data.builtin import make_colour
from baerase.errors import InputError, LoadError
from baerase.models import SmallCNN, load_model, preprocessing_of, resolve_normalize, save_model
from baerase.models.sources import load_hub, timm_arch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's test_resnet
HUB_NORM = ((0.25, 0.5, 0.75), (0.125, 0.25, 0.5))  # written into the test repositories' config.json
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "acme/tiny-resnet"

pytestmark = pytest.mark.usefixtures("one_thread")


def _same_outputs(a, b, side=32) -> bool:
    x = torch.rand(2, 3, side, side)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x))


def _timm(name="test_resnet", **kwargs):
    """A tiny timm model with random weights, built through baerase's factory (which records its preprocessing)."""
    timm = pytest.importorskip("timm")
    if not timm.is_model(name):
        pytest.skip(f"this timm has no {name}")
    return timm_arch(name)(**kwargs)


def _hub_folder(folder: Path, model) -> Path:
    """``model`` saved as a timm hub repository (config.json + model.safetensors) with HUB_NORM as its mean/std."""
    from timm.models import save_for_hf

    save_for_hf(model, folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config["pretrained_cfg"].update(mean=HUB_NORM[0], std=HUB_NORM[1])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _hub_cache(root: Path, model, repo=REPO) -> Path:
    """A Hugging Face hub cache holding ``repo`` at COMMIT (refs/main -> snapshots/COMMIT), as
    ``hf_hub_download`` leaves it; returns the cache folder."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    _hub_folder(repo_dir / "snapshots" / COMMIT, model)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def tiny_presets(monkeypatch):
    # The CLI has no flags for the network sizes; shrink the preset so an audit costs seconds.
    tiny = functools.partial(Config, hidden=16, mine_hidden=8, batch_size=8, eval_samples=32, unlearn_epochs=1)
    monkeypatch.setattr(cli, "PRESETS", {"fast": tiny, "paper": tiny, "short-erase": tiny})


@pytest.fixture
def colour_npz(tmp_path) -> Path:
    images, labels = make_colour(num_classes=4, per_class=10, side=32)
    path = tmp_path / "colour4.npz"
    np.savez(path, images=images.numpy(), labels=labels.numpy())
    return path


# --- the vision extra is optional -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "arch", "path"),
    [
        ("torchvision", "torchvision:resnet18", None),
        ("timm", "timm:resnet18", None),
        ("huggingface_hub", None, "hf://acme/tiny-resnet"),
    ],
)
def test_a_missing_library_names_the_extra(tmp_path, monkeypatch, module, arch, path):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing it raises ImportError
    path = path or save_model(SmallCNN(3, 4, 16), tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match=rf"{module} is not installed.*pip install baerase\[vision\]"):
        load_model(path, arch)


def test_cli_without_the_extra_fails_in_one_line(tmp_path, monkeypatch, capsys, colour_npz):
    monkeypatch.setitem(sys.modules, "timm", None)
    model = save_model(SmallCNN(3, 4, 32), tmp_path / "model.safetensors")
    code = cli.main(["scan", str(model), "--arch", "timm:resnet18", "--data", str(colour_npz)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "pip install baerase[vision]" in err


# --- torchvision ---------------------------------------------------------------------------------


def test_torchvision_architecture_round_trip(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(num_classes=10)
    path = save_model(net, tmp_path / "resnet18.safetensors")
    loaded = load_model(path, "torchvision:resnet18", num_classes=10)
    assert _same_outputs(net, loaded)
    pre = preprocessing_of(loaded)
    assert pre.source == "torchvision:resnet18" and pre.normalize == IMAGENET
    assert "ResNet18_Weights" in pre.origin and pre.input_size == (3, 224, 224)


def test_torchvision_rejects_unknown_and_non_classification_names(tmp_path):
    pytest.importorskip("torchvision")
    path = save_model(SmallCNN(3, 4, 16), tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match=r"not a torchvision classification model; did you mean .*resnet18"):
        load_model(path, "torchvision:resnet")
    with pytest.raises(LoadError, match="fasterrcnn_resnet50_fpn' is not a torchvision classification model"):
        load_model(path, "torchvision:fasterrcnn_resnet50_fpn")


def test_library_weights_are_never_downloaded(tmp_path):
    pytest.importorskip("torchvision")
    path = save_model(SmallCNN(3, 4, 16), tmp_path / "model.safetensors")
    with pytest.raises(LoadError, match="weights would download"):
        load_model(path, "torchvision:resnet18", weights="DEFAULT")


# --- timm ----------------------------------------------------------------------------------------


def test_timm_architecture_round_trip(tmp_path):
    net = _timm(num_classes=4)
    path = save_model(net, tmp_path / "net.safetensors")
    loaded = load_model(path, "timm:test_resnet", num_classes=4)
    assert _same_outputs(net, loaded)
    pre = preprocessing_of(loaded)
    assert pre.source == "timm:test_resnet" and pre.normalize == INCEPTION and pre.input_size == (3, 160, 160)


def test_timm_unknown_name_and_wrong_kwargs(tmp_path):
    net = _timm(num_classes=4)
    path = save_model(net, tmp_path / "net.safetensors")
    with pytest.raises(LoadError, match="'no_such_net' is not a timm model"):
        load_model(path, "timm:no_such_net")
    with pytest.raises(LoadError, match="shape mismatches"):
        load_model(path, "timm:test_resnet", num_classes=7)


# --- normalisation -------------------------------------------------------------------------------


def test_normalisation_given_by_the_user_wins():
    net = _timm(num_classes=4)
    mean_std = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    normalize, record = resolve_normalize(net, (3, 160, 160), mean_std)
    assert normalize == mean_std and record["normalize_source"] == "given by the user"
    assert record["model_source"] == "timm:test_resnet" and record["model_input_size"] == [3, 160, 160]


def test_normalisation_defaults_to_the_library_and_says_so():
    net = _timm(num_classes=4)
    normalize, record = resolve_normalize(net, (3, 160, 160))
    assert normalize == INCEPTION and record["normalize"] == {"mean": list(INCEPTION[0]), "std": list(INCEPTION[1])}
    assert record["normalize_source"].startswith("timm pretrained_cfg of test_resnet")


def test_a_plain_model_gets_no_normalisation():
    normalize, record = resolve_normalize(SmallCNN(3, 4, 16), (3, 16, 16))
    assert normalize is None and record == {"normalize": None, "normalize_source": record["normalize_source"]}
    assert record["normalize_source"].startswith("none")


def test_other_image_size_warns_and_a_fixed_size_model_refuses(caplog):
    resnet = _timm(num_classes=4)
    with caplog.at_level(logging.WARNING, logger="baerase"):
        resolve_normalize(resnet, (3, 32, 32))
    assert "configured for 3x160x160 inputs; the clean images are 3x32x32" in caplog.text
    vit = _timm("test_vit", num_classes=4)
    with pytest.raises(InputError, match="takes only 3x160x160 images, the clean images are 3x32x32"):
        resolve_normalize(vit, (3, 32, 32))


def test_library_normalisation_must_match_the_channels():
    net = _timm(num_classes=4, in_chans=1)
    with pytest.raises(InputError, match="has 3 channels, the images 1"):
        resolve_normalize(net, (1, 160, 160))


# --- Hugging Face hub ----------------------------------------------------------------------------


def test_hub_model_loads_from_the_cache_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    net = _timm(num_classes=4)
    cache = _hub_cache(tmp_path / "hub", net)
    for spec in (f"hf://{REPO}", f"hf://{REPO}@{COMMIT}"):
        loaded, weights = load_hub(spec, cache_dir=cache, local_files_only=True)
        assert _same_outputs(net, loaded) and weights.name == "model.safetensors"
        pre = preprocessing_of(loaded)
        assert pre.source == f"hf://{REPO}@{COMMIT}" and pre.normalize == HUB_NORM
        assert pre.origin == f"config.json pretrained_cfg of hf://{REPO}@{COMMIT}"


def test_hub_model_needs_safetensors_and_a_cached_copy_offline(tmp_path):
    pytest.importorskip("huggingface_hub")
    cache = _hub_cache(tmp_path / "hub", _timm(num_classes=4))
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    (snapshot / "model.safetensors").rename(snapshot / "pytorch_model.bin")
    with pytest.raises(LoadError, match=r"cannot get model\.safetensors.*pickled \.bin weights are not loaded"):
        load_hub(f"hf://{REPO}", cache_dir=cache, local_files_only=True)
    with pytest.raises(LoadError, match=r"cannot get config\.json"):
        load_hub("hf://acme/absent", cache_dir=cache, local_files_only=True)


def test_hub_config_in_the_older_flat_layout(tmp_path):
    net = _timm(num_classes=4)
    folder = _hub_folder(tmp_path / "repo", net)
    config = json.loads((folder / "config.json").read_text())
    flat = {"architecture": config["architecture"], "num_features": config["num_features"], **config["pretrained_cfg"]}
    (folder / "config.json").write_text(json.dumps(flat))
    loaded = load_model(folder)
    assert _same_outputs(net, loaded) and preprocessing_of(loaded).normalize == HUB_NORM


@pytest.mark.parametrize("spec", ["hf://", "hf://just-a-name", "hf://a/b/c", "hf://../etc"])
def test_bad_hub_reference(spec):
    with pytest.raises(LoadError, match="not a hub model reference"):
        load_model(spec)


def test_hub_folder_loads_through_load_model(tmp_path):
    net = _timm(num_classes=4)
    _hub_folder(tmp_path / "repo", net)
    loaded = load_model(tmp_path / "repo")
    assert _same_outputs(net, loaded)
    assert preprocessing_of(loaded).normalize == HUB_NORM
    with pytest.raises(LoadError, match=r"names its architecture in config\.json; drop arch"):
        load_model(tmp_path / "repo", "timm:test_resnet")
    (tmp_path / "repo" / "model.safetensors").unlink()
    with pytest.raises(LoadError, match=r"needs model\.safetensors"):
        load_model(tmp_path / "repo")


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.usefixtures("tiny_presets")
def test_cli_audits_a_torchvision_model_with_its_normalisation(tmp_path, colour_npz, capsys):
    torchvision = pytest.importorskip("torchvision")
    model = save_model(torchvision.models.resnet18(num_classes=4), tmp_path / "resnet18.safetensors")
    argv = ["audit", model, "--arch", "torchvision:resnet18", "--arch-arg", "num_classes=4", "--data", colour_npz]
    code = cli.main([str(a) for a in argv] + ["--out", str(tmp_path / "out"), "--steps", "2", "--quiet"])
    assert code == 0, capsys.readouterr().err
    prov = json.loads((tmp_path / "out" / "report.json").read_text())["scan"]["provenance"]
    assert prov["model_source"] == "torchvision:resnet18" and prov["normalize"]["mean"] == list(IMAGENET[0])
    assert "ResNet18_Weights" in prov["normalize_source"] and prov["model_input_size"] == [3, 224, 224]


def test_cli_scans_a_hub_model_offline(tmp_path, colour_npz):
    pytest.importorskip("huggingface_hub")
    cache = _hub_cache(tmp_path / "hub", _timm(num_classes=4))
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    argv = ["scan", f"hf://{REPO}", "--data", colour_npz, "--steps", "1", "--classes", "0", "--quiet"]
    argv += ["--out", tmp_path / "out", "--threads", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "baerase.cli", *map(str, argv)], env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    prov = json.loads((tmp_path / "out" / "report.json").read_text())["scan"]["provenance"]
    assert prov["model_source"] == f"hf://{REPO}@{COMMIT}" and prov["normalize"]["std"] == list(HUB_NORM[1])
    assert prov["model_file"].endswith(f"{COMMIT}/model.safetensors")
