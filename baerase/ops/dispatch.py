"""Which backend runs each op, chosen per call and per context.

Every op is a ``torch.library`` custom op ``baerase::<op>`` whose default kernel is the PyTorch
reference. For CPU and CUDA tensors the dispatcher calls the kernel ``routed_op`` registers, which
asks ``backend_for`` and calls that backend's function:

1. a requested backend (``use_backend`` / ``config.run.backend``, else ``BAERASE_BACKEND``) runs every
   op it implements (the reference serves the others, e.g. Triton has no Adam kernel); if it
   cannot load or does not serve the tensors' device, ``BackendError`` says why;
2. otherwise ``AUTO`` names the fast backend per (op, device type) and the problem size from
   which the benchmarks show it beats the reference; below that, or when the backend is missing,
   the reference serves (a backend that fails to load logs one warning).

The override and the records live in ``contextvars``: threads and asyncio tasks never see each
other's choice. A backward pass may run on an autograd worker thread, so each op's autograd saves
``scope()`` in the forward and its backward runs ``in_scope(...)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from types import ModuleType

import torch

from ..errors import BackendError, InputError

log = logging.getLogger(__name__)

BACKENDS = ("triton", "cpp", "ref")
OPS = ("trigger_apply", "patch_apply", "trigger_loss", "adam_step")
_MODULES = {"triton": "baerase.kernels", "cpp": "baerase._C"}
_DEVICES = {"triton": ("cuda",), "cpp": ("cpu",)}

# auto: (op, device type) -> (fast backend, smallest problem in elements of the op's largest
# tensor from which it beats the reference). CPU, 1 thread (benchmarks/bench_<op>.py): the C++
# kernels win at every measured size, 1.1-15x. CUDA: benchmarks/results/gpu_h200.md.
AUTO: dict[tuple[str, str], tuple[str, int]] = {
    ("trigger_apply", "cpu"): ("cpp", 0),
    ("patch_apply", "cpu"): ("cpp", 0),
    ("trigger_loss", "cpu"): ("cpp", 0),
    ("adam_step", "cpu"): ("cpp", 0),
    # H200: 0.89x at K=10 x B=128 x 3x32x32 (3.9M outputs), 1.74x at K=100 (39M).
    ("trigger_apply", "cuda"): ("triton", 1 << 23),
    # H200: 1.8x at 39M outputs, the smallest case measured.
    ("patch_apply", "cuda"): ("triton", 0),
    # H200: 0.96-1.01x up to 12.8M logits (Kc <= 1000, the scan's sizes), 2.7x at 410M (Kc = 100,000).
    ("trigger_loss", "cuda"): ("triton", 1 << 26),
}

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("baerase_backend", default=None)
_records: contextvars.ContextVar[tuple[dict[str, str], ...]] = contextvars.ContextVar("baerase_records", default=())
_impl_names: dict[str, str] = {}  # custom op name -> backend function name
_loaded: dict[str, ModuleType | None] = {}
_load_errors: dict[str, str] = {}
_load_lock = threading.Lock()


def _module(name: str) -> ModuleType | None:
    """The backend's module, imported once; None (and one warning) when it cannot load."""
    if name not in _loaded:
        with _load_lock:  # threads that first need a backend together import (and warn) once
            if name not in _loaded:
                try:
                    _loaded[name] = _checked(importlib.import_module(_MODULES[name]))
                except Exception as exc:  # an optional backend fails in many ways; keep the reason
                    _loaded[name], _load_errors[name] = None, f"{type(exc).__name__}: {exc}"
                    log.warning("baerase %s backend unavailable (%s); the reference serves its ops.", name, exc)
    return _loaded[name]


def _checked(module: ModuleType) -> ModuleType:
    """``module``, unless it is a C++ extension built against another torch release than this one."""
    built = getattr(module, "torch_version", None)
    running = ".".join(torch.__version__.split(".")[:2])
    if built is not None and built != running:
        raise ImportError(f"built for torch {built}, running torch {running}; reinstall baerase to rebuild it")
    return module


def _device_types(name: str) -> tuple[str, ...]:
    # The Triton interpreter runs CPU tensors, for tests; auto never picks it.
    interpret = name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return _DEVICES[name] + (("cpu",) if interpret else ())


def _check_name(name: str | None) -> None:
    if name is not None and name not in (*BACKENDS, "auto"):
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")


def requested_backend() -> str | None:
    """The backend forced by ``use_backend`` or ``BAERASE_BACKEND``, or None for automatic choice."""
    name = _override.get() or os.environ.get("BAERASE_BACKEND") or None
    _check_name(name)
    return None if name == "auto" else name


def _implements(name: str, op: str) -> bool:
    module = _module(name)
    return module is not None and hasattr(module, _impl_names.get(op, f"{op}_fwd"))


def _unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, or None when it can."""
    if name == "ref":
        return None
    if device.type not in _device_types(name):
        return f"it serves {' and '.join(_device_types(name))} tensors, not {device.type}"
    return None if _module(name) is not None else _load_errors[name]


def backend_for(op: str, device: torch.device | str, size: int | None = None) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    ``size``: elements of the op's largest tensor, for the auto policy's thresholds; None asks
    about a large problem (what the fast path serves).
    """
    device = torch.device(device)
    name = requested_backend()
    if name is not None:
        why = _unavailable(name, device)
        if why:
            raise BackendError(f"backend {name!r} was requested for {op} on {device.type} but {why}")
        return name if name == "ref" or _implements(name, op) else "ref"
    fast, min_size = AUTO.get((op.removesuffix("_backward"), device.type), ("ref", 0))
    if fast != "ref" and (size is None or size >= min_size) and _unavailable(fast, device) is None:
        return fast if _implements(fast, op) else "ref"
    return "ref"


def backend(device: torch.device | str = "cpu") -> str:
    """Name of the backend the trigger ops run on for ``device``: ``triton``, ``cpp`` or ``ref``."""
    return backend_for("trigger_apply", device)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` (each serves the ops it implements; ``ref`` serves all)."""
    device = torch.device(device)
    return [name for name in BACKENDS if _unavailable(name, device) is None]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force a backend (``'triton'``, ``'cpp'``, ``'ref'``) in this context; ``'auto'`` chooses
    automatically, None leaves the choice to ``BAERASE_BACKEND`` (else automatic)."""
    _check_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


@contextlib.contextmanager
def record_backends() -> Iterator[dict[str, str]]:
    """Yield a dict filled with ``{op: backend}`` for every op (and ``<op>_backward``) run in this
    context; nested records each see the ops run inside them."""
    used: dict[str, str] = {}
    token = _records.set((*_records.get(), used))
    try:
        yield used
    finally:
        _records.reset(token)


def scope() -> tuple:
    """This context's override and records, for a backward that may run on another thread."""
    return _override.get(), _records.get()


@contextlib.contextmanager
def in_scope(saved: tuple) -> Iterator[None]:
    """Run with the override saved by ``scope()``; ops record into the saved and the current records."""
    current = tuple(r for r in _records.get() if all(r is not s for s in saved[1]))
    tokens = _override.set(saved[0]), _records.set(saved[1] + current)
    try:
        yield
    finally:
        _records.reset(tokens[1])
        _override.reset(tokens[0])


def _tensors(args) -> Iterator[torch.Tensor]:
    for a in args:
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            yield from _tensors(a)


def largest(*args) -> int:
    """Elements of the largest tensor argument: the default problem size for the auto policy."""
    return max((t.numel() for t in _tensors(args)), default=0)


def routed_op(name: str, impl: str, *, mutates_args=(), size: Callable[..., int] = largest):
    """Decorator: define custom op ``baerase::<name>`` with the decorated reference as its default
    kernel, and register for CPU and CUDA a kernel that runs ``<backend module>.<impl>``."""

    def define(ref: Callable) -> torch.library.CustomOpDef:
        op = torch.library.custom_op(f"baerase::{name}", ref, mutates_args=mutates_args)
        _impl_names[name] = impl

        def kernel(*args):
            device = next(_tensors(args), torch.empty(0)).device
            chosen = backend_for(name, device, size(*args))
            for record in _records.get():
                record[name] = chosen
            fn = ref if chosen == "ref" else getattr(_module(chosen), impl)
            try:
                return fn(*args)
            except InputError:
                raise
            except ValueError as exc:  # the C++ checks (TORCH_CHECK_VALUE): one error type for callers
                raise InputError(str(exc).split("\nException raised from")[0]) from None

        op.register_kernel(("cpu", "cuda"), kernel)
        return op

    return define
