"""C++ CPU backend: the ``<op>_fwd`` / ``<op>_bwd`` functions of ``baerase._C`` for the dispatcher.

Importing this module fails when the extension was not built; ``dispatch`` then serves the
PyTorch reference and logs one warning.
"""

from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension links against it)

from baerase import _C

trigger_apply_fwd = _C.trigger_apply_fwd
trigger_apply_bwd = _C.trigger_apply_bwd
patch_apply_fwd = _C.patch_apply_fwd
trigger_loss_fwd = _C.trigger_loss_fwd
trigger_loss_bwd = _C.trigger_loss_bwd
batched_adam_step = _C.batched_adam_step
moving_average_ = _C.moving_average_


def patch_apply_bwd(grad_out, rows, cols, patch_shape, std):
    return _C.patch_apply_bwd(grad_out, rows, cols, list(patch_shape), std)
