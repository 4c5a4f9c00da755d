import hashlib
import os
import sys

import pytest
import torch
from torch import nn

# torch.jit is deprecated upstream, but TorchScript archives are still a format users hand in
from baerase.errors import InputError, LoadError
from baerase.models import ARCHITECTURES, ResNet18, SmallCNN, build, load_model, save_model, sha256_file

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning"),
    pytest.mark.usefixtures("one_thread"),  # tiny convolutions stall on thread hand-offs when the cores are busy
]


def _same_outputs(a: nn.Module, b: nn.Module, shape=(2, 1, 28, 28)) -> bool:
    x = torch.rand(*shape)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x))


@pytest.fixture
def cnn():
    return SmallCNN(1, 10, 28).eval()


# --- architectures ------------------------------------------------------------------------------


def test_small_cnn_shapes():
    assert SmallCNN()(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    assert SmallCNN(3, 43, 32)(torch.rand(2, 3, 32, 32)).shape == (2, 43)
    assert SmallCNN(1, 4, 16).features(torch.rand(2, 1, 16, 16)).shape == (2, 64)
    with pytest.raises(InputError, match="divisible by 4"):
        SmallCNN(side=30)


def test_resnet18_shapes_and_width():
    small = ResNet18(num_classes=7, width=0.125).eval()
    with torch.no_grad():
        assert small(torch.rand(2, 3, 32, 32)).shape == (2, 7)
        assert ResNet18(5, in_channels=1, width=0.125).eval()(torch.rand(1, 1, 28, 28)).shape == (1, 5)
    full = sum(p.numel() for p in ResNet18().parameters())
    assert 11_000_000 < full < 11_300_000, "the CIFAR ResNet-18 has about 11.2 M parameters"
    assert sum(p.numel() for p in small.parameters()) < full / 30


def test_registry():
    assert set(ARCHITECTURES) >= {"small_cnn", "resnet18"}
    assert isinstance(build("small_cnn", in_channels=3, num_classes=4, side=32), SmallCNN)
    assert isinstance(build("resnet18", num_classes=4, width=0.25), ResNet18)
    with pytest.raises(InputError, match="registered"):
        build("vgg16")


# --- loading and saving round trips -------------------------------------------------------------


def test_safetensors_round_trip_with_recorded_arch(tmp_path, cnn):
    path = save_model(cnn, tmp_path / "m.safetensors", arch="small_cnn", arch_kwargs={"in_channels": 1})
    loaded = load_model(path)
    assert isinstance(loaded, SmallCNN) and not loaded.training
    assert _same_outputs(cnn, loaded)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"], "no temporary file left behind"


def test_safetensors_needs_arch_without_metadata(tmp_path, cnn):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in cnn.state_dict().items()}, str(path))
    with pytest.raises(LoadError, match="arch="):
        load_model(path)
    assert _same_outputs(cnn, load_model(path, "small_cnn"))


def test_resnet_round_trip_with_buffers(tmp_path):
    net = ResNet18(4, width=0.125)
    net.train()(torch.rand(4, 3, 16, 16))  # move the batch-norm running statistics off their defaults
    path = save_model(net, tmp_path / "r.safetensors")
    loaded = load_model(path, "resnet18", num_classes=4, width=0.125)
    assert torch.equal(loaded.bn1.running_mean, net.bn1.running_mean)
    assert _same_outputs(net, loaded, (2, 3, 16, 16))


@pytest.mark.parametrize("wrap", ["bare", "checkpoint", "data_parallel"])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_state_dict_round_trip(tmp_path, cnn, wrap, suffix):
    sd = cnn.state_dict()
    obj = {
        "bare": sd,
        "checkpoint": {"epoch": 3, "state_dict": sd},
        "data_parallel": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / f"m{suffix}"
    torch.save(obj, path)
    assert _same_outputs(cnn, load_model(path, "small_cnn"))
    with pytest.raises(LoadError, match="arch="):
        load_model(path)


def test_legacy_torch_format(tmp_path, cnn):
    path = tmp_path / "legacy.pt"
    torch.save(cnn.state_dict(), path, _use_new_zipfile_serialization=False)
    assert _same_outputs(cnn, load_model(path, "small_cnn"))


def test_torchscript_round_trip(tmp_path, cnn):
    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(cnn), str(path))
    loaded = load_model(path)
    assert not loaded.training
    assert _same_outputs(cnn, loaded)


def test_full_pickle_refused_unless_trusted(tmp_path, cnn):
    path = tmp_path / "full.pt"
    torch.save(cnn, path)
    with pytest.raises(LoadError, match="trust_pickle=True") as info:
        load_model(path, "small_cnn")
    assert "arbitrary code" in str(info.value) and str(path) in str(info.value)
    assert _same_outputs(cnn, load_model(path, trust_pickle=True))


def test_module_callable_arch(tmp_path, monkeypatch, cnn):
    (tmp_path / "user_nets.py").write_text(
        "from baerase.models import SmallCNN\n"
        "class Zoo:\n"
        "    @staticmethod\n"
        "    def digits(classes=10):\n"
        "        return SmallCNN(1, classes, 28)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = save_model(cnn, tmp_path / "m.safetensors")
    try:
        assert _same_outputs(cnn, load_model(path, "user_nets:Zoo.digits", classes=10))
        assert _same_outputs(cnn, load_model(path, SmallCNN))
        with pytest.raises(LoadError, match="cannot import"):
            load_model(path, "no_such_module_xyz:Net")
        with pytest.raises(LoadError, match="no attribute"):
            load_model(path, "user_nets:Missing")
        with pytest.raises(LoadError, match="unknown architecture"):
            load_model(path, "lenet")
    finally:
        sys.modules.pop("user_nets", None)


def test_state_dict_mismatch_names_keys(tmp_path, cnn):
    path = save_model(cnn, tmp_path / "m.safetensors")
    with pytest.raises(LoadError, match=r"shape mismatches: out\.weight") as info:
        load_model(path, "small_cnn", num_classes=4)
    assert str(path) in str(info.value) and "num_classes" in str(info.value)
    with pytest.raises(LoadError, match=r"missing keys: .*unexpected keys: c1\.bias"):
        load_model(path, "resnet18", width=0.125)
    with pytest.raises(LoadError, match="building arch"):
        load_model(path, "small_cnn", bogus=1)


def test_save_never_overwrites_source(tmp_path, cnn):
    src = save_model(cnn, tmp_path / "in.safetensors")
    digest = sha256_file(src)
    loaded = load_model(src, "small_cnn")
    with pytest.raises(InputError, match="refusing to overwrite"):
        save_model(loaded, src)
    os.symlink(src, tmp_path / "alias.safetensors")
    with pytest.raises(InputError, match="refusing to overwrite"):
        save_model(loaded, tmp_path / "alias.safetensors")
    assert sha256_file(src) == digest
    out = save_model(loaded, tmp_path / "out" / "repaired.safetensors")  # parent created
    assert _same_outputs(cnn, load_model(out, "small_cnn"))
    other = SmallCNN()
    save_model(other, out)  # any other existing file is replaced atomically
    assert _same_outputs(other, load_model(out, "small_cnn"))


def test_failed_save_leaves_nothing(tmp_path, cnn, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model(cnn, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_save_rejects_unrecordable_arch(tmp_path, cnn):
    with pytest.raises(InputError, match="registry"):
        save_model(cnn, tmp_path / "m.safetensors", arch="os:system")


def test_metadata_cannot_name_code(tmp_path, cnn):
    from safetensors.torch import save_file

    path = tmp_path / "evil.safetensors"
    tensors = {k: v.contiguous() for k, v in cnn.state_dict().items()}
    save_file(tensors, str(path), metadata={"baerase.arch": "os:system", "baerase.arch_kwargs": "{}"})
    with pytest.raises(LoadError, match="arch="):
        load_model(path)


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    with pytest.raises(LoadError):
        sha256_file(tmp_path / "missing")


# --- bad files ------------------------------------------------------------------------------------


def _files(tmp_path, cnn) -> dict:
    files = {"safetensors": save_model(cnn, tmp_path / "m.safetensors"), "pt": tmp_path / "m.pt"}
    torch.save(cnn.state_dict(), files["pt"])
    files["ts"] = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(cnn), str(files["ts"]))
    files["pickle"] = tmp_path / "full.pt"
    torch.save(cnn, files["pickle"])
    return files


@pytest.mark.parametrize("kind", ["safetensors", "pt", "ts", "pickle"])
@pytest.mark.parametrize("keep", [0.0, 0.003, 0.5, 0.97])
def test_truncated_files_raise_load_error(tmp_path, cnn, kind, keep):
    path = _files(tmp_path, cnn)[kind]
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LoadError, match=str(path.name)):
        load_model(path, "small_cnn", trust_pickle=True)


@pytest.mark.parametrize("kind", ["safetensors", "pt", "ts"])
def test_corrupted_files_raise_load_error(tmp_path, cnn, kind):
    path = _files(tmp_path, cnn)[kind]
    data = bytearray(path.read_bytes())
    g = torch.Generator().manual_seed(0)
    # flip bytes where the format's index lives (safetensors: the JSON header at the start; zip
    # archives: the central directory at the end), so corruption cannot pass as other weights
    start = 0 if kind == "safetensors" else len(data) - 200
    for i in (start + torch.randint(0, 200, (40,), generator=g)).tolist():
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError):
        load_model(path, "small_cnn")


def test_random_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(LoadError, match=r"junk\.pt"):
        load_model(junk, "small_cnn")
    with pytest.raises(LoadError, match="does not exist"):
        load_model(tmp_path / "nope.safetensors", "small_cnn")
    with pytest.raises(LoadError, match="not a regular file"):
        load_model(tmp_path, "small_cnn")
    text = tmp_path / "model.safetensors"
    text.write_text('{"not": "a model"}')
    with pytest.raises(LoadError):
        load_model(text, "small_cnn")
