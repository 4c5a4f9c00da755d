"""Safe model loading and atomic saving.

Model files are untrusted by definition, so nothing here unpickles arbitrary objects unless the
caller opts in with ``trust_pickle=True``: weights come from safetensors or from
``torch.load(weights_only=True)``, architectures from baerase's registry, torchvision's or timm's
(``torchvision:<name>``, ``timm:<name>``, see :mod:`.sources`) or a ``module:callable`` the caller
names, and TorchScript archives through ``torch.jit.load``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pickle
import tempfile
import warnings
import weakref
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, LoadError
from . import sources
from .nets import ARCHITECTURES

PathLike = str | os.PathLike

# Remembers which file each loaded model came from, so save_model can refuse to overwrite it
# (a weak map: no attribute is added to the user's module, and entries die with the model).
_SOURCES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()

_PICKLE_RISK = (
    "it holds a full pickled model, and unpickling can run arbitrary code from the file. "
    "Either save only the weights (torch.save(model.state_dict(), path) or baerase.models.save_model) "
    "and load them with an architecture (arch='small_cnn', 'resnet18' or 'module:callable'), "
    "or, only if you trust where the file came from, pass trust_pickle=True (CLI: --trust-pickle)"
)


def source_of(model: nn.Module) -> str | None:
    """The file ``model`` was loaded from by ``load_model``, or None."""
    return _SOURCES.get(model)


def sha256_file(path: PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 digest of a file's bytes, read in chunks (for the audit trail)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk_size):
                digest.update(block)
    except OSError as e:
        raise LoadError(f"cannot read {os.fspath(path)!r} to hash it: {e.strerror or e}") from e
    return digest.hexdigest()


def _sniff(path: Path) -> str:
    """Format from the file's bytes, not its name: 'safetensors', 'torchscript', 'torch' or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 8:
        return "unknown"
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise LoadError(f"{path}: corrupt or truncated zip archive ({e}); re-export the model file") from e
        # TorchScript archives carry compiled code and constants beside the pickled data.
        if any(n.split("/", 1)[-1] == "constants.pkl" or "/code/" in n for n in names):
            return "torchscript"
        return "torch"
    header_len = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and 0 < header_len <= path.stat().st_size - 8:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol marker: legacy (non-zip) torch.save
        return "torch"
    return "unknown"


def _resolve_arch(arch: str | Callable[..., nn.Module], path: Path) -> Callable[..., nn.Module]:
    if callable(arch):
        return arch
    if not isinstance(arch, str) or not arch:
        raise LoadError(f"{path}: arch must be a registry name, 'module:callable' or a callable, got {arch!r}")
    if sources.is_source_arch(arch):
        return sources.resolve_arch(arch)
    if ":" not in arch:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch]
        raise LoadError(
            f"{path}: unknown architecture {arch!r}; use one of {sorted(ARCHITECTURES)} "
            "or name your own as 'package.module:callable'"
        )
    module_name, _, attr = arch.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise LoadError(
            f"{path}: cannot import module {module_name!r} for arch {arch!r} ({e}); "
            "check the name and that it is on PYTHONPATH"
        ) from e
    try:
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise LoadError(f"{path}: module {module_name!r} has no attribute {attr!r} (arch {arch!r})") from None
    if not callable(obj):
        raise LoadError(f"{path}: arch {arch!r} is not callable")
    return obj


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a training checkpoint holding one under a usual key."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise LoadError(
            f"{path}: expected a state dict (str -> tensor), found {type(obj).__name__}; "
            "save it with torch.save(model.state_dict(), path)"
        )
    sd = dict(obj)
    # nn.DataParallel / DistributedDataParallel prefix every key with 'module.'.
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _build(arch: str | Callable[..., nn.Module], path: Path, arch_kwargs: dict) -> nn.Module:
    factory = _resolve_arch(arch, path)
    try:
        model = factory(**arch_kwargs)
    except Exception as e:
        raise LoadError(f"{path}: building arch {arch!r} with {arch_kwargs} failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise LoadError(f"{path}: arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, arch: object) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:

        def show(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = [
            f"missing keys: {show(missing)}" if missing else "",
            f"unexpected keys: {show(unexpected)}" if unexpected else "",
        ]
        parts.append(f"shape mismatches: {show(wrong)}" if wrong else "")
        raise LoadError(
            f"{path}: weights do not match arch {arch!r} ({'; '.join(p for p in parts if p)}); "
            "pass the architecture and keyword arguments (e.g. num_classes, in_channels) the model was trained with"
        )
    model.load_state_dict(sd, strict=True)


def load_model(
    path: PathLike,
    arch: str | Callable[..., nn.Module] | None = None,
    *,
    trust_pickle: bool = False,
    **arch_kwargs,
) -> nn.Module:
    """Load a model from a file, safely by default; returns it on CPU in eval mode.

    Formats (detected from the bytes, not the suffix):
      - safetensors state dict: needs ``arch`` unless the file was written by :func:`save_model`
        with a registry architecture recorded in its metadata;
      - ``.pt``/``.pth`` state dict or checkpoint dict (``state_dict``/``model_state_dict`` key),
        read with ``torch.load(weights_only=True)``: needs ``arch``;
      - TorchScript archive (``torch.jit.save``): self-contained, ``arch`` is ignored;
      - a fully pickled ``nn.Module`` (``torch.save(model)``): only with ``trust_pickle=True``;
      - ``hf://<org>/<repo>[@<revision>]`` or a local folder holding ``config.json`` and
        ``model.safetensors``: a timm model from the Hugging Face hub, ``arch`` must be None.

    ``arch`` is a name in ``ARCHITECTURES``, ``"torchvision:<name>"``, ``"timm:<name>"``, a
    ``"package.module:callable"`` string or a callable; it is called with ``arch_kwargs`` to build
    the model the weights are loaded into (for a hub model they override its ``model_args``).
    Every failure raises :class:`baerase.errors.LoadError` naming the file and the fix.
    """
    if sources.is_hub_spec(path) or sources.is_hub_folder(Path(os.fspath(path))):
        return _load_hub(path, arch, arch_kwargs)
    p = Path(os.fspath(path))
    if not p.exists():
        raise LoadError(f"model file {str(p)!r} does not exist; check the path")
    if not p.is_file():
        raise LoadError(f"{p} is not a regular file; pass the model file itself")
    try:
        fmt = _sniff(p)
    except LoadError:
        raise
    except OSError as e:
        raise LoadError(f"cannot read {p}: {e.strerror or e}") from e

    if fmt == "safetensors":
        model = _load_safetensors(p, arch, arch_kwargs)
    elif fmt == "torchscript":
        try:
            with warnings.catch_warnings():
                # deprecated upstream, yet still how many deployed models are shipped
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:
            raise LoadError(
                f"{p}: corrupt or truncated TorchScript archive ({e}); re-export it with torch.jit.save"
            ) from e
    elif fmt == "torch":
        model = _load_torch(p, arch, arch_kwargs, trust_pickle)
    else:
        raise LoadError(
            f"{p}: not a recognised model file (expected safetensors, a torch.save zip archive or TorchScript); "
            "the file may be truncated or corrupt"
        )
    model = model.cpu().eval()
    _SOURCES[model] = os.path.realpath(p)
    return model


def _load_hub(path: PathLike, arch, arch_kwargs: dict) -> nn.Module:
    """A timm model from ``hf://<org>/<repo>[@<revision>]`` or a local folder laid out like one."""
    if arch is not None:
        raise LoadError(f"{os.fspath(path)}: a hub model names its architecture in config.json; drop arch= (--arch)")
    if sources.is_hub_spec(path):
        model, weights = sources.load_hub(path, **arch_kwargs)
    else:
        model, weights = sources.load_hub_folder(Path(os.fspath(path)), **arch_kwargs)
    model = model.cpu().eval()
    _SOURCES[model] = os.path.realpath(weights)
    return model


def _read_safetensors(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except Exception as e:
        raise LoadError(f"{p}: corrupt or truncated safetensors file ({e}); re-export the weights") from e
    return sd, metadata


def _load_safetensors(p: Path, arch, arch_kwargs: dict) -> nn.Module:
    sd, metadata = _read_safetensors(p)
    if arch is None:
        # Only registry names are taken from the file: a module path in metadata would make
        # loading an untrusted file import code it names.
        recorded = metadata.get("baerase.arch")
        if recorded not in ARCHITECTURES:
            raise LoadError(
                f"{p}: a safetensors file holds only weights; pass arch= (one of {sorted(ARCHITECTURES)} "
                "or 'package.module:callable', CLI: --arch) and its keyword arguments"
            )
        arch = recorded
        try:
            arch_kwargs = {**json.loads(metadata.get("baerase.arch_kwargs", "{}")), **arch_kwargs}
        except json.JSONDecodeError as e:
            raise LoadError(f"{p}: unreadable baerase.arch_kwargs metadata ({e}); pass arch= and its arguments") from e
    model = _build(arch, p, arch_kwargs)
    _load_into(model, _unwrap_state_dict(sd, p), p, arch)
    return model


def _load_torch(p: Path, arch, arch_kwargs: dict, trust_pickle: bool) -> nn.Module:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):
            raise LoadError(f"{p}: corrupt or truncated torch file ({e}); re-export the model file") from e
        if not trust_pickle:
            raise LoadError(f"{p}: refusing to load: {_PICKLE_RISK}") from None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise LoadError(f"{p}: could not unpickle the model ({e2}); its classes must be importable") from e2
        if isinstance(obj, nn.Module):
            return obj
    except Exception as e:
        raise LoadError(f"{p}: corrupt or truncated torch file ({type(e).__name__}: {e}); re-export it") from e
    if isinstance(obj, nn.Module):
        return obj
    if arch is None:
        raise LoadError(
            f"{p}: the file holds a state dict, which has no architecture; pass arch= (one of "
            f"{sorted(ARCHITECTURES)} or 'package.module:callable', CLI: --arch) and its keyword arguments"
        )
    model = _build(arch, p, arch_kwargs)
    _load_into(model, _unwrap_state_dict(obj, p), p, arch)
    return model


def save_model(
    model: nn.Module,
    path: PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
) -> Path:
    """Write ``model``'s state dict to ``path`` as safetensors, atomically; returns the path.

    The bytes go to a temporary file in the same directory, are flushed to disk, then renamed
    over ``path`` (``os.replace``), so a crash never leaves a half-written model. The file a model
    was loaded from is never overwritten (raises :class:`baerase.errors.InputError`). A registry
    ``arch`` and JSON-serialisable ``arch_kwargs`` are recorded in the metadata so
    :func:`load_model` can rebuild the model without being told.
    """
    from safetensors.torch import save_file

    dest = Path(os.fspath(path))
    real = os.path.realpath(dest)
    source = _SOURCES.get(model)
    if real == source or (
        dest.exists() and source is not None and os.path.exists(source) and os.path.samefile(dest, source)
    ):
        raise InputError(f"refusing to overwrite {dest}: the model was loaded from it; choose another output path")
    if dest.is_dir():
        raise InputError(f"{dest} is a directory; pass a file path such as {dest / 'model.safetensors'}")
    metadata = {"format": "pt"}
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise InputError(f"arch {arch!r} is not a registry name {sorted(ARCHITECTURES)}; it cannot be recorded")
        metadata["baerase.arch"] = arch
        metadata["baerase.arch_kwargs"] = json.dumps(arch_kwargs or {})
    # clone: safetensors refuses tensors that share storage (tied weights) or are non-contiguous.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return dest
