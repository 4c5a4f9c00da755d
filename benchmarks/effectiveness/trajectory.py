"""An erase's trajectory: at each guard evaluation, what the guard sees beside the real trigger on the test split.

    python -m benchmarks.effectiveness.trajectory "mnist/small_cnn/badnets7/p5%-t1/b10%/s0"

Each argument names a cell of a grid (``--grid full``, ``beyond``, ``small`` or ``drawn``) as the grid
runner prints it. The cell's model is trained, scanned and erased at default settings, as the grid
does; at every guard evaluation of every round it prints the guard's view (held-out accuracy, share of
the original's right answers broken, the recovered triggers' success) beside the real trigger's attack
success and the clean accuracy on the cell's test split, and which checkpoint the guard holds. It shows
where an erase's margin goes: a real trigger that lags the recovered one, or accuracy the guard's few
hundred images cannot see.
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch

import baerase
from baerase.unlearn import loop
from baerase.unlearn.guard import Guard

from .grid import GRIDS, Cell
from .run import measure, splits, train


def find(name: str) -> Cell:
    """The grid cell called ``name``."""
    for grid in GRIDS.values():
        for cell in grid():
            if cell.name == name:
                return cell
    raise ValueError(f"no grid cell is called {name!r}")


def watched(test_xy, trig, target: int) -> type[Guard]:
    """A guard that prints each checkpoint it judges beside the real trigger's success on ``test_xy``."""

    class Watched(Guard):
        def accept(self, row: dict):
            accuracy, asr = measure(self.model, test_xy, trig, target)  # the checkpoint, before any search
            judged = super().accept(row)
            print(
                f"step {row['step']:4d} | guard: accuracy {row['clean_accuracy']:.3f} broken {row['broken']:.3f} "
                f"recovered {row['trigger_asr']:.3f} | test: accuracy {accuracy:.4f} real trigger {asr:.4f} "
                f"| held: step {self.best['step']} share {self.best.get('share', 1.0)}",
                flush=True,
            )
            return judged

    return Watched


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.effectiveness.trajectory", description=__doc__)
    ap.add_argument("cells", nargs="+", help='grid cell names, e.g. "mnist/small_cnn/badnets7/p5%%-t1/b10%%/s0"')
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    try:
        cells = [find(name) for name in args.cells]
    except ValueError as exc:
        ap.error(f"{exc}; the grid runner prints the names (python -m benchmarks.effectiveness --grid ...)")
    for cell in cells:
        train_xy, (x, y), test_xy = splits(cell)
        model, trig = train(cell, train_xy, int(max(train_xy[1].max(), test_xy[1].max())) + 1)
        ca, asr = measure(model, test_xy, trig, cell.target)
        print(f"{cell.name}: test accuracy {ca:.4f}, real trigger {asr}", flush=True)
        config = baerase.Config(seed=cell.seed, progress=False)
        report = baerase.scan(model, x, y, config=config)
        print(f"flagged {report.flagged}", flush=True)
        with mock.patch.object(loop, "Guard", watched(test_xy, trig, cell.target)):
            result = baerase.erase(model, x, y, report, config=config)
        ca_after, asr_after = measure(result.model, test_xy, trig, cell.target)
        print(f"after: test accuracy {ca_after:.4f} ({ca_after - ca:+.4f}), real trigger {asr_after}, "
              f"{result.rounds} round(s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
