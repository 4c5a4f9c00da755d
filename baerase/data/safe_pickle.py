"""Unpickling that can only build plain containers and numpy arrays.

CIFAR batches are pickles, and a pickle can name any importable callable (``os.system``...) for
the loader to call. This Unpickler resolves only the handful of numpy globals that array pickles
need; any other global is refused before it is imported.
"""

from __future__ import annotations

import codecs
import io
import pickle
from typing import Any

import numpy as np

from baerase.errors import LoadError

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """Protocol-2 pickles written by Python 3 store bytes as ``_codecs.encode(str, "latin1")``.
    The real ``codecs.encode`` can reach any registered codec, so only that one use is allowed."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("only latin-1 string encoding is allowed")
    return codecs.encode(obj, "latin-1")


# (module, name) -> object. Pickles written by numpy 1.x name numpy.core, by 2.x numpy._core.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED[(_mod, "_reconstruct")] = _multiarray._reconstruct
    _ALLOWED[(_mod, "scalar")] = _multiarray.scalar
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _ALLOWED[(_mod, "_frombuffer")] = _numeric._frombuffer  # protocol-5 array pickles


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler whose ``find_class`` only returns the allowed numpy globals."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name} (not needed by array data)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_loads(data: bytes, source: str) -> Any:
    """Unpickle ``data`` allowing only containers, scalars and numpy arrays.

    Raises:
        LoadError: the data is not a pickle, is truncated or corrupt, or names a forbidden global.
    """
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise LoadError(f"{source}: not a safe data pickle ({exc})") from None
    except MemoryError:
        raise LoadError(f"{source}: corrupt pickle (declares more data than fits in memory)") from None
    except RecursionError:
        raise LoadError(f"{source}: corrupt pickle (nested too deeply)") from None
    except Exception as exc:
        raise LoadError(f"{source}: truncated or corrupt pickle ({type(exc).__name__}: {exc})") from None
    return obj
