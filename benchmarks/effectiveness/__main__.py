"""``python -m benchmarks.effectiveness [--grid small|full] [--data PATH]``: see ``benchmarks/effectiveness``."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from .grid import GRIDS
from .report import write
from .run import run_cell

NOTES = [
    (
        "Data: 70% of the images train the model; the defender gets `budget x |train|` images from the "
        "other 30%, and every defense of a cell gets the same images and the same model; the rest "
        "(after the largest budget, 10%) is the evaluation set."
    ),
    (
        "Peer tool: adversarial-robustness-toolbox 1.20 installs and imports offline, but its Neural "
        "Cleanse (art.defences.transformer.poisoning.NeuralCleanse) accepts only Keras classifiers and "
        "raises NotImplementedError on a PyTorchClassifier, so it cannot run on these models (row "
        "`art_nc`, full grid). The in-repo `neural_cleanse` baseline follows the paper instead."
    ),
]


def _source_state() -> str:
    """The commit the numbers come from, and whether baerase/ had uncommitted edits when they were taken."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "baerase"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (" with uncommitted changes under baerase/" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.effectiveness", description=__doc__)
    ap.add_argument("--grid", choices=sorted(GRIDS), default="small")
    ap.add_argument("--data", help="a data set for baerase.data.load_dataset (idx, CIFAR batches, GTSRB...)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "results"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a shared machine)")
    ap.add_argument("--cells", help="run only cells whose name contains one of these comma-separated texts")
    ap.add_argument("--defenses", help="comma-separated subset of defenses")
    ap.add_argument("--epochs", type=int, help="override training epochs (quick checks)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cells = GRIDS[args.grid](f"file:{args.data}" if args.data else None)
    if args.cells:
        cells = [c for c in cells if any(part in c.name for part in args.cells.split(","))]
    if args.epochs:
        import dataclasses

        cells = [dataclasses.replace(c, epochs=args.epochs) for c in cells]
    only = set(args.defenses.split(",")) if args.defenses else None
    stem = "effectiveness" if args.grid == "small" else f"effectiveness_{args.grid}"
    meta = {
        "grid": args.grid,
        "threads": args.threads,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "notes": NOTES,
        "seconds": 0.0,
    }
    meta["baerase_source"] = _source_state()
    start, rows = time.perf_counter(), []
    for cell in cells:
        rows.append(run_cell(cell, log=lambda s: print(s, flush=True), only=only))
        meta["seconds"] = time.perf_counter() - start
        paths = write(rows, meta, Path(args.out), stem)  # after every cell: a long run leaves partial results
    print("wrote", *map(str, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
