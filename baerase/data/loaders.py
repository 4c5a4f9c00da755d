"""Loaders for users' data files. Each returns (images float32 [N,C,H,W] in [0,1], labels int64 [N])
as torch tensors, and reports every failure as LoadError (the file) or InputError (its content)."""

from __future__ import annotations

import gzip
import inspect
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from baerase.data._validate import standardise
from baerase.data.builtin import load_mnist, make_colour
from baerase.data.safe_pickle import safe_loads
from baerase.errors import InputError, LoadError

PathLike = Union[str, "os.PathLike[str]"]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".ppm", ".pgm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192; far beyond any classifier input
_CHUNK = 1 << 20


def _existing(path: PathLike, kind: str = "file") -> Path:
    p = Path(path)
    if kind == "file" and not p.is_file():
        raise LoadError(f"{p}: no such file" + (" (it is a directory)" if p.is_dir() else ""))
    if kind == "dir" and not p.is_dir():
        raise LoadError(f"{p}: no such directory" + (" (it is a file)" if p.exists() else ""))
    return p


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise LoadError(f"{path}: cannot read ({exc.strerror or exc})") from None


# --------------------------------------------------------------------------------------------- npz


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read every array of an .npz, checking each header against the stored size first so a
    corrupt header cannot make numpy allocate an absurd array."""
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
                    else:
                        continue  # rarer versions: leave to np.load, which still refuses pickles
                    if dtype.hasobject:
                        raise InputError(
                            f"{path}: array '{info.filename[:-4]}' holds Python objects; only numbers are accepted"
                        )
                    expected = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                    if expected != info.file_size - f.tell():
                        raise LoadError(
                            f"{path}: array '{info.filename[:-4]}' is corrupt (its header does not match its size)"
                        )
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (InputError, LoadError):
        raise
    except MemoryError:
        raise LoadError(f"{path}: corrupt .npz (declares more data than fits in memory)") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise LoadError(f"{path}: not a valid .npz file ({exc})") from None
    except OSError as exc:
        raise LoadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:
        raise LoadError(f"{path}: corrupt .npz file ({type(exc).__name__}: {exc})") from None


def load_npz(path: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an .npz holding images and labels (keys ``images``/``labels`` or ``x``/``y``).

    Images may be [N,H,W], [N,C,H,W] or [N,H,W,C], uint8 0-255 or float 0-1.

    Returns:
        images: float32 tensor [N, C, H, W] in [0, 1]; labels: int64 tensor [N].
    """
    p = _existing(path)
    arrays = _npz_arrays(p)
    for xk, yk in (("images", "labels"), ("x", "y")):
        if xk in arrays and yk in arrays:
            return standardise(arrays[xk], arrays[yk], str(p))
    raise InputError(f"{p}: expected arrays 'images' and 'labels' (or 'x' and 'y'), found {sorted(arrays)}")


# ------------------------------------------------------------------------------------ image folders


def _image_files(folder: Path) -> list[Path]:
    try:
        return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    except OSError as exc:
        raise LoadError(f"{folder}: cannot list ({exc.strerror or exc})") from None


def _read_image(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    """One image file -> uint8 [H,W] (grey) or [H,W,3] (colour)."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is optional
        raise LoadError(f"{path}: reading image files needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as im:
            # The header is read lazily; refuse absurd sizes (often a corrupt header) before decoding.
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise LoadError(f"{path}: image is {im.width}x{im.height}, over the {MAX_IMAGE_PIXELS}-pixel limit")
            im.load()
            grey = im.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")
            im = im.convert("L" if grey else "RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except LoadError:
        raise
    except OSError as exc:
        raise LoadError(f"{path}: cannot read image ({exc})") from None
    except MemoryError:
        raise LoadError(f"{path}: image too large to decode") from None
    except Exception as exc:
        raise LoadError(f"{path}: corrupt image ({type(exc).__name__}: {exc})") from None


def _size_pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in pair):
        raise InputError(f"size must be a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


def _stack_images(files: list[tuple[Path, int]], size: tuple[int, int] | None, source: str):
    if not files:
        raise InputError(f"{source}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)})")
    images = [_read_image(f, size) for f, _ in files]
    shapes = {im.shape[:2] for im in images}
    if len(shapes) > 1:
        raise InputError(
            f"{source}: images have different sizes ({', '.join(f'{h}x{w}' for h, w in sorted(shapes)[:4])}...); "
            "pass size= to resize them"
        )
    if any(im.ndim == 3 for im in images):  # mixed grey and colour: make all colour
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
    x = np.stack(images)
    if x.ndim == 4:  # known channels-last; don't let small images be mistaken for channels-first
        x = x.transpose(0, 3, 1, 2)
    y = np.array([label for _, label in files], dtype=np.int64)
    return standardise(x, y, source)


def _class_dirs(root: Path) -> list[Path]:
    try:
        return sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    except OSError as exc:
        raise LoadError(f"{root}: cannot list ({exc.strerror or exc})") from None


def load_image_folder(root: PathLike, size: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load an ImageFolder tree ``root/<class_name>/*.png|jpg|ppm...``; classes are the sub-folders
    sorted by name, numbered from 0.

    Args:
        size: resize every image to size x size (or (height, width)); without it all images must
            already share one size.

    Returns:
        images: float32 tensor [N, C, H, W] in [0, 1] (C = 1 if every image is grey, else 3);
        labels: int64 tensor [N].
    """
    r = _existing(root, "dir")
    hw = _size_pair(size)
    classes = _class_dirs(r)
    if not classes:
        raise InputError(f"{r}: no class folders (expected {r}/<class_name>/<image files>)")
    files = []
    for label, d in enumerate(classes):
        found = _image_files(d)
        if not found:
            raise InputError(f"{d}: class folder '{d.name}' has no image files")
        files += [(f, label) for f in found]
    return _stack_images(files, hw, str(r))


def load_gtsrb(root: PathLike, size: int | tuple[int, int] = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Load GTSRB-style data: numbered class folders (``00000``, ``00001``...) of .ppm images, either
    directly under ``root`` or below it (e.g. ``GTSRB/Final_Training/Images``). The folder number
    is the label; the per-folder CSV (ROI annotations) is ignored. Images vary in size, so they are
    resized to ``size``.

    Returns:
        images: float32 tensor [N, 3, size, size] in [0, 1]; labels: int64 tensor [N].
    """
    r = _existing(root, "dir")
    hw = _size_pair(size)
    base = _find_numbered_dirs(r)
    if base is None:
        raise InputError(f"{r}: no numbered class folders (00000, 00001, ...) found within three levels")
    files = []
    for d in _class_dirs(base):
        if d.name.isdigit():
            files += [(f, int(d.name)) for f in _image_files(d)]
    return _stack_images(files, hw, str(r))


def _find_numbered_dirs(root: Path, depth: int = 3) -> Path | None:
    subdirs = _class_dirs(root)
    if any(d.name.isdigit() for d in subdirs):
        return root
    if depth == 0:
        return None
    for d in subdirs:
        found = _find_numbered_dirs(d, depth - 1)
        if found is not None:
            return found
    return None


# ------------------------------------------------------------------------------------------- CIFAR


def _cifar_batch(path: Path, coarse: bool) -> tuple[np.ndarray, np.ndarray]:
    obj = safe_loads(_read_bytes(path), str(path))
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a CIFAR batch (a dict), got {type(obj).__name__}")
    d = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    keys = ("coarse_labels",) if coarse else ("labels", "fine_labels")
    label_key = next((k for k in keys if k in d), None)
    if "data" not in d or label_key is None:
        raise InputError(
            f"{path}: CIFAR batch needs 'data' and {' or '.join(map(repr, keys))}, found {sorted(map(str, d))}"
        )
    data, labels = d["data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype.hasobject:
        raise InputError(f"{path}: 'data' must be a numeric array, got {type(data).__name__}")
    try:
        labels = np.asarray(labels)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{path}: unreadable labels ({exc})") from None
    if labels.dtype.hasobject:
        raise InputError(f"{path}: labels must be integers")
    if data.ndim == 2:  # the CIFAR layout: rows of 3072 = 3 x 32 x 32, channel-major
        side = round((data.shape[1] / 3) ** 0.5) if data.shape[1] else 0
        if side == 0 or 3 * side * side != data.shape[1]:
            raise InputError(
                f"{path}: 'data' rows have {data.shape[1]} values; expected 3 x side x side (3072 for CIFAR)"
            )
        data = data.reshape(-1, 3, side, side)
    return data, labels


def load_cifar(path: PathLike, split: str = "train", coarse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Load CIFAR-10/100 python batches: one batch file, or the extracted directory
    (``cifar-10-batches-py`` with ``data_batch_1..5``/``test_batch``, or ``cifar-100-python`` with
    ``train``/``test``). Batches are pickles; they are read with an unpickler that can only build
    numpy arrays, never call arbitrary code.

    Args:
        split: "train" or "test", used when ``path`` is a directory.
        coarse: CIFAR-100 only: use the 20 coarse labels instead of the 100 fine ones.

    Returns:
        images: float32 tensor [N, 3, 32, 32] in [0, 1]; labels: int64 tensor [N].
    """
    p = Path(path)
    if p.is_dir():
        if split not in ("train", "test"):
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        if split == "train":
            files = sorted(p.glob("data_batch_*"), key=lambda f: (len(f.name), f.name)) or [p / "train"]
        else:
            files = [p / "test_batch"] if (p / "test_batch").exists() else [p / "test"]
        files = [f for f in files if f.is_file()]
        if not files:
            raise LoadError(f"{p}: no CIFAR {split} batches (data_batch_*/test_batch or train/test) found")
    else:
        files = [_existing(p)]
    parts = [_cifar_batch(f, coarse) for f in files]
    shapes = {d.shape[1:] for d, _ in parts}
    if len(shapes) > 1:
        raise InputError(f"{p}: batches have different image shapes {sorted(shapes)}")
    x = np.concatenate([d for d, _ in parts])
    try:
        y = np.concatenate([np.reshape(lab, -1) for _, lab in parts])
    except (ValueError, TypeError) as exc:
        raise InputError(f"{p}: labels cannot be combined ({exc})") from None
    return standardise(x, y, str(p))


# --------------------------------------------------------------------------------------------- idx

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: PathLike, max_bytes: int = 1 << 32) -> np.ndarray:
    """Read one idx file (MNIST format), gzip-compressed or raw, as a numpy array."""
    p = _existing(path)
    try:
        with open(p, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        opener = gzip.open if gz else open
        with opener(p, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_DTYPES or not 1 <= head[3] <= 4:
                raise LoadError(f"{p}: not an idx file (bad magic number {head.hex() or 'empty'})")
            dtype = np.dtype(_IDX_DTYPES[head[2]])
            dims_raw = f.read(4 * head[3])
            if len(dims_raw) < 4 * head[3]:
                raise LoadError(f"{p}: truncated idx header")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, dtype=">u4"))
            nbytes = int(np.prod(dims, dtype=np.float64)) * dtype.itemsize
            if nbytes > max_bytes:
                raise LoadError(f"{p}: idx header declares {nbytes} bytes, over the {max_bytes}-byte limit (corrupt?)")
            # Read in chunks: a corrupt header must not make us allocate its declared size up front.
            chunks, got = [], 0
            while got < nbytes:
                chunk = f.read(min(_CHUNK, nbytes - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
            if got < nbytes:
                raise LoadError(f"{p}: truncated idx file ({got} of {nbytes} data bytes)")
            if f.read(1):
                raise LoadError(f"{p}: idx file has data past the size its header declares (corrupt?)")
    except LoadError:
        raise
    except OSError as exc:  # gzip.BadGzipFile is an OSError
        raise LoadError(f"{p}: cannot read ({exc})") from None
    except Exception as exc:
        raise LoadError(f"{p}: corrupt idx file ({type(exc).__name__}: {exc})") from None
    return np.frombuffer(b"".join(chunks), dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_pair(images: Path) -> Path:
    name = images.name.replace("images-idx3", "labels-idx1").replace("images", "labels")
    if name == images.name:
        raise InputError(f"{images}: cannot tell the labels file's name; pass labels_path=")
    return images.with_name(name)


def load_idx(
    path: PathLike, labels_path: PathLike | None = None, split: str = "train"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST / Fashion-MNIST idx files (gzip-compressed or raw).

    ``path`` is the images file (``train-images-idx3-ubyte[.gz]``; the labels file is found by
    its standard name unless ``labels_path`` is given) or a directory holding both, in which case
    ``split`` ("train" or "t10k"/"test") picks the pair.

    Returns:
        images: float32 tensor [N, 1, 28, 28] in [0, 1]; labels: int64 tensor [N].
    """
    p = Path(path)
    if p.is_dir():
        prefix = {"train": "train", "test": "t10k", "t10k": "t10k"}.get(split)
        if prefix is None:
            raise InputError(f"split must be 'train' or 'test', got {split!r}")
        found = sorted(p.glob(f"{prefix}-images-idx3-ubyte*"))
        if not found:
            raise LoadError(f"{p}: no {prefix}-images-idx3-ubyte[.gz] file")
        p = found[0]
    images = read_idx(p)
    labels = read_idx(Path(labels_path) if labels_path is not None else _idx_pair(p))
    if images.ndim not in (3, 4):
        raise InputError(f"{p}: idx images must have 3 or 4 dimensions, got shape {images.shape}")
    return standardise(images, labels, str(p))


# ---------------------------------------------------------------------------------------- dispatch

_COLOUR = re.compile(r"colou?r(\d+)$")


def _sniff(path: Path) -> str:
    if path.is_dir():
        names = {f.name for f in path.iterdir()}
        if any(n.startswith("data_batch_") for n in names) or "test_batch" in names or {"train", "meta"} <= names:
            return "cifar"
        if any("images-idx3-ubyte" in n for n in names):
            return "idx"
        if _find_numbered_dirs(path) is not None:
            return "gtsrb"
        return "image_folder"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):
        return "npz"
    if head[:1] == b"\x80":
        return "cifar"
    if head.startswith(b"\x1f\x8b") or (len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES):
        return "idx"
    raise LoadError(f"{path}: unknown data format (expected .npz, a CIFAR batch, an idx file or an image folder)")


def load_dataset(spec: PathLike, **options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Load data from a path (format detected) or a built-in name.

    Built-in names: ``"mnist"`` (5,000 embedded digits, [N,1,28,28]) and ``"colour<K>"`` (e.g.
    ``"colour10"``, ``"colour43"``, ``"colour100"``; also spelled ``color<K>``): procedural
    32x32 colour images for K classes; ``options`` go to :func:`make_colour` (default 300 per
    class, fewer for K > 100 so the set stays around 30,000 images).
    Paths: an .npz file, a CIFAR batch file or directory, an idx file or directory, a GTSRB tree
    or an ImageFolder tree; ``options`` go to the matching loader.

    Returns:
        images: float32 tensor [N, C, H, W] in [0, 1]; labels: int64 tensor [N].
    """
    p = Path(spec)
    if not p.exists() and isinstance(spec, str):
        name = spec.strip().lower()
        if name == "mnist":
            if options:
                raise InputError(f"the built-in 'mnist' data takes no options, got {sorted(options)}")
            return load_mnist()
        m = _COLOUR.match(name)
        if m:
            k = int(m.group(1))
            options.setdefault("per_class", 300 if k <= 100 else max(30, 30_000 // k))
            return make_colour(num_classes=k, **options)
    if not p.exists():
        raise LoadError(f"{spec}: no such file or directory, and not a built-in data set ('mnist', 'colour<K>')")
    try:
        kind = _sniff(p)
    except LoadError:
        raise
    except OSError as exc:
        raise LoadError(f"{p}: cannot read ({exc.strerror or exc})") from None
    loader = {
        "npz": load_npz,
        "cifar": load_cifar,
        "idx": load_idx,
        "gtsrb": load_gtsrb,
        "image_folder": load_image_folder,
    }[kind]
    try:
        inspect.signature(loader).bind(p, **options)
    except TypeError as exc:
        raise InputError(f"{p}: bad options for the {kind} loader ({exc})") from None
    return loader(p, **options)
