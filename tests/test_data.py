"""baerase.data: embedded data, the colour generator, every file loader on small fixtures."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from baerase import data
from baerase.errors import InputError, LoadError


def _check(x, y, n, shape):
    assert isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape) == (n, *shape) and tuple(y.shape) == (n,)
    assert x.min() >= 0 and x.max() <= 1


# ----------------------------------------------------------------------------------- built-in data


def test_embedded_mnist():
    x, y = data.load_mnist()
    _check(x, y, 5000, (1, 28, 28))
    assert torch.bincount(y).tolist() == [500] * 10
    assert x.max() == 1.0 and 0.05 < x.mean() < 0.25  # real digits: mostly dark background
    assert data.MNIST_PATH.stat().st_size < 2_000_000


def test_colour_shapes_and_determinism():
    x, y = data.make_colour(num_classes=7, per_class=5, side=24, seed=3)
    _check(x, y, 35, (3, 24, 24))
    assert y.tolist() == [c for c in range(7) for _ in range(5)]
    x2, _ = data.make_colour(num_classes=7, per_class=5, side=24, seed=3)
    assert torch.equal(x, x2)
    x3, _ = data.make_colour(num_classes=7, per_class=5, side=24, seed=4)
    assert not torch.equal(x, x3)


def test_colour_class_independent_of_k():
    small, _ = data.make_colour(num_classes=3, per_class=4)
    large, _ = data.make_colour(num_classes=120, per_class=4)
    assert torch.equal(small, large[:12])


@pytest.mark.parametrize("k", [10, 100, 1000])
def test_colour_classes_separable(k):
    per = 20 if k < 1000 else 8
    x, y = data.make_colour(num_classes=k, per_class=per, side=16)
    x = x.reshape(len(x), -1)
    train = (torch.arange(len(x)) % per) < per // 2
    centroids = torch.zeros(k, x.shape[1]).index_add_(0, y[train], x[train]) / (per // 2)
    acc = (torch.cdist(x[~train], centroids).argmin(1) == y[~train]).float().mean().item()
    # Nearest centroid on raw pixels is a weak classifier; a CNN does better. Chance is 1/k.
    assert acc > {10: 0.9, 100: 0.7, 1000: 0.4}[k]


def test_colour_not_trivial():
    x, y = data.make_colour(num_classes=2, per_class=50)
    same = x[y == 0]
    assert (same - same.mean(0)).abs().mean() > 0.03  # samples of one class really vary


def test_colour_bad_args():
    for kwargs in ({"num_classes": 0}, {"per_class": -1}, {"side": 2}, {"num_classes": 2.5}):
        with pytest.raises(InputError):
            data.make_colour(**kwargs)


def test_load_dataset_builtins():
    x, y = data.load_dataset("mnist")
    assert x.shape == (5000, 1, 28, 28)
    x, y = data.load_dataset("colour43", per_class=3)
    _check(x, y, 129, (3, 32, 32))
    x, y = data.load_dataset("color5", per_class=2, side=8)
    _check(x, y, 10, (3, 8, 8))
    with pytest.raises(LoadError, match="not a built-in"):
        data.load_dataset("imagenet")


# ---------------------------------------------------------------------------------------------- npz


def _pixels(n=6, c=3, h=5, w=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, c, h, w), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nhw"])
@pytest.mark.parametrize("kind", ["uint8", "float"])
@pytest.mark.parametrize("keys", [("images", "labels"), ("x", "y")])
def test_load_npz(tmp_path, layout, kind, keys):
    ref = _pixels(c=1 if layout == "nhw" else 3)
    arr = {"nchw": ref, "nhwc": ref.transpose(0, 2, 3, 1), "nhw": ref[:, 0]}[layout]
    if kind == "float":
        arr = arr.astype(np.float32) / 255
    labels = np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8)
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **{keys[0]: arr, keys[1]: labels})
    x, y = data.load_npz(path)
    _check(x, y, 6, ref.shape[1:])
    assert torch.allclose(x, torch.from_numpy(ref / 255).float(), atol=1e-6)
    assert y.tolist() == labels.tolist()
    assert torch.equal(data.load_dataset(str(path))[0], x)


def test_load_npz_content_errors(tmp_path):
    cases = {
        "nan": {"images": np.full((2, 1, 4, 4), np.nan, np.float32), "labels": np.zeros(2, int)},
        "count": {"images": np.zeros((2, 1, 4, 4), np.float32), "labels": np.zeros(3, int)},
        "negative": {"images": np.full((2, 1, 4, 4), -0.5, np.float32), "labels": np.zeros(2, int)},
        "empty": {"images": np.zeros((0, 1, 4, 4), np.uint8), "labels": np.zeros(0, int)},
        "shape": {"images": np.zeros((2, 4), np.uint8), "labels": np.zeros(2, int)},
        "channels": {"images": np.zeros((2, 7, 4, 9), np.uint8), "labels": np.zeros(2, int)},
        "keys": {"pictures": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.zeros(2, int)},
        "label_neg": {"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0, -1])},
        "label_float": {"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array([0.5, 1.0])},
        "dtype": {"images": np.zeros((2, 1, 4, 4), np.complex64), "labels": np.zeros(2, int)},
        "strings": {"images": np.zeros((2, 1, 4, 4), np.uint8), "labels": np.array(["a", "b"])},
    }
    for name, arrays in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arrays)
        with pytest.raises(InputError, match=name + ".npz"):
            data.load_npz(path)


def test_load_npz_rescales_255_floats(tmp_path):
    path = tmp_path / "f.npz"
    np.savez(path, images=np.full((2, 1, 3, 3), 255.0), labels=[0, 1])
    with pytest.warns(UserWarning, match="0-255"):
        x, _ = data.load_npz(path)
    assert torch.all(x == 1)


def test_load_npz_file_errors(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        data.load_npz(tmp_path / "missing.npz")
    with pytest.raises(LoadError, match="directory"):
        data.load_npz(tmp_path)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip at all")
    with pytest.raises(LoadError, match=r"bad\.npz"):
        data.load_npz(bad)
    obj = tmp_path / "obj.npz"
    np.savez(obj, images=np.array([object()] * 2), labels=np.zeros(2))
    with pytest.raises(InputError, match="objects"):
        data.load_npz(obj)


# ------------------------------------------------------------------------------------ image folders


def _image_tree(root, classes=("cat", "dog", "emu"), per=3, size=(6, 5), mode="RGB", suffix=".png"):
    rng = np.random.default_rng(0)
    expected = []
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
            Image.fromarray(arr, mode).save(root / name / f"{i:03d}{suffix}")
            expected.append((arr, label))
    return expected


def test_load_image_folder(tmp_path):
    expected = _image_tree(tmp_path / "tree", classes=("b_second", "a_first"))
    x, y = data.load_image_folder(tmp_path / "tree")
    _check(x, y, 6, (3, 6, 5))
    # classes numbered in name order: a_first (written second) is class 0
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    arr0 = expected[3][0]
    assert torch.allclose(x[0], torch.from_numpy(arr0.transpose(2, 0, 1) / 255).float())
    x, y = data.load_image_folder(tmp_path / "tree", size=8)
    assert x.shape == (6, 3, 8, 8)
    assert data.load_dataset(str(tmp_path / "tree"))[0].shape == (6, 3, 6, 5)


def test_load_image_folder_grey_and_errors(tmp_path):
    _image_tree(tmp_path / "grey", mode="L", per=2)
    x, y = data.load_image_folder(tmp_path / "grey")
    _check(x, y, 6, (1, 6, 5))

    (tmp_path / "mixed" / "a").mkdir(parents=True)
    (tmp_path / "mixed" / "b").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "mixed" / "a" / "0.png")
    Image.new("RGB", (5, 4)).save(tmp_path / "mixed" / "b" / "0.png")
    with pytest.raises(InputError, match="size="):
        data.load_image_folder(tmp_path / "mixed")
    assert data.load_image_folder(tmp_path / "mixed", size=(3, 2))[0].shape == (2, 3, 3, 2)

    (tmp_path / "mixed" / "c").mkdir()
    with pytest.raises(InputError, match="no image files"):
        data.load_image_folder(tmp_path / "mixed", size=4)
    (tmp_path / "mixed" / "c" / "0.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(LoadError, match=r"0\.png"):
        data.load_image_folder(tmp_path / "mixed", size=4)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class folders"):
        data.load_image_folder(tmp_path / "empty")
    with pytest.raises(LoadError, match="no such directory"):
        data.load_image_folder(tmp_path / "nope")
    with pytest.raises(InputError, match="size"):
        data.load_image_folder(tmp_path / "grey", size=0)


# --------------------------------------------------------------------------------------------- GTSRB


def test_load_gtsrb(tmp_path):
    base = tmp_path / "GTSRB" / "Final_Training" / "Images"
    rng = np.random.default_rng(1)
    for c in (0, 1, 2, 42):
        d = base / f"{c:05d}"
        d.mkdir(parents=True)
        for i, (h, w) in enumerate([(30, 31), (40, 37)]):
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i:05d}_00000.ppm")
        (d / f"GT-{c:05d}.csv").write_text("Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n")
    x, y = data.load_gtsrb(tmp_path / "GTSRB")
    _check(x, y, 8, (3, 32, 32))
    assert y.tolist() == [0, 0, 1, 1, 2, 2, 42, 42]
    x, _ = data.load_gtsrb(base, size=16)
    assert x.shape == (8, 3, 16, 16)
    assert torch.equal(data.load_dataset(str(base))[1], y)
    with pytest.raises(InputError, match="numbered"):
        data.load_gtsrb(tmp_path / "GTSRB" / "Final_Training" / "Images" / "00000")


# --------------------------------------------------------------------------------------------- CIFAR


def _cifar_batch(path, n, seed, fine=False, protocol=2):
    rng = np.random.default_rng(seed)
    d = {b"batch_label": b"training batch", b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
    if fine:
        d[b"fine_labels"] = rng.integers(0, 100, size=n).tolist()
        d[b"coarse_labels"] = rng.integers(0, 20, size=n).tolist()
    else:
        d[b"labels"] = rng.integers(0, 10, size=n).tolist()
    path.write_bytes(pickle.dumps(d, protocol=protocol))
    return d


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_load_cifar10_batch_and_dir(tmp_path, protocol):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    b1 = _cifar_batch(root / "data_batch_1", 4, 0, protocol=protocol)
    b2 = _cifar_batch(root / "data_batch_2", 3, 1, protocol=protocol)
    test = _cifar_batch(root / "test_batch", 2, 2, protocol=protocol)
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"] * 10}))
    x, y = data.load_cifar(root / "data_batch_1")
    _check(x, y, 4, (3, 32, 32))
    ref = b1[b"data"].reshape(4, 3, 32, 32) / 255
    assert torch.allclose(x, torch.from_numpy(ref).float())
    assert y.tolist() == b1[b"labels"]
    x, y = data.load_cifar(root)
    assert y.tolist() == b1[b"labels"] + b2[b"labels"]
    x, y = data.load_cifar(root, split="test")
    assert y.tolist() == test[b"labels"]
    assert data.load_dataset(str(root))[0].shape == (7, 3, 32, 32)


def test_load_cifar100(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train = _cifar_batch(root / "train", 5, 0, fine=True)
    _cifar_batch(root / "test", 2, 1, fine=True)
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": []}))
    _x, y = data.load_cifar(root)
    assert y.tolist() == train[b"fine_labels"]
    _, y = data.load_cifar(root / "train", coarse=True)
    assert y.tolist() == train[b"coarse_labels"]
    assert data.load_dataset(str(root / "train"))[1].tolist() == train[b"fine_labels"]


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def test_load_cifar_refuses_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(LoadError, match=r"refused .*system"):
        data.load_cifar(path)
    assert not (tmp_path / "pwned.txt").exists()


def test_load_cifar_content_errors(tmp_path):
    cases = {
        "notdict": [1, 2, 3],
        "nodata": {b"labels": [0]},
        "rows": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
        "count": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]},
        "neg": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, -1]},
    }
    for name, obj in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj, protocol=2))
        with pytest.raises(InputError, match=name):
            data.load_cifar(path)
    (tmp_path / "d").mkdir()
    with pytest.raises(LoadError, match="no CIFAR"):
        data.load_cifar(tmp_path / "d")


# ----------------------------------------------------------------------------------------------- idx


def _idx_bytes(arr, code=0x08):
    head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.tobytes()


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx(tmp_path, compress):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write = gzip.compress if compress else bytes
    (tmp_path / f"train-images-idx3-ubyte{suffix}").write_bytes(write(_idx_bytes(images)))
    (tmp_path / f"train-labels-idx1-ubyte{suffix}").write_bytes(write(_idx_bytes(labels)))
    x, y = data.load_idx(tmp_path / f"train-images-idx3-ubyte{suffix}")
    _check(x, y, 5, (1, 28, 28))
    assert torch.allclose(x[:, 0], torch.from_numpy(images / 255).float())
    assert y.tolist() == labels.tolist()
    assert torch.equal(data.load_idx(tmp_path)[1], y)
    assert torch.equal(data.load_dataset(str(tmp_path))[1], y)
    assert torch.equal(data.load_dataset(str(tmp_path / f"train-images-idx3-ubyte{suffix}"))[1], y)


def test_read_idx_types_and_errors(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    (tmp_path / "a").write_bytes(_idx_bytes(arr, 0x0C))
    assert data.read_idx(tmp_path / "a").tolist() == arr.tolist()
    (tmp_path / "short").write_bytes(_idx_bytes(arr, 0x0C)[:-3])
    with pytest.raises(LoadError, match="truncated"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "long").write_bytes(_idx_bytes(arr, 0x0C) + b"x")
    with pytest.raises(LoadError, match="past the size"):
        data.read_idx(tmp_path / "long")
    (tmp_path / "huge").write_bytes(struct.pack(">BBBBIII", 0, 0, 8, 3, 2**31, 2**31, 9))
    with pytest.raises(LoadError, match="limit"):
        data.read_idx(tmp_path / "huge")
    (tmp_path / "magic").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(LoadError, match="magic"):
        data.read_idx(tmp_path / "magic")
    with pytest.raises(InputError, match="labels_path"):
        data.load_idx(tmp_path / "a")


def test_load_dataset_unknown_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(LoadError, match="unknown data format"):
        data.load_dataset(str(tmp_path / "x.bin"))
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 1, 2, 2), np.uint8), labels=[0, 1])
    with pytest.raises(InputError, match="bad options"):
        data.load_dataset(str(tmp_path / "d.npz"), size=3)


# --------------------------------------------------------------------------------- split, as_tensors


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_split_stratified(kind):
    y = np.repeat(np.arange(5), [40, 40, 20, 10, 10])
    x = np.arange(len(y) * 2, dtype=np.float32).reshape(len(y), 2)
    if kind == "torch":
        x, y = torch.from_numpy(x), torch.from_numpy(y)
    parts = data.split(x, y, (0.5, 0.25, 0.25), seed=1)
    assert [len(p[1]) for p in parts] == [60, 30, 30]
    for px, py in parts:
        assert type(px) is type(x) and type(py) is type(y)
        counts = np.bincount(np.asarray(py), minlength=5)
        assert (counts > 0).all()
        # each class in proportion, within one sample
        assert np.all(np.abs(counts / len(py) - np.array([40, 40, 20, 10, 10]) / 120) <= 1 / len(py) + 1e-9)
    ids = np.concatenate([np.asarray(px)[:, 0] for px, _ in parts])
    assert len(np.unique(ids)) == 120  # disjoint and complete
    for px, py in parts:  # images keep their labels
        assert np.array_equal(np.asarray(y)[(np.asarray(px)[:, 0] // 2).astype(int)], np.asarray(py))
    again = data.split(x, y, (0.5, 0.25, 0.25), seed=1)
    assert all(np.array_equal(np.asarray(a[1]), np.asarray(b[1])) for a, b in zip(parts, again, strict=False))
    assert [len(p[1]) for p in data.split(x, y, (0.1,))] == [12]


def test_split_errors():
    x, y = torch.zeros(10, 1, 2, 2), torch.zeros(10, dtype=torch.int64)
    for fr in ((0.7, 0.7), (), (0.0, 0.5), (float("nan"),), (0.01,)):
        with pytest.raises(InputError):
            data.split(x, y, fr)
    with pytest.raises(InputError, match="labels"):
        data.split(x, y[:5], (0.5,))


def test_as_tensors():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.rand(10, 3, 4, 4)
    y = torch.arange(10) % 3
    for given in (
        (x, y),
        (x.numpy(), y.numpy()),
        TensorDataset(x, y),
        DataLoader(TensorDataset(x, y), batch_size=4),
    ):
        gx, gy = data.as_tensors(given)
        assert torch.equal(gx, x) and torch.equal(gy, y)
    u8 = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)  # channels-last bytes
    gx, _ = data.as_tensors((u8, y))
    assert gx.shape == x.shape and torch.allclose(gx, x, atol=0.5 / 255 + 1e-6)
    for bad in (x, [x], (x, y[:3]), (x * float("nan"), y), (x, -y - 1), TensorDataset(x[:0], y[:0])):
        with pytest.raises(InputError):
            data.as_tensors(bad)
    with pytest.raises(InputError, match="empty"):
        data.as_tensors(DataLoader(TensorDataset(x[:0], y[:0])))
