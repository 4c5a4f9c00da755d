"""Backdoor attacks for evaluation and tests: triggers, poisoning, training and metrics."""

from .optimise import imc_train, optimise_trojan_trigger
from .train import (
    attack_success_rate,
    clean_accuracy,
    normalizer,
    poison,
    predict,
    train_backdoored,
    train_classifier,
)
from .triggers import BadNets, Blended, PatchTrigger, Trigger, TrojanWatermark, checkerboard, ring_mask

__all__ = [
    "BadNets",
    "Blended",
    "PatchTrigger",
    "Trigger",
    "TrojanWatermark",
    "attack_success_rate",
    "checkerboard",
    "clean_accuracy",
    "imc_train",
    "normalizer",
    "optimise_trojan_trigger",
    "poison",
    "predict",
    "ring_mask",
    "train_backdoored",
    "train_classifier",
]
