"""``baerase demo``: a backdoored MNIST model found and repaired end to end, offline."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from .config import Config

log = logging.getLogger(__name__)


def _attack(name: str):
    from .attacks import BadNets, Blended, TrojanWatermark

    return {
        "badnets": lambda: BadNets(size=3, position="random", seed=1),
        "blended": lambda: Blended(pattern="sine", alpha=0.15),
        "trojan": lambda: TrojanWatermark(size=5, position="corner"),
    }[name]()


def run_demo(
    attack: str = "badnets",
    target: int = 0,
    out: str | None = None,
    overwrite: bool = False,
    config: Config | None = None,
    echo: Callable[[str], None] | None = None,
) -> int:
    """Train a backdoored SmallCNN on the embedded MNIST digits, scan it, erase the backdoor and
    give a before/after table, line by line, to ``echo`` (the CLI prints them; default: INFO records
    of the ``baerase.demo`` logger). Returns a process exit status (0 when the backdoor is gone)."""
    from . import audit, write_outputs
    from .attacks import attack_success_rate, clean_accuracy, train_backdoored
    from .data import load_mnist, split
    from .models import SmallCNN

    echo = echo or log.info
    start = time.perf_counter()
    images, labels = load_mnist()
    (x_train, y_train), (x_clean, y_clean), (x_test, y_test) = split(images, labels, [0.7, 0.1, 0.2], seed=0)
    trigger = _attack(attack)
    echo(f"Training a SmallCNN on {len(y_train)} MNIST digits with a {trigger.name} backdoor -> class {target} ...")
    device = torch.device(config.run.device if config is not None and config.run.device is not None else "cpu")
    # The same model every run, and the caller's RNG untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = train_backdoored(
            SmallCNN(1, 10, 28).to(device), x_train, y_train, trigger, target, rate=0.2, epochs=12, seed=0
        )
    before = clean_accuracy(model, x_test, y_test), attack_success_rate(model, x_test, y_test, trigger, target)

    echo(f"Scanning and erasing with {len(y_clean)} clean digits ...")
    report, result = audit(model, x_clean, y_clean, config=config)
    after = (
        clean_accuracy(result.model, x_test, y_test),
        attack_success_rate(result.model, x_test, y_test, trigger, target),
    )
    echo("\n" + report.summary() + "\n\n" + result.summary() + "\n")
    echo(_table(len(y_test), before, after))
    ok = report.flagged == [target] and after[1] <= 0.01 and before[0] - after[0] <= 0.01
    echo(f"\nTarget flagged: {report.flagged == [target]}; total {time.perf_counter() - start:.0f}s")
    if out:
        echo(f"wrote {write_outputs(out, report, x_clean, result, overwrite=overwrite)}")
    return 0 if ok else 1


def _table(images: int, before: tuple[float, float], after: tuple[float, float]) -> str:
    """The before/after table on the test digits: (clean accuracy, attack success) of each model."""
    return "\n".join(
        [
            f"| test set ({images} digits) | clean accuracy | attack success (real trigger) |",
            "|---|---:|---:|",
            f"| backdoored model | {before[0]:.3f} | {before[1]:.3f} |",
            f"| repaired model   | {after[0]:.3f} | {after[1]:.3f} |",
        ]
    )
