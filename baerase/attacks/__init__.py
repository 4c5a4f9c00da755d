"""Backdoor attacks for evaluation and tests: triggers, poisoning, training and metrics."""

from .colour_filter import VINTAGE, ColourFilter
from .dynamic import DynamicConfig, InputAwareTrigger, TriggerGenerator, train_input_aware
from .multi import AllToAll, Backdoors, corner_backdoors
from .optimise import imc_train, label_consistent, optimise_trojan_trigger
from .signal import SIG
from .train import (
    POISON_MODES,
    all_to_all_success_rate,
    attack_success_rate,
    clean_accuracy,
    normalizer,
    poison,
    poison_all_to_all,
    poison_clean_label,
    poison_multi,
    predict,
    train_backdoored,
    train_classifier,
)
from .triggers import BadNets, Blended, PatchTrigger, Trigger, TrojanWatermark, checkerboard, ring_mask
from .warp import WaNet, WarpPoisoning, train_wanet

__all__ = [
    "POISON_MODES",
    "SIG",
    "VINTAGE",
    "AllToAll",
    "Backdoors",
    "BadNets",
    "Blended",
    "ColourFilter",
    "DynamicConfig",
    "InputAwareTrigger",
    "PatchTrigger",
    "Trigger",
    "TriggerGenerator",
    "TrojanWatermark",
    "WaNet",
    "WarpPoisoning",
    "all_to_all_success_rate",
    "attack_success_rate",
    "checkerboard",
    "clean_accuracy",
    "corner_backdoors",
    "imc_train",
    "label_consistent",
    "normalizer",
    "optimise_trojan_trigger",
    "poison",
    "poison_all_to_all",
    "poison_clean_label",
    "poison_multi",
    "predict",
    "ring_mask",
    "train_backdoored",
    "train_classifier",
    "train_input_aware",
    "train_wanet",
]
