"""The TrojAI harness entry point: scan one model, write the probability that it is poisoned.

The harness calls ``baerase trojai --model_filepath DIR/model.pt --result_filepath OUT
--scratch_dirpath TMP --examples_dirpath DIR/clean-example-data``. The model file is a fully
pickled model (``torch.save(model)``; loading it runs code from the file, so it needs
``--trust-pickle``) or a state dict with ``--arch``. The examples folder holds clean images
(PNG/JPG) whose labels come from a JSON file in the folder mapping file names to labels, from a
``<image stem>.json`` beside each image holding its label, or from file names as TrojAI writes
them (``class_<label>_example_<n>.png``).

baerase scans the model (recovery and detection, no erase) and writes one number to the result
file: the probability that the model is poisoned,

    p = 1 / (1 + exp(-(e - t) / s)),   clipped to [0.01, 0.99],

where ``t`` is the detection threshold (``config.detection.anomaly_threshold``, 2.0 by default),
``s = 1`` (``SCALE``) and ``e`` is the scan's evidence: the largest anomaly index of a flagged
class or, when no class is flagged, the largest anomaly index of any class capped at ``t`` (an
outlier that failed the other tests or its confirmations counts as undecided, not as poisoned).
So ``p > 0.5`` exactly when the scan flags a class, it rises with the flagged trigger's anomaly
index (0.73 at ``t + 1``, 0.99 from ``t + 4.6``), and an unflagged model gets between 0.12 (every
class at the median) and 0.5. The clip keeps one confident mistake from costing unbounded
cross-entropy (TrojAI scores the probabilities by cross-entropy and ROC AUC). A model that cannot be scanned
gets 0.5 (``UNDECIDED``) and the command exits non-zero with the reason on stderr. The scan's
report goes to ``<scratch>/baerase-scan``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .config import Config
from .errors import BaeraseError, InputError, LoadError
from .report import ScanReport

PathLike = str | os.PathLike
UNDECIDED = 0.5
SCALE = 1.0
CLIP = (0.01, 0.99)
_LABEL_IN_NAME = re.compile(r"class_(\d+)(?:_|$)")


def poisoned_probability(report: ScanReport, scale: float = SCALE) -> float:
    """The probability that the scanned model is poisoned (see the module docstring)."""
    threshold = float(report.config["detection"]["anomaly_threshold"])
    flagged = [c.anomaly_index for c in report.classes if c.flagged]
    strongest = max((c.anomaly_index for c in report.classes), default=0.0)
    evidence = max(flagged) if flagged else min(strongest, threshold)
    p = 1.0 / (1.0 + math.exp(-(evidence - threshold) / scale))
    return min(max(p, CLIP[0]), CLIP[1])


def load_examples(folder: PathLike) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean example images of a TrojAI model: images [N, C, H, W] in [0, 1], labels [N].

    Labels come from a JSON file in ``folder`` mapping file names (or stems) to labels, else from a
    ``<stem>.json`` beside each image, else from ``class_<label>_...`` in the file name.
    """
    from .data.loaders import _image_files, _stack_images

    folder = Path(folder)
    if not folder.is_dir():
        raise LoadError(f"examples folder {folder} does not exist or is not a folder")
    files = _image_files(folder)
    if not files:
        raise InputError(f"{folder}: no example images (PNG/JPG)")
    mapping = _label_mapping(folder)
    pairs = [(f, _label(f, mapping)) for f in files]
    return _stack_images(pairs, None, str(folder))


def _label_mapping(folder: Path) -> dict[str, int]:
    """File name (and stem) -> label from every JSON object in ``folder`` that maps names to labels."""
    mapping: dict[str, int] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise LoadError(f"{path}: cannot read labels from it ({exc})") from None
        if isinstance(content, dict):
            mapping.update({str(k): v for k, v in content.items()})
    return mapping


def _label(image: Path, mapping: dict) -> int:
    value = mapping.get(image.name, mapping.get(image.stem))
    sidecar = image.with_suffix(".json")
    if value is None and sidecar.is_file():
        try:
            value = json.loads(sidecar.read_text())
        except (OSError, ValueError) as exc:
            raise LoadError(f"{sidecar}: cannot read the label of {image.name} ({exc})") from None
    if value is None and (match := _LABEL_IN_NAME.search(image.stem)):
        value = match.group(1)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(
            f"{image}: no label; name the image class_<label>_example_<n>.png, put <stem>.json with its label "
            "beside it, or a JSON file mapping file names to labels in the folder"
        ) from None


def trojai_scan(
    model_filepath: PathLike,
    scratch_dirpath: PathLike,
    examples_dirpath: PathLike,
    *,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    normalize=None,
    trust_pickle: bool = False,
    config: Config | None = None,
) -> tuple[float, ScanReport]:
    """Scan a TrojAI model; returns (probability that it is poisoned, the scan report).

    Any failure raises a ``BaeraseError`` naming the problem (errors from inside the model, too).
    """
    from .api import scan
    from .models import load_model, resolve_normalize
    from .report import write_outputs

    config = config or Config()
    try:
        model = load_model(model_filepath, arch, trust_pickle=trust_pickle, **(arch_kwargs or {}))
        device = config.run.device or ("cuda" if torch.cuda.is_available() else None)
        if device is not None:
            model, config = model.to(device), config.replace(device=device)
        images, labels = load_examples(examples_dirpath)
        normalize, record = resolve_normalize(model, tuple(images.shape[1:]), normalize)
        report = scan(model, images, labels, normalize=normalize, config=config)
        report.provenance.update(record)
        write_outputs(Path(scratch_dirpath) / "baerase-scan", report, images, overwrite=True)
    except BaeraseError:
        raise
    except Exception as exc:  # a model that fails inside (shapes, dtypes) cannot be scanned either
        raise InputError(f"cannot scan {model_filepath}: {type(exc).__name__}: {exc}") from exc
    return poisoned_probability(report), report


def write_probability(result_filepath: PathLike, probability: float) -> None:
    """The harness's result file: one number."""
    path = Path(result_filepath)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{probability:.6f}\n")
