"""Fast-path ops behind one dispatch: Triton on CUDA, the C++ extension on CPU, else PyTorch."""
from .dispatch import available_backends, backend, backend_for, requested_backend, use_backend
from .recovery import BatchedAdam, moving_average_
from .reference import mine_lower_bound_ref as mine_lower_bound
from .trigger_apply import patch_apply, trigger_apply
from .trigger_loss import trigger_loss

__all__ = [
    "BatchedAdam",
    "available_backends",
    "backend",
    "backend_for",
    "mine_lower_bound",
    "moving_average_",
    "patch_apply",
    "requested_backend",
    "trigger_apply",
    "trigger_loss",
    "use_backend",
]
