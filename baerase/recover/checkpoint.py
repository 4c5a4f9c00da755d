"""Per-chunk checkpoints of a scan, so that a killed scan resumes where it stopped.

Layout of a checkpoint directory::

    scan.json                      what the chunks belong to (config, model and data hashes)
    chunk-<first>-<digest>.safetensors   one finished chunk: trigger state + attack success

Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, which is atomic on POSIX: a scan killed at any instant leaves either the old file,
the new one, or a stray ``*.tmp`` that is ignored, never a half-written checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from ..errors import InputError
from . import families
from .triggers import TriggerSet

log = logging.getLogger(__name__)

_FORMAT = 2


def _atomic_write(path: Path, write) -> None:
    """Write through ``write(tmp_path)`` and move the result onto ``path`` atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def chunk_key(targets: list[int]) -> str:
    digest = hashlib.sha256(json.dumps([int(t) for t in targets]).encode()).hexdigest()[:12]
    return f"chunk-{int(targets[0]):06d}-{digest}"


class ChunkStore:
    """Finished chunks of one scan in ``directory``; ``fingerprint`` (JSON-able) names the scan.

    A directory that holds another scan's chunks (different config, model or data) is refused
    rather than mixed in.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True, default=str))
        meta = self.directory / "scan.json"
        if meta.exists():
            try:
                saved = json.loads(meta.read_text())
            except (OSError, ValueError) as exc:
                raise InputError(
                    f"checkpoint {meta} is unreadable ({exc}); delete the directory to start over"
                ) from None
            if saved.get("format") != _FORMAT or saved.get("fingerprint") != self.fingerprint:
                raise InputError(
                    f"checkpoint directory {self.directory} belongs to another scan (different settings, "
                    "model, data or baerase version); use a new directory or delete it"
                )
        else:
            text = json.dumps({"format": _FORMAT, "fingerprint": self.fingerprint}, indent=1, sort_keys=True)
            _atomic_write(meta, lambda tmp: Path(tmp).write_text(text))

    def _path(self, targets: list[int]) -> Path:
        return self.directory / f"{chunk_key(targets)}.safetensors"

    def load(self, targets: list[int]) -> tuple[TriggerSet, torch.Tensor] | None:
        """The finished chunk for exactly ``targets`` (triggers on CPU, success [K]), or None."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self._path(targets)
        if not path.exists():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads(handle.metadata()["meta"])
            tensors = load_file(str(path))
            success = tensors.pop("attack_success")
            triggers = families.from_state(meta, tensors)
        except Exception as exc:
            # Atomic writes make this unexpected (e.g. a disk fault); recomputing is always safe.
            log.warning("ignoring unreadable checkpoint %s (%s); recomputing that chunk", path, exc)
            return None
        if triggers.targets.tolist() != [int(t) for t in targets]:
            return None
        return triggers, success

    def save(self, triggers: TriggerSet, success: torch.Tensor) -> None:
        from safetensors.torch import save_file

        tensors = {name: t.detach().cpu().contiguous() for name, t in triggers.state_dict().items()}
        tensors["attack_success"] = success.detach().float().cpu().contiguous()
        metadata = {"meta": json.dumps(triggers.meta)}
        _atomic_write(self._path(triggers.targets.tolist()), lambda tmp: save_file(tensors, tmp, metadata=metadata))
