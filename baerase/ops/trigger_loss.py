"""trigger_loss: per-row clipped target probability and cross-entropy from one softmax pass.

Custom ops ``baerase::trigger_loss`` and ``baerase::trigger_loss_backward``; contract (every
backend): logits [M, Kc] contiguous in any float dtype, target int64 [M]; hinge, nll and the
logsumexp the backward reuses are fp32 [M]; the logit gradient is in logits' dtype. The fast
backends never materialise the softmax matrix.
"""

import torch
from torch import Tensor

from .dispatch import in_scope, routed_op, scope
from .reference import trigger_loss_backward_ref, trigger_loss_ref


@routed_op("trigger_loss", "trigger_loss_fwd")
def _trigger_loss(logits: Tensor, target: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    hinge, nll = trigger_loss_ref(logits, target, beta)
    return hinge, nll, torch.logsumexp(logits.float(), -1)


@routed_op("trigger_loss_backward", "trigger_loss_bwd")
def _trigger_loss_backward(
    grad_hinge: Tensor, grad_nll: Tensor, logits: Tensor, target: Tensor, lse: Tensor, beta: float
) -> Tensor:
    return trigger_loss_backward_ref(grad_hinge, grad_nll, logits, target, lse, beta)


@_trigger_loss.register_fake
def _(logits, target, beta):
    return tuple(logits.new_empty(logits.shape[:1], dtype=torch.float32) for _ in range(3))


@_trigger_loss_backward.register_fake
def _(grad_hinge, grad_nll, logits, target, lse, beta):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, target, beta = inputs
    ctx.save_for_backward(logits, target, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.beta, ctx.scope = beta, scope()


def _backward(ctx, grad_hinge, grad_nll, _grad_lse):
    # Autograd hands zeros for an unused output and expanded (stride-0) gradients after a sum.
    with in_scope(ctx.scope):
        grad = _trigger_loss_backward(grad_hinge.contiguous(), grad_nll.contiguous(), *ctx.saved_tensors, ctx.beta)
    return grad, None, None


_trigger_loss.register_autograd(_backward, setup_context=_setup_context)


def trigger_loss(logits: Tensor, target: Tensor, beta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Per-row ``(min(softmax(logits)_t, beta), CE(logits, t))`` for logits [M, Kc], target [M].

    Both outputs are fp32 [M]; gradients flow to ``logits``.
    """
    hinge, nll, _ = _trigger_loss(logits.contiguous(), target.long().contiguous(), float(beta))
    return hinge, nll
