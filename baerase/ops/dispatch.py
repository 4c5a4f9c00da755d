"""Backend registry: which implementation of each op runs on which device.

Order of choice: an explicitly requested backend (``use_backend`` / ``config.backend`` or the
``BAERASE_BACKEND`` environment variable) that must then be available, else Triton for CUDA
tensors, the C++ extension for CPU tensors, else the pure-PyTorch reference.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from ..errors import BackendError

log = logging.getLogger("baerase")

BACKENDS = ("triton", "cpp", "ref")
OPS = ("trigger_apply", "patch_apply", "trigger_loss")
_requested: str | None = None
_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}


def _import_triton_backend() -> ModuleType:
    import triton  # noqa: F401  (fail early and clearly when triton is absent)

    try:
        return importlib.import_module("baerase.kernels")
    except ImportError:
        # Source-tree use: ``kernels/`` sits beside the ``baerase`` package.
        root = Path(__file__).resolve().parents[2]
        if not (root / "kernels" / "__init__.py").exists():
            raise
        spec = importlib.util.spec_from_file_location(
            "baerase.kernels", root / "kernels" / "__init__.py", submodule_search_locations=[str(root / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["baerase.kernels"] = module
        spec.loader.exec_module(module)
        return module


def _import_cpp_backend() -> ModuleType:
    return importlib.import_module("baerase.ops.cpp")


_IMPORTERS = {"triton": _import_triton_backend, "cpp": _import_cpp_backend}


def _module(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = _IMPORTERS[name]()
        except Exception as exc:  # noqa: BLE001 - an optional backend may fail in many ways; keep the reason
            _loaded[name] = None
            _load_errors[name] = f"{type(exc).__name__}: {exc}"
            if name == "cpp":
                log.warning("baerase C++ extension unavailable (%s); using the PyTorch reference on CPU.", exc)
    return _loaded[name]


def _serves(name: str, op: str, device: torch.device) -> bool:
    if name == "ref":
        return True
    if name == "triton":
        on_device = device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
    else:
        on_device = device.type == "cpu"
    module = _module(name) if on_device else None
    return module is not None and hasattr(module, f"{op}_fwd")


def requested_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``BAERASE_BACKEND``, or None for automatic choice."""
    name = _requested or os.environ.get("BAERASE_BACKEND") or None
    if name is not None and name not in BACKENDS + ("auto",):
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return None if name == "auto" else name


def backend_for(op: str, device: torch.device | str) -> str:
    """Name of the backend that will run ``op`` for tensors on ``device``."""
    device = torch.device(device)
    name = requested_backend()
    if name is not None:
        if not _serves(name, op, device):
            why = _load_errors.get(name, f"it does not serve {op} on {device.type}")
            raise BackendError(f"backend {name!r} was requested for {op} on {device.type} but {why}")
        return name
    auto = "triton" if device.type == "cuda" else "cpp"
    return auto if _serves(auto, op, device) else "ref"


def backend(device: torch.device | str = "cpu") -> str:
    """Name of the backend the trigger ops run on for ``device``: ``triton``, ``cpp`` or ``ref``."""
    return backend_for("trigger_apply", device)


def implementation(name: str) -> ModuleType:
    """The module implementing backend ``name`` (``<op>_fwd`` / ``<op>_bwd`` functions)."""
    module = _module(name)
    if module is None:
        raise BackendError(f"backend {name!r} is unavailable: {_load_errors.get(name, 'not built')}")
    return module


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that serve every op on ``device``."""
    device = torch.device(device)
    return [b for b in BACKENDS if all(_serves(b, op, device) for op in OPS)]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend (``'triton'``, ``'cpp'``, ``'ref'``; None or ``'auto'`` for automatic)."""
    global _requested
    if name is not None and name not in BACKENDS + ("auto",):
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    previous, _requested = _requested, name
    try:
        yield
    finally:
        _requested = previous
