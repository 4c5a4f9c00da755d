"""patch_apply: paste an h x w patch per (candidate, sample) at a random position, then normalise.

Custom ops ``baerase::patch_apply`` and ``baerase::patch_apply_backward``; contract (every
backend): inputs contiguous; x [B, C, H, W] and patch [K, B, C, h, w] in any float dtype; rows,
cols int64 [K, B] (top-left corners that keep the patch inside the image); mean/std fp32 [C]; the
output in x's dtype, the patch gradient in grad_out's (autograd casts it to the patch's).
"""

from torch import Tensor

from ..errors import InputError
from .dispatch import in_scope, routed_op, scope
from .reference import identity_stats, patch_apply_backward_ref, patch_apply_ref


@routed_op("patch_apply", "patch_apply_fwd", size=lambda x, patch, *_: patch.shape[0] * x.numel())
def _patch_apply(x: Tensor, patch: Tensor, rows: Tensor, cols: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return patch_apply_ref(x, patch, rows, cols, mean, std)


@routed_op("patch_apply_backward", "patch_apply_bwd")
def _patch_apply_backward(grad_out: Tensor, rows: Tensor, cols: Tensor, std: Tensor, h: int, w: int) -> Tensor:
    return patch_apply_backward_ref(grad_out, rows, cols, std, h, w)


@_patch_apply.register_fake
def _(x, patch, rows, cols, mean, std):
    return x.new_empty((patch.shape[0], *x.shape))


@_patch_apply_backward.register_fake
def _(grad_out, rows, cols, std, h, w):
    return grad_out.new_empty((*grad_out.shape[:3], h, w))


def _setup_context(ctx, inputs, output):
    _, patch, rows, cols, _, std = inputs
    ctx.save_for_backward(rows, cols, std)
    ctx.patch_hw, ctx.scope = patch.shape[3:], scope()


def _backward(ctx, grad_out):
    with in_scope(ctx.scope):
        grad_patch = _patch_apply_backward(grad_out.contiguous(), *ctx.saved_tensors, *ctx.patch_hw)
    return None, grad_patch, None, None, None, None


_patch_apply.register_autograd(_backward, setup_context=_setup_context)


def patch_apply(
    x: Tensor, patch: Tensor, rows: Tensor, cols: Tensor, mean: Tensor | None = None, std: Tensor | None = None
) -> Tensor:
    """Paste patch [K, B, C, h, w] at (rows, cols) into x [B, C, H, W] -> [K, B, C, H, W].

    rows, cols: integer [B] (the same corner for every candidate) or [K, B]; mean/std: [C] or None.
    Gradients flow to ``patch``.
    """
    k, b = patch.shape[:2]
    for name, t in (("rows", rows), ("cols", cols)):
        if t.shape not in ((b,), (k, b)) or t.is_floating_point():
            raise InputError(f"{name} must be integer [{b}] or [{k}, {b}], got {t.dtype} {list(t.shape)}")
    rows, cols = (t.long().expand(k, b).contiguous() for t in (rows, cols))
    mean, std = identity_stats(mean, std, x)
    return _patch_apply(x.contiguous(), patch.contiguous(), rows, cols, mean, std)
