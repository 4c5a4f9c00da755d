"""Train each cell's model, run every defense on the same clean hold-out data, measure the result."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from functools import lru_cache

import torch

import baerase
from baerase import attacks as A
from baerase.data import load_dataset, load_mnist, make_colour, split
from baerase.models import ResNet18, SmallCNN
from benchmarks import baselines as B

from .grid import ABLATIONS, BEYOND, Cell

BAR_ASR, BAR_DROP = 0.01, 0.01  # the bar: ASR after <= 1%, clean accuracy drop <= 1 point
BAR_ASR_ALL_TO_ALL = 0.05  # issue 22: all-to-all must end at most 5% (y -> y + 1)
WEAK_ATTACK = 0.5  # below this ASR before defense the backdoor barely exists; the cell is marked


@lru_cache(maxsize=4)
def load(data: str) -> tuple[torch.Tensor, torch.Tensor]:
    if data == "mnist":
        return load_mnist()
    if data.startswith("colour"):
        k = int(data.removeprefix("colour"))
        return make_colour(k, per_class=max(50, 5000 // k), side=32, seed=0)
    if data.startswith("file:"):
        return load_dataset(data.removeprefix("file:"))
    raise ValueError(f"unknown data {data!r}: mnist, colour10/43/100 or file:<path>")


def splits(cell: Cell):
    """Train 70%; the other 30% is the pool: the defender takes ``budget * |train|`` images from its
    start, and the evaluation set is the rest after the largest budget (10%), the same for every budget."""
    x, y = load(cell.data)
    (tx, ty), (px, py) = split(x, y, [0.7, 0.3], seed=0)
    n = max(10, round(cell.budget * len(ty)))
    start = max(n, round(0.1 * len(ty)))
    return (tx, ty), (px[:n], py[:n]), (px[start:], py[start:])


def build_model(cell: Cell, x: torch.Tensor, k: int) -> torch.nn.Module:
    torch.manual_seed(cell.seed)
    c, h, _ = x.shape[1:]
    if cell.model == "resnet18":
        return ResNet18(k, c, width=0.125)
    return SmallCNN(c, k, h)


def make_trigger(attack: str, seed: int = 1, targets: tuple[int, ...] = (0, 5)):
    """The cell's trigger (a ``Backdoors`` of several for two_target, an ``AllToAll`` for all_to_all)."""
    drawn = _drawn_trigger(attack)
    if drawn is not None:
        return drawn
    if attack.startswith("badnets"):
        size = int(attack[7])
        return A.BadNets(size, "corner" if attack.endswith("fixed") else "random", seed=seed)
    if attack == "blended":
        return A.Blended("sine", alpha=0.15)
    if attack == "sig":
        return A.SIG(delta=0.1, freq=6)
    if attack == "sig_clean":
        # the test-time signal: stronger than the training one, as in Barni et al. (see SIG_CLEAN_TRAIN)
        return A.SIG(delta=0.4, freq=6)
    if attack == "wanet":
        # paper mode; the paper's s = 0.5 reaches 73% ASR on MNIST in 15 epochs, s = 1 (still sub-pixel) 88%
        return A.WaNet(k=4, strength=1.0, seed=seed)
    if attack == "wanet_s4":
        return A.WaNet(k=4, strength=4.0, seed=seed)
    if attack == "filter":
        return A.ColourFilter()
    if attack == "two_target":
        return A.corner_backdoors(targets, size=4, seed=seed)
    if attack == "all_to_all":
        return A.AllToAll(A.BadNets(4, "corner", seed=seed))
    raise ValueError(attack)


def _drawn_trigger(attack: str):
    """The trigger a drawn cell names (see ``grid.drawn_cell``), or None for the grid's named attacks."""
    if m := re.fullmatch(r"badnets(\d)@(\d+),(\d+)", attack):
        size, row, col = map(int, m.groups())
        return A.BadNets(size, (row, col), pattern="random", seed=31 * row + col)
    if m := re.fullmatch(r"noise(\d+)", attack):
        return A.Blended("noise", alpha=int(m[1]) / 100, seed=int(m[1]))
    if m := re.fullmatch(r"sine(\d+)p(\d+)", attack):
        return A.Blended("sine", alpha=int(m[1]) / 100, period=int(m[2]))
    if m := re.fullmatch(r"sig(\d+)f(\d+)", attack):
        return A.SIG(delta=int(m[1]) / 100, freq=int(m[2]))
    return None


# Clean-label SIG stamps only target images, labels kept: a weak lesson. On MNIST a 0.2 signal in training
# costs 1 point of clean accuracy and a 0.4 signal at test time then reaches 94% (0.3 in training costs 5).
SIG_CLEAN_TRAIN = A.SIG(delta=0.2, freq=6)
# colour10's classes are told apart by colour alone, so the signal is learned only on target images made hard
# first (label-consistent, eps per data set; MNIST learns it without).
SIG_CLEAN_HARDEN = {"colour10": 0.15}


def _train_beyond(cell: Cell, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kw: dict):
    """(model, trigger) for the attacks beyond the paper: each has its own way of poisoning."""
    if cell.attack == "dynamic":
        return A.train_input_aware(model, x, y, cell.target, **kw)
    trig = make_trigger(cell.attack, targets=cell.all_targets)
    if cell.attack in ("wanet", "wanet_s4"):
        cross = 2.0 if cell.attack == "wanet" else 1.0  # the paper's 2 drowns the strong warp on colour10
        return A.train_wanet(model, x, y, trig, cell.target, cell.rate, cross_ratio=cross, **kw), trig
    if cell.attack == "two_target":
        return A.train_backdoored(model, x, y, trig.triggers, trig.targets, cell.rate, **kw), trig
    if cell.attack == "all_to_all":
        return A.train_backdoored(model, x, y, trig.trigger, None, cell.rate, mode="all_to_all", **kw), trig
    if cell.attack == "sig_clean":
        x = _harden_target(cell, x, y) if cell.data in SIG_CLEAN_HARDEN else x
        return A.train_backdoored(model, x, y, SIG_CLEAN_TRAIN, cell.target, cell.rate, mode="clean_label", **kw), trig
    return A.train_backdoored(model, x, y, trig, cell.target, cell.rate, **kw), trig


def _harden_target(cell: Cell, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x with the target class's images perturbed away from their label against a clean model of another seed."""
    clean = Cell(cell.data, model=cell.model, seed=cell.seed + 7, epochs=cell.epochs)
    reference = A.train_classifier(build_model(clean, x, int(y.max()) + 1), x, y, epochs=clean.epochs, seed=clean.seed)
    idx = torch.nonzero(y == cell.target).flatten()
    x = x.clone()
    x[idx] = A.label_consistent(reference, x[idx], y[idx], SIG_CLEAN_HARDEN[cell.data])
    return x


def train(cell: Cell, train_xy, k: int):
    """(model, trigger or None) for the cell; TrojanNN and IMC optimise their trigger against the model."""
    x, y = train_xy
    model = build_model(cell, x, k)
    kw = {"epochs": cell.epochs, "seed": cell.seed}
    if cell.attack is None:
        return A.train_classifier(model, x, y, **kw), None
    if cell.attack == "trojan":
        # TrojanNN: trigger optimised against a (partly) trained clean model, which is then retrained
        # on poisoned data.
        half = max(1, cell.epochs // 2)
        A.train_classifier(model, x, y, epochs=half, seed=cell.seed)
        trig = A.optimise_trojan_trigger(model, x[:64], A.TrojanWatermark(5, "corner"), neurons=2, steps=100)
        return A.train_backdoored(model, x, y, trig, cell.target, cell.rate, cell.epochs - half, cell.seed), trig
    if cell.attack == "imc":
        return A.imc_train(model, x, y, cell.target, rate=cell.rate, **kw)
    if cell.attack in BEYOND:
        return _train_beyond(cell, model, x, y, kw)
    trig = make_trigger(cell.attack)
    return A.train_backdoored(model, x, y, trig, cell.target, cell.rate, **kw), trig


def measure(model, test_xy, trig, target) -> tuple[float, float | None]:
    """(clean accuracy, ASR); with several backdoors the ASR is the highest, all-to-all's is y -> y + 1."""
    x, y = test_xy
    ca = A.clean_accuracy(model, x, y)
    if trig is None:
        return ca, None
    if isinstance(trig, A.Backdoors):
        return ca, max(trig.success_rates(model, x, y).values())
    if isinstance(trig, A.AllToAll):
        return ca, trig.success_rate(model, x, y)
    if hasattr(trig, "reset"):
        trig.reset()  # random-position triggers: every model sees the same positions
    return ca, A.attack_success_rate(model, x, y, trig, target)


def _baerase(config: baerase.Config) -> Callable:
    def run(model, x, y, seed):
        cfg = config.replace(seed=seed, progress=False)
        report = baerase.scan(model, x, y, config=cfg)
        result = baerase.erase(model, x, y, report, config=cfg)
        # The guard's own view (its validation split of the defender's images) explains CA drops on the test set.
        extra = {
            "verified": result.verified,
            "changed": result.changed,
            "scan_s": round(report.seconds, 1),
            "rounds": result.rounds,
            "guard_ca_before": result.accuracy_before,
            "guard_ca_after": result.accuracy_after,
        }
        return result.model, report.flagged, extra

    return run


def _plain(fn: Callable) -> Callable:
    def run(model, x, y, seed):
        return fn(model, x, y, seed=seed), None, {}

    return run


def _nc(model, x, y, seed):
    report = B.reverse_engineer(model, x, y, steps=200, seed=seed)
    fixed = B.neural_cleanse(model, x, y, report=report, seed=seed)
    return fixed, report.flagged, {"scan_s": round(report.seconds, 1)}


def _art_nc(model, x, y, seed):
    """The Adversarial Robustness Toolbox's Neural Cleanse, when it installs and accepts a torch model."""
    try:
        from art.defences.transformer.poisoning import NeuralCleanse
        from art.estimators.classification import PyTorchClassifier
    except ImportError as exc:
        raise DefenseUnavailableError(f"adversarial-robustness-toolbox not installed ({exc.name})") from None
    k = int(model(x[:1]).shape[1])
    clf = PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=tuple(x.shape[1:]),
        nb_classes=k,
        clip_values=(0.0, 1.0),
    )
    try:
        defence = NeuralCleanse(clf)
    except NotImplementedError as exc:  # ART 1.x: Keras only
        raise DefenseUnavailableError(f"ART NeuralCleanse refuses a PyTorch model: {exc}") from None
    fixed = defence(clf, steps=200)
    flagged = [int(c) for c in getattr(fixed, "flagged_classes", [])]
    return fixed.model, flagged, {}


class DefenseUnavailableError(Exception):
    """A defense that cannot run here (optional dependency missing or unsupported)."""


def defense_fn(name: str) -> Callable:
    if name == "baerase":
        return _baerase(baerase.Config())
    if name == "baerase_paper":
        return _baerase(baerase.Config.paper())
    if name in ABLATIONS:
        return _baerase(baerase.Config(**ABLATIONS[name]))
    if name == "neural_cleanse":
        return _nc
    if name == "art_nc":
        return _art_nc
    return _plain(B.DEFENSES[name])


def run_cell(cell: Cell, log: Callable[[str], None] = print, only: set[str] | None = None) -> dict:
    train_xy, defend_xy, test_xy = splits(cell)
    k = int(max(train_xy[1].max(), test_xy[1].max())) + 1
    start = time.perf_counter()
    model, trig = train(cell, train_xy, k)
    row = {
        "cell": cell.name,
        **cell.to_dict(),
        "defense_images": len(defend_xy[1]),
        "test_images": len(test_xy[1]),
        "train_s": round(time.perf_counter() - start, 1),
        "trigger": trig.describe() if trig is not None else None,
    }
    row["ca_before"], row["asr_before"] = measure(model, test_xy, trig, cell.target)
    row["weak_attack"] = row["asr_before"] is not None and row["asr_before"] < WEAK_ATTACK
    log(f"{cell.name}: CA {row['ca_before']:.3f} ASR {row['asr_before']} (train {row['train_s']}s)")
    row["defenses"] = {}
    for name in cell.defenses:
        if only and name not in only:
            continue
        t0 = time.perf_counter()
        try:
            fixed, flagged, extra = defense_fn(name)(model, *defend_xy, cell.seed)
        except DefenseUnavailableError as exc:
            row["defenses"][name] = {"skipped": str(exc)}
            log(f"  {name}: skipped ({exc})")
            continue
        seconds = time.perf_counter() - t0
        ca, asr = measure(fixed, test_xy, trig, cell.target)
        res = {"ca_after": ca, "asr_after": asr, "seconds": round(seconds, 1), **extra}
        if flagged is not None:
            res["flagged"] = flagged
            targets = cell.all_targets  # empty for clean models and all-to-all (every class is a target)
            res["target_flagged"] = all(t in flagged for t in targets) if targets else None
            res["false_flags"] = [c for c in flagged if c not in targets] if cell.attack != "all_to_all" else []
        res["bar"] = meets_bar(row, res)
        row["defenses"][name] = res
        log(f"  {name}: CA {ca:.3f} ASR {asr} flagged {flagged} ({seconds:.0f}s) bar={res['bar']}")
    return row


def meets_bar(row: dict, res: dict) -> bool | None:
    """The issue's bar for one defense on one cell: None where it does not apply (no detection)."""
    drop_ok = row["ca_before"] - res["ca_after"] <= BAR_DROP + 1e-9
    if row["attack"] is None:
        return drop_ok and not res["false_flags"] if "flagged" in res else drop_ok
    if row["attack"] == "all_to_all":  # every class is a target: no detection verdict, a looser ASR bar
        return drop_ok and res["asr_after"] <= BAR_ASR_ALL_TO_ALL
    ok = drop_ok and res["asr_after"] <= BAR_ASR
    if "flagged" in res:
        ok = ok and res["target_flagged"] and not res["false_flags"]
    return ok
