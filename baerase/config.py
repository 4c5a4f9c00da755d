"""Hyper-parameters, validated once. ``Config()`` is the fast default; ``Config.paper()`` holds
the settings of the BAERASE paper and its public code."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import ConfigError

FAMILIES = ("mask", "patch")


@dataclass(frozen=True)
class Config:
    """Settings of a scan (trigger recovery + detection) and of an erase (unlearning).

    Defaults are tuned for speed on CPU and hold for unseen models; ``Config.paper()`` gives the
    paper's settings. Use ``config.replace(field=value)`` to change a few.
    """

    # Trigger recovery (one entropy-maximising generator per candidate class).
    family: str = "mask"  # "mask": x + m*(p - x) over the image; "patch": h x w patch at random positions
    patch_size: int = 3
    steps: int = 300  # optimisation steps per candidate; None-like values are rejected
    batch_size: int = 32  # clean images per candidate per step
    latent_dim: int = 64
    hidden: int = 256  # generator width (paper: 2048)
    lr: float = 1e-3  # Adam lr of the generator and statistics network (paper: 2e-4)
    mask_lr: float = 0.1  # Adam lr of the mask logits (mask family)
    betas: tuple[float, float] = (0.5, 0.999)
    alpha: float = 0.1  # weight of the entropy (mutual information) term
    beta: float = 0.5  # hinge: target probability above beta earns nothing more
    noise_std: float = 0.1  # Gaussian noise on generated triggers while training G
    mine_hidden: int = 128
    mine_ma_rate: float = 0.001  # moving average of E[exp T] for MINE's bias-corrected gradient
    mask_cost: float = 1e-3  # initial weight of the mask-mass penalty, adapted per class
    success_threshold: float = 0.9  # share of samples that must flip for a trigger to "work"
    classes: tuple[int, ...] | None = None  # candidate targets; None = every class
    chunk_size: int | None = None  # candidates per batched computation; None = from memory_budget
    memory_budget: int | None = None  # bytes for one chunk's activations; None = auto-detected

    # Detection.
    anomaly_threshold: float = 2.0  # MAD anomaly index above which a class is flagged
    min_attack_success: float = 0.5  # a flagged class's recovered trigger must flip this share
    # Mask family: a flagged class's trigger is also this many times smaller than the median class's.
    # A 3x3 backdoor trigger recovers 10-20x smaller, a 7x7 one about 4x; an easy-to-reach clean
    # class can be 2-2.5x smaller and still sit past the threshold when its neighbours cluster tightly.
    min_trigger_shrink: float = 3.0
    eval_samples: int = 256  # held-out images used to score each class

    # Unlearning.
    unlearn_epochs: int = 20
    unlearn_lr: float = 1e-3
    unlearn_batch_size: int = 64
    alpha_u: float = 10.0  # weight of the clean cross-entropy (paper: 100 with a 10x smaller lr)
    relabel_weight: float = 1.0  # CE of triggered images toward their true label (0: the paper's loss)
    # L-inf radius (pixels in [0, 1]) of a universal perturbation toward each flagged class, unlearned
    # with the recovered triggers (0: off): it covers the rest of a whole-image (blend) trigger, of
    # which recovery finds only a few pixels. Costs about 1.7x the unlearning time.
    universal_eps: float = 0.1
    weight_l1: float = 1e-6  # lambda of ||theta - theta_0||_1
    max_accuracy_drop: float = 0.01  # never return a model that lost more clean accuracy
    asr_stop: float = 0.005  # stop once fresh recovered triggers flip less than this share
    val_fraction: float = 0.2  # share of the clean data a scan holds out to score each class
    # Share of the clean data an erase holds out for its accuracy guard and trigger checks. Half: on a
    # few hundred images one point is a handful of images, and a smaller split turns the noise of
    # which images flip into refused checkpoints.
    guard_fraction: float = 0.5

    # Run.
    seed: int = 0
    backend: str | None = None  # "triton" | "cpp" | "ref" | None (automatic)
    device: str | None = None  # None: the model's device
    progress: bool = True

    # Scale (all off by default: they change speed or memory, not the method).
    checkpoint_dir: str | None = None  # finished chunks saved here; a killed scan resumes from them
    amp: bool = False  # bf16 autocast of the suspect model's forward on CUDA (no effect on CPU)
    channels_last: bool = False  # feed the model channels-last images (convs on tensor cores prefer it)
    compile: bool = False  # torch.compile the suspect model for recovery
    halving: bool = False  # stop, after a third of the steps, classes that clearly cannot be outliers

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family must be one of {FAMILIES}, got {self.family!r}")
        positive_ints = ("patch_size", "steps", "batch_size", "latent_dim", "hidden", "mine_hidden",
                         "eval_samples", "unlearn_epochs", "unlearn_batch_size")
        for name in positive_ints:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.latent_dim < 4:
            raise ConfigError("latent_dim must be at least 4 (it is split over the generator's 4 layers)")
        for name in ("lr", "mask_lr", "unlearn_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("alpha", "noise_std", "mask_cost", "weight_l1", "alpha_u", "relabel_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("beta", "success_threshold", "min_attack_success", "mine_ma_rate"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        for name in ("max_accuracy_drop", "asr_stop", "universal_eps"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("val_fraction", "guard_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1 or None, got {self.chunk_size!r}")
        if not self.min_trigger_shrink >= 1:
            raise ConfigError(f"min_trigger_shrink must be >= 1, got {self.min_trigger_shrink!r}")
        if self.backend not in (None, "auto", "triton", "cpp", "ref"):
            raise ConfigError(f"backend must be 'triton', 'cpp', 'ref' or None, got {self.backend!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas!r}")

    @classmethod
    def paper(cls, **overrides) -> Config:
        """The paper's settings: patch triggers, G width 2048, Adam 2e-4, batch 128, 10 epochs
        (about 200 steps on 2,500 images), SGD unlearning at lr 1e-4 with alpha_u = 100."""
        settings = {"family": "patch", "patch_size": 3, "hidden": 2048, "lr": 2e-4, "batch_size": 128,
                    "steps": 200, "alpha": 0.1, "beta": 0.5, "unlearn_lr": 1e-4, "alpha_u": 100.0,
                    "relabel_weight": 0.0, "universal_eps": 0.0, "weight_l1": 1e-6, "asr_stop": 0.0005}
        settings.update(overrides)
        return cls(**settings)

    def replace(self, **changes) -> Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS = {"fast": Config, "paper": Config.paper}
