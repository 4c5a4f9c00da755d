"""Fast-path ops as ``torch.library`` custom ops (namespace ``baerase``): the PyTorch reference by
default, the C++ extension and Triton kernels where ``backend_for`` picks them (see README.md)."""

from .adam_step import BatchedAdam, adam_step
from .dispatch import (
    available_backends,
    backend,
    backend_for,
    record_backends,
    requested_backend,
    use_backend,
)
from .moving_average import moving_average_
from .patch_apply import patch_apply
from .reference import mine_lower_bound_ref as mine_lower_bound
from .trigger_apply import trigger_apply
from .trigger_loss import trigger_loss

__all__ = [
    "BatchedAdam",
    "adam_step",
    "available_backends",
    "backend",
    "backend_for",
    "mine_lower_bound",
    "moving_average_",
    "patch_apply",
    "record_backends",
    "requested_backend",
    "trigger_apply",
    "trigger_loss",
    "use_backend",
]
