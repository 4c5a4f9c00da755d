"""Command line: ``baerase demo | scan | erase | audit``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from . import __version__
from .config import FAMILIES, PRESETS, Config
from .errors import BaeraseError, InputError


def _parse_normalize(text: str | None):
    if not text:
        return None
    try:
        mean, std = (tuple(float(v) for v in part.split(",")) for part in text.split(":"))
    except ValueError:
        raise InputError(
            f"--normalize wants MEAN:STD with comma-separated channels, e.g. "
            f"0.49,0.48,0.45:0.25,0.24,0.26; got {text!r}"
        ) from None
    return mean, std


def _parse_kwargs(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise InputError(f"--arch-arg wants KEY=VALUE, got {pair!r}")
        try:
            out[key] = int(value)
        except ValueError:
            try:
                out[key] = float(value)
            except ValueError:
                out[key] = value
    return out


def _config(args) -> Config:
    changes = {
        k: getattr(args, k)
        for k in (
            "steps",
            "family",
            "seed",
            "backend",
            "device",
            "universal_eps",
            "threads",
            "max_seconds",
            "max_model_images",
        )
        if getattr(args, k, None) is not None
    }
    if "threads" not in changes:
        from .threads import default_threads

        changes["threads"] = default_threads()  # the CPUs this process may use, not the machine's
    if getattr(args, "classes", None):
        try:
            changes["classes"] = tuple(int(c) for c in args.classes.split(","))
        except ValueError:
            raise InputError(f"--classes wants comma-separated class indices, e.g. 0,3; got {args.classes!r}") from None
    changes["progress"] = not args.quiet and sys.stderr.isatty()  # bars only where someone watches
    return PRESETS[args.preset](**changes)


def _check_out(args) -> None:
    """Fail before the long computation, not after it, if the output directory cannot be used, and
    never replace a directory that holds the inputs."""
    from pathlib import Path

    from .report import check_output_dir

    if not args.out:
        return
    out = Path(args.out).resolve()
    check_output_dir(out, args.overwrite)
    for name in ("model", "data"):
        value = getattr(args, name, None)
        if value and Path(value).exists() and Path(value).resolve().is_relative_to(out):
            raise InputError(f"--out {args.out} would replace the input {value}; choose another output directory")


def _record_sources(report, args) -> None:
    """Add the data file's hash to the audit trail (the model file's is added by the scan)."""
    from pathlib import Path

    from .models import sha256_file

    report.provenance.update(getattr(args, "model_provenance", {}))  # set by _load_inputs
    if Path(args.data).is_file():
        report.provenance.update(data_file=str(Path(args.data).resolve()), data_file_sha256=sha256_file(args.data))


def _load_inputs(args):
    from .data import load_dataset
    from .models import load_model, resolve_normalize

    _check_out(args)
    model = load_model(args.model, args.arch, trust_pickle=args.trust_pickle, **_parse_kwargs(args.arch_arg))
    if args.device is not None:
        model = model.to(args.device)  # a loaded model is our own copy; the file is untouched
    images, labels = load_dataset(args.data)
    # Without --normalize, a torchvision/timm/hub model gets its library's mean/std.
    given = _parse_normalize(args.normalize)
    normalize, args.model_provenance = resolve_normalize(model, tuple(images.shape[1:]), given)
    return model, images, labels, normalize


def _cmd_scan(args) -> int:
    from .api import scan
    from .report import write_outputs

    model, images, labels, normalize = _load_inputs(args)
    report = scan(model, images, labels, normalize=normalize, config=_config(args))
    _record_sources(report, args)
    print(report.summary())
    if args.out:
        print(f"\nwrote {write_outputs(args.out, report, images, overwrite=args.overwrite)}")
    return 4 if report.cut_short else 0


def _cmd_erase(args) -> int:
    from .api import erase
    from .report import ScanReport, write_outputs

    model, images, labels, normalize = _load_inputs(args)
    report = ScanReport.load(args.report)
    result = erase(model, images, labels, report, normalize=normalize, config=_config(args))
    print(result.summary())
    print(f"\nwrote {write_outputs(args.out, report, images, result, overwrite=args.overwrite)}")
    return _status(result)


def _cmd_audit(args) -> int:
    from .api import audit
    from .report import write_outputs

    model, images, labels, normalize = _load_inputs(args)
    report, result = audit(model, images, labels, normalize=normalize, config=_config(args))
    _record_sources(report, args)
    print(report.summary() + "\n\n" + result.summary())
    print(
        "\nAudit cost (images through the suspect model):\n" + report.cost.merged(result.cost).table(report.num_classes)
    )
    print(f"\nwrote {write_outputs(args.out, report, images, result, overwrite=args.overwrite)}")
    return _status(result)


def _status(result) -> int:
    """An erase's exit status: 0 verified, 3 not verified, 4 cut short by its budget (no verdict)."""
    return 4 if result.cut_short else 0 if result.verified else 3


def _cmd_demo(args) -> int:
    from .demo import run_demo

    _check_out(args)
    return run_demo(
        attack=args.attack,
        target=args.target,
        out=args.out,
        overwrite=args.overwrite,
        config=_config(args),
        echo=print,
    )


def _cmd_audit_many(args) -> int:
    from .fleet import audit_many

    # The per-model status lines are notes of the baerase.fleet logger, printed by main's console logging.
    result = audit_many(
        args.models,
        args.out,
        data=args.data,
        arch=args.arch,
        arch_kwargs=_parse_kwargs(args.arch_arg),
        normalize=_parse_normalize(args.normalize),
        trust_pickle=args.trust_pickle,
        config=_config(args),
        engine="local" if args.no_ray else "auto",
        address=args.address,
        workers=args.workers,
        cpus_per_task=args.cpus_per_task or args.threads or 1,
        gpus_per_task=args.gpus_per_task,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    counts = ", ".join(f"{n} {status}" for status, n in result.counts.items() if n)
    print(f"{len(result.rows)} models ({counts}) in {result.seconds:.1f}s; wrote {result.out / 'summary.md'}")
    return 0 if not result.counts["error"] else 3


def _cmd_trojai(args) -> int:
    from .trojai import UNDECIDED, trojai_scan, write_probability

    try:
        probability, report = trojai_scan(
            args.model_filepath,
            args.scratch_dirpath,
            args.examples_dirpath,
            arch=args.arch,
            arch_kwargs=_parse_kwargs(args.arch_arg),
            normalize=_parse_normalize(args.normalize),
            trust_pickle=args.trust_pickle,
            config=_config(args),
        )
    except BaseException:
        write_probability(args.result_filepath, UNDECIDED)  # the harness reads a number whatever happens
        raise
    write_probability(args.result_filepath, probability)
    print(f"{probability:.6f} (flagged classes: {report.flagged or 'none'})")
    return 0


def _common(p: argparse.ArgumentParser, needs_out: bool) -> None:
    p.add_argument(
        "model",
        help="model file: safetensors / .pt state dict (needs --arch), TorchScript, "
        "a pickled model with --trust-pickle, or a timm model on the Hugging Face hub (hf://ORG/REPO)",
    )
    p.add_argument(
        "--arch",
        help="architecture: a registry name (small_cnn, resnet18), torchvision:NAME, timm:NAME or module:callable",
    )
    p.add_argument(
        "--arch-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument for the architecture, e.g. num_classes=10 (repeatable)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="clean hold-out data: .npz, image folder, CIFAR batches, "
        "GTSRB folder, idx file, or a built-in name (mnist, colour10)",
    )
    p.add_argument(
        "--normalize",
        help="per-channel MEAN:STD applied before the model, e.g. 0.5,0.5,0.5:0.25,0.25,0.25 "
        "(default: a torchvision/timm/hub model's own)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a full pickled model (runs code from the file)",
    )
    p.add_argument("--out", required=needs_out, help="output directory (report.json, report.md, triggers, model)")
    _options(p)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="fast",
        help="fast default, the paper's settings, or short-erase (cheaper unlearning rounds, weaker on some backdoors)",
    )
    p.add_argument("--steps", type=int, help="recovery steps per class")
    p.add_argument(
        "--family",
        choices=list(FAMILIES),
        help="trigger family (mask, the default, falls back to warp, then blend, when it flags nothing)",
    )
    p.add_argument("--classes", help="comma-separated candidate target classes (default: all)")
    p.add_argument("--backend", choices=["auto", "triton", "cpp", "ref"], help="force a compute backend")
    p.add_argument("--device", help="torch device (default: the model's)")
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--threads", type=int, help="CPU threads (default: the CPUs this process may use, or OMP_NUM_THREADS)"
    )
    p.add_argument(
        "--universal-eps",
        type=float,
        help="L-inf radius of the universal perturbation per flagged class "
        "unlearned with the recovered triggers (default 0.1; 0: off)",
    )
    p.add_argument("--max-seconds", type=float, help="wall-time budget; past it the run ends, cut short (exit 4)")
    p.add_argument(
        "--max-model-images", type=int, help="budget of images through the suspect model; past it, as --max-seconds"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress notes (warnings still show)")


def _add_fleet(sub) -> None:
    p = sub.add_parser("audit-many", help="audit a fleet of models, one task per model (on Ray when installed)")
    p.add_argument("models", nargs="+", help="model files, directories of them, or a manifest (.jsonl / .csv)")
    p.add_argument("--out", required=True, help="output directory: one audit folder per model and summary.*")
    p.add_argument("--data", help="clean hold-out data for every model a manifest row gives none for")
    p.add_argument("--arch", help="architecture for every model a manifest row gives none for")
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE", help="architecture argument")
    p.add_argument("--normalize", help="per-channel MEAN:STD applied before every model")
    p.add_argument("--trust-pickle", action="store_true", help="allow full pickled models (runs code from them)")
    p.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    p.add_argument("--workers", type=int, help="most models audited at once (default: what the cluster fits)")
    p.add_argument("--cpus-per-task", type=int, help="CPUs (and torch threads) per model (default: --threads or 1)")
    p.add_argument("--gpus-per-task", type=float, help="GPUs per model (default: 1 where the cluster has GPUs)")
    p.add_argument("--no-ray", action="store_true", help="audit the models one after another in this process")
    _options(p)
    p.set_defaults(func=_cmd_audit_many)


def _add_trojai(sub) -> None:
    p = sub.add_parser("trojai", help="TrojAI harness: write the probability that a model is poisoned")
    p.add_argument("--model_filepath", required=True, help="model.pt: a pickled model or a state dict (--arch)")
    p.add_argument("--result_filepath", required=True, help="file the probability is written to")
    p.add_argument("--scratch_dirpath", required=True, help="folder for the scan's report")
    p.add_argument("--examples_dirpath", required=True, help="folder of clean example images with labels")
    for name in (
        "--round_training_dataset_dirpath",
        "--metaparameters_filepath",
        "--schema_filepath",
        "--learned_parameters_dirpath",
        "--source_dataset_dirpath",
    ):
        p.add_argument(name, help=argparse.SUPPRESS)  # passed by the harness; a scan needs none of them
    p.add_argument("--arch", help="architecture when model.pt holds a state dict")
    p.add_argument("--arch-arg", action="append", default=[], metavar="KEY=VALUE", help="architecture argument")
    p.add_argument("--normalize", help="per-channel MEAN:STD applied before the model")
    p.add_argument("--trust-pickle", action="store_true", help="allow a full pickled model (runs code from the file)")
    _options(p)
    p.set_defaults(func=_cmd_trojai)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baerase", description="Find and erase backdoors in image classifiers.")
    parser.add_argument("--version", action="version", version=f"baerase {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a backdoored MNIST model, scan it, erase the backdoor")
    demo.add_argument("--attack", choices=["badnets", "blended", "trojan"], default="badnets")
    demo.add_argument("--target", type=int, default=0)
    demo.add_argument("--out", help="also write the report and repaired model here")
    _options(demo)
    demo.set_defaults(func=_cmd_demo)
    for name, func, help_, needs_out in (
        ("scan", _cmd_scan, "recover triggers and flag backdoored classes", False),
        ("erase", _cmd_erase, "unlearn the classes flagged in a scan report", True),
        ("audit", _cmd_audit, "scan then erase", True),
    ):
        p = sub.add_parser(name, help=help_)
        _common(p, needs_out)
        if name == "erase":
            p.add_argument("--report", required=True, help="output directory of an earlier scan")
        p.set_defaults(func=func)
    _add_fleet(sub)
    _add_trojai(sub)
    return parser


class _ConsoleFormat(logging.Formatter):
    """Notes as they are; warnings and errors named as such, as the one-line errors are."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"baerase: {record.levelname.lower()}: {message}"


@contextmanager
def _console_logging(quiet: bool) -> Iterator[None]:
    """The library's log records on stderr while a command runs (notes unless ``quiet``, warnings
    always); the ``baerase`` logger is left as it was afterwards."""
    logger, handler = logging.getLogger("baerase"), logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ConsoleFormat())
    level = logger.level
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _console_logging(getattr(args, "quiet", False)):
            return args.func(args)
    except (BaeraseError, OSError) as exc:
        # One line: scanners parse stderr, and a traceback says nothing the message does not.
        print(f"baerase: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("baerase: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
