"""Trigger recovery: stacked generators, the MINE entropy estimator and trigger families."""

from . import families
from .blend import BlendSet
from .generator import StatisticsNetwork, TriggerGenerator, mine_estimate
from .recovery import RecoveryResult, attack_success, frozen, recover, sent_to
from .screen import Screened, recover_all, reference_sample
from .triggers import UNTARGETED, TriggerSet
from .warp import WarpSet

__all__ = [
    "UNTARGETED",
    "BlendSet",
    "RecoveryResult",
    "Screened",
    "StatisticsNetwork",
    "TriggerGenerator",
    "TriggerSet",
    "WarpSet",
    "attack_success",
    "families",
    "frozen",
    "mine_estimate",
    "recover",
    "recover_all",
    "reference_sample",
    "sent_to",
]
