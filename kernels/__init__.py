"""Triton kernels for baerase's fast-path ops (installed as ``baerase.kernels``).

Each op exposes ``<op>_fwd`` / ``<op>_bwd`` launchers with the contract of its custom op
(``baerase/ops/<op>.py``); the ops' CUDA kernels call them when ``baerase.ops.backend_for`` picks
Triton (and their CPU kernels, under ``TRITON_INTERPRET=1``, when Triton is requested).
"""

from .patch_apply import patch_apply_bwd, patch_apply_fwd
from .trigger_apply import trigger_apply_bwd, trigger_apply_fwd
from .trigger_loss import trigger_loss_bwd, trigger_loss_fwd

__all__ = [
    "patch_apply_bwd",
    "patch_apply_fwd",
    "trigger_apply_bwd",
    "trigger_apply_fwd",
    "trigger_loss_bwd",
    "trigger_loss_fwd",
]
