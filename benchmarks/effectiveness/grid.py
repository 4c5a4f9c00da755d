"""The benchmark grid: which (data, model, attack, budget) cells run and which defenses each gets."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

ATTACKS = ("badnets3", "badnets5", "badnets7", "badnets3_fixed", "trojan", "imc", "blended")
# Attacks beyond the paper: a whole-image signal (label-flipping and clean-label), a warp, a colour filter,
# input-aware triggers, two backdoors with their own targets, and all-to-all (y -> y + 1).
# wanet is the paper's noise mode at s = 1; on colour10 it is not learnt in 15 epochs, wanet_s4 (a 4x stronger warp,
# half the label-keeping noisy warps, 20% poison, 30 epochs) reaches about 75% there.
BEYOND = ("sig", "sig_clean", "wanet", "wanet_s4", "filter", "dynamic", "two_target", "all_to_all")


@dataclass(frozen=True)
class Cell:
    """One trained model and the defenses run on it. ``attack`` None: a clean model (false-flag check)."""

    data: str  # "mnist", "colour10", "colour43", "colour100" or "file:<path>"
    model: str = "small_cnn"  # "small_cnn" | "resnet18" (width 0.125 here)
    attack: str | None = None
    rate: float = 0.1  # poison rate
    target: int = 0
    targets: tuple[int, ...] = ()  # every target of a multi-target attack (``target`` is the first)
    seed: int = 0
    budget: float = 0.1  # defender's clean images as a share of the training set size
    epochs: int = 15
    defenses: tuple[str, ...] = ("baerase", "fine_tune", "neural_cleanse")
    tag: str = ""  # extra label for ablation rows

    @property
    def all_targets(self) -> tuple[int, ...]:
        """The classes a backdoor sends images to (empty for clean models and all-to-all)."""
        if self.attack is None or self.attack == "all_to_all":
            return ()
        return self.targets or (self.target,)

    @property
    def name(self) -> str:
        kind = self.attack or "clean"
        parts = [self.data, self.model, kind]
        if self.attack == "all_to_all":
            parts.append(f"p{round(self.rate * 100)}%-t+1")
        elif self.attack:
            parts.append(f"p{round(self.rate * 100)}%-t{'+'.join(map(str, self.all_targets))}")
        parts += [f"b{round(self.budget * 100)}%", f"s{self.seed}"]
        return "/".join(parts) + (f"/{self.tag}" if self.tag else "")

    def to_dict(self) -> dict:
        return asdict(self)


ALL_DEFENSES = ("baerase", "baerase_paper", "fine_tune", "fine_prune", "nad", "neural_cleanse", "art_nc")
# Ablations of baerase (full grid): entropy term off, hinge beta, trigger family.
ABLATIONS = {
    "baerase_alpha0": {"alpha": 0.0},
    "baerase_beta0.8": {"beta": 0.8},
    "baerase_beta0.9": {"beta": 0.9},
    "baerase_patch": {"family": "patch"},
}


def small_grid(data: str | None = None) -> list[Cell]:
    """A few minutes on 2 CPU cores: two MNIST attacks, one colour patch, a clean model of each."""
    d = ("mnist", data) if data else ("mnist", "colour10")
    cells = [
        Cell(d[0], attack="badnets3"),
        Cell(d[0], attack="blended"),
        Cell(d[0]),
        Cell(d[1], attack="badnets3_fixed"),
        Cell(d[1]),
    ]
    return cells


def full_grid(data: str | None = None) -> list[Cell]:
    """The issue's grid as far as a CPU allows: every attack, two poison rates, three budgets,
    four data sets, both architectures, five clean seeds per data set, and the ablations."""
    every = ALL_DEFENSES + tuple(ABLATIONS)
    datasets = [data] if data else ["mnist", "colour10", "colour43", "colour100"]
    cells: list[Cell] = []
    for ds in datasets:
        for attack in ATTACKS:
            for rate in (0.05, 0.1):
                cells.append(Cell(ds, attack=attack, rate=rate, target=1 if rate == 0.05 else 0, defenses=every))
        for budget in (0.01, 0.05):
            cells.append(Cell(ds, attack="badnets3", budget=budget, defenses=ALL_DEFENSES))
        for seed in range(5):
            cells.append(Cell(ds, seed=seed, defenses=every))
        if ds != "mnist" and not ds.startswith("file:"):
            cells.append(Cell(ds, model="resnet18", attack="badnets3_fixed", defenses=ALL_DEFENSES))
            cells.append(Cell(ds, model="resnet18", defenses=ALL_DEFENSES))
    return cells


# Poison rate per attack beyond the paper: sig_clean stamps this share of the target class (labels kept);
# all the others poison this share of the training set (per backdoor for two_target).
BEYOND_RATES = {"sig_clean": 1.0, "wanet_s4": 0.2}
BEYOND_EPOCHS = {"wanet_s4": 30, "dynamic": 25}  # the others train for the grid's 15 epochs


def beyond_cell(data: str, attack: str, **kw) -> Cell:
    """The grid's cell for an attack beyond the paper (two_target: targets 0 and 5)."""
    if attack not in BEYOND:
        raise ValueError(f"unknown attack {attack!r}: one of {BEYOND}")
    if attack == "two_target":
        kw.setdefault("targets", (0, 5))
    kw.setdefault("epochs", BEYOND_EPOCHS.get(attack, 15))
    return Cell(data, attack=attack, rate=BEYOND_RATES.get(attack, 0.1), **kw)


def beyond_grid(data: str | None = None) -> list[Cell]:
    """The attacks beyond the paper on MNIST and colour10 (their clean cells are in the other grids)."""
    datasets = [data] if data else ["mnist", "colour10"]
    return [beyond_cell(ds, attack, defenses=ALL_DEFENSES) for ds in datasets for attack in BEYOND]


DRAWN_DEFENSES = ("baerase", "neural_cleanse", "fine_tune")


def drawn_cell(data: str, seed: int) -> Cell:
    """A cell whose trigger, target, poison rate and training length are drawn from ``seed``: a patch of
    random colours at a random fixed place (``badnets{size}@{row},{col}``), a checkerboard at a random
    place per image (``badnets{size}``), a blended noise (``noise{alpha %}``) or stripe pattern
    (``sine{alpha %}p{period}``), a SIG signal (``sig{delta %}f{freq}``), or a clean model; the fixed
    patch, the commonest backdoor, twice as often as each of the others."""
    g = random.Random(f"{data}/{seed}")
    kind, size = g.choice(("patch", "patch", "checker", "noise", "sine", "sig", "clean")), g.choice((3, 4))
    attack = {
        "patch": f"badnets{size}@{g.randrange(22)},{g.randrange(22)}",
        "checker": f"badnets{size}",
        "noise": f"noise{g.randrange(10, 21)}",
        "sine": f"sine{g.randrange(10, 21)}p{g.randrange(4, 9)}",
        "sig": f"sig{g.randrange(8, 16)}f{g.randrange(3, 9)}",
        "clean": None,
    }[kind]
    rate, target, epochs = g.choice((0.05, 0.1, 0.2)), g.randrange(10), g.randrange(10, 21)
    return Cell(
        data, attack=attack, rate=rate, target=target, seed=seed, epochs=epochs, defenses=DRAWN_DEFENSES, tag="drawn"
    )


def drawn_grid(data: str | None = None, n: int = 12) -> list[Cell]:
    """``n`` drawn cells (``drawn_cell``) per data set, MNIST and colour10: cases the defaults were not tuned on."""
    datasets = [data] if data else ["mnist", "colour10"]
    return [drawn_cell(ds, seed) for ds in datasets for seed in range(n)]


GRIDS = {"small": small_grid, "full": full_grid, "beyond": beyond_grid, "drawn": drawn_grid}
