"""trigger_apply: stamp K masked triggers onto a batch, ``normalize(x + sigmoid(m) * (p - x))``.

Custom ops ``baerase::trigger_apply`` and ``baerase::trigger_apply_backward``; contract (every
backend): inputs contiguous; x [B, C, H, W], mask_logits [K, 1|C, H, W] and pattern [K, C, H, W]
or [K, B, C, H, W] in any float dtype; mean/std fp32 [C]; fp32 math; the output in x's dtype and
each gradient in its tensor's dtype.
"""

from torch import Tensor

from .dispatch import in_scope, routed_op, scope
from .reference import identity_stats, trigger_apply_backward_ref, trigger_apply_ref


@routed_op("trigger_apply", "trigger_apply_fwd", size=lambda x, mask_logits, *_: mask_logits.shape[0] * x.numel())
def _trigger_apply(x: Tensor, mask_logits: Tensor, pattern: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return trigger_apply_ref(x, mask_logits, pattern, mean, std)


@routed_op("trigger_apply_backward", "trigger_apply_bwd")
def _trigger_apply_backward(
    grad_out: Tensor, x: Tensor, mask_logits: Tensor, pattern: Tensor, mean: Tensor, std: Tensor
) -> tuple[Tensor, Tensor]:
    return trigger_apply_backward_ref(grad_out, x, mask_logits, pattern, mean, std)


@_trigger_apply.register_fake
def _(x, mask_logits, pattern, mean, std):
    return x.new_empty((mask_logits.shape[0], *x.shape))


@_trigger_apply_backward.register_fake
def _(grad_out, x, mask_logits, pattern, mean, std):
    return mask_logits.new_empty(mask_logits.shape), pattern.new_empty(pattern.shape)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.scope = scope()


def _backward(ctx, grad_out):
    with in_scope(ctx.scope):
        grad_mask, grad_pattern = _trigger_apply_backward(grad_out.contiguous(), *ctx.saved_tensors)
    return None, grad_mask, grad_pattern, None, None


_trigger_apply.register_autograd(_backward, setup_context=_setup_context)


def trigger_apply(
    x: Tensor, mask_logits: Tensor, pattern: Tensor, mean: Tensor | None = None, std: Tensor | None = None
) -> Tensor:
    """``normalize(x + sigmoid(m) * (p - x))`` for K candidates: [B, C, H, W] -> [K, B, C, H, W].

    mask_logits: [K, 1|C, H, W]; pattern: [K, C, H, W] or [K, B, C, H, W]; mean/std: [C] or None
    (no normalisation). Gradients flow to ``mask_logits`` and ``pattern``.
    """
    mean, std = identity_stats(mean, std, x)
    return _trigger_apply(x.contiguous(), mask_logits.contiguous(), pattern.contiguous(), mean, std)
