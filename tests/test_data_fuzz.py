"""Property-based tests: truncated, bit-flipped and random files given to every data loader either
load cleanly or raise the documented baerase errors, never a raw numpy/Pillow/pickle exception."""

import contextlib
import gzip
import io
import os
import pickle
import struct
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from baerase import data
from baerase.errors import InputError, LoadError

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _npz() -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez_compressed(buf, images=rng.integers(0, 256, (4, 3, 6, 6), dtype=np.uint8), labels=np.arange(4))
    return buf.getvalue()


def _npz_stored() -> bytes:  # uncompressed: flips land in headers and raw data, not only in deflate
    buf = io.BytesIO()
    np.savez(buf, x=np.linspace(0, 1, 2 * 16, dtype=np.float32).reshape(2, 1, 4, 4), y=np.array([0, 1]))
    return buf.getvalue()


def _cifar() -> bytes:
    rng = np.random.default_rng(0)
    batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [0, 1, 2]}
    return pickle.dumps(batch, protocol=2)


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _ppm() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)).save(buf, "PPM")
    return buf.getvalue()


def _idx(gz: bool) -> bytes:
    arr = np.random.default_rng(0).integers(0, 256, (3, 4, 4), dtype=np.uint8)
    raw = struct.pack(">BBBBIII", 0, 0, 8, 3, 3, 4, 4) + arr.tobytes()
    return gzip.compress(raw) if gz else raw


VALID = {
    "npz": _npz(),
    "npz_stored": _npz_stored(),
    "cifar": _cifar(),
    "png": _png(),
    "ppm": _ppm(),
    "idx": _idx(False),
    "idx_gz": _idx(True),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory per format; each example overwrites the fuzzed file in place."""
    root = tmp_path_factory.mktemp("fuzz")
    labels = struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([0, 1, 2])
    for name in ("idx", "idx_gz"):
        (root / name).mkdir()
        (root / name / "train-labels-idx1-ubyte").write_bytes(labels)
    for name in ("png", "ppm"):  # an image folder / GTSRB tree with one good and one fuzzed file
        cls = root / name / ("00000" if name == "ppm" else "a")
        cls.mkdir(parents=True)
        (cls / f"good.{name}").write_bytes(VALID[name])
    return root


def _load(fmt: str, blob: bytes, root) -> None:
    if fmt.startswith("npz"):
        path = root / "f.npz"
        path.write_bytes(blob)
        loaders = [data.load_npz, data.load_dataset]
    elif fmt == "cifar":
        path = root / "data_batch_1"
        path.write_bytes(blob)
        loaders = [data.load_cifar, data.load_dataset]
    elif fmt.startswith("idx"):
        path = root / fmt / "train-images-idx3-ubyte"
        path.write_bytes(blob)
        loaders = [data.load_idx, data.read_idx]
    elif fmt == "png":
        (root / "png" / "a" / "z.png").write_bytes(blob)
        path, loaders = root / "png", [data.load_image_folder, data.load_dataset]
    else:
        (root / "ppm" / "00000" / "z.ppm").write_bytes(blob)
        path, loaders = root / "ppm", [data.load_gtsrb, data.load_dataset]
    for load in loaders:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. float 0-255 rescaling after a flipped dtype
                out = load(str(path) if load is data.load_dataset else path)
        except (LoadError, InputError) as exc:
            if not str(exc):  # the documented errors carry a message
                raise AssertionError(f"{type(exc).__name__} without a message") from exc
            continue
        if load is data.read_idx:
            assert isinstance(out, np.ndarray)
            continue
        x, y = out
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.ndim == 4 and len(x) == len(y)
        assert torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1


FORMATS = sorted(VALID)


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_fixtures_load(fmt, workdir):
    _load(fmt, VALID[fmt], workdir)


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True))
def test_truncated(fmt, cut, workdir):
    blob = VALID[fmt]
    _load(fmt, blob[: int(cut * len(blob))], workdir)


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8))
def test_bit_flipped(fmt, flips, workdir):
    blob = bytearray(VALID[fmt])
    for where, bit in flips:
        blob[int(where * len(blob))] ^= 1 << bit
    _load(fmt, bytes(blob), workdir)


@pytest.mark.parametrize("fmt", FORMATS)
@FUZZ
@given(blob=st.binary(max_size=2048), keep_magic=st.booleans())
def test_random_bytes(fmt, blob, keep_magic, workdir):
    if keep_magic:  # get past the format check into the parser proper
        blob = VALID[fmt][:8] + blob
    _load(fmt, blob, workdir)


@FUZZ
@given(blob=st.binary(max_size=512))
def test_random_pickle_opcodes(blob):
    """Any byte string after a protocol header is either a safe object or a LoadError."""
    with contextlib.suppress(LoadError):
        data.safe_loads(b"\x80\x02" + blob, "fuzz")


class _System:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


class _Eval:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('pwned.txt').write_text('x')",))


@pytest.mark.parametrize("payload", [_System(), _Eval(), {b"data": _System(), b"labels": [0]}])
@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_refused(payload, protocol, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    for load in (data.load_cifar, data.load_dataset):
        with pytest.raises(LoadError, match="refused"):
            load(path if load is data.load_cifar else str(path))
    assert not (tmp_path / "pwned.txt").exists()


def test_codecs_encode_only_latin1():
    # _codecs.encode is allowed for protocol-2 bytes, but must not reach other codecs.
    blob = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x06\x00\x00\x00base64q\x02\x86q\x03Rq\x04."
    with pytest.raises(LoadError, match="latin-1"):
        data.safe_loads(blob, "codec")
