"""What an audit costs, counted in images passed through the suspect model, beside Neural Cleanse.

    python -m pytest benchmarks/bench_audit_cost.py -s -p no:cacheprovider

One 10-class MNIST model with a BadNets backdoor (trained here, seeded) and 500 clean digits:
baerase's default scan, then Neural Cleanse's reverse engineering at the settings the effectiveness
grid gives it (200 steps, batch 32), back to back on the same model and data; then the whole audit
(scan, erase, verification); and a clean model of the same training, scanned with every fallback
family and with the mask family alone. Scan images are counted with a forward hook on the suspect
model, so both defenses are counted the same way (the audit's count is baerase's own cost record);
counts do not drift with the machine's load. Each run of the backdoored model's tests appends its
figures to benchmarks/results/audit_cost.md.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

import baerase
from baerase.attacks import BadNets, attack_success_rate, clean_accuracy, train_backdoored, train_classifier
from baerase.data import load_mnist, split
from baerase.models import SmallCNN
from benchmarks.baselines.neural_cleanse import reverse_engineer

RESULTS = Path(__file__).parent / "results" / "audit_cost.md"
TARGET = 0
_figures: dict[str, dict] = {}


@pytest.fixture(scope="module")
def case():
    """(backdoored model, clean images, labels, test images, labels, trigger)."""
    images, labels = load_mnist()
    (x_train, y_train), (x_clean, y_clean), (x_test, y_test) = split(images, labels, [0.7, 0.1, 0.2], seed=0)
    trigger = BadNets(size=3, position="random", seed=1)
    torch.manual_seed(0)
    model = train_backdoored(SmallCNN(1, 10, 28), x_train, y_train, trigger, TARGET, rate=0.2, epochs=8, seed=0)
    return model, x_clean, y_clean, x_test, y_test, trigger


@pytest.fixture(scope="module")
def clean_case():
    """(clean model, clean images, labels): the same data and training, nothing poisoned."""
    images, labels = load_mnist()
    (x_train, y_train), (x_clean, y_clean), _ = split(images, labels, [0.7, 0.1, 0.2], seed=0)
    torch.manual_seed(0)
    model = train_classifier(SmallCNN(1, 10, 28), x_train, y_train, epochs=8, seed=0)
    return model.eval(), x_clean, y_clean


class _Counter:
    """Images through ``model`` while counting (a forward pre-hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.images = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, _module, args) -> None:
        self.images += len(args[0])


def _timed(fn, model):
    counter = _Counter(model)
    start = time.perf_counter()
    try:
        out = fn()
    finally:
        counter.handle.remove()
    return out, time.perf_counter() - start, counter.images


def test_scan_vs_neural_cleanse(benchmark, case):
    model, x, y, *_ = case
    config = baerase.Config(progress=False)
    report, seconds, images = _timed(
        lambda: benchmark.pedantic(baerase.scan, args=(model, x, y), kwargs={"config": config}, rounds=1), model
    )
    nc, nc_seconds, nc_images = _timed(lambda: reverse_engineer(model, x, y, steps=200, seed=0), model)
    benchmark.extra_info.update(
        baerase_images_per_class=images / 10,
        neural_cleanse_images_per_class=nc_images / 10,
        baerase_seconds=seconds,
        neural_cleanse_seconds=nc_seconds,
        speedup=nc_seconds / seconds,
        baerase_flagged=report.flagged,
        neural_cleanse_flagged=nc.flagged,
        target=TARGET,
    )
    _figures["scan"] = dict(benchmark.extra_info, phases=report.cost.to_dict()["phases"])
    print(
        f"\nscan: baerase {images / 10:,.0f} images/class in {seconds:.1f}s (flagged {report.flagged}); "
        f"Neural Cleanse {nc_images / 10:,.0f} in {nc_seconds:.1f}s (flagged {nc.flagged}): "
        f"{nc_seconds / seconds:.1f}x faster, {nc_images / max(images, 1):.1f}x fewer images"
    )


def test_clean_model_scan(benchmark, clean_case):
    """A model found clean runs every fallback family: their images beside the mask family's alone, and
    beside the fallbacks that never give up a class out of their reach."""
    model, x, y = clean_case
    config = baerase.Config(progress=False)
    report = benchmark.pedantic(baerase.scan, args=(model, x, y), kwargs={"config": config}, rounds=1)
    masks_only = baerase.scan(model, x, y, config=config.replace(fallback=()))
    never_give_up = baerase.scan(model, x, y, config=config.replace(give_up_share=0.0))
    total, masks = report.cost.per_class(10), masks_only.cost.per_class(10)
    full = never_give_up.cost.per_class(10)
    benchmark.extra_info.update(
        images_per_class=total,
        mask_family_images_per_class=masks,
        never_give_up_images_per_class=full,
        flagged=report.flagged,
        family=report.family,
    )
    print(
        f"\nclean model: {total:,.0f} images/class ({full:,.0f} never giving up a class), {masks:,.0f} for the "
        f"mask family alone; flagged {report.flagged} ({never_give_up.flagged} never giving up)"
    )


ERASES = {"default": baerase.Config(progress=False), "short_erase": baerase.Config.short_erase(progress=False)}


@pytest.mark.parametrize("erase", list(ERASES))
def test_whole_audit(benchmark, case, erase):
    model, x, y, x_test, y_test, trigger = case
    config = ERASES[erase]
    start = time.perf_counter()
    report, result = benchmark.pedantic(baerase.audit, args=(model, x, y), kwargs={"config": config}, rounds=1)
    seconds = time.perf_counter() - start
    cost = report.cost.merged(result.cost)
    asr = attack_success_rate(result.model, x_test, y_test, trigger, TARGET)
    drop = clean_accuracy(model, x_test, y_test) - clean_accuracy(result.model, x_test, y_test)
    benchmark.extra_info.update(
        images_per_class=cost.per_class(10),
        seconds=seconds,
        flagged=report.flagged,
        asr_after=asr,
        accuracy_drop=drop,
        rounds=result.rounds,
    )
    _figures[erase] = dict(benchmark.extra_info, phases=cost.to_dict()["phases"])
    print(
        f"\naudit ({erase}): {cost.per_class(10):,.0f} images/class in {seconds:.1f}s; flagged {report.flagged}, "
        f"ASR after {asr:.3%}, test accuracy drop {drop:+.3f}\n{cost.table(10)}"
    )
    _write()


def _write() -> None:
    scan = _figures.get("scan")
    if scan is None or any(erase not in _figures for erase in ERASES):
        return
    rows = [
        f"\n### {time.strftime('%Y-%m-%d %H:%M')} ({torch.get_num_threads()} threads, baerase {baerase.__version__})",
        "| | baerase | Neural Cleanse (200 steps, batch 32) |",
        "|---|---:|---:|",
        f"| scan: model images per class | {scan['baerase_images_per_class']:,.0f} | "
        f"{scan['neural_cleanse_images_per_class']:,.0f} |",
        f"| scan: seconds | {scan['baerase_seconds']:.1f} | {scan['neural_cleanse_seconds']:.1f} |",
        f"| scan: flagged (target {TARGET}) | {scan['baerase_flagged']} | {scan['neural_cleanse_flagged']} |",
    ]
    for erase in ERASES:
        audit = _figures[erase]
        rows += [
            f"| audit ({erase}): model images per class, rounds | {audit['images_per_class']:,.0f}, "
            f"{audit['rounds']} | |",
            f"| audit ({erase}): seconds, ASR after, accuracy drop | {audit['seconds']:.1f}, {audit['asr_after']:.2%}, "
            f"{audit['accuracy_drop']:+.3f} | |",
        ]
    with RESULTS.open("a") as f:
        f.write("\n".join(rows) + "\n")
