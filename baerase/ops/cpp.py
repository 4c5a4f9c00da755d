"""C++ CPU backend: the ``<op>_fwd`` / ``<op>_bwd`` functions of ``baerase._C`` for the dispatcher.

Importing this module fails when the extension was not built; ``dispatch`` then serves the
PyTorch reference and logs one warning. The extension reports bad inputs as ValueError; they are
re-raised as baerase's InputError like the other backends'.
"""

from __future__ import annotations

import functools

import torch  # noqa: F401  (loads libtorch before the extension links against it)

from baerase import _C
from baerase.errors import InputError


def _checked(fn):
    @functools.wraps(fn)
    def call(*args):
        try:
            return fn(*args)
        except ValueError as exc:
            raise InputError(str(exc).split("\nException raised from")[0]) from None

    return call


trigger_apply_fwd = _checked(_C.trigger_apply_fwd)
trigger_apply_bwd = _checked(_C.trigger_apply_bwd)
patch_apply_fwd = _checked(_C.patch_apply_fwd)
trigger_loss_fwd = _checked(_C.trigger_loss_fwd)
trigger_loss_bwd = _checked(_C.trigger_loss_bwd)
batched_adam_step = _checked(_C.batched_adam_step)
moving_average_ = _checked(_C.moving_average_)


@_checked
def patch_apply_bwd(grad_out, rows, cols, patch_shape, std):
    return _C.patch_apply_bwd(grad_out, rows, cols, list(patch_shape), std)
