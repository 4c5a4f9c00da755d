"""Triton kernels for baerase's fast-path ops (installed as ``baerase.kernels``).

Each op exposes ``<op>_fwd`` / ``<op>_bwd`` launchers with the contract documented in
``baerase/ops/README.md``; ``baerase.ops`` dispatch calls them on CUDA tensors (or on CPU tensors
under ``TRITON_INTERPRET=1``).
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
