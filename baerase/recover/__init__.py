"""Trigger recovery: stacked generators, the MINE entropy estimator and trigger families."""
from .generator import StatisticsNetwork, TriggerGenerator, mine_estimate
from .recovery import attack_success, frozen, recover
from .triggers import TriggerSet

__all__ = ["StatisticsNetwork", "TriggerGenerator", "TriggerSet", "attack_success", "frozen", "mine_estimate", "recover"]
