"""Architectures and models from the libraries users already have: torchvision, timm and the
Hugging Face hub.

- ``torchvision:<name>``: a torchvision classification model builder (``resnet18``, ``vit_b_16``, ...);
- ``timm:<name>``: any timm model name;
- ``hf://<org>/<repo>[@<revision>]``: a timm model on the Hugging Face hub (``config.json`` +
  ``model.safetensors``), or a local folder laid out the same way (e.g. from
  ``huggingface-cli download <org>/<repo> --local-dir DIR``).

Nothing here unpickles: the architecture comes from the library's registry by name (a hub
``config.json`` is JSON naming a timm architecture) and hub weights must be safetensors. Each model
built here remembers the preprocessing its library defines (mean/std, input size), which
:func:`resolve_normalize` applies when the caller gives none. These sources need the ``vision``
extra: ``pip install baerase[vision]``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..errors import InputError, LoadError

log = logging.getLogger(__name__)

PREFIXES = ("torchvision", "timm")
HUB_SCHEME = "hf://"
HUB_WEIGHTS = "model.safetensors"
HUB_CONFIG = "config.json"
EXTRA = "pip install baerase[vision]"
# The weights come from the model file or the hub repository, never from the library's own download.
_DOWNLOAD_KWARGS = ("pretrained", "weights")
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

Normalize = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class Preprocessing:
    """What a model's library says its inputs should look like.

    ``source``: how the model was named (``timm:resnet18``, ``hf://org/repo@<commit>``);
    ``normalize``: per-channel (mean, std) or None when the library defines none; ``origin``: where
    that came from; ``input_size``: (C, H, W) the model was configured for, or None;
    ``fixed_input_size``: the model accepts only that size.
    """

    source: str
    normalize: Normalize | None
    origin: str
    input_size: tuple[int, ...] | None = None
    fixed_input_size: bool = False


_PREPROCESSING: weakref.WeakKeyDictionary[nn.Module, Preprocessing] = weakref.WeakKeyDictionary()


def preprocessing_of(model: nn.Module) -> Preprocessing | None:
    """The preprocessing recorded for a model built by this module, or None."""
    return _PREPROCESSING.get(model)


def _require(module: str) -> object:
    """Import an optional dependency of the ``vision`` extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise LoadError(f"{module} is not installed ({e}); the torchvision/timm/hub model sources need: {EXTRA}") from e


def is_source_arch(arch: object) -> bool:
    """Whether ``arch`` names a library architecture (``torchvision:<name>`` or ``timm:<name>``)."""
    return isinstance(arch, str) and arch.partition(":")[0] in PREFIXES and ":" in arch


def is_hub_spec(path: object) -> bool:
    """Whether a model path is a Hugging Face hub reference ``hf://<org>/<repo>[@<revision>]``."""
    return isinstance(path, str) and path.startswith(HUB_SCHEME)


def is_hub_folder(path: Path) -> bool:
    """Whether ``path`` is a local folder laid out like a timm hub repository."""
    return path.is_dir() and (path / HUB_CONFIG).is_file()


def _no_downloads(kwargs: dict, name: str) -> None:
    asked = [k for k in _DOWNLOAD_KWARGS if k in kwargs]
    if asked:
        raise LoadError(
            f"arch {name!r}: {', '.join(asked)} would download the library's weights, but baerase loads "
            "the weights from the model file; drop the argument"
        )


def _nums(values: object) -> tuple[float, ...]:
    return tuple(float(v) for v in values) if isinstance(values, (list, tuple)) else (float(values),)


# --- torchvision -------------------------------------------------------------------------------


def _torchvision_preprocessing(name: str) -> Preprocessing:
    from torchvision.models import get_model_weights

    try:
        weights = get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return Preprocessing(f"torchvision:{name}", None, f"torchvision registers no weights for {name}")
    transform = weights.transforms()  # builds the preprocessing object only; downloads nothing
    size = tuple(int(s) for s in getattr(transform, "crop_size", ()))
    side = (size * 2)[:2] if size else None
    return Preprocessing(
        source=f"torchvision:{name}",
        normalize=(tuple(transform.mean), tuple(transform.std)),
        origin=f"torchvision {weights}.transforms()",
        input_size=(3, *side) if side else None,
    )


def torchvision_arch(name: str) -> Callable[..., nn.Module]:
    """A factory for torchvision classification model ``name``; keyword arguments go to its builder."""
    _require("torchvision")
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)
    if name not in names:
        close = [n for n in names if name.lower() in n or n in name.lower()][:5]
        raise LoadError(
            f"{name!r} is not a torchvision classification model"
            + (f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()")
        )

    def build(**kwargs) -> nn.Module:
        _no_downloads(kwargs, f"torchvision:{name}")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        _PREPROCESSING[model] = _torchvision_preprocessing(name)
        return model

    return build


# --- timm --------------------------------------------------------------------------------------


def _timm_preprocessing(model: nn.Module, source: str, origin: str) -> Preprocessing:
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    size = tuple(int(s) for s in cfg["input_size"]) if cfg.get("input_size") else None
    normalize = None
    if cfg.get("mean") is not None and cfg.get("std") is not None:
        normalize = (_nums(cfg["mean"]), _nums(cfg["std"]))
    return Preprocessing(source, normalize, origin, size, bool(cfg.get("fixed_input_size", False)))


def timm_arch(name: str) -> Callable[..., nn.Module]:
    """A factory for timm model ``name`` (random weights); keyword arguments go to ``timm.create_model``."""
    timm = _require("timm")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5]
        raise LoadError(
            f"{name!r} is not a timm model"
            + (f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()")
        )

    def build(**kwargs) -> nn.Module:
        _no_downloads(kwargs, f"timm:{name}")
        model = timm.create_model(name, pretrained=False, **kwargs)
        tag = (getattr(model, "pretrained_cfg", None) or {}).get("tag")
        origin = f"timm pretrained_cfg of {name}" + (f" ({tag})" if tag else "")
        _PREPROCESSING[model] = _timm_preprocessing(model, f"timm:{name}", origin)
        return model

    return build


def resolve_arch(arch: str) -> Callable[..., nn.Module]:
    """The factory for ``torchvision:<name>`` or ``timm:<name>``."""
    prefix, _, name = arch.partition(":")
    if not name:
        raise LoadError(f"arch {arch!r} names no model; write e.g. {prefix}:resnet18")
    return torchvision_arch(name) if prefix == "torchvision" else timm_arch(name)


# --- Hugging Face hub --------------------------------------------------------------------------


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf://<org>/<repo>[@<revision>]`` -> (repo id, revision or None)."""
    repo, _, revision = spec[len(HUB_SCHEME) :].partition("@")
    if not _REPO_ID.fullmatch(repo) or ".." in repo:
        raise LoadError(
            f"{spec!r} is not a hub model reference; write hf://<org>/<repo> or hf://<org>/<repo>@<revision>"
        )
    return repo, revision or None


def _hub_files(spec: str, cache_dir: str | os.PathLike | None, local_files_only: bool | None) -> tuple[Path, Path]:
    """Local paths of the repository's config.json and model.safetensors, fetched (or read from the
    cache) with ``huggingface_hub``; offline when HF_HUB_OFFLINE=1 or ``local_files_only``."""
    repo, revision = parse_hub_spec(spec)
    hub = _require("huggingface_hub")
    kwargs = {"revision": revision, "cache_dir": cache_dir}
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    paths = []
    for filename in (HUB_CONFIG, HUB_WEIGHTS):
        try:
            paths.append(Path(hub.hf_hub_download(repo, filename, **kwargs)))
        except Exception as e:  # not found, offline without a cached copy, gated, network: all name the file
            hint = (
                "; a timm hub model needs model.safetensors (pickled .bin weights are not loaded)"
                if filename == HUB_WEIGHTS
                else "; is it a timm model repository?"
            )
            raise LoadError(f"{spec}: cannot get {filename} ({type(e).__name__}: {e}){hint}") from e
    return paths[0], paths[1]


def _read_hub_config(path: Path, where: str) -> tuple[str, dict, dict]:
    """(timm architecture, pretrained_cfg, model_args) from a timm hub ``config.json``."""
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadError(f"{where}: unreadable {HUB_CONFIG} ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        raise LoadError(f"{where}: {HUB_CONFIG} names no timm 'architecture'; only timm models are supported")
    # Older exports keep the preprocessing at the top level rather than under pretrained_cfg.
    pretrained_cfg = dict(cfg.get("pretrained_cfg", {k: v for k, v in cfg.items() if k != "architecture"}))
    if "num_classes" in cfg:
        pretrained_cfg["num_classes"] = cfg["num_classes"]
    model_args = cfg.get("model_args") or {}
    if not isinstance(model_args, dict):
        raise LoadError(f"{where}: {HUB_CONFIG} model_args must be an object, got {type(model_args).__name__}")
    return cfg["architecture"], pretrained_cfg, model_args


def _hub_model(config: Path, weights: Path, source: str, arch_kwargs: dict) -> nn.Module:
    from .io import _load_into, _read_safetensors

    timm = _require("timm")
    name, pretrained_cfg, model_args = _read_hub_config(config, source)
    if not timm.is_model(name):
        raise LoadError(f"{source}: {HUB_CONFIG} names {name!r}, which this timm does not know; upgrade timm")
    _no_downloads(arch_kwargs, source)
    # timm validates the dict as a PretrainedCfg; exports carry informational keys it has no field for.
    known = {f.name for f in dataclasses.fields(timm.models.PretrainedCfg)}
    pretrained_cfg = {k: v for k, v in pretrained_cfg.items() if k in known}
    kwargs = {**model_args, **arch_kwargs}
    if pretrained_cfg.get("num_classes") is not None:
        kwargs.setdefault("num_classes", pretrained_cfg["num_classes"])
    try:
        model = timm.create_model(name, pretrained=False, pretrained_cfg=pretrained_cfg, **kwargs)
    except Exception as e:
        raise LoadError(f"{source}: building timm {name!r} with {kwargs} failed: {e}") from e
    _load_into(model, _read_safetensors(weights)[0], weights, f"timm:{name}")
    _PREPROCESSING[model] = _timm_preprocessing(model, source, f"{HUB_CONFIG} pretrained_cfg of {source}")
    return model


def load_hub(
    spec: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    **arch_kwargs,
) -> tuple[nn.Module, Path]:
    """Build the timm model of ``hf://<org>/<repo>[@<revision>]`` and load its safetensors weights.

    ``cache_dir`` and ``local_files_only`` go to ``huggingface_hub.hf_hub_download`` (None: its
    defaults, which follow HF_HUB_CACHE and HF_HUB_OFFLINE); ``arch_kwargs`` override the
    repository's ``model_args``. Returns the model and the weights file it was loaded from.
    """
    config, weights = _hub_files(spec, cache_dir, local_files_only)
    # The snapshot folder is named by the commit, so the report pins the exact weights.
    commit = weights.parent.name if re.fullmatch(r"[0-9a-f]{40}", weights.parent.name) else None
    repo, revision = parse_hub_spec(spec)
    source = f"{HUB_SCHEME}{repo}@{commit or revision or 'main'}"
    return _hub_model(config, weights, source, arch_kwargs), weights


def load_hub_folder(folder: Path, **arch_kwargs) -> tuple[nn.Module, Path]:
    """Like :func:`load_hub` for a local folder holding ``config.json`` and ``model.safetensors``."""
    weights = folder / HUB_WEIGHTS
    if not weights.is_file():
        raise LoadError(
            f"{folder}: a hub model folder needs {HUB_WEIGHTS} beside {HUB_CONFIG} (.bin weights are not loaded)"
        )
    return _hub_model(folder / HUB_CONFIG, weights, str(folder), arch_kwargs), weights


# --- normalisation -----------------------------------------------------------------------------


def _check_size(pre: Preprocessing, image_shape: tuple[int, ...]) -> None:
    """A fixed-size model refuses other sizes; any other model is run at the images' size, with a warning."""
    if pre.input_size is None or tuple(image_shape[-2:]) == tuple(pre.input_size[-2:]):
        return
    want, got = "x".join(map(str, pre.input_size)), "x".join(map(str, image_shape))
    if pre.fixed_input_size:
        raise InputError(
            f"{pre.source} takes only {want} images, the clean images are {got}; resize the data to {want}"
        )
    log.warning(
        "%s is configured for %s inputs; the clean images are %s and go to the model at that size (no resizing). "
        "A model trained at %s may classify them poorly; resize the data for a faithful audit.",
        pre.source,
        want,
        got,
        want,
    )


def resolve_normalize(
    model: nn.Module, image_shape: tuple[int, ...], normalize: Normalize | None = None
) -> tuple[Normalize | None, dict]:
    """The normalisation to use for ``model`` and the provenance entries that say where it came from.

    A ``normalize`` given by the caller wins; otherwise a model built by this module gets its
    library's mean/std. Checks the images' size ``image_shape`` (C, H, W) against the library's
    input size (see :func:`_check_size`).
    """
    pre = preprocessing_of(model)
    record: dict = {}
    if pre is not None:
        _check_size(pre, image_shape)
        record["model_source"] = pre.source
        if pre.input_size is not None:
            record["model_input_size"] = list(pre.input_size)
    if normalize is not None:
        origin = "given by the user"  # validated with the other inputs, by the scan
    elif pre is not None and pre.normalize is not None:
        normalize, origin = pre.normalize, pre.origin
        if len(normalize[0]) != image_shape[0]:
            raise InputError(
                f"the normalisation from {origin} has {len(normalize[0])} channels, the images {image_shape[0]}; "
                "give one mean and std per channel (CLI: --normalize)"
            )
    else:
        origin = "none: pixels in [0, 1] go to the model unchanged"
    record["normalize"] = None if normalize is None else {"mean": list(normalize[0]), "std": list(normalize[1])}
    record["normalize_source"] = origin
    return normalize, record
