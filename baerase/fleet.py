"""Audit a fleet of models: one task per model, on Ray or one after another in this process.

``audit_many(models, out)`` runs ``baerase.audit`` on every model exactly as ``baerase audit``
does (same loaders, same outputs) and writes a summary of the fleet sorted by suspicion:

- **Engines.** ``engine="ray"`` submits one Ray task per model (``ray.init()`` starts a local
  cluster unless one is running or ``address`` names one), with one GPU per task where the cluster
  has GPUs and ``cpus_per_task`` CPUs otherwise; ``workers`` caps the tasks in flight. A worker
  that dies is retried once, then the model is reported as failed. ``engine="local"`` runs the same
  tasks one after another in this process; ``"auto"`` takes Ray when it is installed. Both give the
  same summary apart from its timing fields (``TIMING_FIELDS``).
- **Resumable.** A model whose directory already holds a finished audit of the same model file
  (sha256 recorded in the report's provenance) and data is not audited again; its report is read
  into the summary with status ``skipped-resumed``. A killed fleet run, started again, audits the rest.
- **Isolated.** A model that fails (unreadable file, wrong architecture, NaN weights, any error)
  gets an ``error`` row with the reason, and the others go on.
- **Outputs** under ``out``: ``<name>/`` per model (report.json, report.md, triggers, repaired
  model), and ``summary.json``, ``summary.csv``, ``summary.md``.

Every path (models, data, ``out``) must be visible to every node of the cluster.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .cost import Cost
from .errors import BaeraseError, InputError, LoadError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ts")
MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv")
OK, RESUMED, ERROR = "ok", "skipped-resumed", "error"
FIELDS = (
    "name",
    "status",
    "reason",
    "flagged",
    "max_anomaly_index",
    "asr_before",
    "asr_after",
    "accuracy_before",
    "accuracy_after",
    "accuracy_change",
    "verified",
    "scan_images_per_class",
    "audit_images_per_class",
    "num_classes",
    "sha256",
    "model",
    "seconds",
)
TIMING_FIELDS = ("seconds",)  # differ between runs; everything else is the same on every engine
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelSpec:
    """One model of a fleet: its file, architecture, clean data and normalisation."""

    model: str
    data: str
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    normalize: tuple | None = None
    name: str = ""
    trust_pickle: bool = False


@dataclass
class FleetResult:
    """What ``audit_many`` returns: one row per model (``FIELDS``), most suspicious first."""

    rows: list[dict]
    engine: str
    seconds: float
    out: Path

    @property
    def counts(self) -> dict[str, int]:
        return {status: sum(r["status"] == status for r in self.rows) for status in (OK, RESUMED, ERROR)}

    @property
    def models_per_hour(self) -> float:
        """Models audited in this run (resumed ones not counted) per hour of wall time."""
        return self.counts[OK] * 3600 / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        run = {"engine": self.engine, "seconds": round(self.seconds, 3), "models_per_hour": self.models_per_hour}
        return {"counts": self.counts, "run": run, "models": self.rows}


# ---- reading the list of models ----------------------------------------------------------------------------


def read_models(
    models: PathLike | Iterable[PathLike | ModelSpec | dict],
    *,
    data: str | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    normalize: Any = None,
    trust_pickle: bool = False,
) -> list[ModelSpec]:
    """The fleet as ``ModelSpec``s: from model files, directories of them, manifests (JSON lines or
    CSV with columns model, arch, data, normalize, arch_kwargs, name), dicts or specs. ``data``,
    ``arch``, ``arch_kwargs`` and ``normalize`` are defaults a manifest row may override."""
    defaults = {"data": data, "arch": arch, "arch_kwargs": arch_kwargs or {}, "normalize": normalize}
    items = [models] if isinstance(models, (str, os.PathLike)) else list(models)
    specs: list[ModelSpec] = []
    for item in items:
        if isinstance(item, ModelSpec):
            specs.append(item)
        elif isinstance(item, dict):
            specs.append(_spec(item, defaults, None, trust_pickle))
        else:
            specs += [_spec(row, defaults, base, trust_pickle) for row, base in _expand(Path(item))]
    if not specs:
        raise InputError(f"no models to audit in {models!r}")
    _check_names(specs)
    return specs


def _expand(path: Path) -> list[tuple[dict, Path | None]]:
    """(manifest row, folder relative paths start from) for one path: a directory, manifest or model file."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no model files ({', '.join(MODEL_SUFFIXES)}) in this directory")
        return [({"model": str(p)}, None) for p in files]
    if path.suffix.lower() in MANIFEST_SUFFIXES:
        return [(row, path.parent) for row in _manifest_rows(path)]
    return [({"model": str(path)}, None)]


def _manifest_rows(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"cannot read the manifest {path}: {exc}") from None
    if path.suffix.lower() == ".csv":
        rows = [
            {k.strip(): v for k, v in row.items() if k and v not in (None, "")}
            for row in csv.DictReader(io.StringIO(text))
        ]
    else:
        rows = _json_rows(text, path)
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("model"):
            raise InputError(
                f"{path}: entry {i} has no 'model' (each entry: model, arch, data, normalize, arch_kwargs)"
            )
    return rows


def _json_rows(text: str, path: Path) -> list:
    stripped = text.strip()
    try:
        if stripped.startswith("["):  # one JSON list of objects
            return json.loads(stripped)
        lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return [json.loads(line) for line in lines]
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: not JSON lines ({exc}); write one JSON object per line") from None


def _spec(row: dict, defaults: dict, base: Path | None, trust_pickle: bool) -> ModelSpec:
    unknown = set(row) - {"model", "data", "arch", "arch_kwargs", "normalize", "name"}
    if unknown:
        raise InputError(f"model entry {row!r}: unknown keys {sorted(unknown)}")
    model = _relative(str(row["model"]), base)
    data = row.get("data") or defaults["data"]
    if not data:
        raise InputError(f"{model}: no clean data; pass data= (CLI: --data) or give a 'data' column in the manifest")
    kwargs = {**defaults["arch_kwargs"], **_arch_kwargs(row.get("arch_kwargs"), model)}
    return ModelSpec(
        model=model,
        data=_relative(str(data), base),
        arch=row.get("arch") or defaults["arch"],
        arch_kwargs=kwargs,
        normalize=parse_normalize(row.get("normalize", defaults["normalize"])),
        name=str(row.get("name") or Path(model).stem),
        trust_pickle=trust_pickle,
    )


def _relative(value: str, base: Path | None) -> str:
    """Manifest paths are relative to the manifest's folder; built-in data names stay as they are."""
    if base is None or os.path.isabs(value) or not (base / value).exists():
        return value
    return str(base / value)


def _arch_kwargs(value: Any, model: str) -> dict:
    """A dict, a JSON object, or ``KEY=VALUE`` pairs separated by spaces or semicolons."""
    if value in (None, ""):
        return {}
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{model}: arch_kwargs is not a JSON object ({exc})") from None
    out = {}
    for pair in re.split(r"[;\s]+", text):
        key, sep, raw = pair.partition("=")
        if not sep:
            raise InputError(f"{model}: arch_kwargs wants KEY=VALUE pairs or a JSON object, got {value!r}")
        out[key] = _number(raw)
    return out


def _number(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_normalize(value: Any) -> tuple | None:
    """``"MEAN:STD"`` (comma-separated channels, as the CLI's --normalize), ``[mean, std]``,
    ``{"mean": ..., "std": ...}`` or None -> ``(mean, std)`` tuples or None."""
    if value in (None, ""):
        return None
    if isinstance(value, dict) and set(value) == {"mean", "std"}:
        value = (value["mean"], value["std"])
    if isinstance(value, str):
        try:
            value = tuple(tuple(float(v) for v in part.split(",")) for part in value.split(":"))
        except ValueError:
            value = ()
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InputError(
            f"normalize wants MEAN:STD with comma-separated channels, e.g. 0.5,0.5,0.5:0.25,0.25,0.25; got {value!r}"
        )
    return tuple(tuple(v) if isinstance(v, (list, tuple)) else (v,) for v in value)


def _check_names(specs: list[ModelSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        if not _NAME.match(spec.name):
            raise InputError(f"model name {spec.name!r} cannot name a folder; use letters, digits, '.', '_' and '-'")
        if spec.name in seen:
            raise InputError(
                f"two models are named {spec.name!r} ({seen[spec.name]} and {spec.model}); "
                "give each a 'name' in a manifest"
            )
        seen[spec.name] = spec.model


# ---- one task: audit one model ----------------------------------------------------------------------------


def audit_one(spec: ModelSpec, folder: str, sha256: str, config: Config, overwrite: bool) -> dict:
    """Audit one model as ``baerase audit`` does, write its outputs to ``folder`` and return its
    summary row; any failure becomes an ``error`` row. Runs in a Ray worker or in this process."""
    start = time.perf_counter()
    try:
        document = _audit(spec, folder, config, overwrite)
    except Exception as exc:
        return error_row(spec, sha256, exc)
    return row_of(spec, sha256, OK, document, time.perf_counter() - start)


def _audit(spec: ModelSpec, folder: str, config: Config, overwrite: bool) -> dict:
    import torch

    from .api import audit
    from .data import load_dataset
    from .models import load_model, resolve_normalize, sha256_file
    from .report import write_outputs

    device = config.run.device or ("cuda" if torch.cuda.is_available() else None)
    model = load_model(spec.model, spec.arch, trust_pickle=spec.trust_pickle, **spec.arch_kwargs)
    if device is not None:
        model, config = model.to(device), config.replace(device=device)
    images, labels = load_dataset(spec.data)
    # As `baerase audit`: without a normalisation, a torchvision/timm/hub model gets its library's.
    normalize, record = resolve_normalize(model, tuple(images.shape[1:]), spec.normalize)
    report, result = audit(model, images, labels, normalize=normalize, config=config)
    report.provenance.update(record)
    if Path(spec.data).is_file():  # the data file's hash joins the audit trail
        report.provenance.update(data_file=str(Path(spec.data).resolve()), data_file_sha256=sha256_file(spec.data))
    write_outputs(folder, report, images, result, overwrite=overwrite)
    return {"scan": report.to_dict(), "erase": result.to_dict()}


def row_of(spec: ModelSpec, sha256: str, status: str, document: dict, seconds: float) -> dict:
    """The summary row of a finished audit from its report document (report.json's content)."""
    scan, erase = document["scan"], document["erase"]
    k = scan["num_classes"]
    scan_cost = Cost.from_dict(scan.get("cost"))
    before, after = erase["accuracy_before"], erase["accuracy_after"]
    return _row(
        spec,
        sha256,
        status,
        flagged=list(scan["flagged"]),
        max_anomaly_index=round(max((c["anomaly_index"] for c in scan["classes"]), default=0.0), 6),
        asr_before=erase["trigger_asr_before"],
        asr_after=erase["trigger_asr_after"],
        accuracy_before=before,
        accuracy_after=after,
        accuracy_change=round(after - before, 6),
        verified=erase["verified"],
        scan_images_per_class=round(scan_cost.per_class(k), 1),
        audit_images_per_class=round(scan_cost.merged(Cost.from_dict(erase.get("cost"))).per_class(k), 1),
        num_classes=k,
        seconds=round(seconds, 3),
    )


def error_row(spec: ModelSpec, sha256: str, exc: BaseException | str) -> dict:
    if isinstance(exc, BaseException):
        text = " ".join(str(exc).split())
        # errors baerase raises on purpose carry their own wording; others are named by their type
        exc = text if isinstance(exc, BaeraseError) else f"{type(exc).__name__}: {text}"
    return _row(spec, sha256, ERROR, reason=exc[:500])


def _row(spec: ModelSpec, sha256: str, status: str, **values) -> dict:
    row = dict.fromkeys(FIELDS)
    model = os.path.abspath(spec.model) if os.path.exists(spec.model) else spec.model  # hf://... stays as it is
    row.update(name=spec.name, status=status, reason="", sha256=sha256, model=model)
    row.update(values)
    return row


# ---- resuming ---------------------------------------------------------------------------------------------


class _Hashes:
    """sha256 of model and data files, each read once per fleet run."""

    def __init__(self) -> None:
        self._known: dict[str, str] = {}

    def __call__(self, path: str) -> str:
        from .models import sha256_file

        key = os.path.realpath(path)
        if key not in self._known:
            self._known[key] = sha256_file(path)
        return self._known[key]


def finished(folder: Path, spec: ModelSpec, sha256: str, hashes: _Hashes) -> dict | None:
    """The report document in ``folder`` if it is a finished audit of this model file and data, else None."""
    try:
        document = json.loads((folder / "report.json").read_text())
        provenance = document["scan"]["provenance"]
        done = "erase" in document and provenance.get("model_file_sha256") == sha256
    except (OSError, ValueError, KeyError, TypeError):
        return None
    recorded = provenance.get("data_file_sha256")
    if done and recorded is not None and Path(spec.data).is_file():
        done = recorded == hashes(spec.data)
    return document if done else None


@dataclass(frozen=True)
class _Job:
    spec: ModelSpec
    folder: str
    sha256: str
    overwrite: bool


def _plan(specs: list[ModelSpec], out: Path, redo: bool) -> tuple[list[dict], list[_Job]]:
    """(rows already known: resumed or unreadable models, jobs still to run)."""
    rows, jobs, hashes = [], [], _Hashes()
    for spec in specs:
        folder = out / spec.name
        try:
            sha = hashes(spec.model) if os.path.isfile(spec.model) else ""  # a hub model has no file to hash
        except BaeraseError as exc:
            rows.append(error_row(spec, "", exc))
            continue
        document = None if redo or not sha else finished(folder, spec, sha, hashes)
        if document is not None:
            seconds = document["scan"].get("seconds", 0.0) + document["erase"].get("seconds", 0.0)
            rows.append(row_of(spec, sha, RESUMED, document, seconds))
        else:
            jobs.append(_Job(spec, str(folder), sha, overwrite=folder.exists()))
    return rows, jobs


# ---- engines ----------------------------------------------------------------------------------------------


def has_ray() -> bool:
    return importlib.util.find_spec("ray") is not None


class LocalEngine:
    """The tasks one after another in this process."""

    name = "local"

    def run(self, jobs: list[_Job], config: Config) -> Iterator[dict]:
        for job in jobs:
            yield audit_one(job.spec, job.folder, job.sha256, config, job.overwrite)

    def close(self) -> None:
        pass


class RayEngine:
    """One Ray task per model; at most ``workers`` in flight (None: as many as the cluster fits)."""

    name = "ray"

    def __init__(
        self, address: str | None, workers: int | None, cpus_per_task: int, gpus_per_task: float | None, quiet: bool
    ) -> None:
        import ray

        self.ray, self.workers, self.started = ray, workers, False
        if not ray.is_initialized():
            options = {"logging_level": logging.WARNING if quiet else logging.INFO, "log_to_driver": not quiet}
            if address is None and not os.environ.get("RAY_ADDRESS"):
                options["include_dashboard"] = False  # a dashboard on a cluster started for one command is waste
            ray.init(address=address, **options)
            self.started = True
        if gpus_per_task is None:
            gpus_per_task = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        self.task = ray.remote(audit_one).options(num_cpus=cpus_per_task, num_gpus=gpus_per_task, max_retries=1)

    def run(self, jobs: list[_Job], config: Config) -> Iterator[dict]:
        queue, pending = iter(jobs), {}

        def submit() -> None:
            job = next(queue, None)
            if job is not None:
                pending[self.task.remote(job.spec, job.folder, job.sha256, config, job.overwrite)] = job

        for _ in range(self.workers or len(jobs)):
            submit()
        try:
            while pending:
                (ref,), _ = self.ray.wait(list(pending), num_returns=1)
                job = pending.pop(ref)
                submit()
                yield self._result(ref, job)
        finally:
            for ref in pending:  # interrupted: stop what is still running
                self.ray.cancel(ref, force=True)

    def _result(self, ref, job: _Job) -> dict:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the worker died, and died again on the retry
            return error_row(job.spec, job.sha256, f"the Ray worker failed twice: {' '.join(str(exc).split())}")

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def engine_kind(engine: str) -> str:
    """``"ray"`` or ``"local"``: what ``engine`` (``"auto"``, ``"ray"``, ``"local"``) runs on this machine."""
    if engine not in ("auto", "ray", "local"):
        raise InputError(f"engine must be 'auto', 'ray' or 'local', got {engine!r}")
    if engine == "ray" and not has_ray():
        raise InputError(
            "engine='ray' needs Ray: pip install 'baerase[ray]' (or run with engine='local', CLI --no-ray)"
        )
    return "ray" if engine != "local" and has_ray() else "local"


# ---- the fleet --------------------------------------------------------------------------------------------


def audit_many(
    models: PathLike | Iterable[PathLike | ModelSpec | dict],
    out: PathLike,
    *,
    data: str | None = None,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    normalize: Any = None,
    trust_pickle: bool = False,
    config: Config | None = None,
    engine: str = "auto",
    address: str | None = None,
    workers: int | None = None,
    cpus_per_task: int = 1,
    gpus_per_task: float | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_result: Callable[[dict], None] | None = None,
) -> FleetResult:
    """Audit every model of a fleet (see the module docstring) and write its outputs under ``out``.

    Args:
        models: model files, directories of them, manifests (``.jsonl``/``.json``/``.csv``), dicts
            or ``ModelSpec``s; see ``read_models``. ``data``, ``arch``, ``arch_kwargs`` and
            ``normalize`` apply to every model a manifest row does not give them for.
        config: the audit's settings; each task runs it with ``threads=cpus_per_task`` and no
            progress bars of its own.
        engine: ``"auto"`` (Ray when installed), ``"ray"`` or ``"local"`` (in this process).
        address: a Ray cluster to join (None: the running one, else a new local one).
        workers: most tasks in flight at once (None: as many as the cluster's resources allow).
        gpus_per_task: None: 1 where the cluster has GPUs, else 0.
        overwrite: audit again models that already have a finished report.
        on_result: called with each model's row as it finishes (resumed rows first).
    Returns:
        FleetResult with ``rows`` sorted by suspicion (flagged first, then by the largest anomaly
        index; errors last), ``counts``, ``models_per_hour``.
    """
    if not isinstance(cpus_per_task, int) or cpus_per_task < 1:
        raise InputError(f"cpus_per_task must be a positive integer, got {cpus_per_task!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise InputError(f"workers must be a positive integer or None, got {workers!r}")
    kind = engine_kind(engine)
    specs = read_models(
        models, data=data, arch=arch, arch_kwargs=arch_kwargs, normalize=normalize, trust_pickle=trust_pickle
    )
    config = (config or Config()).replace(threads=cpus_per_task, progress=False)
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    known, jobs = _plan(specs, out, overwrite)
    if kind == "ray" and jobs:  # a fleet that is all resumed needs no cluster
        runner = RayEngine(address, workers, cpus_per_task, gpus_per_task, quiet=not progress)
    else:
        runner = LocalEngine()
    rows, running = [], runner.run(jobs, config)
    try:
        for row in _tracked(itertools.chain(known, running), len(specs), progress):
            rows.append(row)
            if on_result is not None:
                on_result(row)
    finally:
        running.close()  # an interrupted run cancels the tasks still in flight
        runner.close()
    engine_ran = runner.name if jobs else "none"  # every model resumed or unreadable: nothing ran
    result = FleetResult(sorted(rows, key=suspicion), engine_ran, time.perf_counter() - start, out)
    write_summary(result)
    logger.info("fleet of %d models: %s in %.1fs", len(rows), _counted(result.counts), result.seconds)
    return result


def _tracked(rows: Iterator[dict], total: int, enabled: bool) -> Iterator[dict]:
    """The rows, with one progress bar over the models and a status line per model (logged, so the
    lines print above the bar)."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    # Only loggers that print to the console; a handler added to the others would print each line again.
    loggers = [lg for lg in (logging.getLogger(), logging.getLogger("baerase"), logger) if _prints(lg)]
    redirect = logging_redirect_tqdm(loggers=loggers) if enabled and loggers else contextlib.nullcontext()
    with tqdm(total=total, desc="baerase fleet", unit="model", disable=not enabled) as bar, redirect:
        for row in rows:
            logger.info("%s", status_line(row))
            bar.update(1)
            yield row


def _prints(log: logging.Logger) -> bool:
    return any(getattr(h, "stream", None) in (sys.stdout, sys.stderr) for h in log.handlers)


def status_line(row: dict) -> str:
    """One line per finished model: its status and verdict."""
    if row["status"] == ERROR:
        return f"{row['name']}: error: {row['reason']}"
    verdict = f"backdoored: classes {row['flagged']}" if row["flagged"] else "no backdoor found"
    return (
        f"{row['name']}: {row['status']}, {verdict}, max anomaly index {row['max_anomaly_index']:.2f}, "
        f"ASR {row['asr_before']:.3f} -> {row['asr_after']:.3f}, {row['seconds']:.1f}s"
    )


def suspicion(row: dict) -> tuple:
    """Sort key: flagged models first, then the largest anomaly index; errors last."""
    index = row["max_anomaly_index"]
    index = -math.inf if index is None or math.isnan(index) else index
    return (row["status"] == ERROR, not row["flagged"], -index, row["name"])


def _counted(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n)


# ---- summaries --------------------------------------------------------------------------------------------


def write_summary(result: FleetResult) -> None:
    """summary.json, summary.csv and summary.md in ``result.out``, each replaced atomically."""
    _atomic(result.out / "summary.json", json.dumps(result.to_dict(), indent=2))
    _atomic(result.out / "summary.csv", summary_csv(result.rows))
    _atomic(result.out / "summary.md", summary_markdown(result))


def summary_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(str(v) for v in value)
    return "" if value is None else value


def summary_markdown(result: FleetResult) -> str:
    lines = [
        "# baerase fleet audit",
        "",
        f"{len(result.rows)} models ({_counted(result.counts)}); engine {result.engine}, {result.seconds:.1f}s, "
        f"{result.models_per_hour:.1f} models per hour. Most suspicious first.",
        "",
        "| model | status | flagged | max anomaly index | ASR before -> after | accuracy change | images per class "
        "(scan / audit) | seconds |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        if row["status"] == ERROR:
            lines.append(f"| {row['name']} | error | | | | | | |")
            continue
        lines.append(
            f"| {row['name']} | {row['status']} | {_cell(row['flagged']) or '-'} | {row['max_anomaly_index']:.2f} "
            f"| {row['asr_before']:.3f} -> {row['asr_after']:.3f} | {row['accuracy_change']:+.3f} "
            f"| {row['scan_images_per_class']:,.0f} / {row['audit_images_per_class']:,.0f} | {row['seconds']:.1f} |"
        )
    errors = [row for row in result.rows if row["status"] == ERROR]
    if errors:
        lines += ["", "## Errors", ""] + [f"- {row['name']} ({row['model']}): {row['reason']}" for row in errors]
    return "\n".join(lines) + "\n"


def _atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
