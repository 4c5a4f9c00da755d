"""What a scan and an erase return, and how they are written to disk."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import rng
from .cost import Cost
from .errors import DivergenceError, InputError
from .recover import UNTARGETED, TriggerSet, families
from .report_html import write_html

# The version of report.json's layout (baerase/schema/report.schema.json); 3 added ``cut_short``, 4 ``lost_with``.
SCHEMA_VERSION = 4


@dataclass
class ClassResult:
    """Evidence for one candidate target class."""

    target: int
    attack_success: float  # share of held-out non-target images its recovered trigger flips
    trigger_norm: float  # mask L1 mass or patch area (px), warp mean displacement (px), blend attenuation
    anomaly_index: float  # MAD anomaly index of the trigger (higher = more suspicious)
    flagged: bool
    confirmation_index: float | None = None  # lowest anomaly index over independent re-recoveries (suspects)
    steps: int | None = None  # optimisation steps its recovery ran (fewer when it converged early)
    screened_out: bool = False  # only pre-screened (many classes): too hard to reach to be a candidate
    # An outlier not found again once this stronger flagged class was unlearned: reached through its backdoor.
    lost_with: int | None = None

    @property
    def flag_text(self) -> str:
        """The flagged column: yes, or why an outlier or a class is not ("lost with class t", "screened out")."""
        if self.flagged:
            return "yes"
        if self.lost_with is not None:
            return f"lost with class {self.lost_with}"
        return "screened out" if self.screened_out else ""


@dataclass
class ScanReport:
    """Result of ``baerase.scan``: per-class evidence and the classes judged backdoored."""

    classes: list[ClassResult]
    num_classes: int
    image_shape: tuple[int, int, int]
    family: str
    backend: str
    config: dict
    seconds: float
    provenance: dict = field(default_factory=dict)
    triggers: TriggerSet | None = field(default=None, repr=False)  # recovered distributions
    cost: Cost = field(default_factory=Cost)  # images through the suspect model and seconds, per phase
    # Why the scan ended early (its budget ran out): then ``classes`` holds only the classes it finished,
    # none flagged, and ``flagged == []`` is no verdict.
    cut_short: str | None = None
    # An all-to-all backdoor: ``triggers`` holds its one untargeted trigger, ``flagged`` the targets it reaches.
    untargeted: bool = False

    @property
    def flagged(self) -> list[int]:
        """Sorted classes judged backdoored ([] for a clean model)."""
        return sorted(c.target for c in self.classes if c.flagged)

    def flagged_triggers(self) -> TriggerSet:
        """The recovered triggers an erase unlearns: the flagged classes', or the untargeted one."""
        if self.untargeted:
            return self.triggers
        held = self.triggers.targets.tolist()
        return self.triggers.select([held.index(t) for t in self.flagged])

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "flagged": self.flagged,
            "untargeted": self.untargeted,
            "cut_short": self.cut_short,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "family": self.family,
            "backend": self.backend,
            "seconds": round(self.seconds, 3),
            "classes": [asdict(c) for c in self.classes],
            "cost": self.cost.to_dict(),
            "config": _jsonable(self.config),
            "provenance": _jsonable(self.provenance),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """Machine-readable report with stable keys."""
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        verdict = f"backdoored: classes {self.flagged}" if self.flagged else "no backdoor found"
        if self.untargeted:
            verdict = f"backdoored, all-to-all: an untargeted trigger sends the classes to {self.flagged}"
        if self.cut_short:
            verdict = (
                f"INCONCLUSIVE: cut short, {self.cut_short}; {len(self.classes)} of {self.num_classes} "
                "classes recovered, no verdict"
            )
        lines = [
            (
                f"Scan of {self.num_classes} classes ({self.family} triggers, {self.backend} backend, "
                f"{self.seconds:.1f}s): {verdict}"
            ),
            "",
            "| class | attack success | trigger norm | anomaly index | flagged |",
            "|---:|---:|---:|---:|:---:|",
        ]
        for c in self.classes:
            lines.append(
                f"| {c.target} | {c.attack_success:.3f} | {c.trigger_norm:.1f} | {c.anomaly_index:.2f} | "
                f"{c.flag_text} |"
            )
        lines += ["", "Cost (images through the suspect model):", self.cost.table(self.num_classes)]
        return "\n".join(lines)

    @staticmethod
    def of_scan(inputs, screened, verdict, cost: Cost, backends: dict[str, str], seconds: float) -> ScanReport:
        """The report of a scan: ``screened`` (recover.Screened) holds every class's evidence and
        ``verdict`` (detect.Verdict) the flags; ``backends`` the op backends that ran."""
        cfg, recovery = inputs.config, screened.recovery
        full = [True] * len(recovery.targets) if screened.recovered is None else screened.recovered.tolist()
        lost = [-1] * len(recovery.targets) if verdict.lost_with is None else verdict.lost_with.tolist()
        columns = zip(
            recovery.targets,
            recovery.success.tolist(),
            recovery.norms.tolist(),
            verdict.index.tolist(),
            verdict.flagged.tolist(),
            verdict.confirmation.tolist(),
            recovery.steps.tolist(),
            full,
            lost,
            strict=False,
        )
        classes = [
            ClassResult(
                target=t,
                attack_success=s,
                trigger_norm=n,
                anomaly_index=a,
                flagged=bool(f),
                confirmation_index=None if math.isnan(c) else c,
                steps=int(r),
                screened_out=not whole,
                lost_with=None if w < 0 else w,
            )
            for t, s, n, a, f, c, r, whole, w in columns
        ]
        stamp_op = "patch_apply" if cfg.recovery.family == "patch" else "trigger_apply"
        return ScanReport(
            classes=classes,
            num_classes=inputs.num_classes,
            image_shape=tuple(inputs.images.shape[1:]),
            family=cfg.recovery.family,
            backend=backends.get(stamp_op, "ref"),
            config=cfg.to_dict(),
            seconds=seconds,
            provenance=provenance(inputs, backends),
            triggers=recovery.triggers if verdict.untargeted is None else verdict.untargeted,
            cost=cost,
            untargeted=verdict.untargeted is not None,
        )

    @staticmethod
    def load(directory: str | os.PathLike) -> ScanReport:
        """Read a report written by ``write_outputs`` (with its recovered triggers)."""
        directory = Path(directory)
        try:
            data = json.loads((directory / "report.json").read_text())
            scan = data.get("scan", data)
            classes = [ClassResult(**c) for c in scan["classes"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"cannot read a baerase report from {directory}: {exc}") from None
        triggers = None
        if (directory / "triggers.safetensors").exists():
            from safetensors.torch import load_file

            meta = json.loads((directory / "triggers.json").read_text())
            triggers = families.from_state(meta, load_file(str(directory / "triggers.safetensors")))
        return ScanReport(
            classes=classes,
            num_classes=scan["num_classes"],
            image_shape=tuple(scan["image_shape"]),
            family=scan["family"],
            backend=scan["backend"],
            config=scan["config"],
            seconds=scan["seconds"],
            provenance=scan.get("provenance", {}),
            triggers=triggers,
            cost=Cost.from_dict(scan.get("cost")),
            cut_short=scan.get("cut_short"),
            untargeted=scan.get("untargeted", False),
        )


UNCHANGED = (
    "The model is returned unchanged: no unlearning step both stayed within the accuracy guard "
    "(config.unlearning.max_accuracy_drop) and weakened the recovered triggers, so the backdoor remains. More clean "
    "images, or a larger allowed drop, give unlearning room."
)


@dataclass
class EraseResult:
    """Result of ``baerase.erase``: the repaired copy of the model and the evidence."""

    model: nn.Module
    history: list[dict]  # per guard evaluation: step, clean_accuracy, trigger_asr (round added)
    erased: list[int]  # classes unlearned
    verified: bool  # a fresh scan of the repaired model no longer finds these backdoors
    evidence: list[dict]  # per erased class: the re-scan's attack_success, trigger_norm, anomaly_index
    accuracy_before: float  # clean accuracy on the held-out validation split
    accuracy_after: float
    trigger_asr_before: float  # recovered-trigger attack success on the validation split
    trigger_asr_after: float
    rounds: int
    seconds: float
    num_classes: int = 0
    rolled_back: int = 0  # unlearning steps undone because they produced NaN/inf
    changed: bool = True  # False: no unlearning step was kept (see UNCHANGED); model is the input's copy
    cost: Cost = field(default_factory=Cost)  # images through the suspect model and seconds, per phase
    # Why the erase ended early (the budget ran out, or the scan was cut short): ``model`` is the best
    # checkpoint the guard kept (or the input's copy, ``changed`` False), and it is not verified.
    cut_short: str | None = None

    def to_dict(self) -> dict:
        keys = (
            "erased",
            "verified",
            "cut_short",
            "changed",
            "evidence",
            "accuracy_before",
            "accuracy_after",
            "trigger_asr_before",
            "trigger_asr_after",
            "rounds",
            "history",
        )
        out = {k: getattr(self, k) for k in keys}
        out["seconds"] = round(self.seconds, 3)
        out["cost"] = self.cost.to_dict()
        return _jsonable(out)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        if self.cut_short and not self.erased:
            return f"Nothing erased: {self.cut_short}."
        if not self.erased:
            return "Nothing to erase: no class was flagged."
        state = (
            "verified: a re-scan finds no backdoor"
            if self.verified
            else "NOT verified: cut short before a re-scan cleared it"
            if self.cut_short
            else "NOT verified: a re-scan still finds a trigger"
        )
        text = (
            f"Erased classes {self.erased} in {self.rounds} round(s), {self.seconds:.1f}s; {state}.\n"
            f"Validation clean accuracy {self.accuracy_before:.3f} -> {self.accuracy_after:.3f}; "
            f"recovered-trigger success {self.trigger_asr_before:.3f} -> {self.trigger_asr_after:.3f}."
        )
        if self.cut_short:
            kept = "the best checkpoint the accuracy guard kept" if self.changed else "the input model, unchanged"
            text += f"\nCut short, {self.cut_short}: the model is {kept}."
        elif not self.changed:
            text += f"\n{UNCHANGED}"
        return text + "\n\nCost (images through the suspect model):\n" + self.cost.table(self.num_classes)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


def sha256_tensors(*tensors: torch.Tensor) -> str:
    """Hash of tensors' contents (for the audit trail)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sha256_model(model: nn.Module) -> str:
    return sha256_tensors(*(v for v in model.state_dict().values() if isinstance(v, torch.Tensor)))


def _png(array: np.ndarray, path: Path, scale: int) -> None:
    from PIL import Image

    image = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    image = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    pil = Image.fromarray(image)
    pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST).save(path)


@torch.no_grad()
def _trigger_images(report: ScanReport, images: torch.Tensor, folder: Path) -> None:
    """Per class: the mask (mask family), one generated trigger and one stamped image."""
    triggers = report.triggers
    folder.mkdir()
    n = min(8, len(images))
    with rng.seeded(0):  # the same pictures every time, and the caller's global RNG untouched
        _, g = triggers.sample(max(n, 2))  # the generator's batch statistics need two samples
        stamped = triggers.stamp(images[:n].to(g.device), g[:, :n])
    scale = max(1, 128 // max(report.image_shape[1:]))
    c, h, w = report.image_shape
    for i, target in enumerate(triggers.targets.tolist()):
        name = "untargeted" if target == UNTARGETED else f"class_{target}"
        _png(stamped[i, 0].cpu().numpy(), folder / f"{name}_stamped.png", scale)
        if triggers.family == "mask":
            _png(torch.sigmoid(triggers.mask_logits[i]).cpu().numpy(), folder / f"{name}_mask.png", scale)
            _png(g[i, 0].view(c, h, w).cpu().numpy(), folder / f"{name}_pattern.png", scale)
        elif triggers.family == "warp":
            shift = triggers.displacement()[i : i + 1] / triggers.meta["max_shift"]
            _png(shift.detach().cpu().numpy(), folder / f"{name}_displacement.png", scale)
        elif triggers.family == "blend":
            _png(g[i, 0, 1].expand(c, h, w).cpu().numpy(), folder / f"{name}_level.png", scale)
        else:
            p = triggers.meta["patch_size"]
            _png(g[i, 0].view(c, p, p).cpu().numpy(), folder / f"{name}_patch.png", scale * 4)


def write_outputs(
    out_dir: str | os.PathLike,
    report: ScanReport,
    images: torch.Tensor,
    result: EraseResult | None = None,
    overwrite: bool = False,
) -> Path:
    """Write report.json, report.md, trigger PNGs, the recovered triggers and (after an erase) the
    repaired model to ``out_dir``, all or nothing: everything is written to a temporary folder
    beside it and renamed into place. An existing ``out_dir`` is replaced only with ``overwrite``,
    and only if it is empty or an earlier baerase output; if anything fails, it is left as it was.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).resolve()
    check_output_dir(out, overwrite)
    model_state = None
    if result is not None:
        model_state = {k: v.detach().cpu().contiguous() for k, v in result.model.state_dict().items()}
        broken = [k for k, v in model_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if broken:
            raise DivergenceError(
                f"the repaired model has NaN/inf weights ({', '.join(broken[:3])}); nothing was written"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        document = {"scan": report.to_dict()}
        markdown = ["# baerase report", "", report.summary()]
        if result is not None:
            document["erase"] = result.to_dict()
            markdown += ["", "## Erase", "", result.summary()]
            save_file(model_state, str(staging / "model.safetensors"))
        (staging / "report.json").write_text(json.dumps(document, indent=2))
        (staging / "report.md").write_text("\n".join(markdown) + "\n")
        write_html(staging / "report.html", report, images, result)
        if report.triggers is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in report.triggers.state_dict().items()}
            save_file(state, str(staging / "triggers.safetensors"))
            (staging / "triggers.json").write_text(json.dumps(report.triggers.meta))
            _trigger_images(report, images, staging / "triggers")
        _swap_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse an output path whose contents would be lost: anything without ``overwrite``, and even
    with it, anything but an empty directory or an earlier baerase output (report.json inside)."""
    if not (out.exists() or out.is_symlink()):
        return
    if not overwrite:
        raise InputError(f"output directory {out} already exists; choose another or pass overwrite=True (--overwrite)")
    if out.is_symlink() or not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory; choose another path")
    if any(out.iterdir()) and not (out / "report.json").is_file():
        raise InputError(
            f"refusing to replace {out}: it is not empty and holds no baerase report.json, so it is not an "
            "earlier baerase output; choose a new directory"
        )


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and put back if the
    rename fails, so at every moment either the old or the new output is complete."""
    if not out.exists():
        os.replace(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, retired)  # onto an empty directory: atomic on POSIX
    try:
        os.replace(staging, out)
    except BaseException:
        os.replace(retired, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def provenance(inputs, backends: dict[str, str]) -> dict:
    """What a reader needs to reproduce or trust a result: versions, backends, settings, hashes."""
    import platform

    from . import __version__
    from .models.io import sha256_file, source_of

    record = {
        "baerase": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(inputs.device),
        "backends": dict(backends),
        "seed": inputs.config.run.seed,
        "config": inputs.config.to_dict(),
        "model_sha256": sha256_model(inputs.model),
        "data_sha256": sha256_tensors(inputs.images, inputs.labels),
    }
    if inputs.device.type == "cuda":
        record["cuda"] = torch.version.cuda
        record["gpu"] = torch.cuda.get_device_name(inputs.device)
    source = source_of(inputs.model)  # set when the model came from baerase.models.load_model
    if source is not None and os.path.isfile(source):
        record["model_file"], record["model_file_sha256"] = source, sha256_file(source)
    return record
